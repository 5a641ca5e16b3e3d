"""Run a study: plan the stage keys, skip what the store already has, run the rest, track it all."""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from pathlib import Path

from orchestrator.progress import StudyProgress, start_board
from orchestrator.spec import StudySpec, spec_dict
from orchestrator.stages import STAGES, Stage, StageContext
from orchestrator.store import StudyStore, stage_key, write_json
from orchestrator.tracking import Tracker, default_tracking_uri

log = logging.getLogger("saferay")


def plan(spec: StudySpec, stages=STAGES) -> list[tuple[Stage, str]]:
    keys: dict[str, str] = {}
    out = []
    for stage in stages:
        keys[stage.name] = stage_key(stage.name, stage.version, stage.config(spec), {n: keys[n] for n in stage.needs})
        out.append((stage, keys[stage.name]))
    return out


def tracking_uri(spec: StudySpec, store: StudyStore) -> str:
    return spec.tracking.uri or default_tracking_uri(store.root)


def open_tracker(spec: StudySpec, store: StudyStore) -> Tracker:
    uri = tracking_uri(spec, store)
    # A tracking server keeps artifacts where it was told to; a local store keeps them beside it.
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    return Tracker(uri, spec.tracking.experiment or spec.study, store.root / "mlartifacts" if local else None)


