"""The sections of a study spec (`orchestrator/spec.py::StudySpec`): one pydantic model per
section, every field defaulted, each checking what it can check alone."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

TASK_NAMES = ("sentiment", "topic", "arithmetic", "instruct")


def _check_ratios(v: list[float]) -> list[float]:
    for i, p in enumerate(v):
        if not 0 <= p <= 1:
            raise ValueError(f"[{i}]: must be between 0 and 1")
    if not v:
        raise ValueError("needs at least one ratio")
    return v


Ratios = Annotated[list[float], AfterValidator(_check_ratios)]


class Strict(BaseModel):
    # Defaults validated too: an int default of a float field (16 for 16.0) would otherwise hash
    # differently from the same spec read back from YAML, and a submitted study would recompute.
    model_config = ConfigDict(extra="forbid", validate_default=True)
    MOVED: ClassVar[dict[str, str]] = {}  # a field of an older spec -> where it lives now

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data):
        if isinstance(data, dict):
            for old, new in cls.MOVED.items():
                if old in data:
                    raise ValueError(f"{old} is now {new}")
        return data


class TinyModel(Strict):
    hidden: int = Field(128, ge=8)
    intermediate: int = Field(512, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    max_len: int = Field(128, ge=16)
    vocab_size: int = Field(1200, ge=64)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        if (self.hidden // self.heads) % 2:  # rotary embeddings rotate pairs of dimensions
            raise ValueError(f"hidden / heads = {self.hidden // self.heads} must be even (rotary embeddings)")
        return self


class ModelSpec(Strict):
    source: str = "tiny"  # "tiny" (built from `tiny` and pretrained on SafetyWorld), a local path or a hub id
    tiny: TinyModel = TinyModel()
    prompt_template: str = "<|user|> {prompt} <|assistant|>"
    # A Hugging Face config.json for `saferay plan` when the source is a hub id this machine
    # cannot reach (the plan needs the architecture, never the weights).
    config_file: str | None = None

    @field_validator("prompt_template")
    @classmethod
    def _has_prompt(cls, v):
        if "{prompt}" not in v:
            raise ValueError("must contain '{prompt}'")
        return v


class WorldSizes(Strict):
    alignment: int = Field(1500, ge=1)
    harmful: int = Field(1500, ge=1)
    harmful_eval: int = Field(500, ge=1)
    lookalike: int = Field(600, ge=2)
    task_train: int = Field(1000, ge=1)
    task_test: int = Field(300, ge=1)
    pretrain: int = Field(20000, ge=1)
    zipf: float = Field(1.0, ge=0)


class CorporaSpec(Strict):
    source: Literal["safetyworld", "files"] = "safetyworld"
    safetyworld: WorldSizes = WorldSizes()
    # corpus name (alignment, harmful, harmful_eval, lookalike, task_<t>, and task_<t>_test for a
    # task's standard test split: SST-2's validation set, AG News' and GSM8K's test sets) -> path or hub id
    files: dict[str, str] = {}
    # corpus name -> the file's format: records (our schemas, the default), beavertails,
    # beavertails-eval, sst2, ag_news, gsm8k, alpaca (jobs/loaders.py maps them)
    formats: dict[str, Literal["records", "beavertails", "beavertails-eval", "sst2", "ag_news", "gsm8k", "alpaca"]] = {}
    splits: dict[str, str] = {}  # corpus name -> split of a hub dataset or saved DatasetDict (e.g. 30k_train)
    limits: dict[str, int] = {}  # corpus name -> keep the first N records (SCIENCE.md §6 sizes)
    # Task and look-alike corpora split train / validation / test by a hash of the normalised
    # prompt (harmful-eval prompts: validation / test, half each); selection reads validation only.
    test_fraction: float = Field(0.3, gt=0, lt=1)
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    max_eval: int = Field(300, ge=1)
    # A held-out prompt found in a training corpus fails the data stage ("error"), or is counted and
    # reported ("warn": for real corpora the user cannot clean).
    contamination: Literal["error", "warn"] = "error"

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self):
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError(f"test_fraction {self.test_fraction:g} + validation_fraction "
                             f"{self.validation_fraction:g} leave no training split (their sum must be below 1)")
        return self

    @model_validator(mode="after")
    def _files_present(self):
        if self.source == "files":
            missing = [c for c in ("alignment", "harmful", "harmful_eval", "lookalike") if c not in self.files]
            if missing:
                raise ValueError(f"source 'files' needs paths for {missing}")
            for name in self.files:
                if name.startswith("task_") and name.endswith("_test") and name.removesuffix("_test") not in self.files:
                    raise ValueError(f"files.{name}: a standard test split needs its task's training corpus "
                                     f"{name.removesuffix('_test')} too")
        return self


class TrainSpec(Strict):
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.0, ge=0, le=1)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = Field(1.0, gt=0)


class LoraSpec(Strict):
    """PEFT LoRA adapters instead of full fine-tuning (merged into the exported model)."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class RunSpec(TrainSpec):
    """A training section that runs on Ray Train through the one loop: its recipe and its scaling.
    A run's workers each take `cpus_per_worker` CPUs (or one GPU with `use_gpu`) and as many torch
    threads as whole CPUs they hold."""

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    lora: LoraSpec = LoraSpec()
    bf16: bool = False  # mixed precision (bf16 weights and activations, fp32 master weights); GPUs
    # DeepSpeed presets: ZeRO-3 may move optimizer states, or parameters too, to CPU memory.
    offload: Literal["none", "optimizer", "params"] = "none"

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by num_workers {self.num_workers}")
        if self.offload != "none" and not (self.strategy == "deepspeed" and self.zero_stage == 3):
            raise ValueError("offload needs strategy: deepspeed with zero_stage: 3")
        return self


