"""`saferay show`: the stable JSON contract (rates are fractions in [0, 1]) and its table."""

from __future__ import annotations

from orchestrator.store import StudyStore


def summarize(store: StudyStore) -> dict:
    state = store.load_state()
    if state is None:
        raise FileNotFoundError(f"no study '{store.study}' in {store.root} (run it first, or pass --store)")
    out = {
        "study": state["study"],
        "status": state["status"],
        "stages": [{k: s.get(k) for k in ("name", "key", "status", "seconds")} for s in state["stages"]],
        "models": {},
        "attack": [],
        "mlflow": state["mlflow"],
        "store": str(store.dir),
    }
    results = {s["name"]: store.result(s["name"], s["key"]) for s in state["stages"]
               if s["status"] in ("complete", "cached") and store.is_complete(s["name"], s["key"])}
    if "evaluate" in results:
        ev = results["evaluate"]
        out["judge"] = ev["judge"]
        out["models"] = ev["models"]
        out["attack"] = [{k: row[k] for k in ("model", "task", "p", "hs", "fa", "hs_by_category", "over_refusal")}
                         for row in ev["attack"]]
    for name in ("base", "align_sft"):
        if name in results and "final_loss" in results[name]:
            out.setdefault("training", {})[name] = {k: results[name].get(k) for k in
                                                    ("steps", "final_loss", "tokens_per_second", "train_seconds")}
    return out


def render(summary: dict, console) -> None:
    from rich.table import Table

    stages = Table(title=f"study {summary['study']} — {summary['status']}", box=None)
    for col in ("stage", "key", "status", "seconds"):
        stages.add_column(col)
    for s in summary["stages"]:
        stages.add_row(s["name"], s["key"], s["status"], f"{s['seconds']:.1f}" if s["seconds"] is not None else "")
    console.print(stages)
    if summary["models"]:
        models = Table(title=f"models (judge: {summary.get('judge')})", box=None)
        for col in ("model", "HS", "over-refusal", "task accuracy"):
            models.add_column(col)
        for name, m in summary["models"].items():
            fa = ", ".join(f"{t} {v:.2f}" for t, v in m.get("fa", {}).items())
            models.add_row(name, f"{m['hs']:.3f}", f"{m['over_refusal']:.3f}", fa)
        console.print(models)
    if summary["attack"]:
        attack = Table(title="harmful fine-tuning attack", box=None)
        for col in ("model", "task", "p", "HS", "FA"):
            attack.add_column(col)
        for row in summary["attack"]:
            attack.add_row(row["model"], row["task"], f"{row['p']:g}", f"{row['hs']:.3f}", f"{row['fa']:.3f}")
        console.print(attack)
    ml = summary["mlflow"]
    console.print(f"MLflow: {ml['tracking_uri']}  experiment {ml['experiment_id']}  run {ml['run_id']}")
