"""The same 6 VAA steps (plain and perturbed) from the same seed through the one training loop:
in one process, and on Ray Train under DDP on 2 workers and DeepSpeed ZeRO-2 and ZeRO-3 on 2
workers. The losses, q, ‖ε‖ and the norm of the gradient each step took agree within 1e-4
relative (the README's claim). The gradient norm is what catches a gradient off by a constant
factor (AdamW and clipping would hide it in the losses)."""

import pandas as pd
import pytest
import ray
import torch

from jobs.backends import prepare_strategy
from jobs.launch import controller_env, fit
from jobs.models import load_model, save_model, tiny_llama, train_tokenizer
from jobs.steps import make_step
from jobs.train_loop import row_streams, run_epochs

WORDS = ["red", "blue", "green", "moon", "tree", "rock", "sun", "rain", "sand", "wind", "fire", "snow"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vaa")
    texts = [f"<|user|> say {w} {'twice' if i % 2 else 'once'} <|assistant|> {w} {w}" for i, w in enumerate(WORDS)]
    tok = train_tokenizer(texts * 4, 200, tmp / "tok")
    torch.manual_seed(0)
    save_model(tiny_llama(dict(hidden=32, intermediate=64, layers=2, heads=2, max_len=64), tok), tok, tmp / "model")

    # Targets of different lengths, so the token-weighted global mean matters.
    rows = pd.DataFrame({
        "id": [f"a{i:02d}" for i in range(len(WORDS))],
        "prompt_ids": [[tok.bos_token_id] + tok(t.split(" <|assistant|> ")[0] + " <|assistant|>",
                                                add_special_tokens=False).input_ids for t in texts],
        "target_ids": [tok(" " + " ".join([w] * (1 + i % 3)), add_special_tokens=False).input_ids + [tok.eos_token_id]
                       for i, w in enumerate(WORDS)],
        "group": ["vulnerable"] * 5 + ["invulnerable"] * 7})
    rows.to_parquet(tmp / "rows.parquet")
    # The controller poll a study sets (jobs/launch.py): each run ends ~2 s sooner.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": controller_env()})
    yield tmp, tok, rows
    ray.shutdown()


def _cfg(tmp, tok, strategy, zero_stage=2):
    # λ = 1 over E = 2 epochs of 3 steps: λ_t = t / 6, so the seed's coins give plain and perturbed steps.
    return {"model_dir": str(tmp / "model"), "data": str(tmp / "rows.parquet"), "strategy": strategy,
            "zero_stage": zero_stage, "num_workers": 2, "cpus_per_worker": 1, "batch_size": 4, "epochs": 2,
            "steps_per_epoch": 3, "lr": 1e-2, "weight_decay": 0.1, "grad_clip": 1.0, "warmup": 0.0,
            "schedule": "constant", "seed": 2, "pad_id": tok.pad_token_id, "max_len": 64, "threads": 1,
            "step": "vaa", "step_config": {"rho": 0.4, "lam": 1.0, "eta": 0.02, "q_clip": [0.1, 0.9], "q0": 0.5,
                                           "mode": "dro"}}


def single_process(cfg: dict, rows: pd.DataFrame) -> dict:
    """The loop in this process (no Ray Train): the reference every strategy is compared with."""
    torch.manual_seed(cfg["seed"])
    backend = prepare_strategy(cfg, load_model(cfg["model_dir"]), cfg["batch_size"], 1,
                               cfg["steps_per_epoch"] * cfg["epochs"], distributed=False)
    backend.model.train()
    return run_epochs(backend, make_step(cfg, cfg["steps_per_epoch"]), row_streams(rows), cfg, cfg["steps_per_epoch"])


def test_vaa_steps_agree_across_strategies(setup, tmp_path):
    tmp, tok, rows = setup
    single = single_process(_cfg(tmp, tok, "ddp"), rows)
    perturbed = [e > 0 for e in single["eps_norm"]]
    assert 0 < sum(perturbed) < 6, f"the steps should mix plain and perturbed steps: {single['eps_norm']}"
    assert [e for e in single["eps_norm"] if e] == pytest.approx([0.4] * sum(perturbed), rel=1e-5)
    assert len(set(single["group"])) == 2, "the steps should draw both groups for the test to mean much"
    runs = {"ddp": fit(_cfg(tmp, tok, "ddp"), "vaa-ddp", tmp_path),
            "zero2": fit(_cfg(tmp, tok, "deepspeed", 2), "vaa-zero2", tmp_path),
            "zero3": fit(_cfg(tmp, tok, "deepspeed", 3), "vaa-zero3", tmp_path)}
    for name, run in runs.items():
        compared = ("loss", "q", "grad_norm")
        worst = max(abs(a - b) / abs(b) for k in compared for a, b in zip(run[k], single[k]))
        print(f"{name}: groups {run['group']}, largest relative difference from one process {worst:.1e}")
        assert run["group"] == single["group"], name
        assert [e > 0 for e in run["eps_norm"]] == perturbed, name
        for key in (*compared, "eps_norm"):
            assert run[key] == pytest.approx(single[key], rel=1e-4), (name, key)
    # The steps moved the model: later losses differ from the first.
    assert len({round(v, 6) for v in single["loss"]}) == 6