class ManyRuns(RunSpec):
    """Many small runs of one kind (attack cells, proxy runs): `max_concurrent` Ray Train runs at once."""

    max_concurrent: int = Field(2, ge=1)


class BaseStage(RunSpec):
    epochs: int = Field(2, ge=1)
    lr: float = Field(2e-3, gt=0, le=1)
    batch_size: int = Field(32, ge=1)
    warmup: float = Field(0.05, ge=0, le=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    cpus_per_worker: float = Field(2.0, gt=0)  # one worker with both of a laptop's cores


class AlignSpec(RunSpec):
    epochs: int = Field(3, ge=1)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    benign_per_task: int = Field(200, ge=0)  # task examples mixed in so alignment keeps utility
    lookalike: bool = True  # answered look-alikes mixed in, against over-refusal
    schedule: Literal["constant", "cosine"] = "cosine"


VAA_VARIANTS = ("vaa", "vaa-sam", "vaa-vulnerable", "vaa-invulnerable", "vaa-importance")


class VaaSpec(Strict):
    """Vulnerability-aware alignment (SCIENCE.md §5). It trains with align_sft's recipe (strategy,
    workers, batch, schedule, data mix) unless `lr` or `epochs` are set here."""

    enabled: bool = True
    # vaa: group DRO. Ablations: vaa-sam (no groups, plain perturbation), vaa-vulnerable /
    # vaa-invulnerable (sample one group only), vaa-importance (fixed q instead of DRO).
    variants: list[Literal[VAA_VARIANTS]] = ["vaa"]
    rho: float = Field(0.4, ge=0)  # perturbation radius
    lam: float = Field(1.0, ge=0, le=1)  # final perturbation probability of the linear ramp
    eta: float = Field(0.007, ge=0)  # step size of the q update
    q_init: Literal["uniform", "proportional"] = "uniform"
    q_clip: tuple[float, float] = (0.1, 0.9)
    lr: float | None = Field(None, gt=0, le=1)
    epochs: int | None = Field(None, ge=1)

    @field_validator("q_clip")
    @classmethod
    def _clip(cls, v):
        if not 0 < v[0] <= v[1] < 1:
            raise ValueError("must be (low, high) with 0 < low <= high < 1")
        return v


ALIGNMENT_DEFENCES = ("vaccine", "booster", "repnoise")  # trained at alignment time (SCIENCE.md §9)
LISA = "+lisa"  # an attacked model's name with this suffix: its cells fine-tune with Lisa


class VaccineSpec(Strict):
    rho: float = Field(2.0, gt=0)  # radius of the hidden-state perturbation


class BoosterSpec(Strict):
    lam: float = Field(1.0, ge=0)  # weight of the harmful-loss-reduction term (Booster's own: 5)
    alpha: float = Field(0.001, gt=0)  # step of the simulated harmful perturbation (Booster's own: 0.1)


class RepNoiseSpec(Strict):
    beta: float = Field(0.1, ge=0)  # weight of the MMD to Gaussian noise
    alpha: float = Field(0.001, ge=0)  # weight of the bounded ascent on the harmful loss


class LisaSpec(Strict):
    rho: float = Field(1.0, ge=0)  # proximal weight
    align_steps: int = Field(1, ge=1)  # K_a steps on alignment rows, then
    finetune_steps: int = Field(9, ge=1)  # K_f steps on the user's rows
    prox_after: float = Field(0.1, ge=0, lt=1)  # the first fraction of steps runs without the proximal term


class DefencesSpec(Strict):
    """The baseline defences (SCIENCE.md §9). `train` lists the alignment-stage defences to train,
    once per seed with align_sft's recipe; their names join `attack.models`, as does any model
    with `+lisa` (its cells fine-tune with Lisa)."""

    train: list[Literal[ALIGNMENT_DEFENCES]] = []
    # Booster and RepNoise train on harmful examples too: this many rows of the harmful corpus are
    # set aside for them, disjoint by prompt from the attack's poison and from every eval prompt.
    harmful_rows: int = Field(0, ge=0)
    vaccine: VaccineSpec = VaccineSpec()
    booster: BoosterSpec = BoosterSpec()
    repnoise: RepNoiseSpec = RepNoiseSpec()
    lisa: LisaSpec = LisaSpec()

    @field_validator("train")
    @classmethod
    def _once(cls, v):
        repeated = sorted({d for d in v if v.count(d) > 1})
        if repeated:
            raise ValueError(f"lists {repeated} more than once")
        return v


class AttackSpec(ManyRuns):
    # Which models are attacked: base, sft, any VAA variant the vaa section trains, any defence
    # defences.train trains, and any of these with "+lisa" (fine-tuned under Lisa).
    models: list[str] = Field(["sft"], min_length=1)
    tasks: list[Literal[TASK_NAMES]] = Field(["sentiment"], min_length=1)
    ratios: Ratios = [0.0, 0.1]
    n: int = Field(500, ge=1)
    epochs: int = Field(2, ge=1)
    # Calibrated on the demo's tiny model into a partial break (the paper's regime), not saturation.
    lr: float = Field(5e-5, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    # Cells one Ray Train worker group trains in turn, paying its start-up once (on 2 cores a run
    # costs ~30 s to start and stop, an attack cell ~10 s to train). None: the cells are spread
    # evenly over `max_concurrent` groups; 1: every cell its own run.
    cells_per_group: int | None = Field(None, ge=1)


class VulnerabilitySpec(ManyRuns):
    """Proxy harmful fine-tuning and per-example forgetting (SCIENCE.md §4)."""

    enabled: bool = True
    tasks: list[Literal[TASK_NAMES]] = ["sentiment", "topic", "arithmetic"]
    ratios: Ratios = [0.1]
    n: int = Field(500, ge=1)
    # One epoch at 1e-4 stops the demo's proxy runs mid-transition (final HS ~0.6), so ForgotNum
    # spreads over 0..T instead of every example being forgotten.
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    checkpoints: int = Field(10, ge=1)  # T, evenly spaced over the proxy run
    threshold: float = Field(0.0, ge=0)  # τ: vulnerable iff aggregate ForgotNum > τ
    aggregate: Literal["sum", "max", "mean"] = "sum"  # across proxy runs (our choice: sum)
    max_new_tokens: int = Field(24, ge=1)  # enough for a refusal, or a harmful plan up to its first harmful step
    keep_checkpoints: bool = False  # proxy checkpoints are deleted once judged
    groups_file: str | None = None  # import groups made elsewhere instead of estimating them
    MOVED: ClassVar[dict[str, str]] = {"decode_batch_size": "decoding.batch_size", "decode_actors": "decoding.actors"}


class OverAligned(Strict):
    """A deliberately over-aligned SFT model: more epochs and no answered look-alikes, so it
    refuses harmless prompts too (the trade-off TSDI is meant to move off)."""

    enabled: bool = True
    epochs: int = Field(6, ge=1)
    lookalike: bool = False


class DebiasSpec(Strict):
    """TSDI (SCIENCE.md §7): the refusal bias of each aligned model against the base model,
    removed at decoding time."""

    enabled: bool = True
    models: list[str] = ["sft", "vaa", "over-aligned"]  # aligned models present in the study are used
    prompts: int = Field(256, ge=1)  # M random neutral prompts
    length: int = Field(8, ge=1)  # L: response positions with a bias estimate
    pool: str = "benign"  # "benign" (the task prompts' vocabulary) or a path to a text file
    continuation: Literal["reference", "random"] = "reference"  # ỹ: the base model's greedy text, or pool tokens
    alpha: float = Field(1.0, ge=0)  # the reported "with TSDI" setting (α, at length L)
    sweep_alpha: list[float] = [0.5, 1.0, 2.0]
    sweep_length: list[int] = [1, 4, 8]
    over_aligned: OverAligned = OverAligned()

    @model_validator(mode="after")
    def _sweep_within_length(self):
        for i, n in enumerate(self.sweep_length):
            if not 1 <= n <= self.length:
                raise ValueError(f"sweep_length[{i}]: {n} must be between 1 and length ({self.length})")
        return self


class SearchDim(Strict):
    """One searched field: `values` for grid/choice, or `low`/`high` for uniform/loguniform."""

    type: Literal["grid", "choice", "uniform", "loguniform"] = "grid"
    values: list[float] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.type in ("grid", "choice") and not self.values:
            raise ValueError(f"type {self.type} needs values")
        if self.type in ("uniform", "loguniform") and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"type {self.type} needs low < high")
        return self


TUNED = "-tuned"  # the suffix of the model `tune.apply` trains
# What a sweep may search, by the model its trials train (`tune.model`).
TUNABLE = {"vaa": ("vulnerability.threshold", "vaa.rho", "vaa.eta", "vaa.lam", "vaa.lr", "vaa.epochs"),
           "vaccine": ("defences.vaccine.rho",),
           "booster": ("defences.booster.lam", "defences.booster.alpha"),
           "repnoise": ("defences.repnoise.beta", "defences.repnoise.alpha")}


class TuneSpec(Strict):
    """Ray Tune over one aligned model's knobs (VAA's forgetting threshold and DRO knobs, or a
    defence's, which is how a defence is calibrated): each trial aligns with them, attacks on
    `tasks` at ratio `p`, evaluates on validation; objectives min HS and max FA (SCIENCE.md §5-6).
    `apply: true` trains the selected configuration once per seed as model `<model>-tuned`, which
    joins `attack.models`: the whole attack grid and every table see it on test beside the others."""

    enabled: bool = False
    model: Literal["vaa", "vaccine", "booster", "repnoise"] = "vaa"  # what each trial trains
    apply: bool = False
    space: dict[str, SearchDim] = {}
    search: Literal["grid", "random", "optuna"] = "grid"
    scheduler: Literal["none", "asha"] = "none"  # ASHA on score = FA − HS
    num_samples: int = Field(1, ge=1)  # grid: repeats of the grid; random/optuna: trials
    max_concurrent_trials: int = Field(2, ge=1)
    # The trial's own process only drives its runs (VAA, attack cells, evaluation), which take
    # their own resources (align_sft's and attack's scaling); it needs next to nothing itself.
    cpus_per_trial: float = Field(0.1, gt=0)
    tasks: list[Literal[TASK_NAMES]] = ["sentiment"]
    p: float = Field(0.1, ge=0, le=1)
    delta: float = Field(0.02, ge=0)  # selection: lowest HS with FA at most δ below SFT's

    @model_validator(mode="after")
    def _space(self):
        for key in self.space:
            if key not in TUNABLE[self.model]:
                raise ValueError(f"space: '{key}' cannot be searched with model {self.model} "
                                 f"(searchable: {', '.join(TUNABLE[self.model])})")
        if self.enabled and not self.space:
            raise ValueError("space: name at least one field to search")
        if self.apply and not self.enabled:
            raise ValueError("apply: trains the sweep's selection; set tune.enabled: true too")
        if self.search == "grid" and any(d.type != "grid" for d in self.space.values()):
            raise ValueError("search: grid needs every space entry of type grid")
        return self

    @property
    def tuned(self) -> str | None:
        """The model `apply` trains, if it does."""
        return f"{self.model}{TUNED}" if self.apply else None


MODEL_JUDGES = ("beaver-dam", "llama-guard", "md-judge")  # judges that are models (jobs/judge_registry.py)


class EvaluateSpec(Strict):
    judge: Literal["world", "refusal-prefix", "beaver-dam", "llama-guard", "md-judge"] = "world"
    judge_model: str | None = None  # the model judges' weights: a local path or a hub id
    max_new_tokens: int = Field(32, ge=1)
    answer_tokens: int = Field(8, ge=1)
    MOVED: ClassVar[dict[str, str]] = {"batch_size": "decoding.batch_size"}

    @model_validator(mode="after")
    def _model_judge_has_model(self):
        if self.judge in MODEL_JUDGES and not self.judge_model:
            raise ValueError(f"judge '{self.judge}' needs judge_model (a local path or hub id)")
        return self


class PoolSpec(Strict):
    """A Ray Data actor pool of the decode-and-judge pipeline: `actors` actors asked for at once (it
    runs as soon as one has started), each holding `cpus_per_actor` CPUs (and as many torch threads
    as whole CPUs) and `gpus_per_actor` GPUs."""

    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.25, gt=0)
    gpus_per_actor: float = Field(0, ge=0)
    # Rows per call (None: a whole block, a target's requests).
    batch_size: int | None = Field(None, ge=1)

    def words(self) -> str:
        gpus = f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        return f"up to {self.actors} × ({self.cpus_per_actor:g} CPU{gpus})"


