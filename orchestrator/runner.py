"""Run a study: plan the stage keys, skip what the store already has, run the rest, track it all."""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from pathlib import Path

from orchestrator import interrupts
from orchestrator.capacity import local_cpus
from orchestrator.progress import StudyProgress, start_board
from orchestrator.spec import StudySpec, spec_dict
from orchestrator.stages import BY_NAME, STAGES, Stage, StageContext
from jobs.launch import controller_env
from jobs.storage import local
from orchestrator.store import StudyStore, stage_key, write_json
from orchestrator.system_metrics import cpu_description, system_metrics
from orchestrator.tracking import Tracker, default_tracking_uri
from orchestrator.tracking_journal import Journal

log = logging.getLogger("saferay")


def plan(spec: StudySpec, stages=STAGES) -> list[tuple[Stage, str]]:
    keys: dict[str, str] = {}
    out = []
    for stage in stages:
        keys[stage.name] = stage_key(stage.name, stage.version, stage.config(spec), {n: keys[n] for n in stage.needs(spec)})
        out.append((stage, keys[stage.name]))
    return out


def tracking_uri(spec: StudySpec, store: StudyStore) -> str:
    return spec.tracking.uri or default_tracking_uri(store.root)


def open_tracker(spec: StudySpec, store: StudyStore) -> Tracker:
    uri = tracking_uri(spec, store)
    # A tracking server keeps artifacts where it was told to; a local store keeps them beside it.
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    return Tracker(uri, spec.tracking.experiment or spec.study, store.root / "mlartifacts" if local else None,
                   tracking_journal(store))


def tracking_journal(store: StudyStore) -> Journal:
    return Journal(store.dir / "tracking-journal")


