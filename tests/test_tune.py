"""The tune stage: a grid sweep interrupted by a Ctrl-C mid-trial, then by killing the driver
mid-sweep, resumes with Tune's restore; finished trials are not run again and every trial has
exactly one MLflow run. A sweep calibrates a defence; `tune.apply` sends the selection through
the attack grid."""

import json
import os
import signal

import psutil
import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from conftest import SMOKE, saferay
from orchestrator.spec import load_spec
from orchestrator.stages.align_sft import replicate_path
from orchestrator.store import StudyStore
from procs import kill_all, start_cli, wait_for

pytestmark = pytest.mark.slow
# Two trials, one at a time: the driver is killed once the first has reported, so the rerun must
# restore the sweep, keep the first trial's result and run only the second.
SWEEP = ("--set", "tune.enabled=true", "--set", "tune.max_concurrent_trials=1", "--set",
         "tune.space={vaa.rho: {type: grid, values: [0.4, 1.0]}, vulnerability.threshold: {type: grid, values: [1]}}")


def finished_trials(store) -> list:
    """Trial directories whose trial has reported its result."""
    return [d for d in store.glob("ray/smoke-tune-*/trial_*")
            if (d / "result.json").exists() and (d / "result.json").read_text().strip()]


def started_trials(store) -> dict:
    """Trial directory -> how many times its trial has started."""
    return {d.name: len((d / "started").read_text().splitlines())
            for d in store.glob("ray/smoke-tune-*/trial_*") if (d / "started").exists()}


def test_sweep_resumes_after_a_ctrl_c_and_after_the_driver_is_killed(smoke_store):
    # A Ctrl-C (SIGINT to the CLI's process group, as a terminal sends it) while the first trial trains.
    proc = start_cli("run", str(SMOKE), *SWEEP, "--store", str(smoke_store))
    try:
        wait_for(lambda: started_trials(smoke_store), timeout=600, what="started trial")
        started = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            kill_all(proc)
    assert proc.returncode == 130, out[-3000:]
    wait_for(lambda: not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
             timeout=60, what="the interrupted sweep's processes gone")
    state = json.loads((smoke_store / "studies/smoke/state.json").read_text())
    assert next(r for r in state["stages"] if r["name"] == "tune")["status"] == "interrupted"
    assert not finished_trials(smoke_store), "the sweep was interrupted in its first trial"
    assert [d for d in smoke_store.glob("ray/smoke-tune-*") if tune.Tuner.can_restore(str(d))], \
        "the interrupted sweep can be restored"

    # Then the driver killed once a trial has reported.
    proc = start_cli("run", str(SMOKE), *SWEEP, "--store", str(smoke_store))
    try:
        wait_for(lambda: finished_trials(smoke_store), timeout=600, what="finished trial")
    finally:
        kill_all(proc)
    done_before = {d.name for d in finished_trials(smoke_store)}
    starts_before = started_trials(smoke_store)
    assert len(done_before) == 1, done_before
    saferay("run", str(SMOKE), *SWEEP, store=smoke_store)

    s = json.loads(saferay("show", "smoke", "--json", store=smoke_store).stdout)
    t = s["tune"]
    assert t["trials"] == 2 and t["failed_trials"] == 0 and t["pareto"]
    assert t["selected"] is None or set(t["selected"]["config"]) == {"vaa.rho", "vulnerability.threshold"}
    assert t["baselines"]["sft"] and t["baselines"]["vaa"]
    for name, runs in started_trials(smoke_store).items():
        assert runs == starts_before[name] if name in done_before else runs >= 1, f"{name} ran {runs} times"
    client = MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    tune_runs = [r for r in client.search_runs([s["mlflow"]["experiment_id"]], max_results=5000)
                 if r.info.run_name == "tune" and r.data.tags.get("saferay.key")
                 == next(st["key"] for st in s["stages"] if st["name"] == "tune")]
    assert len(tune_runs) == 1, "the resumed stage reopens its run"
    trials = [r for r in client.search_runs([s["mlflow"]["experiment_id"]], max_results=5000)
              if r.data.tags.get("mlflow.parentRunId") == tune_runs[0].info.run_id]
    assert sorted(r.data.tags["saferay.trial"] for r in trials) == sorted({r.data.tags["saferay.trial"] for r in trials})
    assert len(trials) == 2 and all({"vaa.rho", "vulnerability.threshold"} <= set(r.data.params) for r in trials)
    assert {a.path for a in client.list_artifacts(tune_runs[0].info.run_id, "plots")} == {"plots/pareto.png"}


