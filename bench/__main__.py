"""`make bench`: every benchmark in turn, then the whole table from bench/results.json."""

from __future__ import annotations

import json
import sys
import time

from bench import data, decoding, defences, engines, gpu, orchestration, startup, store, training, vaa
from bench.common import RESULTS

BENCHMARKS = [("decoding", decoding.main), ("engines", engines.main), ("data", data.main), ("training", training.main), ("vaa", vaa.main), ("defences", defences.main),
              ("orchestration", orchestration.main), ("startup", startup.main), ("store", store.main), ("gpu", gpu.main)]


def main():
    only = set(sys.argv[1:])  # `python -m bench training vaa` re-runs those rows only
    if not only:
        RESULTS.unlink(missing_ok=True)
    for name, fn in BENCHMARKS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        print(f"\n== {name}", flush=True)
        fn([])
        print(f"({name}: {time.perf_counter() - start:.0f}s)", flush=True)
    if not RESULTS.exists():
        return
    rows = json.loads(RESULTS.read_text())["rows"]
    print(f"\n{'name':<44} {'value':>12} {'unit':<10} {'ratio':>7}  target")
    for r in rows:
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        print(f"{r['name']:<44} {r['value']:>12.4g} {r['unit']:<10} {ratio:>7}  {r.get('target') or ''}")
    print(f"\nwritten: {RESULTS}")


if __name__ == "__main__":
    main()
