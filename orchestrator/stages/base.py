"""The base stage: the tiny Llama pretrained on SafetyWorld's unaligned mixture (a Ray Train run),
or a pretrained causal LM by path or hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import StudySpec
from orchestrator.stage import StageContext, StageResult, TrainedModel, ray_progress, run_name, scaling, train_summary

NAME = "base"
VERSION = 2  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ('data',)


@dataclass(kw_only=True)
class Result(StageResult, TrainedModel):
    """The base model: pretrained here (`model` inside the stage, with its training summary), or
    a pretrained source by path or hub id (`model` as given, `model_in_stage` false)."""

    model_in_stage: bool = True

    def path(self, location: str, seed: int | None = None) -> str:
        return super().path(location) if self.model_in_stage else self.model

    def trained_models(self, location: str, seed: int | None = None) -> dict[str, str]:
        return {"base": self.path(location)}  # shared by every seed


def config(spec: StudySpec) -> dict:
    if spec.model.source != "tiny":
        return {"source": spec.model.source}
    return {"source": "tiny", "tiny": spec.model.tiny.model_dump(), "train": spec.base.model_dump(), "seed": spec.seed}


def resources(spec: StudySpec) -> str:
    return scaling(spec.base) if spec.model.source == "tiny" else "none (pretrained)"


def shown(result: Result, location: str) -> dict:
    return {"training": {NAME: result.training()}} if result.final_loss is not None else {}


def run(ctx: StageContext) -> Result:
    from jobs.models import check_vocab, load_tokenizer
    from jobs.recipes import pretrain_tiny
    from jobs.storage import join

    spec = ctx.spec
    data_dir = ctx.input_dir("data")
    if spec.model.source != "tiny":
        check_vocab(spec.model.source, load_tokenizer(data_dir / "tokenizer"), spec.model.source)
        return Result(model=spec.model.source, model_in_stage=False)
    ctx.progress(f"pretraining on Ray Train ({spec.base.num_workers} worker(s))")
    data = ctx.input_location("data")
    history = pretrain_tiny(data, join(data, "tokenizer"), spec.model.tiny.model_dump(), spec.base.model_dump(),
                            spec.seed, ctx.output("model"), run_name(ctx, "base"), str(ctx.ray_storage),
                            ray_progress(ctx, "base"))
    ctx.tracker.log_series(ctx.run_id, "train/loss", history["loss"])
    return Result(model="model", **train_summary(history))
