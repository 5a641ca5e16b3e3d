"""The study store: stage outputs addressed by key, complete only once moved into place.

    <root>/studies/<study>/stages/<stage>/<key>/      a finished stage (result.json inside)
    <root>/studies/<study>/stages/<stage>/.partial-<key>  a stage being built (never read)
    <root>/studies/<study>/state.json                 the latest execution, for `saferay show`
    <root>/studies/<study>/run.lock                   held (flock) by the one process running it
    <root>/mlflow.db, <root>/mlartifacts/             the embedded MLflow store

The root is a path (a filesystem every node sees) or an object store (`s3://bucket/prefix`,
`gs://...`, through `jobs/storage.py`). On an object store a stage writes its files straight into
`stages/<stage>/<key>/` (its workers from any node, the driver when the stage ends) and is
complete once its result.json, written last, is there; `run.lock` is an object naming its holder;
the driver keeps a working copy of what it reads, its logs and the embedded MLflow database in
`SAFERAY_CACHE/stores/...` (a cluster study points `tracking.uri` at a server instead).

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
import tempfile
import time
import uuid
from pathlib import Path

from jobs.records import InputError
from jobs.storage import cache_root, exists, is_remote, join, local, names, publish, read_text, remove, write_text

DEFAULT_ROOT = ".saferay"
SHARED_STAGES = ("data", "base")


def store_root(explicit: str | None = None) -> Path | str:
    """The store given (`--store`, `SAFERAY_HOME`, else `.saferay`): an absolute path, or an
    object-store URI as it is."""
    root = explicit or os.environ.get("SAFERAY_HOME") or DEFAULT_ROOT
    return root if is_remote(root) else Path(root).absolute()


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
    def __init__(self, root: Path | str, study: str):
        self.location = str(root)  # the store: a path or an object-store URI
        self.remote = is_remote(root)
        # Local files: the store itself, or (object store) the driver's working copy.
        self.root = mirror_root(self.location) if self.remote else Path(root)
        self.study = study
        self.dir = self.root / "studies" / study
        self.study_location = join(self.location, "studies", study)

    def __str__(self) -> str:
        return self.location

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def ray_storage(self) -> Path | str:
        return join(self.location, "ray") if self.remote else self.root / "ray"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def stage_location(self, name: str, key: str) -> str:
        """Where a finished stage's outputs are, for workers on any node."""
        return join(self.study_location, "stages", name, key)

    def stage_dir(self, name: str, key: str) -> Path:
        """A finished stage's outputs as a directory here (on an object store, a local copy)."""
        if self.remote:
            return Path(local(self.stage_location(name, key)))
        return self.dir / "stages" / name / key

    def is_complete(self, name: str, key: str) -> bool:
        if self.remote:
            return exists(join(self.stage_location(name, key), "result.json"))
        return (self.stage_dir(name, key) / "result.json").exists()

    def result(self, name: str, key: str) -> dict:
        if self.remote:
            return json.loads(read_text(join(self.stage_location(name, key), "result.json")))
        return json.loads((self.stage_dir(name, key) / "result.json").read_text())

    def output_location(self, name: str, key: str, out: Path) -> str:
        """Where a stage being built (its driver's files in `out`) has its workers write."""
        return self.stage_location(name, key) if self.remote else str(out)

    def adopt(self, name: str, key: str) -> str | None:
        """Take a shareable stage's finished output from another study of this store, if one has it;
        returns that study's name. Linked into a private directory first and renamed into place, so
        a half-adopted stage never looks complete."""
        if name not in SHARED_STAGES or self.is_complete(name, key):
            return None
        if self.remote:
            return self._adopt_remote(name, key)
        for other in sorted((self.root / "studies").glob(f"*/stages/{name}/{key}/result.json")):
            source = other.parent
            final = self.stage_dir(name, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".partial-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            try:
                shutil.copytree(source, tmp, copy_function=_link_or_copy)
                os.rename(tmp, final)
                shutil.rmtree(final.parent / f".partial-{key}", ignore_errors=True)  # a killed attempt's
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not self.is_complete(name, key):
                    raise
            return source.parents[2].name
        return None

    def _adopt_remote(self, name: str, key: str) -> str | None:
        """`adopt` on an object store: the other study's objects copied, result.json last."""
        for study in names(join(self.location, "studies")):
            source = join(self.location, "studies", study, "stages", name, key)
            if study == self.study or not exists(join(source, "result.json")):
                continue
            target = self.stage_location(name, key)
            remove(target)  # what a killed attempt of this study left there is not the other's
            _publish_stage(Path(local(source)), target)
            return study
        return None

    @contextlib.contextmanager
    def building(self, name: str, key: str):
        """A private directory for a stage's outputs, moved into place only if the body succeeds.

        The caller writes result.json last. The directory, `.partial-<key>`, is the same on every
        attempt and a killed or failed attempt leaves it as it was: a restarted Ray Train group
        skips the runs it finished (`jobs/train_loop.py`), and their models are the ones in there.
        Nothing reads it as a result; the study's run.lock makes this process its only writer. On
        an object store the stage's workers write into its final location, which is as stable;
        the directory holds the driver's files, put there when the body succeeds, result.json last.
        """
        if self.remote:
            with self._building_remote(name, key) as out:
                yield out
            return
        final = self.stage_dir(name, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".partial-{key}-*"):  # per-attempt directories of older versions
            if not _owned_by_live_process(stale):
                shutil.rmtree(stale, ignore_errors=True)
        work = final.parent / f".partial-{key}"
        work.mkdir(exist_ok=True)
        (work / "result.json").unlink(missing_ok=True)  # only this attempt's makes it complete
        yield work
        if not (work / "result.json").exists():
            raise RuntimeError(f"stage {name} wrote no result.json")
        if final.exists():  # a concurrent run of the same study finished first: keep its output
            shutil.rmtree(work)
        else:
            os.rename(work, final)

    @contextlib.contextmanager
    def _building_remote(self, name: str, key: str):
        out = Path(tempfile.mkdtemp(prefix=f"saferay-{name}-"))
        try:
            yield out
            if not (out / "result.json").exists():
                raise RuntimeError(f"stage {name} wrote no result.json")
            _publish_stage(out, self.stage_location(name, key))
        finally:
            shutil.rmtree(out, ignore_errors=True)

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
            holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f.write(holder + "\n")
            f.flush()
            try:
                with self._remote_lock(holder):
                    yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _remote_lock(self, holder: str):
        """On an object store, `run.lock` is an object naming its holder: drivers on other machines
        see it. One whose holder ran on this machine and is gone is taken over. Best effort, not
        mutual exclusion: S3 has no create-if-absent that every server honours, so two drivers
        starting in the same second can both pass the write-then-read-back check."""
        if not self.remote:
            yield
            return
        lock = join(self.study_location, "run.lock")
        if exists(lock):
            other = read_text(lock).strip()
            if not _holder_gone(other):
                raise StudyBusy(f"study '{self.study}' is already running in {self.location} ({other}); wait for "
                                f"it, or stop it; if it is not running any more, delete {lock}")
        write_text(lock, holder)
        if read_text(lock).strip() != holder:  # another driver wrote it at the same moment
            raise StudyBusy(f"study '{self.study}' was just started by another driver ({read_text(lock).strip()})")
        try:
            yield
        finally:
            if exists(lock) and read_text(lock).strip() == holder:  # a takeover's lock is not ours to remove
                remove(lock)

    def load_state(self) -> dict | None:
        if self.remote:
            where = join(self.study_location, "state.json")
            return json.loads(read_text(where)) if exists(where) else None
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else None

    def save_state(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state["updated"] = time.time()
        self.save_json("state.json", state)

    def save_json(self, name: str, data) -> None:
        """A JSON file of the study (state.json, summary.json), in the store and the working copy."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / name, data)
        if self.remote:
            publish(self.dir / name, join(self.study_location, name))


def _publish_stage(files: Path, target: str) -> None:
    """A stage's files put at `target` (an object-store location), result.json last: complete from
    then on. Dot files (a node cache's markers and locks) stay behind."""
    for f in sorted(p for p in files.rglob("*") if p.is_file() and p.name != "result.json"
                    and not p.name.startswith(".")):
        publish(f, join(target, str(f.relative_to(files))))
    publish(files / "result.json", join(target, "result.json"))


def mirror_root(location: str) -> Path:
    """The driver's working copy of an object-store store."""
    scheme, _, rest = location.partition("://")
    return cache_root() / "stores" / scheme / rest.strip("/")


def _holder_gone(holder: str) -> bool:
    """A lock holder ("pid N on HOST, since ...") that ran on this machine and has exited."""
    try:
        words = holder.split()
        pid, host = int(words[1]), words[3].rstrip(",")
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
