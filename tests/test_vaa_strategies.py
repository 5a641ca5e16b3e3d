"""The same 6 VAA steps (plain and perturbed) from the same seed in one process, under DDP on 2
workers, and under DeepSpeed ZeRO-2 and ZeRO-3 on 2 workers: the losses, q, ‖ε‖ and the norm of
the gradient each step took agree within 1e-4 relative (the README's claim). The gradient norm is
what catches a gradient off by a constant factor (AdamW and clipping would hide it in the losses)."""

import pandas as pd
import pytest
import ray
import torch

from jobs.models import save_model, tiny_llama, train_tokenizer
from jobs.train import make_optimizer, make_schedule
from jobs.vaa import GroupSampler, PlainBackend, train_vaa
from jobs.vaa_worker import batches_from, vaa_loop_per_worker

WORDS = ["red", "blue", "green", "moon", "tree", "rock", "sun", "rain", "sand", "wind", "fire", "snow"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vaa")
    texts = [f"<|user|> say {w} {'twice' if i % 2 else 'once'} <|assistant|> {w} {w}" for i, w in enumerate(WORDS)]
    tok = train_tokenizer(texts * 4, 200, tmp / "tok")
    torch.manual_seed(0)
    save_model(tiny_llama(dict(hidden=32, intermediate=64, layers=2, heads=2, max_len=64), tok), tok, tmp / "model")

    def rows(ids):  # targets of different lengths, so the token-weighted global mean matters
        return pd.DataFrame({
            "id": [f"a{i}" for i in ids],
            "prompt_ids": [[tok.bos_token_id] + tok(texts[i].split(" <|assistant|> ")[0] + " <|assistant|>",
                                                    add_special_tokens=False).input_ids for i in ids],
            "target_ids": [tok(" " + " ".join([WORDS[i]] * (1 + i % 3)), add_special_tokens=False).input_ids
                           + [tok.eos_token_id] for i in ids]})

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield tmp, tok, {"vulnerable": rows(range(0, 5)), "invulnerable": rows(range(5, 12))}
    ray.shutdown()


def _cfg(tmp, tok, strategy):
    # λ = 1 over E = 2 epochs of 3 steps: λ_t = t / 6, so the seed's coins give plain and perturbed steps.
    return {"model_dir": str(tmp / "model"), "strategy": strategy, "zero_stage": 2, "batch_size": 4, "epochs": 2,
            "steps_per_epoch": 3, "lr": 1e-2, "weight_decay": 0.1, "grad_clip": 1.0, "warmup": 0.0,
            "schedule": "constant", "seed": 2, "pad_id": tok.pad_token_id, "max_len": 64, "rho": 0.4, "lam": 1.0,
            "eta": 0.02, "q_clip": [0.1, 0.9], "q0": 0.5, "mode": "dro", "shuffle_buffer": 16, "threads": 1}


def _single(tmp, tok, frames):
    from jobs.models import load_model

    cfg = _cfg(tmp, tok, "single")
    torch.manual_seed(cfg["seed"])
    model = load_model(cfg["model_dir"])
    optimizer = make_optimizer(model, cfg)
    backend = PlainBackend(model, optimizer, make_schedule(optimizer, cfg, 6), 1.0)
    model.train()
    datasets = {k: ray.data.from_pandas(v) for k, v in frames.items()}
    return train_vaa(backend, batches_from(datasets, cfg), cfg, GroupSampler(cfg["seed"], q=0.5))


def _distributed(tmp, tok, frames, strategy, zero_stage, tmp_path):
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = {**_cfg(tmp, tok, strategy), "zero_stage": zero_stage}
    trainer = TorchTrainer(
        vaa_loop_per_worker, train_loop_config=cfg, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets={k: ray.data.from_pandas(v) for k, v in frames.items()},
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(name=f"vaa-{strategy}-{zero_stage}", storage_path=str(tmp_path)))
    return trainer.fit().return_value


def test_vaa_steps_agree_across_strategies(setup, tmp_path):
    tmp, tok, frames = setup
    single = _single(tmp, tok, frames)
    perturbed = [e > 0 for e in single["eps_norm"]]
    assert 0 < sum(perturbed) < 6, f"the steps should mix plain and perturbed steps: {single['eps_norm']}"
    assert [e for e in single["eps_norm"] if e] == pytest.approx([0.4] * sum(perturbed), rel=1e-5)
    assert len(set(single["group"])) == 2, "the steps should draw both groups for the test to mean much"
    runs = {"ddp": _distributed(tmp, tok, frames, "ddp", 2, tmp_path),
            "zero2": _distributed(tmp, tok, frames, "deepspeed", 2, tmp_path),
            "zero3": _distributed(tmp, tok, frames, "deepspeed", 3, tmp_path)}
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
