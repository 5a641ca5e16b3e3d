"""Judges by name: the rule-based ones (`jobs/judges.py`) and the model judges
(`jobs/model_judges.py`), which read a model's output."""

from __future__ import annotations

from jobs.judges import Judge, RefusalPrefixJudge, WorldJudge
from jobs.model_judges import BeaverDamJudge, GuardJudge

JUDGES = {"world": WorldJudge, "refusal-prefix": RefusalPrefixJudge}
MODEL_JUDGES = ("beaver-dam", "llama-guard", "md-judge")


def make_judge(name: str, model: str | None = None) -> Judge:
    """A judge by name; the model judges (beaver-dam, llama-guard, md-judge) need a model path or id."""
    if name in MODEL_JUDGES:
        if not model:
            raise ValueError(f"judge '{name}' needs a model (evaluate.judge_model)")
        return BeaverDamJudge(model) if name == "beaver-dam" else GuardJudge(name, model)
    try:
        return JUDGES[name]()
    except KeyError:
        raise ValueError(f"unknown judge '{name}' (known: {', '.join((*JUDGES, *MODEL_JUDGES))})") from None
