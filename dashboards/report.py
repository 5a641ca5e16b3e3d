"""`saferay report STUDY`: one self-contained HTML page of a study's results.

Plots are PNGs (the ones the stages logged, plus HS by category drawn here) embedded as data
URIs; every number links to the MLflow run that produced it in the MLflow UI.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

from jobs.intervals import reading
from orchestrator.tracking import ui_url

SECTIONS = ("stages", "contamination", "hs-fa-table", "hs-against-p", "pareto", "forgetting", "overlap", "hs-by-category",
            "tsdi")


class Links:
    def __init__(self, ui: str, experiment_id: str, resolve=lambda run_id: run_id):
        self.ui, self.experiment_id, self.resolve = ui.rstrip("/"), experiment_id, resolve

    def run(self, run_id: str | None) -> str | None:
        run_id = self.resolve(run_id)  # a run started while the server was away has its MLflow id once sent
        return ui_url(self.ui, self.experiment_id, run_id) if run_id else None

    def number(self, value: float | None, run_id: str | None, fmt: str = "{:.3f}") -> str:
        text = "–" if value is None else fmt.format(value)
        href = self.run(run_id)
        return f'<a href="{html.escape(href)}" title="MLflow run {run_id}">{text}</a>' if href else text


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return f"<p class='missing'>No {html.escape(alt)} in this study (its stage is disabled or has not run).</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _comparisons(evaluate: dict, run_id, links) -> str:
    """The headline comparisons as paired differences with their 95% intervals (SCIENCE.md §10)."""
    rows = []
    for c in evaluate.get("comparisons", []):
        ci, t_ci, verdict = reading(c)
        rows.append([html.escape(f"{c['a']} − {c['b']}"), f"{c['p']:g}", html.escape(c["metric"]),
                     links.number(c["diff"], run_id, "{:+.3f}"), ci, t_ci, verdict])
    if not rows:
        return ""
    how = (evaluate.get("intervals") or {}).get("resampled", "prompts")
    return ("<h3>Paired differences against SFT</h3>" + _table(["models", "p", "metric", "difference", "95% interval",
                                                                  "seeds' t interval", "reading"], rows)
            + f"<p>Intervals: percentile bootstrap over {html.escape(how)}; same prompts on both sides. A difference "
              "is called only where the t interval over the seeds' paired differences excludes 0 too.</p>")


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def build_report(store, mlflow_ui: str = "http://127.0.0.1:5000") -> str:
    from dashboards.plots import hs_by_category
    from orchestrator.summary import computed_seconds, summarize

    summary = summarize(store)
    state = store.load_state()
    from orchestrator.runner import tracking_journal

    links = Links(mlflow_ui, summary["mlflow"]["experiment_id"], tracking_journal(store).resolve)
    rows = {r["name"]: r for r in state["stages"]}

    def stage_file(name, file):
        """One file of a finished stage, here (on an object store, that file alone is fetched)."""
        from jobs.storage import exists, join, local

        r = rows.get(name)
        if not (r and store.is_complete(name, r["key"])):
            return None
        where = join(store.stage_location(name, r["key"]), file)
        return Path(local(where)) if exists(where) else None

    def run_of(name):
        return rows.get(name, {}).get("run_id")

    parts = [_section("stages", "Stages", _table(
        ["stage", "key", "status", "seconds", "computed in (s)"],
        [[html.escape(r["name"]), links.number(None, None) if not r.get("run_id") else
          f'<a href="{html.escape(links.run(r["run_id"]))}">{r["key"]}</a>', html.escape(r["status"]),
          *("" if v is None else f"{v:.1f}" for v in (r.get("seconds"), computed_seconds(r)))]
         for r in state["stages"]]))]

    leaked = summary.get("contamination")
    parts.append(_section("contamination", "Held-out prompts found in training corpora", _table(
        ["held-out split", "prompts also in a training corpus"],
        [[html.escape(k), links.number(v, run_of("data"), "{:d}")] for k, v in leaked.items()])
        if leaked is not None else _img(None, "contamination count")))

    evaluate = summary if "judge" in summary else None  # the evaluate stage's part of `show`
    if evaluate:
        cells = {(a["model"], a["task"], a["p"]): a for a in evaluate["attack"]}
        tasks = list(dict.fromkeys(a["task"] for a in evaluate["attack"]))
        body_rows = []
        for row in evaluate.get("attack_table", []):
            tds = [html.escape(row["model"]), f"{row['p']:g}"]
            for t in tasks:
                c = cells.get((row["model"], t, row["p"]))
                tds.append(f"{links.number(c['hs'], c['attack_run_id'])} / {links.number(c['fa'], c['attack_run_id'], '{:.2f}')}"
                           if c else "")
            tds.append(f"{links.number(row['avg/hs'], run_of('evaluate'))} / "
                       f"{links.number(row['avg/fa'], run_of('evaluate'), '{:.2f}')}")
            body_rows.append(tds)
        models = _table(["model", "HS", "over-refusal", "task accuracy"],
                        [[html.escape(n), links.number(m["hs"], run_of("evaluate")),
                          links.number(m["over_refusal"], run_of("evaluate")),
                          ", ".join(f"{html.escape(t)} {links.number(v, run_of('evaluate'), '{:.2f}')}"
                                    for t, v in m["fa"].items())] for n, m in evaluate["models"].items()])
        table = _table(["model", "p", *(f"{t} HS / FA" for t in tasks), "average HS / FA"], body_rows)
        parts.append(_section("hs-fa-table", f"Harmful fine-tuning: HS / FA (judge: {evaluate['judge']})",
                              "<h3>Before the attack</h3>" + models + "<h3>After the attack</h3>" + table
                              + _comparisons(evaluate, run_of("evaluate"), links)))
    else:
        parts.append(_section("hs-fa-table", "Harmful fine-tuning: HS / FA", _img(None, "evaluation")))
    parts.append(_section("hs-against-p", "HS against the harmful ratio p",
                          _img(stage_file("evaluate", "hs_against_p.png"), "HS against p plot")))

    tune = summary.get("tune")
    pareto_body = _img(stage_file("tune", "pareto.png"), "Pareto front")
    if tune and tune["selected"]:
        sel = tune["selected"]
        pareto_body += (f"<p>Selected on the validation prompts: <code>{html.escape(json.dumps(sel['config']))}</code>:"
                        f" HS {links.number(sel['hs'], run_of('tune'))}, FA {links.number(sel['fa'], run_of('tune'))}"
                        " (validation)")
        if sel.get("test"):
            pareto_body += (f"; on the test prompts, once: HS {links.number(sel['test']['hs'], run_of('tune'))}, "
                            f"FA {links.number(sel['test']['fa'], run_of('tune'))}")
        pareto_body += "</p>"
        for name in tune.get("applied", {}):
            pareto_body += (f"<p>Applied (<code>tune.apply</code>): the selection trained once per seed as "
                            f"<code>{html.escape(name)}</code>, in the HS / FA table and its differences against SFT.</p>")
    parts.append(_section("pareto", "Tuning: the Pareto front of HS and FA", pareto_body))
    parts.append(_section("forgetting", "How often alignment examples are forgotten",
                          _img(stage_file("vulnerability", "forgot_histogram.png"), "ForgotNum histogram")))
    overlap = _img(stage_file("vulnerability", "overlap_heatmap.png"), "overlap heatmap")
    vuln = summary.get("vulnerability")
    if vuln and "overlap" in vuln:
        overlap += _table(["pair", "observed / expected", "within categories", "p"],
                          [[html.escape(pair), links.number(p["obs_over_expected"], run_of("vulnerability"), "{:.2f}"),
                            links.number(p.get("obs_over_expected_within_category"), run_of("vulnerability"), "{:.2f}"),
                            links.number(p["p_value"], run_of("vulnerability"), "{:.2g}")]
                           for pair, p in vuln["overlap"]["pairs"].items()])
    parts.append(_section("overlap", "Overlap of forgotten examples across tasks", overlap))

    with tempfile.TemporaryDirectory() as d:
        cat_png = hs_by_category(evaluate["models"], Path(d) / "cat.png") if evaluate else None
        parts.append(_section("hs-by-category", "HS by harm category (before the attack)",
                              _img(cat_png, "HS by category") + _img(stage_file("vulnerability",
                                                                                "forgetting_by_category.png"),
                                                                     "forgetting by category")))
    debias = summary.get("debias")
    tsdi = _img(stage_file("debias", "safety_helpfulness.png"), "TSDI safety/helpfulness plot")
    if debias:
        tsdi += _table(["model", "HS without → with", "over-refusal without → with", "helpfulness without → with"],
                       [[html.escape(n)] + [f"{links.number(m['without'][k], run_of('debias'))} → "
                                            f"{links.number(m['with'][k], run_of('debias'))}"
                                            for k in ("hs", "over_refusal", "helpfulness")]
                        for n, m in debias["models"].items()])
    parts.append(_section("tsdi", f"TSDI: debiased decoding (α = {debias['alpha']:g}, L = {debias['length']})"
                          if debias else "TSDI: debiased decoding", tsdi))
    return PAGE.format(study=html.escape(summary["study"]), status=html.escape(summary["status"]),
                       mlflow=html.escape(mlflow_ui), body="\n".join(parts),
                       nav=" · ".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>saferay: {study}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0 1rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .25rem .6rem; text-align: left; font-size: .9rem; }}
a {{ color: #1a5fb4; text-decoration: none; }} img {{ max-width: 100%; margin: .5rem 0; }}
.missing {{ color: #777; font-style: italic; }} nav {{ font-size: .85rem; margin-bottom: 1rem; }}
</style></head>
<body><h1>saferay study <code>{study}</code> ({status})</h1>
<nav>{nav}</nav>
<p>Every number links to the MLflow run that produced it (MLflow UI at {mlflow}; start it with <code>saferay ui</code>).</p>
{body}
</body></html>
"""
