"""Epoch checkpoints of a training run (resume through `ray.train.report` /
`ray.train.get_checkpoint`), and trained weights written as a plain Hugging Face model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from jobs.backends import PlainBackend, ZeroBackend
from jobs.models import apply_lora, load_model, load_tokenizer, save_model

DS_TAG = "ckpt"
STEP_TENSORS = "step_tensors.pt"  # a step's tensor state (Lisa's anchor weights), beside the JSON


def checkpoint_meta() -> dict | None:
    """The last checkpoint's description ({"run", "epoch", "extra"}), None when there is none."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / "meta.json").read_text())


def resume(backend: PlainBackend) -> tuple[int, dict]:
    """The epoch to start from and the extra state saved with the last checkpoint, whose weights
    and optimizer state are loaded into `backend`."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, {}
    with checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
        if isinstance(backend, ZeroBackend):
            backend.engine.load_checkpoint(d, tag=DS_TAG)
        else:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
            backend.module.load_state_dict(state["model"])
            backend.optimizer.load_state_dict(state["optimizer"])
            backend.schedule.load_state_dict(state["schedule"])
        extra = meta.get("extra", {})
        if (Path(d) / STEP_TENSORS).exists():
            extra["step"]["tensors"] = torch.load(Path(d) / STEP_TENSORS, map_location="cpu", weights_only=True)
    return meta["epoch"] + 1, extra


def report_epoch(epoch: int, metrics: dict, rank: int, backend: PlainBackend, run: int, extra: dict) -> None:
    """Report the epoch's metrics with a checkpoint a restarted worker group resumes from (`run`:
    which of the group's runs it belongs to);
    `extra` (JSON) carries what the run needs to continue exactly: its history, the step's state
    (whose `tensors`, if any, are saved by rank 0: steps that keep tensors hold whole weights)."""
    import ray.train

    step = dict(extra.get("step", {}))
    tensors = step.pop("tensors", None)
    extra = {**extra, "step": step}
    deepspeed = isinstance(backend, ZeroBackend)
    with tempfile.TemporaryDirectory() as d:
        if deepspeed:  # every rank writes its partition; Ray merges the directories
            backend.engine.save_checkpoint(d, tag=DS_TAG)
        elif rank == 0:
            torch.save({"model": backend.module.state_dict(), "optimizer": backend.optimizer.state_dict(),
                        "schedule": backend.schedule.state_dict()}, Path(d) / "state.pt")
        if rank == 0 and tensors is not None:
            torch.save([t.detach().cpu() for t in tensors], Path(d) / STEP_TENSORS)
        if rank == 0:
            (Path(d) / "meta.json").write_text(json.dumps({"run": run, "epoch": epoch, "deepspeed": deepspeed, "extra": extra}))
        has_files = deepspeed or rank == 0
        ray.train.report({"epoch": epoch, **metrics},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)


def save_trained(state: dict, base_model_dir: str, tokenizer_dir: str, out_dir: str, lora: dict | None = None) -> None:
    """Trained weights (a full state dict of the model as trained, LoRA adapters included) written
    as a plain Hugging Face model directory, adapters merged."""
    model = load_model(base_model_dir)
    if lora and lora.get("enabled"):
        model = apply_lora(model, lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings appear once in a gathered state; anything else missing is a real error.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"trained weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if lora and lora.get("enabled"):
        model = model.merge_and_unload()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    save_model(model, load_tokenizer(tokenizer_dir), out_dir)


def export_model(backend: PlainBackend, cfg: dict, rank: int, out_dir: str) -> None:
    """The model as it is now, saved by rank 0 at `out_dir` (a path or a store location; a
    collective under ZeRO-3: every rank calls it)."""
    from jobs.storage import writing

    state = backend.full_state_dict(rank)
    if rank == 0:
        with writing(out_dir) as d:  # a store location: written here, then put there
            save_trained(state, cfg["model_dir"], cfg.get("tokenizer_dir") or cfg["model_dir"], d, cfg.get("lora"))
