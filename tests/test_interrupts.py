"""A Ctrl-C that lands inside a finaliser is not lost (orchestrator/interrupts.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The main thread loops; the first object's finaliser is where SIGINT lands. Python drops an
# exception raised there ("Exception ignored in ..."), so without a handler that raises again,
# the loop runs to its end.
SCRIPT = textwrap.dedent("""
    import contextlib, os, signal, sys, threading, time
    from orchestrator.interrupts import insistent_ctrl_c

    entered = threading.Event()

    class SlowFinaliser:
        first = True

        def __del__(self):
            if SlowFinaliser.first:
                SlowFinaliser.first = False
                entered.set()
                time.sleep(3)

    def press_ctrl_c():
        entered.wait()
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    handler = insistent_ctrl_c() if sys.argv[1] == "insistent" else contextlib.nullcontext()
    began = time.monotonic()
    try:
        with handler:
            for _ in range(40):
                SlowFinaliser()  # dropped at once: its finaliser runs here
                time.sleep(0.25)
        print("finished")
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - began:.1f}s")
""")


def run(handler: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, handler], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_ctrl_c_inside_a_finaliser_still_interrupts():
    plain = run("python")
    assert "Exception ignored" in plain.stderr and plain.stdout.strip() == "finished", (plain.stdout, plain.stderr)
    ours = run("insistent")
    assert "Exception ignored" in ours.stderr, ours.stderr
    assert ours.stdout.startswith("interrupted"), (ours.stdout, ours.stderr)
    assert float(ours.stdout.split()[-1].rstrip("s")) < 8, ours.stdout
