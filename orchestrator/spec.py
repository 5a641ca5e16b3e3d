"""The study spec: one YAML file, validated into typed models, every field defaulted.

`extends: other.yaml` deep-merges the file over another (how test presets stay the same
study); `--set a.b=value` overrides one field by dotted path before validation.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml
from pydantic import ValidationError, field_validator, model_validator

from orchestrator.spec_sections import (ALIGNMENT_DEFENCES, LISA, TUNABLE, TUNED, VAA_VARIANTS, AlignSpec, AttackSpec, BaseStage,
                                        ClusterSpec, CorporaSpec, DebiasSpec, DecodingSpec, DefencesSpec, EvaluateSpec,
                                        ModelSpec, Strict, TrackingSpec, TuneSpec, VaaSpec, VulnerabilitySpec)


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the key path."""


class StudySpec(Strict):
    study: str = "demo"
    seed: int = 0  # the shared steps: corpora, splits, tokenizer, the base model, vulnerability, debias, tune
    # Replicates (SCIENCE.md §10): alignment (SFT, VAA) and every attack cell run once per seed,
    # paired across models; intervals resample the seeds, then the prompts. Default: [seed].
    seeds: list[int] | None = None
    model: ModelSpec = ModelSpec()
    corpora: CorporaSpec = CorporaSpec()
    base: BaseStage = BaseStage()
    align_sft: AlignSpec = AlignSpec()
    vulnerability: VulnerabilitySpec = VulnerabilitySpec()
    vaa: VaaSpec = VaaSpec()
    defences: DefencesSpec = DefencesSpec()
    attack: AttackSpec = AttackSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    decoding: DecodingSpec = DecodingSpec()
    debias: DebiasSpec = DebiasSpec()
    tune: TuneSpec = TuneSpec()
    tracking: TrackingSpec = TrackingSpec()
    cluster: ClusterSpec = ClusterSpec()

    @property
    def replicates(self) -> list[int]:
        return self.seeds or [self.seed]

    def decode_cfg(self) -> dict:
        """What every evaluation and judged decoding reads: the judge and lengths, the engine and
        pools, and the tasks whose FA is not measured."""
        return {**self.evaluate.model_dump(), "decoding": self.decoding.model_dump(), "free_text": self.free_text_tasks}

    @property
    def free_text_tasks(self) -> list[str]:
        """Tasks whose answers are free text (the `alpaca` format): exact match on them measures
        nothing, and no judge here compares two answers, so their FA is reported as not measured."""
        c = self.corpora
        return sorted(name.removeprefix("task_") for name, fmt in c.formats.items()
                      if c.source == "files" and fmt == "alpaca" and name.startswith("task_") and not name.endswith("_test"))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if v is not None:
            if not v:
                raise ValueError("is empty: list at least one seed, or leave it out to use 'seed'")
            repeated = sorted({s for s in v if v.count(s) > 1})
            if repeated:
                raise ValueError(f"repeats {repeated}: each replicate needs its own seed")
        return v

    @field_validator("study")
    @classmethod
    def _name(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @model_validator(mode="after")
    def _vaa_models_are_trained(self):
        trained = set(self.vaa.variants) if self.vaa.enabled else set()
        if self.tune.tuned and self.tune.tuned not in self.attack.models:
            self.attack.models.append(self.tune.tuned)  # what `apply` is for: the grid and the table see it
        for i, m in enumerate(self.attack.models):
            m = m.removesuffix(LISA)
            if m.endswith(TUNED) and m == self.tune.tuned:
                continue
            if m.endswith(TUNED) and m.removesuffix(TUNED) in TUNABLE:
                raise ValueError(f"attack.models[{i}]: '{m}' is trained by the tune stage: set tune.enabled and "
                                 f"tune.apply to true, with tune.model: {m.removesuffix(TUNED)}")
            if m in VAA_VARIANTS and m not in trained:
                raise ValueError(f"attack.models[{i}]: '{m}' is not trained (add it to vaa.variants"
                                 + ("" if self.vaa.enabled else " and set vaa.enabled: true") + ")")
            if m in ALIGNMENT_DEFENCES and m not in self.defences.train:
                raise ValueError(f"attack.models[{i}]: '{m}' is not trained (add it to defences.train)")
            if m not in ("sft", "base", *VAA_VARIANTS, *ALIGNMENT_DEFENCES):
                raise ValueError(f"attack.models[{i}]: '{m}' is not a model of the study (base, sft, "
                                 f"{', '.join(VAA_VARIANTS + ALIGNMENT_DEFENCES)}, each optionally with '{LISA}')")
        if any(m.endswith(LISA) for m in self.attack.models) and self.attack.strategy == "deepspeed" \
                and self.attack.zero_stage == 3:
            raise ValueError("attack.zero_stage: Lisa's proximal term needs whole weights on every worker; "
                             "use zero_stage 2 or ddp for attacks with '+lisa'")
        if self.tune.enabled and self.tune.model in ("booster", "repnoise") \
                and self.defences.harmful_rows < self.align_sft.batch_size:
            raise ValueError(f"defences.harmful_rows: tune.model {self.tune.model} trains on harmful rows set aside "
                             f"for it; set harmful_rows to at least one batch ({self.align_sft.batch_size})")
        needs_harmful = [d for d in self.defences.train if d in ("booster", "repnoise")]
        if needs_harmful and self.defences.harmful_rows < self.align_sft.batch_size:
            raise ValueError(f"defences.harmful_rows: {' and '.join(needs_harmful)} also train on harmful rows set "
                             f"aside for them; set harmful_rows to at least one batch ({self.align_sft.batch_size})")
        if self.corpora.source == "files" and self.model.source == "tiny" and "pretrain" not in self.corpora.files:
            raise ValueError("corpora.files needs 'pretrain' to build the tiny model, "
                             "or set model.source to a pretrained model")
        for i, m in enumerate(self.debias.models):
            if m not in ("sft", "over-aligned", *VAA_VARIANTS, *ALIGNMENT_DEFENCES):
                raise ValueError(f"debias.models[{i}]: '{m}' is not an aligned model (sft, over-aligned, vaa..., "
                                 "a defence)")
        if trained and not (self.vulnerability.enabled or self.vulnerability.groups_file):
            raise ValueError("vaa needs groups: enable vulnerability or set vulnerability.groups_file")
        if self.tune.enabled and (free := sorted(set(self.tune.tasks) & set(self.free_text_tasks))):
            raise ValueError(f"tune.tasks: {', '.join(free)} has free-text answers (format alpaca), whose FA is not "
                             "measured; a sweep selects on FA, so tune on tasks with exact answers")
        return self


# --- loading --------------------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen=()) -> dict:
    if not path.exists():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec is a mapping of keys, got {type(data).__name__}")
    if not data and not seen:
        raise SpecError(f"{path}: the spec is empty: a spec needs at least 'study: NAME' and the fields it changes "
                        "from the defaults (see studies/demo.yaml)")
    parent = data.pop("extends", None)
    if parent:
        parent_path = (path.parent / parent).resolve()
        if parent_path in seen:
            raise SpecError(f"{path}: 'extends' loops back to {parent_path}")
        data = _merge(_read_yaml(parent_path, seen + (parent_path,)), data)
    return data


def apply_override(data: dict, assignment: str, source: str) -> None:
    """`a.b.c=value`: the value parsed as YAML, so numbers, lists and booleans work."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise SpecError(f"{source}: override '{assignment}' must look like key.path=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{source}: override '{key}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def _loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith("[") and "]: " in msg:  # a list validator naming its own index
            idx, _, msg = msg.partition(": ")
            lines.append(f"{source}: {_loc(loc)}{idx}: {msg}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{source}: {_loc(loc)}: unknown key")
        else:
            lines.append(f"{source}: {_loc(loc) or '(top)'}: {msg}")
    return "\n".join(lines)


def load_spec(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    path = Path(path)
    data = _read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment, str(path))
    try:
        return StudySpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(str(path), e)) from None


def spec_dict(spec: StudySpec) -> dict:
    return spec.model_dump(mode="json")


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys for MLflow params."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
