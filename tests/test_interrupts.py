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

    # Python's own handler, stated: a process started with SIGINT ignored (a background job of a
    # non-interactive shell, as CI may start the suite) does not get it by default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
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


# Ctrl-C in the middle of the driver's first `import ray` (the runner imports it lazily, as a
# stage starts): the interrupt is raised where `ray._private.worker` is imported, deterministically,
# leaving half of Ray's modules behind. Leaving must not import Ray again (CI saw a re-import fail
# with "partially initialized module 'ray'" and exit 1 instead of 130).
HALF_IMPORTED_RAY = textwrap.dedent("""
    import sys
    from orchestrator.cli import _exit_now

    class CtrlCDuringImport:
        def find_spec(self, name, path=None, target=None):
            if name == "ray._private.worker":
                sys.meta_path.remove(self)
                raise KeyboardInterrupt
            return None

    sys.meta_path.insert(0, CtrlCDuringImport())
    try:
        import ray
    except KeyboardInterrupt:
        print("interrupted inside import ray; half of it left:", "ray._private" in sys.modules)
    _exit_now(130)
""")


def test_leaving_after_a_ctrl_c_inside_import_ray_exits_130():
    done = subprocess.run([sys.executable, "-c", HALF_IMPORTED_RAY], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "half of it left: True" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert done.returncode == 130, done.stderr[-2000:]
