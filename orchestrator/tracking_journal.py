"""Tracking calls made while the MLflow server did not answer, kept in the study's directory
until it does:

    <study>/tracking-journal/calls.jsonl   one call per line: {"op", "args", "id" (a started run)}
    <study>/tracking-journal/sent          how many of those lines MLflow has received
    <study>/tracking-journal/ids.json      run or model started while away ("pending-…") -> its MLflow id
    <study>/tracking-journal/files/        copies of the files logged while away
    <study>/tracking-journal/rejected.jsonl  calls the server answered with an error when sent

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
        self.rejected = self.dir / "rejected.jsonl"
        self.ids: dict[str, str] = json.loads(self.ids_file.read_text()) if self.ids_file.exists() else {}

    def _lines(self) -> list[dict]:
        return [json.loads(line) for line in self.calls.read_text().splitlines() if line] if self.calls.exists() else []

    def _sent(self) -> int:
        # No calls file: a finished replay, even one stopped between removing the two files.
        return json.loads(self.sent_file.read_text()) if self.sent_file.exists() and self.calls.exists() else 0

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

    def replay(self, writer, unreachable) -> list[tuple[dict, str]]:
        """Send every unsent call through `writer` (an `MlflowWriter`). Raises where the server
        stops answering again (`unreachable(error)`), with what was sent counted. A call the
        server answers with an error is set aside in `rejected.jsonl`, so that one bad call cannot
        hold back the rest for good; returns those, with their errors."""
        lines, refused = self._lines(), []
        for i in range(self._sent(), len(lines)):
            call = lines[i]
            try:
                result = getattr(writer, call["op"])(*[self.resolve(a) for a in call["args"]])
            except Exception as e:
                if unreachable(e):
                    raise
                refused.append((call, f"{type(e).__name__}: {e}"))
                with open(self.rejected, "a") as f:
                    f.write(json.dumps({**call, "error": refused[-1][1]}) + "\n")
            else:
                if "id" in call:
                    self.ids[call["id"]] = result
                    write_json(self.ids_file, self.ids)
            write_json(self.sent_file, i + 1)
        self.calls.unlink(missing_ok=True)  # first: without it, `sent` counts nothing
        self.sent_file.unlink(missing_ok=True)
        shutil.rmtree(self.dir / "files", ignore_errors=True)
        return refused

    def children(self, parent: str, tag: str) -> set[str]:
        """Tag `tag` of the unsent runs started under `parent`."""
        parent = self.resolve(parent)
        return {c["args"][2].get(tag) for c in self._lines()[self._sent():]
                if c["op"] == "start_run" and self.resolve(c["args"][1]) == parent}
