"""The `saferay` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from jobs.records import InputError
from orchestrator.spec import SpecError, load_spec
from orchestrator.store import StudyStore, store_root

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Safety-alignment studies on Ray.")
console = Console()
err = Console(stderr=True)

StoreOpt = typer.Option(None, "--store", help="Study store: a path, or s3://bucket/prefix, gs://... (default: $SAFERAY_HOME or ./.saferay).")


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _exit_now(code: int):
    """Leave without the interpreter's finalisation: after a Ctrl-C that may have landed inside a
    fork handler or a native library's callback, finalising can crash (CI saw a SIGSEGV after the
    interrupt was recorded). Everything worth keeping is in the store; stop Ray, flush, go.

    Ray is looked up, never imported: a Ctrl-C in the middle of the driver's first `import ray`
    leaves half of its submodules behind, and importing it again then fails (CI saw that). A Ray
    whose import never finished was never started, so there is nothing to stop. One that is imported
    is shut down even if `ray.init` did not finish, which stops its node if `ray.init` had got as
    far as recording it. An interrupt inside the node's own start-up leaves its processes to Ray's
    fate sharing: the node's servers die with this process, and the raylet's two agents notice and
    leave by themselves (~14 s here; stopping them sooner by PID missed the agents the raylet was
    still starting)."""
    ray = sys.modules.get("ray")
    with contextlib.suppress(Exception):
        if ray is not None:
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _load(spec_path: Path, overrides: list[str]):
    try:
        return load_spec(spec_path, overrides)
    except SpecError as e:
        _fail(str(e))


LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "transformers", "deepspeed",
                   "DeepSpeed", "py.warnings", "saferay")


SECRET_NAMES = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """Secrets come from the environment (hub and tracking tokens); should a library ever log
    one, the log file gets `***` instead."""

    def __init__(self):
        super().__init__()
        self.secrets = [v for k, v in os.environ.items() if SECRET_NAMES.search(k) and len(v) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def quiet_libraries(log_file: Path | None, verbose: bool) -> None:
    """Ray, MLflow and transformers talk a lot; their logs go to the store's log file (with
    `--verbose`, to the terminal), secret values redacted either way.

    Called again after `ray.init`, which installs its own handlers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    handler: logging.Handler
    if verbose:  # everything on the terminal, redacted like the log file
        handler = logging.StreamHandler()
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger().setLevel(logging.INFO)
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.captureWarnings(True)  # library UserWarnings go to the log file too
        handler = logging.FileHandler(log_file) if log_file else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(RedactSecrets())
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)


@app.command()
def validate(spec: Path, set_: list[str] = typer.Option([], "--set", help="Override a field: a.b=value")):
    """Check a study spec and print it with every default filled in."""
    s = _load(spec, set_)
    console.print_json(json.dumps(s.model_dump(mode="json")))


def _mlflow_line(mlflow: dict) -> str:
    """Where to see the study's runs: its tracking server, or `saferay ui` over the embedded store."""
    from orchestrator.tracking import ui_url

    server = mlflow["tracking_uri"]
    if server.startswith(("http://", "https://")):
        return f"MLflow: {ui_url(server, mlflow['experiment_id'])}"
    return f"MLflow UI: saferay ui   → {ui_url('http://127.0.0.1:5000', mlflow['experiment_id'])}"


def _check_until(until: str | None) -> None:
    from orchestrator.stages import STAGES

    if until and until not in [stage.name for stage in STAGES]:
        _fail(f"--until: no stage '{until}' (stages: {', '.join(stage.name for stage in STAGES)})")


