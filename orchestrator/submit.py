"""Studies on a Ray cluster through the Ray Jobs API: submit, status, logs, stop.

The project directory travels as the job's working dir (large and generated paths excluded);
the spec travels fully resolved (`extends` and `--set` applied), so what runs on the cluster
is exactly what `saferay validate` printed here.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import yaml

from jobs.launch import controller_env
from jobs.records import InputError
from orchestrator.spec import StudySpec, spec_dict

ROOT = Path(__file__).resolve().parent.parent
# Resolved specs wait here to travel with the working dir, and are deleted once uploaded. Not
# git-ignored on purpose: Ray's upload skips what .gitignore names.
SUBMIT_DIR = ".saferay-submit"
EXCLUDES = [".venv/", ".saferay/", ".git/", "bench/results.json", "**/__pycache__/", ".pytest_cache/", "*.egg-info/",
            "mlruns/", "mlartifacts/"]


def client(address: str):
    """A Jobs API client; an unreachable address is bad input (exit 2), named with the cause."""
    import os

    # Ray clusters require a token by default; the client sends it (from ~/.ray/auth_token or
    # RAY_AUTH_TOKEN) only in token mode, read when Ray is first imported. The token itself
    # never goes to logs or MLflow.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or a RuntimeError wrapping one
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cluster {address}: cannot reach the Ray Jobs API ({cause})") from None


def submit(spec: StudySpec, address: str, store: str, until: str | None = None) -> tuple[str, str]:
    """Send the study; returns (study, job id). `store` is a path every node of the cluster sees, or
    an object-store URI (the nodes' environments hold its credentials); `until`: the job stops
    after that stage, as `saferay run --until`."""
    c = client(address)
    resolved = spec_dict(spec)
    resolved["cluster"]["address"] = "auto"  # the job's driver joins the cluster it runs on
    staged = ROOT / SUBMIT_DIR / f"{spec.study}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    staged.parent.mkdir(exist_ok=True)
    staged.write_text(yaml.safe_dump(resolved, sort_keys=False))
    entrypoint = f"python -m orchestrator.cli run {SUBMIT_DIR}/{staged.name} --store {store}" + (
        f" --until {until}" if until else "")
    job_id = c.submit_job(
        entrypoint=entrypoint,
        submission_id=f"saferay-{spec.study}-{time.strftime('%Y%m%d-%H%M%S')}-{staged.stat().st_ino % 10000:04d}",
        runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES,
                     "env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", **controller_env()}},
        metadata={"saferay.study": spec.study, "saferay.store": store},
    )
    staged.unlink()  # uploaded with the working dir; nothing to keep here
    with contextlib.suppress(OSError):
        staged.parent.rmdir()
    return spec.study, job_id


def _name(status) -> str:
    return getattr(status, "value", str(status))


def status(address: str, job_id: str) -> dict:
    c = client(address)
    info = c.get_job_info(job_id)
    return {"job_id": job_id, "status": _name(info.status), "message": info.message,
            "study": (info.metadata or {}).get("saferay.study"), "store": (info.metadata or {}).get("saferay.store"),
            "entrypoint": info.entrypoint}


def logs(address: str, job_id: str, follow: bool, write) -> None:
    c = client(address)
    if not follow:
        write(c.get_job_logs(job_id))
        return
    import asyncio

    async def tail():
        async for lines in c.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