def ensure_ray(spec: StudySpec, store: StudyStore, verbose: bool, after_start=None) -> None:
    """Start (or join) Ray only when a stage needs computing: a fully cached study never does."""
    import ray

    if ray.is_initialized():
        return
    store.log_dir.mkdir(parents=True, exist_ok=True)
    # Workers import `jobs` by path; the driver's cwd may be anywhere.
    runtime_env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                "TRANSFORMERS_VERBOSITY": "error", **controller_env()}}
    kwargs = dict(include_dashboard=False, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # a submitted job already has its runtime env
        kwargs["runtime_env"] = runtime_env
    if spec.cluster.address:
        ray.init(address=spec.cluster.address, **kwargs)
    else:
        ray.init(num_cpus=local_cpus(spec), **kwargs)  # what preflight checked the study against
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

    def notify(message: str) -> None:
        log.warning(message)
        if console is not None:
            console.print(message, style="yellow", markup=False, highlight=False)

    tracker.notify = notify

    def record(run_id: str, result: dict) -> None:  # result.json's contents
        tracker.log_metrics(run_id, result)
        tracker.log_json(run_id, result, "result.json")
        tracker.end_run(run_id)
    tracker.reconnect()  # calls an earlier execution could not send
    prev = resolve_runs(store.load_state(), tracker)

    def save(state: dict) -> None:
        store.save_state(resolve_runs(state, tracker))
    if _unfinished(prev, spec, tracker):
        # Resume into the same MLflow runs: finished stages keep theirs, the interrupted one
        # reopens its own, and the parent run continues (no duplicate runs).
        state, parent = prev, prev["mlflow"]["run_id"]
        earlier = {(r["name"], r["key"]): r for r in prev["stages"]}
        state["stages"] = [earlier.get((s.name, k), {"name": s.name, "key": k, "status": "pending", "seconds": None})
                           for s, k in steps]
        state["status"] = "running"
        state["resumes"] = state.get("resumes", 0) + 1
        tracker.reopen_run(parent)
        tracker.set_tag(parent, "saferay.resumes", state["resumes"])
    else:
        parent = tracker.start_run(f"{spec.study}-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={"saferay.study": spec.study, "saferay.host": socket.gethostname(),
                                         "saferay.cpu": cpu_description()})
        tracker.log_params(parent, spec_dict(spec))
        state = {"study": spec.study, "status": "running", "started": time.time(), "spec": spec_dict(spec),
                 "stages": [{"name": s.name, "key": k, "status": "pending", "seconds": None} for s, k in steps],
                 "mlflow": {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": parent}}
    save(state)
    began = time.perf_counter()
    with StudyProgress([(s.name, k) for s, k in steps], console) as progress:
        for (stage, key), row in zip(steps[:last + 1], state["stages"]):
            tracker.reconnect()  # a server that stopped answering may be back
            inputs = {n: (store.stage_location(n, state_key(state, n)),
                          BY_NAME[n].result.from_json(store.result(n, state_key(state, n)))) for n in stage.needs(spec)}
            if row["status"] in ("complete", "cached") and store.is_complete(stage.name, key):  # done before a resume
                progress.set(stage.name, row["status"], seconds=row["seconds"])
                continue
            resumed = bool(row.get("run_id"))
            if resumed:  # the stage an earlier execution was running when it stopped
                run_id = row["run_id"]
                row.pop("error", None)
                tracker.reopen_run(run_id)
            else:
                run_id = tracker.start_run(stage.name, parent=parent,
                                           tags={"saferay.stage": stage.name, "saferay.key": key})
                row["run_id"] = run_id
                tracker.log_params(run_id, stage.config(spec))
            adopted = store.adopt(stage.name, key)  # another study of this store computed it
            if resumed and not adopted and store.is_complete(stage.name, key):
                # It finished, and the execution that ran it stopped before recording it in MLflow.
                result = store.result(stage.name, key)
                record(run_id, result)
                row.update(status="complete", seconds=result["seconds"])
                progress.set(stage.name, "complete", seconds=result["seconds"])
                save(state)
                continue
            if store.is_complete(stage.name, key):
                result = store.result(stage.name, key)
                row.update(status="cached", seconds=0.0, computed_seconds=result.get("seconds"))
                tracker.set_tag(run_id, "saferay.cached", "true")
                if adopted:
                    row["from_study"] = adopted
                    tracker.set_tag(run_id, "saferay.cached_from_study", adopted)
                tracker.end_run(run_id)
                progress.set(stage.name, "cached", seconds=0.0)
                save(state)
                continue
            progress.set(stage.name, "running")
            row.update(status="running", seconds=None)
            save(state)
            t0 = time.perf_counter()
            try:  # starting Ray is part of the first stage that computes: a Ctrl-C there interrupts it
                ensure_ray(spec, store, verbose, after_ray_start)
                if progress.board is None:
                    progress.board = start_board()
                t0 = time.perf_counter()  # a stage's seconds are its own, not Ray's start-up
                with store.building(stage.name, key) as out:
                    ctx = StageContext(spec=spec, key=key, out=out, inputs=inputs, tracker=tracker, run_id=run_id,
                                       out_location=store.output_location(stage.name, key, out),
                                       local_dir=lambda location: Path(local(location)),
                                       ray_storage=spec.cluster.storage_path or store.ray_storage,
                                       board=progress.board,
                                       input_runs={r["name"]: r["run_id"] for r in state["stages"]
                                                   if r["name"] in stage.needs(spec) and r.get("run_id")},
                                       progress=lambda msg, n=stage.name: progress.detail(n, msg))
                    with system_metrics(spec.tracking.system_metrics_s, tracker, tracker.resolve(run_id)):
                        typed = stage.run(ctx)
                    typed.seconds = time.perf_counter() - t0
                    result = typed.to_json()
                    write_json(out / "result.json", result)
            except BaseException as e:
                interrupted = isinstance(e, KeyboardInterrupt)
                if interrupted:
                    interrupts.taken()  # recording it below may take longer than a re-raise waits
                status = "interrupted" if interrupted else "failed"
                row.update(status=status, seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
                state["status"] = status
                save(state)
                progress.set(stage.name, status, detail=str(e).splitlines()[0][:120] if str(e) else "")
                tracker.set_tag(run_id, "saferay.error", row["error"][:5000])
                tracker.end_run(run_id, "KILLED" if interrupted else "FAILED")
                tracker.end_run(parent, "KILLED" if interrupted else "FAILED")
                log.debug("stage %s failed:\n%s", stage.name, traceback.format_exc())
                raise
            record(run_id, result)
            row.update(status="complete", seconds=result["seconds"])
            progress.set(stage.name, "complete", seconds=result["seconds"])
            save(state)
    done = last == len(steps) - 1
    state.update(status="complete" if done else "partial", until=None if done else until,
                 seconds=time.perf_counter() - began)
    save(state)
    from orchestrator.summary import summarize

    summary = summarize(store)
    tracker.log_json(parent, summary, "summary.json")
    tracker.log_metrics(parent, {"study_seconds": state["seconds"]})
    tracker.end_run(parent)
    store.save_json("summary.json", summary)
    if not tracker.reconnect():
        state["mlflow"]["unsent"] = tracker.journal.pending()
        save(state)
        notify(f"MLflow at {tracker.uri} still does not answer: {state['mlflow']['unsent']} tracking calls wait in "
               f"{tracker.journal.dir}; the next `saferay run` of this study sends them (every stage's results "
               "are in the store)")
    elif state["mlflow"].pop("unsent", None) is not None:
        save(state)
    return summary


def resolve_runs(state: dict | None, tracker: Tracker) -> dict | None:
    """The state with MLflow's ids for runs started while the server did not answer, once sent."""
    if state is not None:
        state["mlflow"]["run_id"] = tracker.resolve(state["mlflow"]["run_id"])
        for row in state["stages"]:
            if row.get("run_id"):
                row["run_id"] = tracker.resolve(row["run_id"])
    return state


def state_key(state: dict, name: str) -> str:
    return next(s["key"] for s in state["stages"] if s["name"] == name)

