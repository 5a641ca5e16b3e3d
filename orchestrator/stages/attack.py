"""The attack stage: every (model, task, p, seed) cell a harmful fine-tune on Ray Train, a bounded
number at a time (SCIENCE.md §6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.spec import LISA, StudySpec
from orchestrator.stage import (StageContext, StageResult, TrainingSummary, ray_progress, run_bounded, run_name,
                                scaling, train_summary, with_tuned)

NAME = "attack"
VERSION = 2  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ('data', 'base', 'align_sft', 'align_vaa', 'align_defences')


# How the cells are scheduled, which changes no cell's result (so not the stage's key).
SCHEDULING = {"max_concurrent", "cells_per_group"}


def needs(spec: StudySpec) -> tuple[str, ...]:
    return with_tuned(NEEDS, spec)  # the model tune.apply trains


@dataclass(kw_only=True)
class Cell(TrainingSummary):
    """One attacked model: `model` fine-tuned on `task` with a fraction `p` of harmful examples,
    from seed `seed`; its weights at `dir` in the stage."""

    model: str  # the aligned model it attacked (`<model>+lisa`: under Lisa)
    task: str
    p: float
    seed: int
    name: str
    dir: str
    run_id: str | None = None
    harmful_examples: int | None = None

    def path(self, location: str) -> str:
        from jobs.storage import join

        return join(location, self.dir)


@dataclass(kw_only=True)
class Result(StageResult):
    cells: list[Cell] = field(default_factory=list)

    def cells_of(self, model: str, p: float, seed: int) -> dict[str, Cell]:
        """The cells that attacked `model` at `p` from `seed`, by task."""
        return {c.task: c for c in self.cells if c.model == model and c.p == p and c.seed == seed}


def config(spec: StudySpec) -> dict:
    lisa = {"lisa": spec.defences.lisa.model_dump()} if any(m.endswith(LISA) for m in spec.attack.models) else {}
    # The poison changes only for a study that sets harmful rows aside for its defences.
    aside = {"harmful_aside": spec.defences.harmful_rows} if spec.defences.harmful_rows else {}
    return {"attack": spec.attack.model_dump(exclude=SCHEDULING), "seed": spec.seed, "seeds": spec.replicates,
            "max_len": spec.model.tiny.max_len, **lisa, **aside}


def attack_cells(spec: StudySpec) -> list[dict]:
    """model × task × p, once per seed: cells of different models with the same seed draw the same
    task and harmful examples in the same order (paired comparisons)."""
    tag = (lambda s: f"__s{s}") if len(spec.replicates) > 1 else (lambda s: "")
    return [{"model": m, "task": t, "p": p, "seed": s, "name": f"{m}__{t}__p{p:g}{tag(s)}"}
            for s in spec.replicates for m in spec.attack.models for t in spec.attack.tasks for p in spec.attack.ratios]


def cell_groups(spec: StudySpec) -> list[list[int]]:
    """The cells (indices into `attack_cells`) each worker group trains in turn."""
    n = len(attack_cells(spec))
    size = spec.attack.cells_per_group or -(-n // spec.attack.max_concurrent)
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def resources(spec: StudySpec) -> str:
    k = spec.attack
    return f"{len(attack_cells(spec))} cells in {len(cell_groups(spec))} run(s) of {scaling(k)}, {k.max_concurrent} at a time"


def shown(result: Result, location: str) -> dict:
    return {}  # the evaluate stage scores the cells


def recipe(spec: StudySpec) -> dict:
    """What every cell trains with: the attack section less its grid and scheduling."""
    return spec.attack.model_dump(exclude={"models", "tasks", "ratios", "n", *SCHEDULING})


def cell_job(spec: StudySpec, model_dir: str, data_dir: str, task: str, p: float, seed: int, run_dir: str,
             lisa: bool = False, progress=None) -> dict:
    """One cell's arguments for `jobs/recipes.py::attack_cells`: `model_dir` fine-tuned on `task`
    with a fraction `p` of harmful examples, drawn as replicate `seed` draws them (the same for
    every model, and for the tune stage's baselines)."""
    from jobs.recipes import cell_seed

    return {"model_dir": model_dir, "data_dir": data_dir, "task": task, "p": p, "n": spec.attack.n,
            "train": recipe(spec), "seed": cell_seed(seed, task, p), "max_len": spec.model.tiny.max_len,
            "run_dir": run_dir, "lisa": spec.defences.lisa.model_dump() if lisa else None,
            "aside": spec.defences.harmful_rows, "progress": progress}


def run(ctx: StageContext) -> Result:
    """The attack cells on Ray Train with the attack's scaling: groups of cells, each group one
    worker group that trains its cells in turn, `attack.max_concurrent` groups at a time."""
    from jobs.recipes import attack_cells as train_cells

    spec = ctx.spec
    data_dir = ctx.input_location("data")
    sources = {s: ctx.models(s) for s in spec.replicates}
    train = recipe(spec)
    cells = attack_cells(spec)

    def job(i: int) -> dict:
        c = cells[i]
        return cell_job(spec, sources[c["seed"]][c["model"].removesuffix(LISA)], data_dir, c["task"], c["p"],
                        c["seed"], ctx.output("cells", c["name"]), lisa=c["model"].endswith(LISA),
                        progress=ray_progress(ctx, NAME, f"cell {i + 1}/{len(cells)} {c['name']}"))

    groups = cell_groups(spec)
    # A group's run name covers its cells, so a restarted stage resumes each group where it stopped.
    jobs = {g: (train_cells, ([job(i) for i in group], run_name(ctx, f"attack-cells-{group[0]}-{group[-1]}"),
                              str(ctx.ray_storage)), {})
            for g, group in enumerate(groups)}
    done = {}
    for g, histories in run_bounded(ctx, jobs, spec.attack.max_concurrent, f"groups of cells fine-tuned "
                                    f"({len(cells)} cells)"):
        for i, history in zip(groups[g], histories):
            cell = cells[i]
            run_id = ctx.tracker.start_run(cell["name"], parent=ctx.run_id, tags={"saferay.cell": cell["name"]})
            ctx.tracker.log_params(run_id, {**{k: cell[k] for k in ("model", "task", "p", "seed")}, **train,
                                            "n": spec.attack.n})
            ctx.tracker.log_series(run_id, "train/loss", history["loss"])
            ctx.tracker.end_run(run_id)
            done[i] = Cell(**cell, dir=f"cells/{cell['name']}/model", run_id=run_id,
                           harmful_examples=history["harmful_examples"], **train_summary(history))
    return Result(cells=[done[i] for i in range(len(cells))],
                  peak_rss_mb=max(c.peak_rss_mb or 0.0 for c in done.values()))
