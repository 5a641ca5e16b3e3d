"""Orchestration overhead: the demo study's wall time against the time its stages account for,
and the training stages' in-loop compute against their stage time; then a fully cached re-run.

- outside-stage overhead: wall − Σ stage seconds (CLI start, planning, MLflow runs, summary)
- in-stage overhead of a training stage: stage seconds − seconds inside its training loop
  (Ray start, worker start, model load/export, data sharding, checkpoints)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import record

ROOT = Path(__file__).resolve().parent.parent


def run(spec: str, store: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", spec, "--store", store], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default="studies/demo.yaml")
    args = ap.parse_args(argv)
    store = tempfile.mkdtemp(prefix="saferay-bench-store-")
    first = run(args.spec, store)
    cached = run(args.spec, store)
    study_dir = next((Path(store) / "studies").iterdir())
    state = json.loads((study_dir / "state.json").read_text())
    # The cached run rewrote state.json; stage seconds of the computing run are in the results.
    results = {s["name"]: json.loads((study_dir / "stages" / s["name"] / s["key"] / "result.json").read_text())
               for s in state["stages"]}
    staged = sum(r["seconds"] for r in results.values())
    rows = [
        {"name": "orchestration/study_wall", "value": first, "unit": "s", "note": args.spec},
        {"name": "orchestration/sum_of_stage_seconds", "value": staged, "unit": "s"},
        {"name": "orchestration/outside_stage_overhead", "value": (first - staged) / first, "unit": "fraction",
         "target": "<= 0.15"},
        {"name": "orchestration/cached_rerun", "value": cached, "unit": "s", "baseline": first,
         "ratio": cached / first, "target": "< 0.10"},
    ]
    for name in ("base", "align_sft"):
        r = results[name]
        if "train_seconds" in r:
            rows.append({"name": f"orchestration/{name}_in_loop_share", "value": r["train_seconds"] / r["seconds"],
                         "unit": "fraction", "note": f"{r['train_seconds']:.1f}s in the loop of {r['seconds']:.1f}s"})
    for name, r in results.items():
        rows.append({"name": f"orchestration/stage_{name}", "value": r["seconds"], "unit": "s"})
        if "peak_rss_mb" in r:
            rows.append({"name": f"memory/peak_rss_{name}", "value": r["peak_rss_mb"], "unit": "MiB",
                         "note": "process high-water mark of the stage's job (an upper bound in reused Ray workers)"})
    if "cost_over_one_proxy_run" in results.get("vulnerability", {}):
        v = results["vulnerability"]
        rows.append({"name": "vulnerability/cost_over_one_proxy_run", "value": v["cost_over_one_proxy_run"],
                     "unit": "x", "note": f"proxy phase {v['proxy_seconds']:.1f}s, judged decoding "
                                          f"{v['decode_seconds']:.1f}s ({v['decoded_prompts_per_second']:.0f} prompts/s)"})
    record(rows)


if __name__ == "__main__":
    main()
