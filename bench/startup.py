"""What a short fine-tune pays around its training: an attack-cell-sized run (one worker, one epoch
of 64 rows) through `jobs/launch.py::fit`, from a Ray task as a stage calls it, with Ray Train's
controller polling its workers every 2 s (Ray's default) and every 0.5 s (a study's setting,
`controller_env`). The two alternate, so drift on this machine falls on both alike.

Per run: wall time of `fit`, the seconds inside the training loop, and the rest (controller and
worker start-up, imports, model load, export, the wait until the controller sees the end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench.common import record, world_model
from bench.training import rows_for
from jobs.models import save_model

INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import ray

    from jobs.launch import controller_env, fit

    tok, model, corpora = world_model()
    model_dir = tempfile.mkdtemp(prefix="saferay-bench-model-")
    save_model(model, tok, model_dir)
    data = f"{model_dir}/rows.parquet"
    rows_for(tok, corpora, 64).to_parquet(data)
    cfg = dict(lr=1e-3, epochs=1, batch_size=16, max_len=128, schedule="constant", strategy="ddp", seed=0,
               model_dir=model_dir, data=data, pad_id=tok.pad_token_id, threads=1, num_workers=1, cpus_per_worker=1)
    storage = tempfile.mkdtemp(prefix="saferay-bench-ray-")

    def run() -> dict:  # the poll comes from the task's runtime env
        began = time.perf_counter()
        history = fit(cfg, f"bench-startup-{os.getpid()}-{time.time_ns()}", storage)
        return {"wall": time.perf_counter() - began, "loop": history["seconds"]}

    ours = controller_env()[INTERVAL]
    if ours == "2.0":
        raise SystemExit(f"{INTERVAL}=2.0 in this environment: that is Ray's default, nothing to compare")
    settings = {"2.0": "Ray's default", ours: "a study's"}
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    try:
        # The controller is an actor started by the task's `fit`: it inherits the task's environment.
        tasks = {s: ray.remote(run).options(num_cpus=0, runtime_env={"env_vars": {INTERVAL: s}}) for s in settings}
        runs: dict[str, list[dict]] = {s: [] for s in settings}
        ray.get([t.remote() for t in tasks.values()])  # each task process started and warm
        for _ in range(args.repeats):
            for s, task in tasks.items():
                runs[s].append(ray.get(task.remote()))
    finally:
        ray.shutdown()
    walls = {s: statistics.mean(r["wall"] for r in rs) for s, rs in runs.items()}
    out = []
    for s, rs in runs.items():
        each = ", ".join(f"{r['wall']:.1f}" for r in rs)
        out.append({"name": f"startup/fit_wall_poll_{s}s", "value": walls[s], "unit": "s",
                    "baseline": walls["2.0"], "ratio": walls[s] / walls["2.0"],
                    "note": f"{settings[s]} controller poll; runs {each} s, "
                            f"of which {statistics.mean(r['loop'] for r in rs):.1f} s in the training loop"})
    out.append({"name": "startup/fit_saved_per_run", "value": walls["2.0"] - walls[ours], "unit": "s",
                "note": f"mean of {args.repeats} runs each, alternating"})
    record(out)


if __name__ == "__main__":
    main()
