"""Checks that run before a study touches its store: every input a stage will need is there and
usable, so bad input fails in seconds with one message and leaves the store as it was."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from jobs.records import InputError
from orchestrator.spec import StudySpec


STORE_ERRORS = (  # what pyarrow's S3 client says, and what it means for the user
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("INVALID_ACCESS_KEY_ID", "the credentials in the environment are not known to the store"),
    ("SIGNATURE_DOES_NOT_MATCH", "the credentials in the environment are wrong (the secret key does not match)"),
    ("ACCESS_DENIED", "the credentials in the environment may not write there"),
    ("NETWORK_CONNECTION", "cannot reach the object store (check AWS_ENDPOINT_URL or the network)"),
)


def check_store(location: str) -> None:
    """An object-store store answers, and these credentials may write to it: a probe object is
    written and deleted. Credentials come from the environment only, and no message names them."""
    import uuid

    from jobs.storage import is_remote, join, remove, write_text

    if not is_remote(location):
        return
    if location.startswith("s3://") and not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                                             or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE")):
        raise InputError(f"--store {location}: no credentials in the environment (set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    probe = join(location, f".saferay-probe-{uuid.uuid4().hex}")
    try:
        write_text(probe, "saferay checks it may write here")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - every failure of the probe is the store's
        text = str(e)
        cause = next((meaning for code, meaning in STORE_ERRORS if code in text), None)
        if cause is None:  # a message of its own: its first line, never a credential
            cause = text.splitlines()[0][:200] if text else type(e).__name__
            for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
                if os.environ.get(name):
                    cause = cause.replace(os.environ[name], "***")
        raise InputError(f"--store {location}: {cause}") from None


def check_corpora(spec: StudySpec, read_rows: bool) -> None:
    """Corpus files exist; with `read_rows` (the data stage will run), every row is checked too, and
    the corpora are split as the data stage will split them (a corpus too small fails here)."""
    if spec.corpora.source != "files":
        if read_rows:  # SafetyWorld generates a demo-sized world in well under a second
            from jobs.corpora import split_corpora
            from orchestrator.stages.data import load_corpora

            split_corpora(load_corpora(spec), spec.corpora.model_dump())
        return
    from jobs.models import looks_local
    from orchestrator.stages.data import read_corpus_file

    for name, path in spec.corpora.files.items():
        is_file = looks_local(path) or Path(path).suffix in (".jsonl", ".json", ".parquet")
        if is_file and not Path(path).exists():
            raise InputError(f"corpora.files.{name}: {path}: no such file")
        if read_rows:
            read_corpus_file(spec, name)  # raises naming file:line on the first bad row, or an empty corpus


def check_model(spec: StudySpec) -> None:
    """A pretrained source given as a local path exists and its tokenizer fits its embedding."""
    source = spec.model.source
    if source == "tiny":
        return
    from jobs.models import looks_local, check_vocab, load_tokenizer

    if not looks_local(source):
        return  # a hub id is resolved by the base stage (where a network exists)
    if not Path(source).exists():
        raise InputError(f"model.source: model path does not exist: {source}")
    check_vocab(source, load_tokenizer(source), source)


def check_judge(spec: StudySpec) -> None:
    """A model judge given as a local path is a model directory transformers can read (the judge
    pool would otherwise fail at its first verdict, after every model was trained)."""
    from jobs.models import looks_local
    from orchestrator.spec_sections import MODEL_JUDGES

    e = spec.evaluate
    if e.judge not in MODEL_JUDGES or not looks_local(e.judge_model):
        return  # a hub id is fetched by the judge pool (where a network exists)
    if not Path(e.judge_model).is_dir():
        raise InputError(f"evaluate.judge_model: {e.judge_model}: no such model directory")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(e.judge_model)
    except Exception as err:  # noqa: BLE001 - whatever transformers says, it is the user's path
        raise InputError(f"evaluate.judge_model: {e.judge_model} does not load as a model "
                         f"({str(err).splitlines()[0][:160]})") from None
    if e.judge == "beaver-dam" and len(getattr(config, "id2label", {}) or {}) != 14:
        raise InputError(f"evaluate.judge_model: {e.judge_model} is not a beaver-dam-style classifier (it has "
                         f"{len(config.id2label or {})} labels; beaver-dam has one per harm category, 14)")


def check_cluster(address: str | None, timeout: float = 3.0) -> None:
    """`cluster.address` answers on its port (Ray would otherwise retry for a long while)."""
    if not address or address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise InputError(f"cluster.address: '{address}' is not host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"cluster.address: cannot connect to {host}:{port} ({e.strerror or e})") from None


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "file", "databricks")


def check_tracking(uri: str | None, timeout: float = 3.0) -> None:
    """`tracking.uri` parses as a URI MLflow knows and, for a server, answers on its port."""
    if not uri:
        return  # the embedded default: a SQLite store in the study store
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        raise InputError(f"tracking.uri: '{uri}' is not a tracking URI (expected one of "
                         f"{', '.join(s + '://' for s in TRACKING_SCHEMES)})")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise InputError(f"tracking.uri: '{uri}' is not a SQLite URI (sqlite:///relative/path or sqlite:////abs/path)")
    if scheme in ("http", "https"):
        try:
            port = parsed.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise InputError(f"tracking.uri: '{uri}' has no valid port") from None
        if not parsed.hostname:
            raise InputError(f"tracking.uri: '{uri}' names no host")
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        except OSError as e:
            raise InputError(f"tracking.uri: cannot connect to {parsed.hostname}:{port} ({e.strerror or e}); "
                             "start the tracking server (saferay tracking-server) or fix the address") from None


def check_memory(spec: StudySpec) -> None:
    """A tiny model whose training cannot fit this machine's memory fails here, not minutes later
    in a native out-of-memory abort. (GPU and cluster runs: `saferay plan` and cluster.gpu_memory_gb.)"""
    import psutil

    from orchestrator.plan import training_memory

    if spec.model.source != "tiny" or spec.cluster.address or spec.align_sft.use_gpu:
        return
    per_worker, workers = sum(training_memory(spec)) / 2**30, spec.align_sft.num_workers
    have = psutil.virtual_memory().total / 2**30
    if per_worker * workers > 0.8 * have:
        t = spec.model.tiny
        raise InputError(f"model.tiny: training needs about {per_worker:.1f} GiB per worker × {workers} workers "
                         f"(hidden {t.hidden}, layers {t.layers}, vocab {t.vocab_size}, max_len {t.max_len}, "
                         f"align_sft.batch_size {spec.align_sft.batch_size}), more than 80% of this machine's "
                         f"{have:.0f} GiB; make the model or the batch smaller")


def check_resources(spec: StudySpec) -> None:
    """What the study's runs and actors ask fits the local Ray (a cluster's nodes are checked once
    the driver has joined it: `orchestrator/capacity.py`)."""
    from orchestrator.capacity import check_capacity, local_capacity

    if spec.cluster.address is None:
        check_capacity(spec, local_capacity(spec))


def check_decoding(spec: StudySpec) -> None:
    """`decoding.engine: vllm` needs vLLM installed, a model it can load from local files, (on CPU) a
    head size its attention kernels take, and a KV cache that holds one request: otherwise the
    engine fails minutes into a stage. (Its pools' resources: `check_resources`.)"""
    d = spec.decoding
    if d.engine != "vllm":
        return
    from jobs.engines import vllm_missing
    from jobs.models import looks_local

    source = spec.model.source
    if source != "tiny" and not looks_local(source):
        raise InputError(f"decoding.engine: vllm loads local checkpoints; model.source '{source}' is a hub id: "
                         f"download it to a directory first, or set decoding.engine: hf")
    if why := vllm_missing():
        raise InputError(f"decoding.engine: {why}; or set decoding.engine: hf")

    if not d.gpus_per_actor:  # generation actors hold no GPU: vLLM runs its CPU kernels
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        if source == "tiny":
            head, where = spec.model.tiny.hidden // spec.model.tiny.heads, "model.tiny has hidden / heads"
        elif not (Path(source) / "config.json").exists():
            raise InputError(f"decoding.engine: vllm loads checkpoints with a config.json; {source} has none")
        else:
            config = json.loads((Path(source) / "config.json").read_text())
            head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            where = f"{source} has head size"
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            raise InputError(f"decoding.engine: vllm on CPU takes head sizes {sizes}; {where} = {head}: "
                             f"change the model or set decoding.engine: hf")
    check_kv_cache(spec)  # after the config.json check above, whose message is the clearer one


def check_kv_cache(spec: StudySpec) -> None:
    """vLLM starts only with room in `decoding.kv_cache_gb` for one request of its longest length,
    the model's full context unless `decoding.max_model_len` is shorter (Llama-2-7B's 4096
    positions in fp32: 4 GiB, against a default of 0.25), in vLLM's blocks (`plan.vllm_block`);
    otherwise the first evaluation fails as the engine starts, hours into a study."""
    from orchestrator.plan import GIB, vllm_context_bytes

    d = spec.decoding
    positions, need = vllm_context_bytes(spec)  # positions: max_model_len, cut to the model's context
    if d.max_model_len and d.max_model_len > positions:
        raise InputError(f"decoding.max_model_len: {d.max_model_len} is longer than the model's context "
                         f"({positions} positions), which vLLM refuses")
    if need > d.kv_cache_gb * GIB:
        length = "decoding.max_model_len" if d.max_model_len else "the model's full context"
        enough = math.ceil(need / GIB * 100) / 100  # rounded up: the value printed is one that fits
        raise InputError(f"decoding.kv_cache_gb: {d.kv_cache_gb:g} GiB cannot hold one request at {length} "
                         f"({positions} positions need at least {enough:.2f} GiB of fp32 KV cache, which vLLM "
                         f"asks for before it starts): raise decoding.kv_cache_gb, or set a shorter "
                         f"decoding.max_model_len")


def preflight(spec: StudySpec, data_cached: bool) -> None:
    check_tracking(spec.tracking.uri)
    check_cluster(spec.cluster.address)
    check_corpora(spec, read_rows=not data_cached)
    check_model(spec)
    check_judge(spec)
    check_memory(spec)
    check_resources(spec)
    check_decoding(spec)
