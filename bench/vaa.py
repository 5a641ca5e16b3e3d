"""VAA step cost over the SFT step, same model and batch, measured side by side (target <= 1.6x).

Two VAA figures: every step perturbed (λ_t = 1, the upper bound: two forward and two backward
passes) and a whole run's worth of steps under the λ ramp (λ = 1, E = 5 epochs, so the
perturbation coin comes up 0, 20, 40, 60, 80% of the time), which is what a study pays.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import record, world_model
from bench.training import rows_for
from jobs.backends import PlainBackend
from jobs.train import collate, count_target_tokens
from jobs.vaa import GroupSampler, lambda_at, vaa_step


def steps_seconds(model, batches, perturbs, rho=0.4) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # tiny steps: the model barely drifts
    backend = PlainBackend(model, optimizer, None, 1.0)
    start = time.perf_counter()
    for batch, perturb in zip(batches, perturbs):
        vaa_step(backend, batch, count_target_tokens(batch), rho, perturb)
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps-per-epoch", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    tok, model, corpora = world_model()
    n = args.steps_per_epoch * args.epochs
    bs = args.batch_size
    rows = rows_for(tok, corpora, n * bs)
    batches = [collate(rows["prompt_ids"][i * bs:(i + 1) * bs], rows["target_ids"][i * bs:(i + 1) * bs],
                       tok.pad_token_id, 128) for i in range(n)]
    sampler = GroupSampler(seed=0)
    ramp = [sampler.perturb(lambda_at(s, args.steps_per_epoch, args.epochs, 1.0)) for s in range(n)]
    steps_seconds(model, batches[:4], [False, True] * 2)  # warm-up
    sft = steps_seconds(model, batches, [False] * n)
    always = steps_seconds(model, batches, [True] * n)
    ramped = steps_seconds(model, batches, ramp)
    record([
        {"name": "vaa/sft_step", "value": 1000 * sft / n, "unit": "ms/step", "note": f"batch {bs}, {n} steps"},
        {"name": "vaa/vaa_step_always_perturbed", "value": 1000 * always / n, "unit": "ms/step",
         "baseline": 1000 * sft / n, "ratio": always / sft, "note": "upper bound: 2 forward + 2 backward"},
        {"name": "vaa/vaa_step_lambda_ramp", "value": 1000 * ramped / n, "unit": "ms/step", "baseline": 1000 * sft / n,
         "ratio": ramped / sft, "target": "<= 1.6",
         "note": f"{sum(ramp)}/{n} steps perturbed (λ=1, E={args.epochs})"},
    ])


if __name__ == "__main__":
    main()
