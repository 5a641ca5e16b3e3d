"""`saferay show`: the stable JSON contract (rates are fractions in [0, 1]) and its table."""

from __future__ import annotations

from jobs.intervals import reading
from orchestrator.store import StudyStore


def summarize(store: StudyStore) -> dict:
    state = store.load_state()
    if state is None:
        raise FileNotFoundError(f"no study '{store.study}' in {store.root} (run it first, or pass --store)")
    out = {
        "study": state["study"],
        "status": state["status"],
        "stages": [{**{k: s.get(k) for k in ("name", "key", "status", "seconds")},
                    "computed_seconds": computed_seconds(s)} for s in state["stages"]],
        "models": {},
        "attack": [],
        "mlflow": state["mlflow"],
        "store": store.study_location,
    }
    from orchestrator.stages import STAGES

    for stage in STAGES:
        done = next((s for s in state["stages"] if s["name"] == stage.name and s["status"] in ("complete", "cached")
                     and store.is_complete(s["name"], s["key"])), None)
        if done:
            result = stage.result.from_json(store.result(stage.name, done["key"]))
            for key, value in stage.shown(result, store.stage_location(stage.name, done["key"])).items():
                # Stages that train add their rows to one "training" table.
                out[key] = {**out[key], **value} if isinstance(out.get(key), dict) and out[key] else value
    return out


def _with_ci(value, ci, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _number(value, fmt: str) -> str:
    """A statistic, or n/a where it is not defined (no example could be forgotten, say)."""
    return "n/a" if value is None else format(value, fmt)


def computed_seconds(row: dict) -> float | None:
    """What a stage cost when it was computed: by this execution, or (cached) by the one that did."""
    return row.get("seconds") if row["status"] == "complete" else row.get("computed_seconds")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def render(summary: dict, console) -> None:
    from rich.table import Table

    stages = Table(title=f"study {summary['study']} — {summary['status']}", box=None)
    for col in ("stage", "key", "status", "seconds", "computed in"):
        stages.add_column(col)
    for s in summary["stages"]:
        stages.add_row(s["name"], s["key"], s["status"], _seconds(s["seconds"]), _seconds(s.get("computed_seconds")))
    console.print(stages)
    if summary["models"]:
        models = Table(title=f"models (judge: {summary.get('judge')})", box=None)
        for col in ("model", "HS", "over-refusal", "task accuracy"):
            models.add_column(col)
        for name, m in summary["models"].items():
            fa = ", ".join(f"{t} {_with_ci(v, m.get('fa_ci', {}).get(t), 2)}" for t, v in m.get("fa", {}).items())
            models.add_row(name, _with_ci(m["hs"], m.get("hs_ci")), _with_ci(m["over_refusal"], m.get("over_refusal_ci")),
                           fa)
        console.print(models)
    if summary.get("attack_table"):
        rows = summary["attack_table"]
        tasks = [k.removesuffix("/hs") for k in rows[0] if k.endswith("/hs") and k != "avg/hs"]
        attack = Table(title="harmful fine-tuning attack: HS / FA", box=None)
        for col in ("model", "p", *tasks, "average"):
            attack.add_column(col)
        for row in rows:
            cells = [f"{_with_ci(row[f'{t}/hs'], row.get(f'{t}/hs_ci'))} / {_with_ci(row[f'{t}/fa'], row.get(f'{t}/fa_ci'), 2)}"
                     if f"{t}/hs" in row else "" for t in (*tasks, "avg")]
            attack.add_row(row["model"], f"{row['p']:g}", *cells)
        console.print(attack)
        if summary.get("intervals"):
            console.print(f"[dim]95% intervals: bootstrap over {summary['intervals']['resampled']}[/]")
    for c in summary.get("comparisons", []):
        ci, t_ci, verdict = reading(c)
        console.print(f"{c['a']} − {c['b']} at p = {c['p']:g}, {c['metric']}: {c['diff']:+.3f} {ci} "
                      f"(seeds' t: {t_ci}): {verdict}")
    for line in summary.get("judge_warnings", []):
        console.print(f"[yellow]{line}[/]")
    for name, v in summary.get("vaa", {}).get("variants", {}).items():
        console.print(f"{name}: q {v['q0']:.2f} → {v['q_final']:.2f}, {v['perturbed_fraction']:.0%} of steps perturbed, "
                      f"{v['vulnerable_draw_fraction']:.0%} drew the vulnerable group, final loss {v['final_loss']:.3f}")
    if summary.get("debias"):
        d = summary["debias"]
        table = Table(title=f"TSDI (α = {d['alpha']:g}, L = {d['length']}): without → with", box=None)
        for col in ("model", "HS", "over-refusal", "helpfulness"):
            table.add_column(col)
        for name, m in d["models"].items():
            a, b = m["without"], m["with"]
            table.add_row(name, *(f"{a[k]:.3f} → {b[k]:.3f}" for k in ("hs", "over_refusal", "helpfulness")))
        console.print(table)
    if summary.get("tune"):
        t = summary["tune"]
        sel, base = t["selected"], t["baselines"]
        line = lambda b: f"HS {b['hs']:.3f} / FA {b['fa']:.3f}" if b else "n/a"  # noqa: E731
        console.print(f"tune ({t['model']}): {t['trials']} trials at p = {t['p']:g} on {', '.join(t['tasks'])}; "
                      f"{len(t['pareto'])} on the Pareto front")
        console.print(f"  selected on validation {sel['config'] if sel else 'none (no trial within δ of SFT FA)'}: "
                      f"{line(sel)}   sft {line(base['sft'])}   {t['model']} (spec defaults) "
                      f"{line(base.get(t['model']))}")
        if sel and sel.get("test"):
            console.print(f"  the selected configuration on test: {line(sel['test'])}")
        for name in t.get("applied", {}):
            console.print(f"  applied: {name} trained once per seed; attacked and evaluated in the tables above")
    vuln = summary.get("vulnerability")
    if vuln and "overlap" in vuln:
        console.print(f"vulnerability: {vuln['fraction_vulnerable']:.1%} of {vuln['n']} alignment examples vulnerable "
                      f"(τ = {vuln['threshold']:g}), {vuln['fraction_never_forgotten']:.1%} never forgotten")
        ov = vuln["overlap"]
        ratio = ov["common_forgot_ratio"]
        console.print(f"  common_forgot_ratio {ratio:.3f}" if ratio is not None else "  common_forgot_ratio n/a")
        for pair, p in ov["pairs"].items():
            oe, oec = p["obs_over_expected"], p.get("obs_over_expected_within_category")
            a, b = pair.split("__")
            console.print(f"  {pair}: Jaccard {_number(ov['jaccard'][a][b], '.3f')}, observed/expected "
                          f"{_number(oe, '.2f')} (p = {_number(p['p_value'], '.2g')}), within categories "
                          f"{_number(oec, '.2f')} (p = {_number(p.get('p_value_within_category'), '.2g')})")
    leaked = summary.get("contamination") or {}
    if leaked:
        total = sum(leaked.values())
        console.print(f"contamination: {total} held-out prompts in training corpora" +
                      ("" if not total else f" ({', '.join(f'{k} {v}' for k, v in leaked.items() if v)})"))
    ml = summary["mlflow"]
    console.print(f"MLflow: {ml['tracking_uri']}  experiment {ml['experiment_id']}  run {ml['run_id']}")
