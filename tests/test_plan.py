"""`saferay plan` on the 7B study specs, offline: the model from its config on the meta device,
the memory estimate against DeepSpeed's own estimator, and refusal of a plan that does not fit."""

import json

import pytest

from conftest import ROOT, saferay


def plan(tmp_path, spec, *sets):
    """The plan as `saferay plan --json` prints it (in this process: building 7B models on the
    meta device is cheap, starting the CLI ten times is not)."""
    from orchestrator.plan import make_plan
    from orchestrator.spec import load_spec
    from orchestrator.store import StudyStore

    s = load_spec(ROOT / "studies" / spec, list(sets))
    return json.loads(json.dumps(make_plan(s, StudyStore(tmp_path, s.study))))


def test_llama2_7b_zero3_estimate_matches_deepspeed_within_20_percent(tmp_path):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    p = plan(tmp_path, "vaa-llama2-7b.yaml")
    m = p["model"]
    assert 6.7e9 < m["parameters"] < 6.8e9 and m["largest_layer"] == 32000 * 4096
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(m["parameters"], m["largest_layer"], num_gpus_per_node=8,
                                                          num_nodes=1, cpu_offload=False, cpu_offload_params=False)
    ours = p["memory_per_worker_gib"]["model_states"] * 2**30
    print(f"ours {ours / 2**30:.2f} GiB, DeepSpeed {ds_gpu / 2**30:.2f} GiB, ratio {ours / ds_gpu:.3f}")
    assert abs(ours / ds_gpu - 1) < 0.2
    assert p["training"] == {"strategy": "deepspeed-zero3", "workers": 8, "gpu": True, "bf16": True,
                             "offload": "none", "lora": False}
    assert p["fits"] is True and not any(s["cached"] for s in p["stages"])
    assert next(s for s in p["stages"] if s["name"] == "align_sft")["resources"] == "1 run(s) of 8 × 1 GPU (deepspeed-zero3, Ray Train)"
    assert next(s for s in p["stages"] if s["name"] == "align_defences")["resources"] == \
        "3 run(s) of 8 × 1 GPU (deepspeed-zero3, Ray Train)"  # Vaccine, Booster and RepNoise
    assert next(s for s in p["stages"] if s["name"] == "attack")["resources"] == \
        "72 cells in 2 run(s) of 4 × 1 GPU (deepspeed-zero2, Ray Train), 2 at a time"  # ZeRO-2: Lisa's whole weights


def test_attack_cells_are_planned_with_lisas_anchor(tmp_path):
    """An attack cell's worker holds the attack scaling's model states, its activations and, for
    `sft+lisa`, Lisa's anchor and the difference its penalty builds (two bf16 copies of every
    trainable weight under DeepSpeed). On 2 GPUs a Llama-2-7B Lisa cell needs more than an 80 GB
    GPU: the plan says so and refuses."""
    p = plan(tmp_path, "vaa-llama2-7b.yaml")
    params, mem = p["model"]["parameters"], p["attack_memory_per_worker_gib"]
    assert mem["lisa"] * 2**30 == 2 * 2 * params
    assert mem["model_states"] * 2**30 == 2 * params + 14 * params // 4  # ZeRO-2 on 4: weights + a quarter of the rest
    assert mem["total"] == pytest.approx(mem["model_states"] + mem["activations"] + mem["lisa"])
    assert p["fits"] is True and mem["total"] * 2**30 < 80e9
    two = plan(tmp_path, "vaa-llama2-7b.yaml", "attack.num_workers=2", "attack.max_concurrent=4")
    assert two["fits"] is False and two["over"] == [
        f"an attack cell needs {two['attack_memory_per_worker_gib']['total']:.1f} GiB per GPU worker"]
    assert plan(tmp_path, "vaa-llama2-7b.yaml", "attack.models=[sft, vaa]")["attack_memory_per_worker_gib"]["lisa"] == 0
    # The attack's own LoRA, not align_sft's: adapters only are trainable, and only they are anchored.
    lora = plan(tmp_path, "vaa-llama2-7b.yaml", "attack.lora.enabled=true")["attack_memory_per_worker_gib"]
    assert lora["lisa"] < mem["lisa"] / 100 and lora["model_states"] < mem["model_states"]
    # DDP's bf16 is autocast over fp32 weights: its copies are fp32.
    ddp = plan(tmp_path, "vaa-llama2-7b.yaml", "attack.strategy=ddp")["attack_memory_per_worker_gib"]
    assert ddp["lisa"] == 2 * mem["lisa"]


