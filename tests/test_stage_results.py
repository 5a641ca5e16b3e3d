"""Stage results are typed (orchestrator/stage.py::StageResult): what a stage returns is what its
result.json holds and what the next stage reads back, through its class, never by key."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.stage import StageContext
from orchestrator.stages import BY_NAME, STAGES, align_defences, align_sft, align_vaa, attack, base, vulnerability

ROOT = Path(__file__).resolve().parent.parent


def trained(name: str) -> dict:
    return {"model": f"{name}/model", "replicates": {"0": f"{name}/model", "1": f"{name}/seed1/model"}}


def test_every_stage_declares_its_result_type():
    assert all(s.result.__module__ == f"orchestrator.stages.{s.name}" for s in STAGES)


def test_results_round_trip_through_their_json_and_ignore_keys_they_lack(tmp_path):
    results = [
        base.Result(model="model", steps=3, final_loss=2.5),
        align_sft.Result(model="model", replicates={"0": "model", "1": "seed1/model"}, strategy="ddp", rows=10),
        align_vaa.Result(enabled=True, strategy="ddp", groups={"vulnerable": 4, "invulnerable": 6},
                         variants={"vaa": align_vaa.Variant(mode="dro", q0=0.5, **trained("vaa"))}),
        align_defences.Result(defences={"vaccine": align_defences.Defence(knobs={"rho": 2.0},
                                                                          **trained("vaccine"))}),
        attack.Result(cells=[attack.Cell(model="sft", task="sentiment", p=0.1, seed=1, name="c", dir="cells/c/model",
                                         steps=4)]),
        vulnerability.Result(groups_file="groups.csv", stats_file="stats.json", n=10, fraction_vulnerable=0.3),
    ]
    for r in results:
        again = type(r).from_json({**r.to_json(), "written_by_an_older_version": 1})
        assert again == r, type(r)


def test_a_stage_finds_the_models_its_inputs_trained_by_seed(tmp_path):
    dirs = {n: tmp_path / n for n in ("data", "base", "align_sft", "align_vaa", "align_defences", "attack", "evaluate")}
    inputs = {
        "data": BY_NAME["data"].result(splits={"align_train": 10}),
        "base": base.Result(model="model"),
        "align_sft": align_sft.Result(**trained("sft")),
        "align_vaa": align_vaa.Result(enabled=True, variants={"vaa": align_vaa.Variant(mode="dro", **trained("vaa"))}),
        "align_defences": align_defences.Result(defences={"booster": align_defences.Defence(**trained("booster"))}),
        "attack": attack.Result(cells=[attack.Cell(model="sft", task="t", p=0.1, seed=1, name="c", dir="cells/c/model")]),
        # Rates per model (a field called `models`), which the tune stage needs: not models it trained.
        "evaluate": BY_NAME["evaluate"].result(judge="world", models={"sft": {"hs": 0.5}}),
    }
    ctx = StageContext(spec=None, key="k", out=tmp_path / "out", inputs={n: (dirs[n], r) for n, r in inputs.items()},
                       tracker=None, run_id="r", ray_storage=tmp_path)
    assert ctx.models(1) == {"base": str(dirs["base"] / "model"), "sft": str(dirs["align_sft"] / "sft/seed1/model"),
                             "vaa": str(dirs["align_vaa"] / "vaa/seed1/model"),
                             "booster": str(dirs["align_defences"] / "booster/seed1/model")}
    assert ctx.models()["vaa"] == str(dirs["align_vaa"] / "vaa/model")  # the first seed's
    assert {m: ctx.trained_by(m) for m in ("base", "sft", "vaa", "booster")} == {
        "base": "base", "sft": "align_sft", "vaa": "align_vaa", "booster": "align_defences"}
    assert list(inputs["attack"].cells_of("sft", 0.1, 1)) == ["t"] and not inputs["attack"].cells_of("sft", 0.1, 0)


def test_no_module_reads_a_stage_result_by_key():
    """The rule the typed results exist for: `input_result(...)` is read through its class."""
    by_key = re.compile(r"input_result\([^)]*\)(\[|\.get\()")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "orchestrator").rglob("*.py") if by_key.search(p.read_text())]
    assert not offenders