@app.command()
def run(spec: Path, set_: list[str] = typer.Option([], "--set", help="Override a field: a.b=value"),
        store: Optional[str] = StoreOpt, verbose: bool = typer.Option(False, "--verbose", "-v"),
        until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage (e.g. align_sft)")):
    """Run a study on the embedded default (local Ray + local MLflow), resuming what is done."""
    s = _load(spec, set_)
    _check_until(until)
    st = StudyStore(store_root(store), s.study)
    from orchestrator.preflight import check_store, preflight
    from orchestrator.runner import plan

    try:  # bad input fails here, before anything is written to the store
        check_store(st.location)
        preflight(s, data_cached=st.is_complete("data", dict((stage.name, key) for stage, key in plan(s))["data"]))
    except InputError as e:
        _fail(str(e))
    st.log_dir.mkdir(parents=True, exist_ok=True)
    log_file = st.log_dir / "saferay.log"
    import mlflow  # noqa: F401  (its import installs log handlers; quiet_libraries replaces them)

    quiet_libraries(log_file, verbose)
    from orchestrator.runner import run_study
    from orchestrator.summary import render

    console.print(f"study [bold]{s.study}[/] → store {st.dir}  (logs: {log_file})")
    from orchestrator.interrupts import insistent_ctrl_c

    def after_ray_start() -> None:
        quiet_libraries(log_file, verbose)
        if s.cluster.address:  # a cluster's nodes are known only now; what none can hold would wait forever
            from orchestrator.capacity import check_cluster, cluster_capacity

            if warning := check_cluster(s, cluster_capacity(s.cluster.address)):
                logging.getLogger("saferay").warning(warning)
                err.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)

    try:
        with insistent_ctrl_c():
            summary = run_study(s, st, verbose=verbose, console=console, after_ray_start=after_ray_start, until=until)
    except KeyboardInterrupt:
        err.print("[bold red]error:[/] interrupted; finished stages are kept, `saferay run` again resumes",
                  highlight=False, soft_wrap=True)
        _exit_now(130)
    except InputError as e:  # bad input: exit 2, like a bad spec
        _fail(f"{e}\n(finished stages are kept)")
    except Exception as e:  # one clear line; the traceback is in the log file
        logging.getLogger("saferay").exception("study failed")
        _fail(f"{type(e).__name__}: {e}\n(full traceback in {log_file}; finished stages are kept)", 1)
    render(summary, console)
    console.print(f"summary: {st.dir / 'summary.json'}   (saferay show {s.study})")
    console.print(_mlflow_line(summary["mlflow"]))


@app.command()
def show(study: str, store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")):
    """Stage status, timings and results of a study."""
    from orchestrator.summary import render, summarize

    try:
        summary = summarize(StudyStore(store_root(store), study))
    except FileNotFoundError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        render(summary, console)


@app.command()
def report(study: str, store: Optional[str] = StoreOpt,
           out: Optional[Path] = typer.Option(None, "--out", help="Default: <store>/studies/STUDY/report.html "
                                              "(on an object store, also a local copy in SAFERAY_CACHE)"),
           mlflow_url: str = typer.Option("http://127.0.0.1:5000", "--mlflow-url", help="Where the MLflow UI is.")):
    """One self-contained HTML page of the study's results, every number linked to its MLflow run."""
    from dashboards.report import build_report

    st = StudyStore(store_root(store), study)
    if st.load_state() is None:
        _fail(f"no study '{study}' in {st.location} (run it first, or pass --store)")
    path = out or st.dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(st, mlflow_url))
    if st.remote and out is None:
        from jobs.storage import join, publish

        publish(path, join(st.study_location, "report.html"))
        console.print(f"report: {join(st.study_location, 'report.html')} (a copy here: {path})")
    else:
        console.print(f"report: {path}")


