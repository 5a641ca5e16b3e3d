"""What each stage of a study computes, in FLOPs and GPU-hours, for `saferay plan`.

A training token costs 6·N FLOPs (forward 2·N, backward 4·N; Kaplan et al., 2020, §2.1), a
decoded token 2·N (a forward pass: the prompt's tokens and each generated one), N the model's
parameters. A model judge (beaver-dam, llama-guard, md-judge) reads each decoded row once more,
counted at the study model's size (its own is not known before it loads). GPU-hours are FLOPs
over one GPU's peak (`cluster.gpu_tflops`) times a stated utilisation (`cluster.train_utilisation`,
`cluster.decode_utilisation`: decoding is bound by memory, not arithmetic).

Token counts are upper bounds: every row at the full sequence length (`model.tiny.max_len`), and
a step that takes several passes (VAA's perturbed step, Vaccine, Booster, RepNoise) counted at
all of them on every step. Rows per split are the data stage's own counts once it has run,
otherwise read from the spec (SafetyWorld's sizes and split fractions, or `corpora.limits`); a
stage whose inputs have no known size is left out of the total and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.corpora import standard_test
from orchestrator.spec import StudySpec
from orchestrator.spec_sections import MODEL_JUDGES

# Forward-and-backward passes per step, over a plain SFT step (jobs/vaa.py, jobs/defences.py).
PASSES = {"vaa": 2, "vaccine": 2, "booster": 3, "repnoise": 2}


@dataclass
class Work:
    train_tokens: float = 0.0  # tokens through a forward and a backward pass
    decode_tokens: float = 0.0  # tokens through a forward pass while decoding, judging included
    unknown: str | None = None  # why it cannot be counted (a corpus of unknown size)

    def __add__(self, other: Work) -> Work:
        return Work(self.train_tokens + other.train_tokens, self.decode_tokens + other.decode_tokens,
                    self.unknown or other.unknown)


def split_rows(spec: StudySpec, measured: dict[str, int] | None) -> dict[str, int | None]:
    """Rows per split of the data stage: its own counts (`measured`), or what the spec implies."""
    if measured:
        return measured
    c = spec.corpora
    if c.source == "safetyworld":
        w = c.safetyworld
        sizes = {"alignment": w.alignment, "harmful": w.harmful, "harmful_eval": w.harmful_eval,
                 "lookalike": w.lookalike, "pretrain": w.pretrain,
                 **{f"task_{t}": w.task_train + w.task_test for t in ("sentiment", "topic", "arithmetic", "instruct")}}
    else:
        sizes = {name: c.limits.get(name) for name in c.files}
    val, test = c.validation_fraction, c.test_fraction

    def part(n: int | None, fraction: float) -> int | None:
        return None if n is None else int(n * fraction)

    rows = {"align_train": sizes.get("alignment"), "harmful": sizes.get("harmful"),
            "harmful_validation": part(sizes.get("harmful_eval"), 0.5), "harmful_eval": part(sizes.get("harmful_eval"), 0.5),
            "lookalike_train": part(sizes.get("lookalike"), 1 - val - test),
            "lookalike_validation": part(sizes.get("lookalike"), val), "lookalike_eval": part(sizes.get("lookalike"), test),
            "pretrain": sizes.get("pretrain")}
    for name, n in sizes.items():
        if name.startswith("task_") and not standard_test(name):
            given = f"{name}_test" in sizes  # the task's standard test split: its own corpus is train + validation
            rows |= {f"{name}_train": part(n, 1 - val - (0 if given else test)), f"{name}_validation": part(n, val),
                     f"{name}_test": sizes[f"{name}_test"] if given else part(n, test)}
    return rows


class Counter:
    """Token counts of one study, from its spec and its rows per split."""

    def __init__(self, spec: StudySpec, rows: dict[str, int | None]):
        self.spec, self.rows, self.length = spec, rows, spec.model.tiny.max_len
        # A model judge reads each decoded row again (a judge_model beside a rule judge is never loaded).
        self.judged = 2 if spec.evaluate.judge in MODEL_JUDGES else 1

    def n(self, split: str, at_most: int | None = None) -> int:
        """Rows of `split`, and at most `at_most` (the bound itself where the size is unknown)."""
        value = self.rows.get(split)
        if value is None:
            if at_most is None:
                raise LookupError(split)
            return at_most
        return value if at_most is None else min(value, at_most)

    def held_out(self, split: str) -> int:
        """Prompts an evaluation decodes from a held-out split (at most `corpora.max_eval`)."""
        return self.n(split, self.spec.corpora.max_eval)

    def alignment_mix(self, lookalike: bool | None = None) -> int:
        a = self.spec.align_sft
        tasks = [s for s in self.rows if s.startswith("task_") and s.endswith("_train")]
        return (self.n("align_train") + (self.n("lookalike_train") if (a.lookalike if lookalike is None else lookalike)
                                          else 0) + sum(self.n(t, a.benign_per_task) for t in tasks))

    def train(self, rows: float, epochs: int, passes: int = 1) -> Work:
        return Work(train_tokens=rows * epochs * self.length * passes)

    def decode(self, prompts: float) -> Work:
        return Work(decode_tokens=prompts * self.length * self.judged)

    def evaluated(self, tasks: list[str], split: str = "test") -> float:
        """Prompts one evaluation decodes on the `split` side: harmful, look-alike and each task's."""
        side = "eval" if split == "test" else "validation"
        return (self.held_out(f"harmful_{side}") + self.held_out(f"lookalike_{side}")
                + sum(self.held_out(f"task_{t}_{split}") for t in tasks))

    def model_eval(self, split: str = "test") -> float:
        """Prompts one aligned model is evaluated on (every attacked task's)."""
        return self.evaluated(self.spec.attack.tasks, split)

    def cell_eval(self, task: str, split: str = "test") -> float:
        """Prompts one attack cell is evaluated on (its task's)."""
        return self.evaluated([task], split)

    def alignment(self, model: str) -> tuple[int, int]:
        """Rows and epochs of one alignment run of `model` (sft, vaa or a defence), as its stage
        trains it: VAA at its own epochs, Booster and RepNoise on the harmful rows too."""
        s = self.spec
        rows = self.alignment_mix() + (s.defences.harmful_rows if model in ("booster", "repnoise") else 0)
        return rows, (s.vaa.epochs or s.align_sft.epochs) if model == "vaa" else s.align_sft.epochs