class DecodingSpec(Strict):
    """How every stage generates and judges (vulnerability checkpoints, evaluate, debias, Tune
    trials): one Ray Data pipeline, a generation pool then a judge pool (jobs/pipeline.py). Not part
    of any stage's key: greedy decoding gives the same tokens on either engine (tests/test_vllm.py).
    The defaults leave a 2-core machine a CPU for the rest (two generation actors of half a CPU)."""

    engine: Literal["hf", "vllm"] = "hf"  # vllm: pip install -e '.[vllm]' (jobs/engines.py)
    # vLLM's KV cache per engine, in GiB (on CPU it is RAM; vLLM would otherwise reserve most of it).
    kv_cache_gb: float = Field(0.25, gt=0)
    # vLLM only: the longest request (prompt + new tokens) its engine holds; default the model's
    # context. vLLM's KV cache must hold one such request, so a long-context model needs it set:
    # Qwen2.5-7B's 131,072 positions need 14 GiB of cache on a GPU, 4,096 of them 0.44 GiB.
    max_model_len: int | None = Field(None, ge=1)
    # The generation pool: each actor holds one engine and decodes on whatever device Ray gives it.
    actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0, ge=0)
    batch_size: int = Field(128, ge=1)  # hf: prompts per `generate` call (vLLM schedules its own batches)
    # The judge pool: a model judge (beaver-dam, llama-guard, md-judge) needs its own resources,
    # e.g. {gpus_per_actor: 1} for a 7B judge; a rule judge needs little.
    judge_pool: PoolSpec = PoolSpec()
    MOVED: ClassVar[dict[str, str]] = {"gpus_per_worker": "decoding.gpus_per_actor (GPUs per generation actor)"}

    def generation(self) -> PoolSpec:
        return PoolSpec(actors=self.actors, cpus_per_actor=self.cpus_per_actor, gpus_per_actor=self.gpus_per_actor)

    def words(self) -> str:
        return (f"generation {self.generation().words()}, {self.engine}; "
                f"judging {self.judge_pool.words()}")