@app.command()
def plan(spec: Path, set_: list[str] = typer.Option([], "--set", help="Override a field: a.b=value"),
         store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")):
    """Stages, keys, cache state, resources and memory per GPU worker, before anything runs.
    Exits 2 when the estimate exceeds cluster.gpu_memory_gb."""
    from orchestrator.plan import make_plan

    s = _load(spec, set_)
    try:
        p = make_plan(s, StudyStore(store_root(store), s.study))
    except InputError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(p, indent=2) + "\n")
    else:
        from rich.table import Table

        table = Table(title=f"plan: study {p['study']}", box=None)
        for col in ("stage", "key", "cache", "asks the cluster for", "PFLOP", "GPU-hours"):
            table.add_column(col)
        for st in p["stages"]:
            hours = "?" if st["gpu_hours"] is None else f"{st['gpu_hours']:,.2f}"
            table.add_row(st["name"], st["key"], "cached" if st["cached"] else "to run", st["resources"],
                          f"{st['pflop']:,.3g}", hours)
        console.print(table)
        c, a = p["compute"], p["compute"]["assumptions"]
        unknown = [st["name"] for st in p["stages"] if st["gpu_hours"] is None]
        console.print(f"compute: {c['total_gpu_hours']:,.1f} GPU-hours in all (upper bound: every row at "
                      f"{a['sequence_length']} tokens; rows {a['rows']}; {a['flops']}; GPUs of {a['gpu_tflops']:g} "
                      f"TFLOP/s at {a['train_utilisation']:.0%} when training, {a['decode_utilisation']:.0%} when "
                      "decoding)" + (f"; not counted: {', '.join(unknown)} ({p['stages'][[s['name'] for s in p['stages']].index(unknown[0])]['unknown']})" if unknown else ""))
        m, t, mem = p["model"], p["training"], p["memory_per_worker_gib"]
        console.print(f"model: {m['parameters'] / 1e6:,.1f}M parameters ({m['trainable'] / 1e6:,.1f}M trainable), "
                      f"largest layer {m['largest_layer'] / 1e6:,.1f}M")
        console.print(f"training: {t['strategy']} on {t['workers']} {'GPU' if t['gpu'] else 'CPU'} workers, "
                      f"bf16 {t['bf16']}, offload {t['offload']}, LoRA {t['lora']}")
        console.print(f"memory per worker: {mem['total']:.2f} GiB = model states {mem['model_states']:.2f} "
                      f"+ activations {mem['activations']:.2f}")
        am = p["attack_memory_per_worker_gib"]
        console.print(f"memory per attack worker: {am['total']:.2f} GiB = model states {am['model_states']:.2f} "
                      f"+ activations {am['activations']:.2f} + Lisa's anchor and penalty {am['lisa']:.2f}")
        d = p["decoding"]
        where = f"{d['gpus_per_actor']:g} GPU" if d["gpus_per_actor"] else "CPU"
        j = d["judge_pool"]
        judges = f"{j['gpus_per_actor']:g} GPU" if j["gpus_per_actor"] else f"{j['cpus_per_actor']:g} CPU"
        console.print(f"decoding: {d['engine']}, up to {d['actors']} generation actors on {where} each, "
                      f"{d['memory_per_worker_gib']:.2f} GiB each (fp32 weights + KV cache); judging: up to "
                      f"{j['actors']} actors on {judges} each")
    if p["fits"] is False:
        _fail(f"plan refused: {'; '.join(p['over'])}: more than cluster.gpu_memory_gb ({p['gpu_memory_gb']:g} GB)")


AddressOpt = typer.Option(None, "--address", envvar="SAFERAY_CLUSTER",
                          help="Ray dashboard / Jobs API address, e.g. http://127.0.0.1:8265 ($SAFERAY_CLUSTER).")


def _address(address: Optional[str]) -> str:
    if not address:
        _fail("no cluster address: pass --address URL or set SAFERAY_CLUSTER")
    return address


def _cluster_call(fn, *args):
    try:
        return fn(*args)
    except InputError as e:
        _fail(str(e))
    except (RuntimeError, ValueError) as e:  # the Jobs API's answer for unknown job ids and the like
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