def test_presets_order_the_estimate(tmp_path):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    states = {}
    for name, sets in {"zero3": (), "offload-optimizer": ("align_sft.offload=optimizer",),
                       "offload-params": ("align_sft.offload=params",), "zero2": ("align_sft.zero_stage=2",),
                       "lora": ("align_sft.lora.enabled=true",)}.items():
        states[name] = plan(tmp_path, "vaa-llama2-7b.yaml", *sets)["memory_per_worker_gib"]["model_states"]
    assert states["offload-params"] < states["offload-optimizer"] < states["zero3"] < states["zero2"]
    assert states["lora"] < states["zero3"]
    params = plan(tmp_path, "vaa-llama2-7b.yaml")["model"]["parameters"]
    _, ds_gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=8, cpu_offload=False)
    assert abs(states["zero2"] * 2**30 / ds_gpu - 1) < 0.2


def test_qwen_and_tsdi_specs_plan(tmp_path):
    qwen = plan(tmp_path, "vaa-qwen2.5-7b.yaml")
    assert 7.5e9 < qwen["model"]["parameters"] < 7.7e9
    tsdi = plan(tmp_path, "tsdi-llama2-7b.yaml")
    assert [s["resources"] for s in tsdi["stages"] if s["name"] in ("vulnerability", "align_vaa")] == ["none", "none"]


def test_the_cli_prints_the_plan_and_refuses_one_that_does_not_fit(tmp_path):
    out = saferay("plan", str(ROOT / "studies" / "vaa-llama2-7b.yaml"), store=tmp_path).stdout
    assert "memory per worker" in out and "align_sft" in out and "to run" in out
    proc = saferay("plan", str(ROOT / "studies" / "vaa-llama2-7b.yaml"), "--set", "cluster.gpu_memory_gb=12",
                   store=tmp_path, check=False)
    assert proc.returncode == 2 and "plan refused" in proc.stderr and "cluster.gpu_memory_gb (12 GB)" in proc.stderr


@pytest.mark.parametrize("spec", ["demo.yaml", "smoke.yaml"])
def test_tiny_studies_plan_too(tmp_path, spec):
    p = plan(tmp_path, spec)
    assert 1e5 < p["model"]["parameters"] < 2e6 and p["fits"] is None


@pytest.mark.parametrize("sets", [
    [],
    ["model.tiny={hidden: 96, intermediate: 200, layers: 3, heads: 4, max_len: 64, vocab_size: 900}"],
    ["align_sft.lora.enabled=true"],
    ["align_sft.lora.enabled=true", "align_sft.lora.r=4", "align_sft.lora.target_modules=[k_proj, gate_proj, down_proj]"],
    ["model.tiny={hidden: 32, intermediate: 400, layers: 1, heads: 2, max_len: 32, vocab_size: 300}"],  # MLP largest
    ["model.tiny={hidden: 128, intermediate: 64, layers: 1, heads: 2, max_len: 32, vocab_size: 64}"],  # attention largest
    ["align_sft.lora.enabled=true", "align_sft.lora.target_modules=[q_proj, lm_head]"],  # the head adapted too
])
def test_the_tiny_models_counts_by_arithmetic_equal_the_model_built_on_the_meta_device(sets):
    from orchestrator.plan import config_shape, tiny_shape
    from orchestrator.spec import load_spec

    s = load_spec(ROOT / "studies" / "smoke.yaml", sets)
    assert tiny_shape(s) == config_shape(s)


def test_gpu_smoke_benchmark_skips_cleanly_without_a_gpu(capsys):
    import torch

    from bench import gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run `python -m bench.gpu` instead")
    gpu.main([])
    assert capsys.readouterr().out.strip() == "gpu: skipped (no CUDA device)"


