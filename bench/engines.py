"""Judged decoding on the two engines, side by side in one run: `hf` (Hugging Face `generate`,
batched) against `vllm` (vLLM's CPU build), same prompts, token budget and judge, on the demo-sized
tiny Llama and on a ~50M-parameter Llama built from a config; plus what a vLLM engine costs to
start and to take a new checkpoint's weights (the reason engines are reused across checkpoints);
and the whole decode-and-judge pipeline on Ray Data (one generation actor, one judge actor) on
each engine, start-up included, against the engine alone in this process."""

from __future__ import annotations

import argparse
import tempfile

import torch

from bench.common import alignment_prompts, record, timed, world_model
from jobs.engines import HFEngine, VLLMEngine, vllm_missing
from jobs.judges import WorldJudge
from jobs.models import count_parameters, save_model

MODELS = {"tiny": dict(hidden=128, intermediate=512, layers=4, heads=4, max_len=128),
          "50m": dict(hidden=640, intermediate=1792, layers=10, heads=10, max_len=128)}


def judged_rate(engine, model_dir: str, tok, prompts, texts, max_new_tokens: int) -> tuple[float, list]:
    """Prompts per second through decode + judge, the engine already holding the model."""
    engine.load(model_dir)
    engine.generate(prompts[:8], max_new_tokens, tok.pad_token_id, tok.eos_token_id)  # warm-up
    judge = WorldJudge()

    def run():
        ids, _ = engine.generate(prompts, max_new_tokens, tok.pad_token_id, tok.eos_token_id)
        judge(texts, tok.batch_decode(ids, skip_special_tokens=True))
        return ids

    ids, seconds = timed(run)
    return len(prompts) / seconds, ids


def pipeline_rate(decoding: dict, model_dirs: list[str], prompt_ids, texts, max_new_tokens: int) -> float:
    """Prompts per second through `decode_and_judge` (actors started, each checkpoint loaded in
    turn, decoded, judged), as the vulnerability stage decodes: one block per checkpoint."""
    import pandas as pd

    from jobs.pipeline import decode_and_judge

    blocks = [pd.DataFrame({"prompt": texts, "prompt_ids": prompt_ids, "kind": "alignment", "part": "p", "task": None,
                            "category": None, "answer": None, "max_new_tokens": max_new_tokens, "target": f"t{k}",
                            "model": model_dir, "tsdi": "", "score_first": False})
              for k, model_dir in enumerate(model_dirs)]
    _, seconds = timed(decode_and_judge, blocks, {**decoding, "actors": 1, "cpus_per_actor": 1, "gpus_per_actor": 0,
                                                   "batch_size": 128, "kv_cache_gb": 0.5,
                                                   "judge_pool": {"actors": 1, "cpus_per_actor": 0.25,
                                                                  "gpus_per_actor": 0, "batch_size": None}}, "world")
    return len(texts) * len(model_dirs) / seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    if why := vllm_missing():
        print(f"skipped: {why}")
        return
    torch.set_num_threads(1)  # vLLM's CPU engine uses one core for the model, so does hf here
    rows = []
    vllm = VLLMEngine(kv_cache_gb=0.5)
    for name, shape in MODELS.items():
        tok, model, corpora = world_model(shape)
        prompts = alignment_prompts(tok, corpora, args.prompts)
        texts = [r["prompt"] for r in corpora["alignment"][: args.prompts]]
        dirs = []
        for seed in (0, 1):  # two checkpoints of one architecture: the second is loaded into the engine
            torch.manual_seed(seed)
            dirs.append(tempfile.mkdtemp(prefix=f"saferay-bench-{name}-"))
            save_model(model if seed == 0 else type(model)(model.config), tok, dirs[-1])
        params = count_parameters(model)
        hf_rate, hf_ids = judged_rate(HFEngine(batch_size=128), dirs[0], tok, prompts, texts, args.max_new_tokens)
        vllm.close()
        _, start = timed(vllm.load, dirs[0])
        vllm_rate, vllm_ids = judged_rate(vllm, dirs[0], tok, prompts, texts, args.max_new_tokens)
        _, reload = timed(vllm.load, dirs[1])
        same = sum(a == b for a, b in zip(hf_ids, vllm_ids)) / len(prompts)
        if name == "tiny":  # through Ray Data, the engine in an actor (the 50M model's vLLM start is minutes)
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            checkpoints = dirs * 4  # 8 checkpoints of 2 sets of weights, 2,048 prompts
            through = {e: pipeline_rate({"engine": e}, checkpoints, prompts, texts, args.max_new_tokens)
                       for e in ("hf", "vllm")}
            ray.shutdown()
            rows += [{"name": f"engines/{name}_pipeline_{e}", "value": v, "unit": "prompts/s",
                      "baseline": hf_rate if e == "hf" else vllm_rate, "ratio": v / (hf_rate if e == "hf" else vllm_rate),
                      "note": "decode_and_judge over 8 checkpoints (start-up, loads, decoding, judging) against the "
                              "engine alone on one"}
                     for e, v in through.items()]
        note = f"{params / 1e6:.1f}M parameters, {len(prompts)} prompts x {args.max_new_tokens} tokens, 1 thread"
        rows += [
            {"name": f"engines/{name}_hf", "value": hf_rate, "unit": "prompts/s", "note": note},
            {"name": f"engines/{name}_vllm", "value": vllm_rate, "unit": "prompts/s", "baseline": hf_rate,
             "ratio": vllm_rate / hf_rate, "note": note},
            {"name": f"engines/{name}_vllm_same_tokens", "value": same, "unit": "fraction"},
            {"name": f"engines/{name}_vllm_start", "value": start, "unit": "s",
             "note": "engine start (processes, weights, KV cache)"},
            {"name": f"engines/{name}_vllm_new_checkpoint", "value": reload, "unit": "s", "baseline": start,
             "ratio": reload / start, "note": "a checkpoint's weights loaded into the running engine"},
        ]
    vllm.close()
    record(rows)


if __name__ == "__main__":
    main()
