"""Ctrl-C in a study's driver: a KeyboardInterrupt that is never lost.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be. If
that is inside a finaliser or a callback the interpreter calls on its own (a `__del__`, a weakref
callback: "Exception ignored in ..."), the exception is printed and dropped, and the study goes
on as if nobody had pressed Ctrl-C. CI saw exactly that: a SIGINT mid-`align_sft`, the stage
completed, and the run exited 0. So the handler here raises as Python's does and, until the
runner says it has taken the interrupt (`taken()`), raises it again every two seconds.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading

RETRY_SECONDS = 2.0
_lock = threading.Lock()
_pending = False


def _on_sigint(signum, frame):
    global _pending
    with _lock:
        first, _pending = not _pending, True
    if first:
        threading.Thread(target=_insist, name="ctrl-c", daemon=True).start()
    raise KeyboardInterrupt


def _insist() -> None:
    """Deliver the interrupt again (through `_on_sigint`, in the main thread) until it is taken."""
    while True:
        threading.Event().wait(RETRY_SECONDS)
        with _lock:
            if not _pending:
                return
        _thread.interrupt_main(signal.SIGINT)


def taken() -> None:
    """The interrupt reached code that acts on it: stop re-raising."""
    global _pending
    with _lock:
        _pending = False


@contextlib.contextmanager
def insistent_ctrl_c():
    """While the block runs, Ctrl-C raises KeyboardInterrupt until `taken()` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        taken()
        signal.signal(signal.SIGINT, before)
