"""What a short fine-tune pays around its training: an attack-cell-sized run (one worker, one epoch
of 64 rows) through `jobs/launch.py::fit`, from a Ray task as a stage calls it, under three
settings of the Ray Train controller's environment: Ray's defaults; the study's controller poll
alone (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`); everything a study sets (`controller_env`, also
without the preemption watcher's actor). They alternate, so drift on this machine falls on all
alike.

Per run (with `--at-once N`, N runs started together: the one that ended last): wall time of
`fit`, the seconds inside the training loop, and the rest (controller and worker start-up,
imports, model load, export, the wait until the controller sees the end).
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

INTERVAL, WATCHER = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--at-once", type=int, default=1,
                    help="runs started together, from tasks of their own, as a stage starts its groups")
    args = ap.parse_args(argv)
    if args.at_once < 1:
        ap.error("--at-once: at least 1 run")
    import ray

    from jobs.launch import CONTROLLER_ENV, fit

    tok, model, corpora = world_model()
    model_dir = tempfile.mkdtemp(prefix="saferay-bench-model-")
    save_model(model, tok, model_dir)
    data = f"{model_dir}/rows.parquet"
    rows_for(tok, corpora, 64).to_parquet(data)
    cfg = dict(lr=1e-3, epochs=1, batch_size=16, max_len=128, schedule="constant", strategy="ddp", seed=0,
               model_dir=model_dir, data=data, pad_id=tok.pad_token_id, threads=1, num_workers=1, cpus_per_worker=1)
    storage = tempfile.mkdtemp(prefix="saferay-bench-ray-")

    def run() -> dict:  # the settings come from the task's runtime env
        began = time.perf_counter()
        history = fit(cfg, f"bench-startup-{os.getpid()}-{time.time_ns()}", storage)
        return {"wall": time.perf_counter() - began, "loop": history["seconds"]}

    settings = {"ray_defaults": {INTERVAL: "2.0", WATCHER: "1"},
                "poll_only": {INTERVAL: CONTROLLER_ENV[INTERVAL], WATCHER: "1"},
                "study": CONTROLLER_ENV}  # not controller_env(): this machine's environment is not the study's
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    try:
        # The controller is an actor started by the task's `fit`: it inherits the task's environment.
        tasks = {s: ray.remote(run).options(num_cpus=0, runtime_env={"env_vars": env}) for s, env in settings.items()}
        runs: dict[str, list[dict]] = {s: [] for s in settings}
        ray.get([t.remote() for t in tasks.values() for _ in range(args.at_once)])  # task processes warm
        for _ in range(args.repeats):
            for s, task in tasks.items():
                together = ray.get([task.remote() for _ in range(args.at_once)])
                runs[s].append(max(together, key=lambda r: r["wall"]))
    finally:
        ray.shutdown()
    walls = {s: statistics.mean(r["wall"] for r in rs) for s, rs in runs.items()}
    suffix = f"_{args.at_once}_at_once" if args.at_once > 1 else ""
    out = []
    for s, rs in runs.items():
        each = ", ".join(f"{r['wall']:.1f}" for r in rs)
        env = ", ".join(f"{k}={v}" for k, v in settings[s].items())
        out.append({"name": f"startup/fit_wall_{s}{suffix}", "value": walls[s], "unit": "s",
                    "baseline": walls["ray_defaults"], "ratio": walls[s] / walls["ray_defaults"],
                    "note": f"{env}; runs {each} s, of which {statistics.mean(r['loop'] for r in rs):.1f} s "
                            "in the training loop"})
    out.append({"name": f"startup/fit_saved_per_run{suffix}", "value": walls["ray_defaults"] - walls["study"], "unit": "s",
                "note": f"Ray's defaults against a study's settings; mean of {args.repeats} runs each, alternating"})
    record(out)


if __name__ == "__main__":
    main()