def _base(c: Counter) -> Work:
    s = c.spec
    return c.train(c.n("pretrain"), s.base.epochs) if s.model.source == "tiny" else Work()


def _align_sft(c: Counter) -> Work:
    return c.train(c.alignment_mix() * len(c.spec.replicates), c.spec.align_sft.epochs)


def _vulnerability(c: Counter) -> Work:
    v = c.spec.vulnerability
    if not v.enabled or v.groups_file:
        return Work()
    runs = len(v.tasks) * len(v.ratios)
    # Every alignment prompt at checkpoint 0 and at each run's T checkpoints.
    return c.train(runs * v.n, v.epochs) + c.decode(c.n("align_train") * (1 + runs * v.checkpoints))


def _align_vaa(c: Counter) -> Work:
    s = c.spec
    if not s.vaa.enabled:
        return Work()
    rows, epochs = c.alignment("vaa")
    return c.train(rows * len(s.vaa.variants) * len(s.replicates), epochs, PASSES["vaa"])


def _align_defences(c: Counter) -> Work:
    s = c.spec
    work = Work()
    for d in s.defences.train:
        rows, epochs = c.alignment(d)
        work += c.train(rows * len(s.replicates), epochs, PASSES[d])
    return work


def _attack(c: Counter) -> Work:
    k = c.spec.attack
    cells = len(k.models) * len(k.tasks) * len(k.ratios) * len(c.spec.replicates)
    return c.train(cells * k.n, k.epochs)


def _trained_models(spec: StudySpec) -> list[str]:
    """Aligned models per seed: SFT, each VAA variant, each defence, and tune.apply's model."""
    return ["sft", *(spec.vaa.variants if spec.vaa.enabled else []), *spec.defences.train,
            *([spec.tune.tuned] if spec.tune.tuned else [])]