def test_decoding_memory_against_hand_computed_values(tmp_path):
    # The smoke model: vocabulary 600, hidden 64, 2 layers of 2 heads (head size 32), MLP 128, 96 positions.
    params = 600 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64  # tied embedding, norms
    p = plan(tmp_path, "smoke.yaml", "decoding.batch_size=16")
    assert p["model"]["parameters"] == params == 120640
    kv = 2 * 2 * 2 * 32 * 4 * 16 * 96  # K and V × layers × KV heads × head size × fp32 × batch × positions
    assert p["decoding"]["memory_per_worker_gib"] * 2**30 == pytest.approx(4 * params + kv)
    assert p["decoding"]["memory_per_gpu_gib"] is None and p["fits"] is None  # decoding on CPU

    vllm = plan(tmp_path, "smoke.yaml", "decoding.engine=vllm", "decoding.kv_cache_gb=0.5")
    assert vllm["decoding"]["memory_per_worker_gib"] * 2**30 == pytest.approx(4 * params + 2**29)

    # Two generation actors per GPU share its memory; a GPU smaller than that refuses the plan.
    shared = plan(tmp_path, "smoke.yaml", "decoding.engine=vllm", "decoding.kv_cache_gb=0.5",
                  "decoding.gpus_per_actor=0.5", "cluster.gpu_memory_gb=1.0")
    assert shared["decoding"]["memory_per_gpu_gib"] == pytest.approx(2 * vllm["decoding"]["memory_per_worker_gib"])
    assert shared["fits"] is False and shared["over"] == ["decoding needs 1.0 GiB per GPU"]
    assert plan(tmp_path, "smoke.yaml", "decoding.gpus_per_actor=0.5", "cluster.gpu_memory_gb=1.0")["fits"] is True


# The smoke study's rows per split, as its data stage measures them.
SMOKE_SPLITS = {"align_train": 150, "harmful": 150, "harmful_validation": 30, "harmful_eval": 30, "lookalike_train": 30,
                "lookalike_validation": 10, "lookalike_eval": 10, "task_sentiment_train": 90,
                "task_sentiment_validation": 20, "task_sentiment_test": 50, "task_topic_train": 15,
                "task_topic_validation": 20, "task_topic_test": 40, "pretrain": 1500}
GPUS = ("cluster.gpu_tflops=100", "cluster.train_utilisation=0.5", "cluster.decode_utilisation=0.25")


def measured_plan(tmp_path, *overrides: str) -> dict:
    """`saferay plan --json` of the smoke study, with the data stage's row counts in the store."""
    from orchestrator.runner import plan as stage_keys
    from orchestrator.spec import load_spec
    from orchestrator.stages import data
    from orchestrator.store import StudyStore, write_json

    s = load_spec(ROOT / "studies/smoke.yaml", [*GPUS, *overrides])
    store = StudyStore(tmp_path, s.study)
    with store.building("data", dict((st.name, k) for st, k in stage_keys(s))["data"]) as out:
        write_json(out / "result.json", data.Result(splits=SMOKE_SPLITS).to_json())
    return plan(tmp_path, "smoke.yaml", *GPUS, *overrides)


def hours(n: int, train: int, decode: int) -> float:
    return (6 * n * train / 0.5 + 2 * n * decode / 0.25) / 100e12 / 3600


