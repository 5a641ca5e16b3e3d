import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "studies" / "smoke.yaml"


def _untracked() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                         text=True).stdout
    return {line[3:] for line in out.splitlines() if line.startswith("??")}


@pytest.fixture(scope="module", autouse=True)
def leaves_the_repository_clean(request):
    """Every file a test module writes goes to its own temp dirs: none appears in the checkout."""
    before = _untracked()
    yield
    new = _untracked() - before
    assert not new, f"{request.module.__name__} left files in the repository: {sorted(new)[:10]}"


def saferay(*args, store: Path | str, check: bool = True, timeout: int = 900,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in its own process (its own embedded Ray), as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--store", str(store)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"saferay {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory):
    """One smoke study (DDP alignment) computed once and shared by the integration tests."""
    store = tmp_path_factory.mktemp("store")
    saferay("run", str(SMOKE), store=store)
    return store


def seeded_store(smoke_store: Path, store: Path) -> Path:
    """A new store holding the smoke study's data and base, hard-linked: a study of the same model
    and corpora adopts them (status `cached`) instead of spending ~80 s computing them again."""
    for name in ("data", "base"):
        shutil.copytree(smoke_store / "studies/smoke/stages" / name, store / "studies/smoke/stages" / name,
                        copy_function=os.link)
    return store
