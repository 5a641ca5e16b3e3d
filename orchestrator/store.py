"""The study store: stage outputs addressed by key, complete only once moved into place.

    <root>/studies/<study>/stages/<stage>/<key>/      a finished stage (result.json inside)
    <root>/studies/<study>/stages/<stage>/.partial-*  a stage being built (never read)
    <root>/studies/<study>/state.json                 the latest execution, for `saferay show`
    <root>/studies/<study>/run.lock                   held (flock) by the one process running it
    <root>/mlflow.db, <root>/mlartifacts/             the embedded MLflow store

Stage keys ignore the study's name, so a study whose `data` or `base` key another study of the
same store has completed adopts that output (hard links, no copy of the bytes) instead of
recomputing it: two studies on one base pretrain once. Only stages whose outputs carry nothing of
their study (no MLflow run ids) are shared.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from jobs.records import InputError

DEFAULT_ROOT = ".saferay"
SHARED_STAGES = ("data", "base")


def store_root(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("SAFERAY_HOME") or DEFAULT_ROOT).absolute()


def stage_key(name: str, version: int, config: dict, input_keys: dict[str, str]) -> str:
    blob = json.dumps({"stage": name, "version": version, "config": config, "inputs": input_keys},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_json(path: Path, data) -> None:
    """Write-then-rename, so that a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class StudyBusy(InputError):
    """The study is being run by another process (the CLI exits 2; nothing of it is touched)."""


class StudyStore:
    def __init__(self, root: Path, study: str):
        self.root = Path(root)
        self.study = study
        self.dir = self.root / "studies" / study

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def stage_dir(self, name: str, key: str) -> Path:
        return self.dir / "stages" / name / key

    def is_complete(self, name: str, key: str) -> bool:
        return (self.stage_dir(name, key) / "result.json").exists()

    def result(self, name: str, key: str) -> dict:
        return json.loads((self.stage_dir(name, key) / "result.json").read_text())

    def adopt(self, name: str, key: str) -> str | None:
        """Take a shareable stage's finished output from another study of this store, if one has it;
        returns that study's name. Linked into a private directory first and renamed into place, so
        a half-adopted stage never looks complete."""
        if name not in SHARED_STAGES or self.is_complete(name, key):
            return None
        for other in sorted((self.root / "studies").glob(f"*/stages/{name}/{key}/result.json")):
            source = other.parent
            final = self.stage_dir(name, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".partial-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            try:
                shutil.copytree(source, tmp, copy_function=_link_or_copy)
                os.rename(tmp, final)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not self.is_complete(name, key):
                    raise
            return source.parents[2].name
        return None

    @contextlib.contextmanager
    def building(self, name: str, key: str):
        """A private directory for a stage's outputs, moved into place only if the body succeeds.

        The caller writes result.json last; a killed stage leaves a .partial-* directory that
        nothing reads and the next attempt removes.
        """
        final = self.stage_dir(name, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".partial-{key}-*"):
            if not _owned_by_live_process(stale):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".partial-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        try:
            yield tmp
            if not (tmp / "result.json").exists():
                raise RuntimeError(f"stage {name} wrote no result.json")
            if final.exists():  # a concurrent run of the same study finished first: keep its output
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def running(self):
        """Held while this study runs: a second `saferay run` of the same study into the same
        store (another terminal, a submitted copy) would compute the same stages and overwrite
        state.json under the first. The lock is the kernel's (flock), so a killed run releases it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "run.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise StudyBusy(f"study '{self.study}' is already running in {self.root} ({holder}); "
                                f"wait for it, or stop it, then run again") from None
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def load_state(self) -> dict | None:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else None

    def save_state(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state["updated"] = time.time()
        write_json(self.state_path, state)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # outputs are never modified in place: sharing the inode is safe
    except OSError:
        shutil.copy2(src, dst)


def _owned_by_live_process(partial: Path) -> bool:
    try:
        pid = int(partial.name.split("-")[2])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()
