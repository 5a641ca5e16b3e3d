"""Where a study's files live: a local path (a filesystem every node sees), or an object store
(`s3://bucket/prefix`, `gs://bucket/prefix`) reached through `pyarrow.fs`. Jobs take locations as
strings and never care which:

- `local(location)`: a file or directory on this node holding the location's files: the location
  itself when it is a path; otherwise a copy in this node's cache (`SAFERAY_CACHE`, default
  `~/.cache/saferay`), downloaded once and again only when the listing in the store changed
  (names, sizes, modification times: object stores keep whole seconds, so a file rewritten in the
  same second with the same size would go unnoticed; a study writes each location once per
  attempt, and attempts are minutes apart);
- `writing(location)`: a local directory to write into, put at the location when the body ends;
- `publish` (a local file or directory put at a location), `write_text`, `read_text`,
  `write_parquet`, `exists`, `names`, `remove`, `join`, `parent`.

Credentials and the endpoint come from each node's environment only (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, ...), as `pyarrow`
reads them; nothing here logs or stores them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path

SCHEMES = ("s3://", "gs://")
LISTING = ".saferay-listing"  # beside a cached copy: the store's listing it was downloaded from


def is_remote(location) -> bool:
    return str(location).startswith(SCHEMES)


def join(location, *parts: str) -> str:
    """`location`/part/...: a URI joined with '/', a path as a path."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return str(Path(location).joinpath(*parts))


def parent(location) -> str:
    location = str(location)
    return location.rstrip("/").rsplit("/", 1)[0] if is_remote(location) else str(Path(location).parent)


@lru_cache(maxsize=8)
def _filesystem(scheme_and_bucket: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(scheme_and_bucket)[0]


def filesystem(location: str):
    """(pyarrow filesystem, path inside it) of a remote location."""
    scheme, _, rest = str(location).partition("://")
    return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest.rstrip("/")


def cache_root() -> Path:
    return Path(os.environ.get("SAFERAY_CACHE") or Path.home() / ".cache" / "saferay")


def _listing(fs, path: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime ns) of every file under `path` ([] for none); a file alone: itself."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [("", info.size, info.mtime_ns or 0)]
    if info.type == pafs.FileType.NotFound:
        return []
    return sorted((f.path[len(path) + 1:], f.size, f.mtime_ns or 0)
                  for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if f.type == pafs.FileType.File)


def local(location) -> str:
    """A local file or directory with `location`'s contents (see the module docstring)."""
    location = str(location)
    if not is_remote(location):
        return location
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    listing = _listing(fs, path)
    if not listing:
        raise FileNotFoundError(f"{location}: nothing there")
    scheme = location.split("://")[0]
    target = cache_root() / "objects" / scheme / path
    stamp = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
    marker = target.parent / f".{target.name}{LISTING}"  # hidden: parquet readers skip dot files

    def fresh() -> bool:
        return target.exists() and marker.exists() and marker.read_text() == stamp

    if fresh():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One download per node: the ranks of a worker group, or cells decoding one model, ask at once;
    # the others wait and find the copy fresh.
    with open(target.parent / f".{target.name}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if fresh():
            return str(target)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}"
        if listing[0][0] == "":  # a file
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            for rel, _, _ in listing:  # one object at a time into a private directory, renamed when whole
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f"{path}/{rel}", str(tmp / rel), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
        marker.unlink(missing_ok=True)  # never a marker beside the content of another listing
        _replace(tmp, target)
        marker_tmp = marker.with_name(f"{marker.name}.{uuid.uuid4().hex[:8]}")
        marker_tmp.write_text(stamp)
        os.replace(marker_tmp, marker)
    return str(target)


def _replace(new: Path, old: Path) -> None:
    """Put `new` where `old` is (the old content gone), under the caller's lock."""
    if old.exists():
        trash = old.parent / f".{old.name}.old.{uuid.uuid4().hex[:8]}"
        os.rename(old, trash)
        os.rename(new, old)
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)
    else:
        os.rename(new, old)


def publish(source, location) -> None:
    """Put the local file or directory `source` at `location` (a no-op where they are the same)."""
    location, source = str(location), Path(source)
    if not is_remote(location):
        if Path(location).resolve() != source.resolve():
            if source.is_dir():
                shutil.copytree(source, location, dirs_exist_ok=True)
            else:
                Path(location).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, location)
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    pafs.copy_files(str(source), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextlib.contextmanager
def writing(location):
    """A local directory to write `location`'s files into: the location itself when it is a path;
    otherwise a temporary directory put at the location when the body ends without error."""
    location = str(location)
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield location
        return
    tmp = tempfile.mkdtemp(prefix="saferay-out-")
    try:
        yield tmp
        publish(tmp, location)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(location, text: str) -> None:
    location = str(location)
    if not is_remote(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(text)
        os.replace(tmp, path)  # a reader never sees half a file
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(location) -> str:
    location = str(location)
    if not is_remote(location):
        return Path(location).read_text()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def exists(location) -> bool:
    location = str(location)
    if not is_remote(location):
        return Path(location).exists()
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.NotFound:
        return True
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)))


def names(location) -> list[str]:
    """The entries directly inside a directory location ([] where there is none)."""
    location = str(location)
    if not is_remote(location):
        return sorted(p.name for p in Path(location).iterdir()) if Path(location).is_dir() else []
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return sorted(f.base_name for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def write_parquet(frame, location) -> None:
    """A DataFrame as a parquet file at `location`."""
    location = str(location)
    if not is_remote(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(location)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        frame.to_parquet(f)


def remove(location) -> None:
    """A file or a directory, gone (nothing where there was nothing)."""
    location = str(location)
    if not is_remote(location):
        path = Path(location)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory:
        fs.delete_dir(path)