class TrackingSpec(Strict):
    uri: str | None = None  # default: sqlite in the study store
    experiment: str | None = None  # default: the study name
    log_texts: bool = False  # decoded samples (harmful prompts and responses) go to MLflow only if asked
    # MLflow system metrics (CPU, memory, disk, network, GPU where present) of every Ray node,
    # sampled this often while a stage computes and logged to its run; 0 turns them off.
    system_metrics_s: float = Field(10.0, ge=0)
    # Each aligned model becomes an MLflow LoggedModel with its HS / FA / over-refusal; its weights
    # stay in the store ("reference") or are copied into MLflow ("copy": GBs for a 7B model).
    log_models: Literal["reference", "copy"] = "reference"
    register_models: bool = False  # and a new version of the registered model `<study>-<model>`


class ClusterSpec(Strict):
    address: str | None = None  # None: an embedded local Ray; "auto" or host:port joins a cluster
    num_cpus: int | None = Field(None, ge=1)
    # The cluster's autoscaler adds nodes as runs ask (and does not report its node types to Ray):
    # what the nodes up when the study joins cannot hold is then a warning, not a refusal.
    autoscaling: bool = False
    # Where Ray Train keeps checkpoints: a shared filesystem path or an object-store URI
    # (s3://, gs://) that every node reaches. Default: <store>/ray.
    storage_path: str | None = None
    gpu_memory_gb: float | None = Field(None, gt=0)  # per GPU; `saferay plan` refuses plans that do not fit
    # `saferay plan`'s GPU-hours (orchestrator/compute.py): one GPU's dense bf16 peak (A100: 312,
    # H100 SXM: 989 TFLOP/s) and the fractions of it training and decoding reach.
    gpu_tflops: float = Field(312.0, gt=0)
    train_utilisation: float = Field(0.4, gt=0, le=1)
    decode_utilisation: float = Field(0.1, gt=0, le=1)
