"""The tune stage's search set-up against real Ray Tune with a trivial trainable: Optuna's
multi-objective search and random search over spec-style dotted keys, the Pareto front and the
selection rule."""

import pytest
import ray
from ray import tune

from orchestrator.spec import load_spec
from orchestrator.stages.tune import _searcher, pareto_front, search_space, select

from conftest import ROOT


def fake_trial(config):
    # HS falls and FA falls with ρ: a trade-off with a known front.
    tune.report({"hs": 1.0 - config["vaa.rho"] / 2, "fa": 1.0 - config["vaa.rho"] ** 2 / 4})


@pytest.fixture(scope="module")
def local_ray():
    # Trial workers import this module (its trainable) by path, like the study's workers import jobs/.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    yield
    ray.shutdown()


@pytest.mark.parametrize("search", ["optuna", "random"])
def test_search_runs_trials_over_dotted_keys(local_ray, tmp_path, search):
    spec = load_spec(ROOT / "studies" / "demo.yaml", [
        f"tune.search={search}", "tune.num_samples=4",
        "tune.space={vaa.rho: {type: uniform, low: 0.1, high: 2.0}}"])
    tuner = tune.Tuner(tune.with_resources(fake_trial, {"cpu": 0.5}), param_space=search_space(spec),
                       tune_config=tune.TuneConfig(num_samples=4, search_alg=_searcher(spec), max_concurrent_trials=2),
                       run_config=tune.RunConfig(name=f"search-{search}", storage_path=str(tmp_path), verbose=0))
    rows = [{"hs": r.metrics["hs"], "fa": r.metrics["fa"], "config": r.config} for r in tuner.fit()]
    assert len(rows) == 4 and all(0.1 <= r["config"]["vaa.rho"] <= 2.0 for r in rows)
    assert len(pareto_front(rows)) == 4  # a strict trade-off: nobody dominates anybody


def test_pareto_and_selection_rule():
    rows = [{"hs": 0.5, "fa": 0.9}, {"hs": 0.4, "fa": 0.95}, {"hs": 0.3, "fa": 0.80}, {"hs": 0.6, "fa": 0.99}]
    assert pareto_front(rows) == [rows[2], rows[1], rows[3]]  # (0.5, 0.9) is dominated by (0.4, 0.95)
    assert select(rows, baseline_fa=1.0, delta=0.02) == rows[3]
    assert select(rows, baseline_fa=1.0, delta=0.06) == rows[1]
    assert select(rows, baseline_fa=1.0, delta=0.0) is None