@app.command()
def submit(spec: Path, set_: list[str] = typer.Option([], "--set", help="Override a field: a.b=value"),
           address: Optional[str] = AddressOpt,
           store: str = typer.Option("/tmp/saferay", "--store",
                                     help="Study store every node reaches: a shared path, or s3://bucket/prefix, gs://..."),
           until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage (e.g. align_sft)")):
    """Send a study to a Ray cluster through the Ray Jobs API; prints the study and job ids.
    A study stopped or failed earlier resumes from its finished stages when submitted again."""
    from orchestrator import submit as jobs

    s = _load(spec, set_)
    _check_until(until)
    study, job_id = _cluster_call(jobs.submit, s, _address(address), store, until)
    console.print(f"study [bold]{study}[/]  job [bold]{job_id}[/]  (store on the cluster: {store})")
    console.print(f"follow it: saferay logs {job_id} -f --address {address}")


@app.command()
def status(job_id: str, address: Optional[str] = AddressOpt, as_json: bool = typer.Option(False, "--json")):
    """State of a submitted study's job."""
    from orchestrator import submit as jobs

    info = _cluster_call(jobs.status, _address(address), job_id)
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        console.print(f"{info['job_id']}: {info['status']}  study {info['study']}  store {info['store']}"
                      + (f"\n{info['message']}" if info["message"] else ""))


@app.command()
def logs(job_id: str, address: Optional[str] = AddressOpt, follow: bool = typer.Option(False, "--follow", "-f")):
    """A submitted study's output (`-f` follows it until the job ends)."""
    from orchestrator import submit as jobs

    _cluster_call(jobs.logs, _address(address), job_id, follow, lambda text: (sys.stdout.write(text), sys.stdout.flush()))


@app.command()
def stop(job_id: str, address: Optional[str] = AddressOpt):
    """Stop a submitted study; its finished stages stay in the store and a re-run resumes."""
    from orchestrator import submit as jobs

    stopped = _cluster_call(jobs.stop, _address(address), job_id)
    console.print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@app.command("tracking-server")
def tracking_server(store: Optional[str] = StoreOpt, host: str = "127.0.0.1", port: int = 5000):
    """An MLflow tracking server (SQLite backend, artifact root) that studies can share via
    `tracking.uri: http://HOST:PORT`. Binds to 127.0.0.1 unless told otherwise."""
    root = store_root(store)
    if isinstance(root, str):
        _fail(f"--store {root}: the tracking server keeps its database in a local directory; give one")
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"MLflow tracking server on http://{host}:{port}  (backend {root / 'server.db'}, "
                  f"artifacts {root / 'server-artifacts'})")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root.absolute() / 'server.db'}",
           "--artifacts-destination", str((root / "server-artifacts").absolute()),
           "--host", host, "--port", str(port), "--workers", "1"]
    raise typer.Exit(serve_mlflow(cmd))


def serve_mlflow(cmd: list[str]) -> int:
    """Run an MLflow server until it exits. It runs in a process group of its own (it starts
    uvicorn workers), and a SIGTERM, SIGHUP or Ctrl-C of saferay stops that whole group: a
    SIGTERM used to stop saferay alone and leave the server and its worker running."""
    import signal

    proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            start_new_session=True)

    def stop(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    code = proc.wait()
    with contextlib.suppress(ProcessLookupError):  # a worker its server did not take down with it
        os.killpg(proc.pid, signal.SIGKILL)
    return code


@app.command()
def ui(store: Optional[str] = StoreOpt, host: str = "127.0.0.1", port: int = 5000):
    """Serve the MLflow UI over the embedded store (127.0.0.1 unless told otherwise); for a store
    in a bucket, the database its studies run from this machine keep in SAFERAY_CACHE."""
    from orchestrator.store import mirror_root
    from orchestrator.tracking import default_tracking_uri, ui_url

    root = store_root(store)
    if isinstance(root, str):  # an object store: its embedded database is on the driver's machine
        root = mirror_root(root)
    if not (root / "mlflow.db").exists():
        _fail(f"no MLflow store in {root} yet: run a study first")
    console.print(f"MLflow UI on {ui_url(f'http://{host}:{port}')}  (store {root})")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", default_tracking_uri(root),
           "--host", host, "--port", str(port), "--workers", "1"]
    raise typer.Exit(serve_mlflow(cmd))


def main():
    app()


if __name__ == "__main__":
    main()