def ensure_ray(spec: StudySpec, store: StudyStore, verbose: bool, after_start=None) -> None:
    """Start (or join) Ray only when a stage needs computing: a fully cached study never does."""
    import ray

    if ray.is_initialized():
        return
    store.log_dir.mkdir(parents=True, exist_ok=True)
    # Workers import `jobs` by path; the driver's cwd may be anywhere.
    runtime_env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                "TRANSFORMERS_VERBOSITY": "error"}}
    kwargs = dict(include_dashboard=False, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # a submitted job already has its runtime env
        kwargs["runtime_env"] = runtime_env
    if spec.cluster.address:
        ray.init(address=spec.cluster.address, **kwargs)
    else:
        # Logical CPUs, not cores: Ray Data needs a slot beside the train workers (README, notes).
        ray.init(num_cpus=spec.cluster.num_cpus or max(2, os.cpu_count() or 2), **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if after_start:
        after_start()


def _unfinished(prev: dict | None, spec: StudySpec, tracker: Tracker) -> bool:
    """An earlier execution of this same spec that did not finish (failed, interrupted, killed, stopped)."""
    return (prev is not None and prev["status"] in ("running", "failed", "interrupted") and prev["spec"] == spec_dict(spec)
            and prev["mlflow"]["tracking_uri"] == tracker.uri and prev["mlflow"]["experiment_id"] == tracker.experiment_id)


def run_study(spec: StudySpec, store: StudyStore, verbose: bool = False, console=None, after_ray_start=None,
              until: str | None = None) -> dict:
    """Run (or resume) the study; with `until`, stop after that stage (the rest stay pending).
    Raises StudyBusy, touching nothing, while another process runs the same study."""
    with store.running():
        return _run_study(spec, store, verbose, console, after_ray_start, until)


def _run_study(spec: StudySpec, store: StudyStore, verbose: bool, console, after_ray_start,
               until: str | None) -> dict:
    steps = plan(spec)
    last = next(i for i, (s, _) in enumerate(steps) if s.name == until) if until else len(steps) - 1
    tracker = open_tracker(spec, store)
    prev = store.load_state()
    if _unfinished(prev, spec, tracker):
        # Resume into the same MLflow runs: finished stages keep theirs, the interrupted one
        # reopens its own, and the parent run continues (no duplicate runs).
        state, parent = prev, prev["mlflow"]["run_id"]
        earlier = {(r["name"], r["key"]): r for r in prev["stages"]}
        state["stages"] = [earlier.get((s.name, k), {"name": s.name, "key": k, "status": "pending", "seconds": None})
                           for s, k in steps]
        state["status"] = "running"
        state["resumes"] = state.get("resumes", 0) + 1
        tracker.client.update_run(parent, status="RUNNING")
        tracker.client.set_tag(parent, "saferay.resumes", str(state["resumes"]))
    else:
        parent = tracker.start_run(f"{spec.study}-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={"saferay.study": spec.study, "saferay.host": socket.gethostname()})
        tracker.log_params(parent, spec_dict(spec))
        state = {"study": spec.study, "status": "running", "started": time.time(), "spec": spec_dict(spec),
                 "stages": [{"name": s.name, "key": k, "status": "pending", "seconds": None} for s, k in steps],
                 "mlflow": {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": parent}}
    store.save_state(state)
    began = time.perf_counter()
    with StudyProgress([(s.name, k) for s, k in steps], console) as progress:
        for (stage, key), row in zip(steps[:last + 1], state["stages"]):
            inputs = {n: (store.stage_dir(n, state_key(state, n)), store.result(n, state_key(state, n)))
                      for n in stage.needs}
            if row["status"] in ("complete", "cached") and store.is_complete(stage.name, key):  # done before a resume
                progress.set(stage.name, row["status"], seconds=row["seconds"])
                continue
            if row.get("run_id"):  # the stage an earlier execution was running when it stopped
                run_id = row["run_id"]
                row.pop("error", None)
                tracker.client.update_run(run_id, status="RUNNING")
            else:
                run_id = tracker.start_run(stage.name, parent=parent,
                                           tags={"saferay.stage": stage.name, "saferay.key": key})
                row["run_id"] = run_id
                tracker.log_params(run_id, stage.config(spec))
            adopted = store.adopt(stage.name, key)  # another study of this store computed it
            if store.is_complete(stage.name, key):
                result = store.result(stage.name, key)
                row.update(status="cached", seconds=0.0, computed_seconds=result.get("seconds"))
                tracker.client.set_tag(run_id, "saferay.cached", "true")
                if adopted:
                    row["from_study"] = adopted
                    tracker.client.set_tag(run_id, "saferay.cached_from_study", adopted)
                tracker.end_run(run_id)
                progress.set(stage.name, "cached", seconds=0.0)
                store.save_state(state)
                continue
            progress.set(stage.name, "running")
            row.update(status="running", seconds=None)
            store.save_state(state)
            t0 = time.perf_counter()
            try:  # starting Ray is part of the first stage that computes: a Ctrl-C there interrupts it
                ensure_ray(spec, store, verbose, after_ray_start)
                if progress.board is None:
                    progress.board = start_board()
                t0 = time.perf_counter()  # a stage's seconds are its own, not Ray's start-up
                with store.building(stage.name, key) as out:
                    ctx = StageContext(spec=spec, key=key, out=out, inputs=inputs, tracker=tracker, run_id=run_id,
                                       ray_storage=spec.cluster.storage_path or store.ray_storage,
                                       board=progress.board,
                                       progress=lambda msg, n=stage.name: progress.detail(n, msg))
                    result = stage.run(ctx)
                    result["seconds"] = time.perf_counter() - t0
                    write_json(out / "result.json", result)
            except BaseException as e:
                interrupted = isinstance(e, KeyboardInterrupt)
                status = "interrupted" if interrupted else "failed"
                row.update(status=status, seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
                state["status"] = status
                store.save_state(state)
                progress.set(stage.name, status, detail=str(e).splitlines()[0][:120] if str(e) else "")
                tracker.client.set_tag(run_id, "saferay.error", row["error"][:5000])
                tracker.end_run(run_id, "KILLED" if interrupted else "FAILED")
                tracker.end_run(parent, "KILLED" if interrupted else "FAILED")
                log.debug("stage %s failed:\n%s", stage.name, traceback.format_exc())
                raise
            tracker.log_metrics(run_id, result)
            tracker.log_json(run_id, result, "result.json")
            tracker.end_run(run_id)
            row.update(status="complete", seconds=result["seconds"])
            progress.set(stage.name, "complete", seconds=result["seconds"])
            store.save_state(state)
    done = last == len(steps) - 1
    state.update(status="complete" if done else "partial", until=None if done else until,
                 seconds=time.perf_counter() - began)
    store.save_state(state)
    from orchestrator.summary import summarize

    summary = summarize(store)
    tracker.log_json(parent, summary, "summary.json")
    tracker.log_metrics(parent, {"study_seconds": state["seconds"]})
    tracker.end_run(parent)
    write_json(store.dir / "summary.json", summary)
    return summary


def state_key(state: dict, name: str) -> str:
    return next(s["key"] for s in state["stages"] if s["name"] == name)

