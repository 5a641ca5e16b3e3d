"""What a user looks at, opened in headless Chromium (Debian's `chromium`, installed by
`make test`): `saferay report`'s self-contained HTML page (a screenshot, every section, no
console messages), and the MLflow UI that `saferay ui` serves (a JavaScript app)."""

import json
import os
import re
import shutil
import signal
import subprocess

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import saferay
from dashboards.report import SECTIONS
from orchestrator.tracking import ui_url
from procs import start_cli
from servers import free_port, wait_http

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args, timeout=120):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=timeout)


def need_chromium():
    if CHROMIUM is None:  # CI must not pass without the browser check: there it fails
        (pytest.fail if os.environ.get("CI") else pytest.skip)("chromium is not installed (make test installs it)")


def rendered(url: str) -> str:
    """The DOM once the page's scripts have run (virtual time: the app's requests included)."""
    return chromium("--window-size=1400,900", "--virtual-time-budget=15000", "--dump-dom", url).stdout


def test_report_renders_in_headless_chromium(smoke_store, tmp_path):
    need_chromium()
    out = tmp_path / "report.html"
    saferay("report", "smoke", "--out", str(out), "--mlflow-url", "http://127.0.0.1:5000", store=smoke_store)
    page = out.read_text()
    assert "http" not in re.sub(r'href="http://127\.0\.0\.1:5000/[^"]*"|http://127\.0\.0\.1:5000', "", page), \
        "self-contained: no resource outside the page (only links to the MLflow UI)"
    assert page.count('href="http://127.0.0.1:5000/#/experiments/') > 20, "numbers link to their MLflow runs"

    shot = tmp_path / "report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1200,5000", out.as_uri())
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    dom = chromium("--dump-dom", out.as_uri())
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom.stdout, section
    rendered = {s: dom.stdout.split(f'<section id="{s}">')[1].split("</section>")[0] for s in SECTIONS}
    for section in ("hs-fa-table", "hs-against-p", "forgetting", "overlap", "hs-by-category", "tsdi"):
        assert "<img" in rendered[section] or "<table" in rendered[section], section
    assert "No Pareto front" in rendered["pareto"]  # the smoke study does not tune
    # Held-out prompts found in training: a row per held-out split, every count 0.
    counts = re.findall(r"<td>(\w+)</td><td><a [^>]*>(\d+)</a></td>", rendered["contamination"])
    assert counts and {n for _, n in counts} == {"0"} and "harmful_eval" in {k for k, _ in counts}
    # The headline comparison is stated as a paired difference with its interval.
    assert "Paired differences against SFT" in rendered["hs-fa-table"] and "95% interval" in rendered["hs-fa-table"]
    console = [line for line in proc.stderr.splitlines() + dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console


def test_the_mlflow_ui_opens_the_study_on_its_runs(smoke_store):
    """MLflow 3's UI opens an experiment on its GenAI overview (traces) unless the link asks for
    the model-training view; the links saferay prints do, and show the runs, nested, and plots."""
    need_chromium()
    state = json.loads((smoke_store / "studies/smoke/state.json").read_text())
    experiment = state["mlflow"]["experiment_id"]
    port = free_port()
    proc = start_cli("ui", "--store", str(smoke_store), "--port", str(port))
    try:
        printed = proc.stdout.readline()
        ui = f"http://127.0.0.1:{port}"
        assert ui_url(ui) in printed, printed
        wait_http(f"{ui}/health", proc=proc)
        client = MlflowClient(ui)
        runs = client.search_runs([experiment], max_results=1000)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        stages = [r for r in runs if r.data.tags.get("saferay.stage")]

        page = rendered(ui_url(ui, experiment))
        assert f"<strong>{len(runs)}</strong> matching runs" in page, "the runs view, every run counted"
        assert all(p.info.run_name in page for p in parents), "every execution of the study is listed"
        assert not any(f">{s.info.run_name}<" in page for s in stages), "stage runs are nested, not listed"
        assert "No data available" not in page, "the GenAI overview, not the runs"
        # Without the link's view, the same experiment opens on traces: why saferay's links carry it.
        assert "matching runs" not in rendered(f"{ui}/#/experiments/{experiment}")

        evaluate = next(r for r in stages if r.info.run_name == "evaluate")
        plot = rendered(ui_url(ui, experiment, evaluate.info.run_id).replace(
            "?", "/artifacts/plots/hs_against_p.png?"))
        assert re.search(r'<img alt="plots/hs_against_p.png" src="blob:', plot), "the stage run shows its plot"
    finally:
        if proc.poll() is None:
            started = psutil.Process(proc.pid).children(recursive=True)
            os.kill(proc.pid, signal.SIGTERM)  # saferay alone: it stops the server it started
            proc.wait(timeout=60)
            for p in psutil.wait_procs(started, timeout=30)[1]:
                p.kill()
