"""`saferay plan`: the stages a study will run, their keys and cache state, what each asks of
the cluster, and the memory each GPU training worker needs, before anything runs.

The memory estimate counts model states the way the ZeRO paper does (Rajbhandari et al.,
2020, §3.1): with mixed-precision Adam each trainable parameter costs 2 bytes of bf16 weight,
2 of bf16 gradient and 12 of fp32 optimizer state (master weight, momentum, variance), 16 in
all. ZeRO-2 partitions gradients and optimizer states over the N workers, ZeRO-3 the weights
too, and ZeRO-3 also gathers one whole layer at a time (4 bytes per parameter of the largest
layer: its bf16 weight and gradient). DeepSpeed's own estimator
(`deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`, and the stage 1/2
one) charges 18 bytes instead of 16, keeping fp32 gradients as well; `tests/test_plan.py`
checks the two agree within 20% for Llama-2-7B on 8 GPUs. Activations are a rough extra:
34·s·b·h bytes per layer plus 5·a·s²·b for attention scores (Korthikanti et al., 2022, no
recomputation), and the fp32 logits. Alignment's workers are estimated under align_sft's
scaling, an attack cell's under the attack section's, with Lisa's two extra copies of the
trainable weights for `+lisa` cells (`attack_memory`).

A generation actor of the decode-and-judge pipeline holds the fp32 weights both engines load
(4 bytes per parameter) and a KV cache: vLLM's `decoding.kv_cache_gb`, or hf's for one batch
(`decoding.batch_size`) of `max_len` positions, 2 tensors (K, V) × layers × KV heads × head size ×
4 bytes per position per sequence. A model judge's own memory is not counted (its size is the
judge model's, which the plan does not read).
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs.records import InputError
from orchestrator.spec import StudySpec
from orchestrator.spec_sections import LISA

GIB = 2**30


def model_config(spec: StudySpec):
    """The architecture only: the tiny model's, a local model's, or `model.config_file`'s."""
    from transformers import AutoConfig, LlamaConfig

    m = spec.model
    if m.source == "tiny":
        t = m.tiny
        return LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden, intermediate_size=t.intermediate,
                           num_hidden_layers=t.layers, num_attention_heads=t.heads,
                           max_position_embeddings=t.max_len, tie_word_embeddings=True)
    source = m.config_file or m.source
    try:
        if Path(source).is_file():  # a config.json of its own
            fields = json.loads(Path(source).read_text())
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        return AutoConfig.from_pretrained(source)
    except Exception as e:
        raise InputError(f"model: cannot read the config of '{source}' ({str(e).splitlines()[0][:160]}); "
                         "set model.config_file to its config.json") from None


def model_shape(spec: StudySpec, lora=None) -> dict:
    """Parameter counts, sizes the memory estimates read; `trainable` under `lora` (default:
    align_sft's). The tiny model's come from its config by arithmetic; any other model's are
    counted on the meta device."""
    lora = lora or spec.align_sft.lora
    return tiny_shape(spec, lora) if spec.model.source == "tiny" else config_shape(spec, lora)


# The tiny Llama's linear layers, (in, out), as `jobs/models.py::tiny_llama` builds it: as many KV
# heads as heads, no biases.
def _tiny_linears(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}


