"""Tracking calls made while the MLflow server did not answer, kept in the study's directory
until it does:

    <study>/tracking-journal/calls.jsonl   one call per line: {"op", "args", "id" (a started run)}
    <study>/tracking-journal/sent          how many of those lines MLflow has received
    <study>/tracking-journal/ids.json      run or model started while away ("pending-…") -> its MLflow id
    <study>/tracking-journal/files/        copies of the files logged while away

Calls are sent in order and counted as they go, so a replay that is itself interrupted resumes
after the last call sent (the one in flight at the interruption may be sent twice).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from orchestrator.store import write_json

PENDING = "pending-"


class Journal:
    def __init__(self, dir: Path):
        self.dir = Path(dir)
        self.calls, self.sent_file, self.ids_file = self.dir / "calls.jsonl", self.dir / "sent", self.dir / "ids.json"
        self.ids: dict[str, str] = json.loads(self.ids_file.read_text()) if self.ids_file.exists() else {}

    def _lines(self) -> list[dict]:
        return [json.loads(line) for line in self.calls.read_text().splitlines() if line] if self.calls.exists() else []

    def _sent(self) -> int:
        return int(self.sent_file.read_text()) if self.sent_file.exists() else 0

    def pending(self) -> int:
        return len(self._lines()) - self._sent()

    def resolve(self, value):
        return self.ids.get(value, value) if isinstance(value, str) and value.startswith(PENDING) else value

    def append(self, op: str, args: list, files: tuple[str, ...] = ()) -> str | None:
        """Keep a call for later; a started run gets an id that stands for it until it is sent."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in files:  # the stage may move or delete its copy before the server is back
            kept = self.dir / "files" / uuid.uuid4().hex / Path(path).name
            kept.parent.mkdir(parents=True)
            shutil.copy2(path, kept)
            args = [str(kept) if a == path else a for a in args]
        call = {"op": op, "args": args}
        if op in ("start_run", "start_model"):  # what later calls name by the id it returns
            call["id"] = f"{PENDING}{uuid.uuid4().hex}"
        with open(self.calls, "a") as f:
            f.write(json.dumps(call) + "\n")
        return call.get("id")

    def replay(self, writer) -> None:
        """Send every unsent call through `writer` (an `MlflowWriter`); raises where the server
        stops answering again, with what was sent counted."""
        lines = self._lines()
        for i in range(self._sent(), len(lines)):
            call = lines[i]
            result = getattr(writer, call["op"])(*[self.resolve(a) for a in call["args"]])
            if "id" in call:
                self.ids[call["id"]] = result
                write_json(self.ids_file, self.ids)
            self.sent_file.write_text(str(i + 1))
        self.calls.unlink(missing_ok=True)
        self.sent_file.unlink(missing_ok=True)
        shutil.rmtree(self.dir / "files", ignore_errors=True)

    def children(self, parent: str, tag: str) -> set[str]:
        """Tag `tag` of the unsent runs started under `parent`."""
        parent = self.resolve(parent)
        return {c["args"][2].get(tag) for c in self._lines()[self._sent():]
                if c["op"] == "start_run" and self.resolve(c["args"][1]) == parent}
