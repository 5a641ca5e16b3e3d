"""Each defence's cost per step against SFT's, same model, batches and threads, measured side by
side in one process through the steps the training loop runs (`jobs/steps.py`): SFT, VAA with
every step perturbed (its upper bound), Vaccine, Booster, RepNoise, and Lisa (a fine-tuning step
with its proximal term). Passes are forward+backward pairs per step, counted from the algorithm."""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import record, world_model
from bench.training import rows_for
from jobs.backends import PlainBackend
from jobs.steps import make_step
from jobs.train import collate, count_target_tokens

PASSES = {"sft": 1, "vaa": 2, "vaccine": 2, "booster": 3, "repnoise": 2, "lisa": 1}
KNOBS = {"sft": {}, "vaa": {"rho": 0.4, "lam": 1e9, "eta": 0.007, "q_clip": [0.1, 0.9], "q0": 0.5, "mode": "none"},
         "vaccine": {"rho": 2.0}, "booster": {"lam": 1.0, "alpha": 0.001}, "repnoise": {"beta": 0.1, "alpha": 0.001},
         "lisa": {"rho": 1.0, "align_steps": 1, "finetune_steps": 9, "prox_after": 0.0}}


def seconds_per_step(model, name: str, batches: list[dict], harmful: list[dict], bs: int) -> float:
    backend = PlainBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-5), None, 1.0)
    step = make_step({"step": name, "step_config": KNOBS[name], "seed": 0, "epochs": 1, "batch_size": bs}, len(batches))
    start = time.perf_counter()
    for t, (batch, harm) in enumerate(zip(batches, harmful)):
        chosen = step.choose(t)
        if isinstance(chosen, str):
            step.take(backend, batch, count_target_tokens(batch), lambda x: x)
        else:
            step.take(backend, {"all": batch, "harmful": harm},
                      {"all": count_target_tokens(batch), "harmful": count_target_tokens(harm)}, lambda x: x)
    return (time.perf_counter() - start) / len(batches)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    tok, model, corpora = world_model()
    bs, n = args.batch_size, args.steps
    rows = rows_for(tok, corpora, 2 * n * bs)

    def batch(i):
        b = collate(rows["prompt_ids"][i * bs:(i + 1) * bs], rows["target_ids"][i * bs:(i + 1) * bs], tok.pad_token_id, 128)
        return {**b, "position": torch.arange(bs)}

    batches, harmful = [batch(i) for i in range(n)], [batch(n + i) for i in range(n)]
    seconds_per_step(model, "vaccine", batches[:3], harmful[:3], bs)  # warm-up
    times = {name: seconds_per_step(model, name, batches, harmful, bs) for name in PASSES}
    sft = times["sft"]
    record([{"name": f"defences/{name}_step", "value": 1000 * s, "unit": "ms/step", "baseline": 1000 * sft,
             "ratio": s / sft, "note": f"{PASSES[name]} forward+backward pass(es); batch {bs}, {n} steps"}
            for name, s in times.items()])


if __name__ == "__main__":
    main()
