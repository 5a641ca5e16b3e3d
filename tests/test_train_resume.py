"""A Ray Train run resumed from its checkpoints returns the whole run's history.

A driver killed after a run's final epoch checkpoint leaves a run with no step left; the next
`saferay run` resumes it (same run name, same storage) and must get the same history back as the
uninterrupted run, not an empty one (which left such a study unable to resume, ever)."""

import pandas as pd
import ray
from test_vaa_strategies import _cfg, setup  # noqa: F401 (the tiny model, tokenizer, Ray session)

from jobs.train_worker import train_loop_per_worker
from jobs.vaa_worker import vaa_loop_per_worker


def _fit(loop, cfg, datasets, name, storage, split):
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config=cfg, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets={k: ray.data.from_pandas(v) for k, v in datasets.items()},
        dataset_config=DataConfig(datasets_to_split="all" if split else []),
        run_config=RunConfig(name=name, storage_path=str(storage)))
    return trainer.fit().return_value


def test_sft_run_resumed_from_its_final_checkpoint_returns_its_history(setup, tmp_path):  # noqa: F811
    tmp, tok, frames = setup
    rows = pd.concat(frames.values(), ignore_index=True)
    cfg = {**_cfg(tmp, tok, "ddp"), "rows": len(rows), "epochs": 2}
    first = _fit(train_loop_per_worker, cfg, {"train": rows}, "sft", tmp_path, split=True)
    again = _fit(train_loop_per_worker, cfg, {"train": rows}, "sft", tmp_path, split=True)
    assert first["start_epoch"] == 0 and again["start_epoch"] == 2, "the second fit should resume past the end"
    assert len(first["losses"]) == first["steps"] == 2 * ((len(rows) // 2) // 2)
    assert again["losses"] == first["losses"] and again["steps"] == first["steps"]
    assert again["tokens_per_rank"] == first["tokens_per_rank"]


def test_vaa_run_resumed_from_its_final_checkpoint_returns_its_trajectory(setup, tmp_path):  # noqa: F811
    tmp, tok, frames = setup
    cfg = _cfg(tmp, tok, "ddp")
    first = _fit(vaa_loop_per_worker, cfg, frames, "vaa", tmp_path, split=False)
    again = _fit(vaa_loop_per_worker, cfg, frames, "vaa", tmp_path, split=False)
    assert again["start_epoch"] == cfg["epochs"]
    for key in ("loss", "q", "group", "lambda", "eps_norm", "tokens_per_rank", "steps"):
        assert again[key] == first[key], key
    assert first["steps"] == cfg["epochs"] * cfg["steps_per_epoch"]
    assert 0 < again["seconds"] <= first["seconds"], "the time spent before the restart counts"
