"""GPU smoke benchmark: a ~1B-parameter Llama built from a config (random weights, nothing
downloaded) trained a few steps with DeepSpeed ZeRO-2 in bf16 on one GPU; prints tokens/s and
model FLOPs utilisation (6·N·tokens/s over the GPU's dense bf16 peak). Skips cleanly without a GPU.

    python -m bench.gpu [--steps 10] [--batch 8] [--seq 1024]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import record

# Dense bf16 peak (no sparsity), by device name; MFU is left out for GPUs not listed.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=4096)


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device)")
        return
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ONE_B, torch_dtype=torch.bfloat16))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9})
    ids = torch.randint(0, ONE_B["vocab_size"], (args.batch, args.seq), device=engine.device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * args.batch * args.seq / seconds
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    mfu = 6 * n_params * tokens_per_s / peak if peak else None
    utilisation = f"MFU {mfu:.1%}" if mfu else f"MFU n/a (no known peak for {name})"
    print(f"gpu: {name}, {n_params / 1e9:.2f}B parameters, {tokens_per_s:,.0f} tokens/s, {utilisation}")
    record([{"name": "gpu/zero2_bf16_1b_tokens_per_s", "value": tokens_per_s, "unit": "tokens/s",
             "note": f"{name}, {n_params / 1e9:.2f}B, batch {args.batch} x {args.seq}, {args.steps} steps"},
            {"name": "gpu/zero2_bf16_1b_mfu", "value": mfu or 0.0, "unit": "fraction",
             "note": f"6·N·tokens/s over {peak / 1e12:.0f} TFLOPs" if peak else "no known peak"}])


if __name__ == "__main__":
    main()
