"""Live progress: a rich table of stages, fed by the driver and by Ray workers.

Workers cannot print to the driver's terminal, so they post to a small actor
(`ProgressBoard`) that a driver thread polls about once a second.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

SYMBOLS = {"pending": "·", "running": "▶", "complete": "✓", "cached": "≡", "failed": "✗", "interrupted": "✗"}


class ProgressBoard:
    """A Ray actor (num_cpus=0): the latest message per label."""

    def __init__(self):
        self.messages: dict[str, str] = {}

    def post(self, label: str, message: str) -> None:
        self.messages[label] = message

    def read(self) -> dict[str, str]:
        return dict(self.messages)


class RemoteReporter:
    """The `progress(step, total, loss)` callback jobs accept, posting to the board."""

    def __init__(self, board, label: str, what: str | None = None):
        self.board, self.label, self.what = board, label, what or label

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.board.post.remote(self.label, f"{self.what}: step {step}/{total}, loss {loss:.3f}")


def start_board():
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


class StudyProgress:
    """The stage table on the terminal; plain lines where output is not a terminal."""

    def __init__(self, stages: list[tuple[str, str]], console: Console | None = None):
        self.console = console or Console()
        self.rows = {name: {"key": key, "status": "pending", "seconds": None, "detail": ""} for name, key in stages}
        self.board = None
        self._started: dict[str, float] = {}
        self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False) \
            if self.console.is_terminal else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        if self._live:
            self._live.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)
        if self._live:
            self._live.update(self._table())
            self._live.__exit__(*exc)

    def set(self, name: str, status: str, detail: str = "", seconds: float | None = None) -> None:
        row = self.rows[name]
        if status == "running" and row["status"] != "running":
            self._started[name] = time.perf_counter()
        row.update(status=status, detail=detail, seconds=seconds)
        if not self._live and (status != "running" or not detail):
            took = f" {seconds:.1f}s" if seconds is not None else ""
            self.console.print(f"{SYMBOLS[status]} {name:<10} {row['key']} {status}{took} {detail}".rstrip())
        self._refresh()

    def detail(self, name: str, message: str) -> None:
        self.rows[name]["detail"] = message
        self._refresh()

    def _poll(self):
        while not self._stop.wait(1.0):
            if self.board is not None:
                try:
                    import ray

                    messages = ray.get(self.board.read.remote(), timeout=2)
                except Exception:  # the board is only a display aid; never fail the study for it
                    continue
                for name, row in self.rows.items():
                    if row["status"] == "running" and name in messages:
                        row["detail"] = messages[name]
            self._refresh()

    def _refresh(self):
        if self._live:
            self._live.update(self._table())

    def _table(self) -> Table:
        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
        for col in ("", "stage", "key", "status", "time", "detail"):
            table.add_column(col)
        for name, row in self.rows.items():
            secs = row["seconds"]
            if secs is None and row["status"] == "running":
                secs = time.perf_counter() - self._started.get(name, time.perf_counter())
            table.add_row(SYMBOLS[row["status"]], name, row["key"], row["status"],
                          f"{secs:.1f}s" if secs is not None else "", row["detail"])
        return table
