"""Every kind of fine-tune of a study runs on Ray Train through the one loop, in every strategy:
an attack cell and a proxy run (with its intermediate checkpoints) under 2-worker DDP and
2-worker ZeRO-2 give the same losses, and an attack cell with LoRA moves only the adapted
weights. (Pretraining, SFT, VAA and the over-aligned model run the same loop in the smoke study;
tests/test_study.py::test_alignment_strategies runs alignment under ZeRO-2/3 and LoRA, and
tests/test_tune.py a sweep whose trials train on Ray Train.)"""

import pytest
import ray
import torch
from safetensors.torch import load_file

from jobs.launch import controller_env
from jobs.recipes import attack_cell, proxy_run

pytestmark = pytest.mark.slow
DDP = {"strategy": "ddp", "num_workers": 2, "cpus_per_worker": 1}
ZERO2 = {"strategy": "deepspeed", "zero_stage": 2, "num_workers": 2, "cpus_per_worker": 1}
TRAIN = {"epochs": 1, "lr": 1e-3, "batch_size": 8, "weight_decay": 0.0, "warmup": 0.0, "schedule": "constant",
         "grad_clip": 1.0, "lora": {"enabled": False}}


@pytest.fixture(scope="module")
def study(smoke_store):
    stages = smoke_store / "studies/smoke/stages"
    data = next((stages / "data").iterdir())
    sft = next(p for p in (stages / "align_sft").iterdir() if (p / "model").exists()) / "model"
    # The controller poll a study sets (jobs/launch.py): each run ends ~2 s sooner.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": controller_env()})
    yield str(data), str(sft)
    ray.shutdown()


def test_attack_cell_under_ddp_zero2_and_lora(study, tmp_path):
    data, sft = study
    runs = {}
    for name, scaling in (("ddp", DDP), ("zero2", ZERO2)):
        runs[name] = attack_cell(sft, data, "sentiment", 0.1, 48, {**TRAIN, **scaling}, 3, 96, str(tmp_path / name),
                                 f"cell-{name}", str(tmp_path / "ray"))
        assert (tmp_path / name / "model" / "model.safetensors").exists()
    assert runs["ddp"]["harmful_examples"] == runs["zero2"]["harmful_examples"] == 5
    assert runs["ddp"]["steps"] == 6
    assert runs["zero2"]["loss"] == pytest.approx(runs["ddp"]["loss"], rel=1e-4)
    assert runs["zero2"]["grad_norm"] == pytest.approx(runs["ddp"]["grad_norm"], rel=1e-4)

    lora = {**TRAIN, "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    attack_cell(sft, data, "sentiment", 0.1, 48, lora, 3, 96, str(tmp_path / "lora"), "cell-lora", str(tmp_path / "ray"))
    before, after = load_file(f"{sft}/model.safetensors"), load_file(tmp_path / "lora/model/model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), sorted(moved)[:4]


def test_proxy_run_saves_its_checkpoints_in_every_strategy(study, tmp_path):
    data, sft = study
    runs = {name: proxy_run(sft, data, "topic", 0.1, 48, {**TRAIN, **scaling, "epochs": 2}, 5, 96, 3, (0, 2),
                            str(tmp_path / name), f"proxy-{name}", str(tmp_path / "ray"))
            for name, scaling in (("ddp", DDP), ("zero2", ZERO2))}
    for name, run in runs.items():
        assert [c["step"] for c in run["checkpoints"]] == [4, 8, 12], name
        weights = [load_file(tmp_path / name / c["dir"] / "model.safetensors") for c in run["checkpoints"]]
        assert not torch.equal(weights[0]["model.norm.weight"], weights[-1]["model.norm.weight"]), "the run moved"
    assert runs["zero2"]["loss"] == pytest.approx(runs["ddp"]["loss"], rel=1e-4)
    last = {n: load_file(tmp_path / n / "ckpt-03" / "model.safetensors") for n in runs}
    for k, v in last["ddp"].items():
        assert torch.allclose(last["zero2"][k], v, rtol=1e-3, atol=1e-5), k


def test_a_tune_trials_vaa_run_under_ddp_zero2_and_lora(study, tmp_path):
    """A Tune trial's own fine-tune (jobs/tune_trial.py::vaa_run, then `fit`, as `trial` does)
    takes align_sft's scaling: under 2-worker DDP and ZeRO-2 the same losses and q; with LoRA only
    the adapted weights move. (Its attack cells are `attack_cell`, tested above.)"""
    from pathlib import Path

    import pandas as pd

    from conftest import ROOT
    from jobs.launch import fit
    from jobs.models import load_tokenizer
    from jobs.recipes import alignment_mix
    from jobs.tune_trial import vaa_run
    from orchestrator.spec import load_spec

    data, _ = study
    spec = load_spec(ROOT / "studies/smoke.yaml")
    stages = Path(data).parent.parent  # the smoke study's stages
    base = str(next(p for p in (stages / "base").iterdir() if (p / "model").exists()) / "model")
    groups = pd.read_csv(next((stages / "vulnerability").glob("*/groups.csv")))
    mix = alignment_mix(data, True, spec.align_sft.benign_per_task, 0).merge(
        groups[["id", "forgot_total"]], on="id", how="left")
    mix.to_parquet(tmp_path / "mix.parquet")
    fixed = {"mix": str(tmp_path / "mix.parquet"), "base": base, "tokenizer": f"{data}/tokenizer",
             "pad_id": load_tokenizer(f"{data}/tokenizer").pad_token_id, "vaa": spec.vaa.model_dump(mode="json"),
             "threshold": 0.0, "seed": 0, "max_len": spec.model.tiny.max_len}
    align = {**spec.align_sft.model_dump(), "epochs": 1}
    runs = {}
    for name, scaling in (("ddp", DDP), ("zero2", ZERO2),
                          ("lora", {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                                             "target_modules": ["q_proj", "v_proj"]}})):
        (tmp_path / name).mkdir()
        cfg, notes = vaa_run({"vaa.rho": 0.4, "vaa.epochs": 1}, {**fixed, "align": {**align, **scaling}}, tmp_path / name)
        assert "error" not in notes, notes
        assert cfg["strategy"] == scaling.get("strategy", align["strategy"]), name
        runs[name] = fit(cfg, f"trial-{name}", str(tmp_path / "ray"))
    assert runs["zero2"]["loss"] == pytest.approx(runs["ddp"]["loss"], rel=1e-4)
    assert runs["zero2"]["q"] == pytest.approx(runs["ddp"]["q"], rel=1e-4) and len(set(runs["ddp"]["q"])) > 1
    before, after = load_file(f"{base}/model.safetensors"), load_file(tmp_path / "lora/aligned/model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), sorted(moved)[:4]