def tiny_shape(spec: StudySpec, lora=None) -> dict:
    """`config_shape` of the tiny model, by arithmetic: every `saferay run` checks the tiny model's
    memory before it starts, and building it on the meta device first imports transformers' model
    code, ~5 s of a driver that otherwise never needs it. `tests/test_plan.py` holds the two equal."""
    t, lora = spec.model.tiny, lora or spec.align_sft.lora
    linears = _tiny_linears(t.hidden, t.intermediate)
    per_layer = sum(i * o for i, o in linears.values()) + 2 * t.hidden  # and two RMSNorm weights
    embedding = t.vocab_size * t.hidden  # the output head is tied to it
    total = embedding + t.layers * per_layer + t.hidden  # the final norm
    trainable = total
    if lora.enabled:  # the adapters: r × (in + out) per adapted layer, and the head's if it is one
        trainable = t.layers * sum(lora.r * (i + o) for name, (i, o) in linears.items() if name in lora.target_modules)
        trainable += lora.r * (t.hidden + t.vocab_size) if "lm_head" in lora.target_modules else 0
    largest = max(embedding, *(i * o for i, o in linears.values()))
    return {"parameters": total, "largest_layer": largest, "trainable": trainable,
            "hidden": t.hidden, "layers": t.layers, "heads": t.heads, "kv_heads": t.heads,
            "head_dim": t.hidden // t.heads, "vocab": t.vocab_size}


def config_shape(spec: StudySpec, lora=None) -> dict:
    """Parameter counts from the config on the meta device: nothing is allocated or downloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())  # tied weights appear once
    total = sum(p.numel() for p in params)
    largest = max(p.numel() for p in params)
    lora = lora or spec.align_sft.lora
    trainable = total
    if lora.enabled:
        trainable = sum(lora.r * (mod.in_features + mod.out_features) for name, mod in model.named_modules()
                        if name.rsplit(".", 1)[-1] in lora.target_modules and hasattr(mod, "in_features"))
    return {"parameters": total, "largest_layer": largest, "trainable": trainable, "hidden": config.hidden_size,
            "heads": config.num_attention_heads, **attention_shape(config), "vocab": config.vocab_size}


def attention_shape(config) -> dict:
    """What a KV cache holds per position, from a transformers config."""
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def model_states_bytes(shape: dict, strategy: str, zero_stage: int, offload: str, workers: int, bf16: bool) -> int:
    """Per-worker bytes of weights, gradients and optimizer states (module docstring)."""
    psi, trainable, largest, n = shape["parameters"], shape["trainable"], shape["largest_layer"], workers
    weight = 2 if bf16 else 4
    frozen = psi - trainable  # LoRA's base: weights only
    per_trainable = 16  # bf16: 2 weight + 2 grad + 12 fp32 Adam state; fp32: 4 + 4 + 8 moments
    if strategy != "deepspeed":  # DDP: everything replicated
        return frozen * weight + trainable * per_trainable
    if zero_stage == 2:
        return psi * weight + trainable * (per_trainable - weight) // n
    gathered = 4 * largest
    if offload == "params":
        return gathered
    if offload == "optimizer":
        return gathered + psi * weight // n
    return gathered + frozen * weight // n + trainable * per_trainable // n


def activation_bytes(shape: dict, micro_batch: int, seq_len: int, bf16: bool) -> int:
    s, b, h, a, layers = seq_len, micro_batch, shape["hidden"], shape["heads"], shape["layers"]
    per_layer = 34 * s * b * h + 5 * a * s * s * b
    return int(per_layer * layers * (1 if bf16 else 2) + 4 * b * s * shape["vocab"])


def decoding_bytes(shape: dict, spec: StudySpec) -> int:
    """One decoding process's memory (module docstring)."""
    weights = 4 * shape["parameters"]
    if spec.decoding.engine == "vllm":
        return weights + int(spec.decoding.kv_cache_gb * GIB)
    return weights + kv_bytes_per_position(shape) * spec.decoding.batch_size * spec.model.tiny.max_len


def kv_bytes_per_position(shape: dict) -> int:
    """One sequence position's fp32 KV cache: K and V × layers × KV heads × head size × 4 bytes."""
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 4


def vllm_block(spec: StudySpec) -> int:
    """Positions per KV-cache block: vLLM's default on GPUs is 16; on CPU it sets 128
    (vllm/platforms/cpu.py)."""
    return 16 if spec.decoding.gpus_per_actor else 128


def vllm_context_bytes(spec: StudySpec) -> tuple[int, int]:
    """vLLM refuses to start unless its KV cache holds one request of its longest length (the
    model's context, or `decoding.max_model_len`): those positions, and their bytes in fp32, in
    whole blocks and one block more (vLLM holds one back)."""
    config = model_config(spec)
    positions = min(config.max_position_embeddings, spec.decoding.max_model_len or config.max_position_embeddings)
    block = vllm_block(spec)
    return positions, (-(-positions // block) + 1) * block * kv_bytes_per_position(attention_shape(config))


def stage_resources(spec: StudySpec) -> dict[str, str]:
    from orchestrator.stages import STAGES

    return {stage.name: stage.resources(spec) for stage in STAGES}


def training_memory(spec: StudySpec, shape: dict | None = None) -> tuple[int, int]:
    """Per-worker bytes of model states and of activations for the largest training the study
    runs (alignment, align_sft's scaling)."""
    a = spec.align_sft
    shape = shape or model_shape(spec)
    states = model_states_bytes(shape, a.strategy, a.zero_stage, a.offload, a.num_workers, a.bf16)
    return states, activation_bytes(shape, a.batch_size // a.num_workers, spec.model.tiny.max_len, a.bf16)


def attack_memory(spec: StudySpec) -> dict[str, int]:
    """Per-worker bytes of the largest attack cell, under the attack section's own scaling and
    LoRA. A cell fine-tuned with Lisa (`sft+lisa`) also holds its anchor, a copy of every trainable
    weight, and while its proximal term is built a difference of the same size
    (`jobs/defences.py::LisaStep`); both in the weights' dtype, bf16 only under DeepSpeed (DDP's
    bf16 is autocast over fp32 weights)."""
    t = spec.attack
    shape = model_shape(spec, t.lora)
    states = model_states_bytes(shape, t.strategy, t.zero_stage, t.offload, t.num_workers, t.bf16)
    acts = activation_bytes(shape, t.batch_size // t.num_workers, spec.model.tiny.max_len, t.bf16)
    weight = 2 if t.bf16 and t.strategy == "deepspeed" else 4
    lisa = 2 * shape["trainable"] * weight if any(m.endswith(LISA) for m in t.models) else 0
    return {"model_states": states, "activations": acts, "lisa": lisa, "total": states + acts + lisa}


def make_plan(spec: StudySpec, store) -> dict:
    from orchestrator.compute import compute
    from orchestrator.runner import plan
    from orchestrator.stages import data

    a = spec.align_sft
    shape = model_shape(spec)
    states, acts = training_memory(spec, shape)
    resources = stage_resources(spec)
    keys = dict((s.name, k) for s, k in plan(spec))
    # The data stage's own row counts, once it has run: the compute estimate's sizes.
    measured = data.Result.from_json(store.result("data", keys["data"])).splits \
        if store.is_complete("data", keys["data"]) else None
    work = compute(spec, shape["parameters"], measured)
    out = {
        "study": spec.study,
        "stages": [{"name": name, "key": k, "cached": store.is_complete(name, k), "resources": resources[name],
                    **{f: work["stages"][name][f] for f in ("pflop", "gpu_hours", "unknown")}}
                   for name, k in keys.items()],
        "compute": {"total_gpu_hours": work["total_gpu_hours"], "assumptions": work["assumptions"]},
        "model": {k: shape[k] for k in ("parameters", "trainable", "largest_layer")},
        "training": {"strategy": a.strategy + (f"-zero{a.zero_stage}" if a.strategy == "deepspeed" else ""),
                     "workers": a.num_workers, "gpu": a.use_gpu, "bf16": a.bf16, "offload": a.offload,
                     "lora": a.lora.enabled},
        "memory_per_worker_gib": {"model_states": states / GIB, "activations": acts / GIB,
                                  "total": (states + acts) / GIB},
        "gpu_memory_gb": spec.cluster.gpu_memory_gb,
    }
    attack = attack_memory(spec)
    out["attack_memory_per_worker_gib"] = {k: v / GIB for k, v in attack.items()}
    d = spec.decoding
    decoding = decoding_bytes(shape, spec)
    # Actors that share a GPU (gpus_per_actor < 1) share its memory; one actor uses one GPU.
    per_gpu = decoding * max(1.0, 1 / d.gpus_per_actor) if d.gpus_per_actor else None
    out["decoding"] = {"engine": d.engine, "actors": d.actors, "gpus_per_actor": d.gpus_per_actor,
                       "judge_pool": d.judge_pool.model_dump(),
                       "memory_per_worker_gib": decoding / GIB,
                       "memory_per_gpu_gib": None if per_gpu is None else per_gpu / GIB}
    limit = spec.cluster.gpu_memory_gb
    over = []
    if limit is not None and a.use_gpu and (states + acts) / 1e9 > limit:
        over.append(f"training needs {(states + acts) / GIB:.1f} GiB per GPU worker")
    if limit is not None and spec.attack.use_gpu and attack["total"] / 1e9 > limit:
        over.append(f"an attack cell needs {attack['total'] / GIB:.1f} GiB per GPU worker")
    if limit is not None and per_gpu is not None and per_gpu / 1e9 > limit:
        over.append(f"decoding needs {per_gpu / GIB:.1f} GiB per GPU")
    out["fits"] = None if limit is None or not (a.use_gpu or spec.attack.use_gpu or per_gpu) else not over
    out["over"] = over
    return out