def test_a_sweep_calibrates_a_defence_on_validation(smoke_store):
    """`tune.model: vaccine`: each trial aligns with Vaccine at its ρ (not VAA), attacks and
    evaluates on validation; only the tune stage runs again."""
    grid = "tune.space={defences.vaccine.rho: {type: grid, values: [0.5, 4.0]}}"
    saferay("run", str(SMOKE), "--set", "tune.enabled=true", "--set", "tune.model=vaccine", "--set", grid,
            store=smoke_store)
    s = json.loads(saferay("show", "smoke", "--json", store=smoke_store).stdout)
    t = s["tune"]
    assert t["model"] == "vaccine" and t["trials"] == 2 and t["failed_trials"] == 0
    assert set(t["baselines"]) == {"sft", "vaccine"} and t["baselines"]["sft"]
    assert t["baselines"]["vaccine"] is None, "the smoke study does not attack Vaccine"
    key = next(st["key"] for st in s["stages"] if st["name"] == "tune")
    runs = {p.name for p in smoke_store.glob(f"ray/smoke-tune-{key}-*")}
    assert len([r for r in runs if r.endswith("-vaccine")]) == 2 and not [r for r in runs if r.endswith("-vaa")], runs
    assert all(st["status"] == "cached" for st in s["stages"] if st["name"] != "tune")
    assert t["pareto"] and all(set(p["config"]) == {"defences.vaccine.rho"} for p in t["pareto"])


def test_apply_trains_the_selection_and_attacks_it_beside_the_others(smoke_store):
    """`tune.apply`: the selected configuration is trained once per seed as `vaa-tuned`, which the
    attack grid, the table and the paired differences against SFT then include. The sweep's one
    trial is the spec's own VAA, so everything it feeds has a known answer: the tuned models are
    align_vaa's, bit for bit, every seed; their attack rows are VAA's; the trial's validation
    numbers are the stage's own VAA baseline (attacked from the attack stage's draws)."""
    rho = load_spec(SMOKE).vaa.rho
    saferay("run", str(SMOKE), "--set", "tune.enabled=true", "--set", "tune.apply=true",
            "--set", "tune.delta=1.0", "--set", f"tune.space={{vaa.rho: {{type: grid, values: [{rho}]}}}}",
            store=smoke_store)
    s = json.loads(saferay("show", "smoke", "--json", store=smoke_store).stdout)
    status = {st["name"]: st["status"] for st in s["stages"]}
    assert {n: status[n] for n in ("data", "base", "align_sft", "vulnerability", "align_vaa", "debias")} == dict.fromkeys(
        ("data", "base", "align_sft", "vulnerability", "align_vaa", "debias"), "cached"), status
    assert status["tune"] == status["attack"] == status["evaluate"] == "complete", status

    t = s["tune"]
    assert t["selected"]["config"] == {"vaa.rho": rho} and set(t["applied"]) == {"vaa-tuned"}
    trial = t["pareto"][0]
    assert (trial["hs"], trial["fa"]) == (t["baselines"]["vaa"]["hs"], t["baselines"]["vaa"]["fa"])

    store = StudyStore(smoke_store, "smoke")
    key = {st["name"]: st["key"] for st in s["stages"]}
    for seed, first in ((0, True), (1, False)):
        tuned = store.stage_dir("tune", key["tune"]) / replicate_path("vaa-tuned", seed, first) / "model.safetensors"
        vaa = store.stage_dir("align_vaa", key["align_vaa"]) / replicate_path("vaa", seed, first) / "model.safetensors"
        assert tuned.read_bytes() == vaa.read_bytes(), f"seed {seed}: vaa-tuned is not the spec's VAA"

    rows = {(r["model"], r["p"]): r for r in s["attack"]}
    for p in load_spec(SMOKE).attack.ratios:
        assert {k: rows[("vaa-tuned", p)][k] for k in ("hs", "fa", "hs_by_seed")} == \
            {k: rows[("vaa", p)][k] for k in ("hs", "fa", "hs_by_seed")}, f"p={p}"
    against_sft = {(c["p"], c["metric"]) for c in s["comparisons"] if c["a"] == "vaa-tuned" and c["b"] == "sft"}
    assert against_sft == {(c["p"], c["metric"]) for c in s["comparisons"] if c["a"] == "vaa" and c["b"] == "sft"}
    assert against_sft and "vaa-tuned" in s["models"]
