"""The steps the training loop (`jobs/train_loop.py`) can take, by name.

A step decides which named stream of rows its next global batch comes from (`choose`), takes
one optimizer step on it through the strategy's backend (`take`, returning the values the run's
history records: at least `loss` and `grad_norm`), and carries any state of its own across a
checkpoint (`state` / `load`; torch tensors go under the key `tensors`). A step that needs a
batch of several streams at once (Booster, RepNoise) returns their names from `choose` and takes
dicts of batches and token counts by stream name. A new algorithm (a defence of SCIENCE.md §9)
is one class in one `jobs/` file and one line in `STEPS`.
"""

from __future__ import annotations

from typing import Callable

from jobs.backends import PlainBackend
from jobs.defences import DEFENCE_STEPS
from jobs.vaa import VAAStep


class SFTStep:
    """Supervised fine-tuning: every batch from the whole set, one forward and backward."""

    streams = ("all",)

    def __init__(self, cfg: dict, steps_per_epoch: int):
        pass

    def choose(self, t: int) -> str:
        return "all"

    def take(self, backend: PlainBackend, batch: dict, n_tokens: int, sum_ranks: Callable[[float], float]) -> dict:
        loss = backend.forward(batch, n_tokens)
        backend.backward(loss)
        return {"loss": sum_ranks(loss.item()), "grad_norm": backend.step()}

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass


STEPS = {"sft": SFTStep, "vaa": VAAStep, **DEFENCE_STEPS}


def make_step(cfg: dict, steps_per_epoch: int):
    """The step cfg['step'] names (default SFT), configured from cfg['step_config']."""
    name = cfg.get("step", "sft")
    if name not in STEPS:
        raise ValueError(f"step '{name}' is not one of {sorted(STEPS)}")
    return STEPS[name]({**cfg.get("step_config", {}), "seed": cfg["seed"], "epochs": cfg["epochs"],
                        "batch_size": cfg["batch_size"]}, steps_per_epoch)