def test_gpu_hours_against_hand_computed_values(tmp_path):
    """`orchestrator/compute.py` on the smoke study, with the data stage's row counts in the store:
    every stage's tokens, PFLOP and GPU-hours, computed here by hand from the spec's numbers."""
    p = measured_plan(tmp_path)
    n, length = p["model"]["parameters"], 96
    mix = 150 + 30 + 20 + 15  # alignment, answered look-alikes, 20 benign rows per task (topic has 15)
    max_eval = 40
    model_eval = 30 + 10 + max_eval  # harmful, look-alike and sentiment test prompts (50 cut to 40)
    tokens = {  # (trained, decoded) tokens per stage
        "base": (1500 * 4 * length, 0),  # 4 epochs of pretraining
        "align_sft": (mix * 2 * 1 * length, 0),  # 2 seeds, 1 epoch
        "vulnerability": (2 * 60 * 2 * length, 150 * (1 + 2 * 3) * length),  # 2 proxy runs of 60 rows × 2 epochs; T = 3
        "align_vaa": (mix * 2 * 2 * 2 * length * 2, 0),  # 2 variants × 2 seeds × 2 epochs, two passes a step
        "attack": (2 * 1 * 2 * 2 * 60 * 1 * length, 0),  # 2 models × 1 task × 2 ratios × 2 seeds, 60 rows, 1 epoch
        # base + 3 models × 2 seeds; 8 cells, each on the harmful, look-alike and sentiment prompts too
        "evaluate": (0, (7 * model_eval + 2 * 2 * 2 * (30 + 10 + max_eval)) * length),
        # The over-aligned model (no look-alikes, 2 epochs); 3 models × (64 bias prompts × 2 + 3 settings' evaluations).
        "debias": ((150 + 20 + 15) * 2 * length, 3 * (2 * 64 + 3 * model_eval) * length),
        "data": (0, 0), "align_defences": (0, 0), "tune": (0, 0)}
    total = 0.0
    for st in p["stages"]:
        train, decode = tokens[st["name"]]
        assert st["pflop"] == pytest.approx((6 * n * train + 2 * n * decode) / 1e15, rel=1e-9), st["name"]
        assert st["gpu_hours"] == pytest.approx(hours(n, train, decode), rel=1e-9), st["name"]
        total += hours(n, train, decode)
    assert p["compute"]["total_gpu_hours"] == pytest.approx(total, rel=1e-9)
    assert p["compute"]["assumptions"]["rows"] == "measured by the data stage"


def test_gpu_hours_of_a_sweep_applied_by_hand(tmp_path):
    """A VAA sweep of 2 trials with `tune.apply`: the trials, the baselines the stage attacks
    itself, the tuned model per seed, and that model in the attack grid and the evaluation."""
    p = measured_plan(tmp_path, "tune.enabled=true", "tune.apply=true",
                      "tune.space={vaa.rho: {type: grid, values: [0.4, 1.0]}}")
    n, length = p["model"]["parameters"], 96
    vaa_run = (150 + 30 + 20 + 15) * 2 * 2  # the mix, 2 epochs, two passes a step
    cell, validation, test = 60 * 1, 30 + 10 + 20, 30 + 10 + 40  # rows × epochs; sentiment prompts per side
    tokens = {
        # 2 trials (VAA, a sentiment cell, validation); SFT's and VAA's cells on validation; the
        # selected trial's cell on test; then vaa-tuned once per seed.
        "tune": ((2 * (vaa_run + cell) + 2 * cell + 2 * vaa_run) * length, (2 * validation + 2 * validation + test) * length),
        "attack": (3 * 1 * 2 * 2 * cell * length, 0),  # sft, vaa, vaa-tuned × 1 task × 2 ratios × 2 seeds
        "evaluate": (0, (1 + 4 * 2) * test * length + 3 * 2 * 2 * test * length),  # base + 4 models × 2 seeds; 12 cells
    }
    stages = {st["name"]: st for st in p["stages"]}
    for name, (train, decode) in tokens.items():
        assert stages[name]["gpu_hours"] == pytest.approx(hours(n, train, decode), rel=1e-9), name


def test_gpu_hours_of_the_7b_spec_and_what_cannot_be_counted(tmp_path):
    p = plan(tmp_path, "vaa-llama2-7b.yaml")
    n = p["model"]["parameters"]
    attack = next(st for st in p["stages"] if st["name"] == "attack")
    # 6 models × 4 tasks × 3 ratios = 72 cells of 1,000 rows × 5 epochs × 512 tokens, on 312 TFLOP/s at 40%.
    assert attack["gpu_hours"] == pytest.approx(6 * n * 72 * 1000 * 5 * 512 / (312e12 * 0.4) / 3600, rel=1e-9)
    assert p["compute"]["total_gpu_hours"] == pytest.approx(sum(st["gpu_hours"] for st in p["stages"]), rel=1e-9)
    # A corpus of no known size (the look-alikes file, without corpora.limits) that alignment trains on.
    q = plan(tmp_path, "vaa-llama2-7b.yaml", "align_sft.lookalike=true")
    sft = next(st for st in q["stages"] if st["name"] == "align_sft")
    assert sft["gpu_hours"] is None and "lookalike_train" in sft["unknown"] and "--until data" in sft["unknown"]
    assert q["compute"]["total_gpu_hours"] == pytest.approx(
        sum(st["gpu_hours"] for st in q["stages"] if st["gpu_hours"] is not None), rel=1e-9)