def _evaluate(c: Counter) -> Work:
    s, k = c.spec, c.spec.attack
    models = 1 + len(_trained_models(s)) * len(s.replicates)  # base, then every aligned model per seed
    cells = sum(c.cell_eval(t) for t in k.tasks) * len(k.models) * len(k.ratios) * len(s.replicates)
    return c.decode(models * c.model_eval() + cells)


def _debias(c: Counter) -> Work:
    s, d = c.spec, c.spec.debias
    if not d.enabled:
        return Work()
    models = [m for m in d.models if m in _trained_models(s)]
    work = Work()
    if "over-aligned" in d.models and d.over_aligned.enabled:
        models.append("over-aligned")
        work += c.train(c.alignment_mix(d.over_aligned.lookalike), d.over_aligned.epochs)
    settings = 1 + len(d.sweep_alpha) * len(d.sweep_length) + ((d.alpha, d.length) not in
                                                               {(a, n) for a in d.sweep_alpha for n in d.sweep_length})
    # The bias: M random prompts through each model and the base; then every setting's evaluation.
    return work + c.decode(len(models) * (2 * d.prompts + settings * c.model_eval()))


def _tune(c: Counter) -> Work:
    s, t = c.spec, c.spec.tune
    if not t.enabled:
        return Work()
    if t.search == "grid":
        trials = t.num_samples * math.prod(len(d.values) for d in t.space.values())
    else:
        trials = t.num_samples
    passes = PASSES[t.model]
    rows, epochs = c.alignment(t.model)  # a trial aligns as its model's stage would
    per_trial = (c.train(rows, epochs, passes) + c.train(len(t.tasks) * s.attack.n, s.attack.epochs)
                 + c.decode(sum(c.cell_eval(task, "validation") for task in t.tasks)))
    # Baselines (SFT's cells, and the searched model's where a stage trains it) fine-tuned and
    # evaluated on validation, and the selected trial's cells on test.
    baselines = 1 + (t.model in _trained_models(s))
    evals = c.train(baselines * len(t.tasks) * s.attack.n, s.attack.epochs) + c.decode(
        sum(baselines * c.cell_eval(task, "validation") + c.cell_eval(task) for task in t.tasks))
    applied = c.train(rows * len(s.replicates), epochs, passes) if t.apply else Work()
    return Work(per_trial.train_tokens * trials, per_trial.decode_tokens * trials) + evals + applied


WORK = {"base": _base, "align_sft": _align_sft, "vulnerability": _vulnerability,
        "align_vaa": _align_vaa, "align_defences": _align_defences, "attack": _attack, "evaluate": _evaluate,
        "debias": _debias, "tune": _tune}


def stage_work(name: str, counter: Counter) -> Work:
    """A stage's tokens (none for a stage `WORK` does not list)."""
    try:
        return WORK[name](counter) if name in WORK else Work()
    except LookupError as e:
        return Work(unknown=f"the size of split {e.args[0]} is not known before the data stage runs "
                            "(`saferay run SPEC --until data`, or corpora.limits)")


def compute(spec: StudySpec, parameters: int, measured: dict[str, int] | None) -> dict:
    """FLOPs and GPU-hours per stage and in all (module docstring), with the assumptions stated."""
    cl = spec.cluster
    counter = Counter(spec, split_rows(spec, measured))
    from orchestrator.stages import STAGES

    stages, total = {}, 0.0
    for name in (stage.name for stage in STAGES):
        w = stage_work(name, counter)
        train, decode = 6 * parameters * w.train_tokens, 2 * parameters * w.decode_tokens
        hours = (train / cl.train_utilisation + decode / cl.decode_utilisation) / (cl.gpu_tflops * 1e12) / 3600
        stages[name] = {"train_tokens": w.train_tokens, "decode_tokens": w.decode_tokens, "pflop": (train + decode) / 1e15,
                        "gpu_hours": None if w.unknown else hours, "unknown": w.unknown}
        total += 0.0 if w.unknown else hours
    return {"stages": stages, "total_gpu_hours": total,
            "assumptions": {"gpu_tflops": cl.gpu_tflops, "train_utilisation": cl.train_utilisation,
                            "decode_utilisation": cl.decode_utilisation, "sequence_length": spec.model.tiny.max_len,
                            "rows": "measured by the data stage" if measured else "from the spec",
                            "flops": "6·N per trained token, 2·N per decoded token; model judges at N"}}
