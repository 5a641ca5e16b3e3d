"""The study end to end through the real CLI: embedded Ray, Ray Train on 2 CPU workers
(DDP, DeepSpeed ZeRO-2 and ZeRO-3), the MLflow SQLite store, resume from the store."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT, SMOKE, saferay
from orchestrator.system_metrics import cpu_description

pytestmark = pytest.mark.slow
STAGES = ["data", "base", "align_sft", "vulnerability", "align_vaa", "align_defences", "tune", "attack", "evaluate",
          "debias"]


# Runs that only check alignment or groups skip the stages downstream that retrain models.
ALIGN_SFT_ONLY = ("--set", "vaa.enabled=false", "--set", "attack.models=[sft]", "--set", "attack.ratios=[0.1]",
                  "--set", "debias.enabled=false", "--set", "seeds=[0]")


def show(store, study="smoke"):
    return json.loads(saferay("show", study, "--json", store=store).stdout)


def statuses(summary):
    return {s["name"]: s["status"] for s in summary["stages"]}


def test_show_json_contract(smoke_store):
    s = show(smoke_store)
    assert s["study"] == "smoke" and s["status"] == "complete"
    assert [st["name"] for st in s["stages"]] == STAGES
    for st in s["stages"]:
        assert st["status"] in ("complete", "cached") and len(st["key"]) == 12 and st["seconds"] >= 0
    for name in ("base", "sft"):
        m = s["models"][name]
        assert 0 <= m["hs"] <= 1 and 0 <= m["over_refusal"] <= 1
        assert m["hs_by_category"] and all(0 <= v <= 1 for v in m["hs_by_category"].values())
    assert s["models"]["base"]["hs"] >= 0.5, "the smoke base should already comply with harmful requests"
    assert [(a["model"], a["task"], a["p"]) for a in s["attack"]] == [
        ("sft", "sentiment", 0.0), ("sft", "sentiment", 0.1), ("vaa", "sentiment", 0.0), ("vaa", "sentiment", 0.1)]
    for a in s["attack"]:
        assert 0 <= a["hs"] <= 1 and 0 <= a["fa"] <= 1
    # The paper's table: a row per (model, p), HS/FA per task and their average.
    assert [(r["model"], r["p"]) for r in s["attack_table"]] == [("sft", 0.0), ("sft", 0.1), ("vaa", 0.0), ("vaa", 0.1)]
    row = s["attack_table"][1]
    assert row["avg/hs"] == row["sentiment/hs"] == s["attack"][1]["hs"]
    # VAA and its plain-SAM ablation, both trained; the λ ramp perturbs about half the steps.
    vaa = s["vaa"]
    assert sum(vaa["groups"].values()) > 0 and set(vaa["variants"]) == {"vaa", "vaa-sam"}
    assert vaa["variants"]["vaa"]["mode"] == "dro" and vaa["variants"]["vaa-sam"]["mode"] == "none"
    assert vaa["variants"]["vaa-sam"]["vulnerable_draw_fraction"] == 0.0
    for v in vaa["variants"].values():
        assert 0.1 <= v["q_final"] <= 0.9 and 0.1 < v["perturbed_fraction"] < 0.9
    assert "vaa" in s["models"] and "vaa-sam" in s["models"]
    assert s["mlflow"]["tracking_uri"].startswith("sqlite:///") and s["mlflow"]["run_id"]


def test_show_json_intervals_comparisons_and_contamination(smoke_store):
    """Two seeds (the smoke preset's): every rate carries a 95% interval over seeds then prompts,
    the headline comparisons are paired differences, and no held-out prompt was trained on."""
    s = show(smoke_store)
    assert s["intervals"]["resampled"] == "seeds, then prompts"
    for a in s["attack"]:
        assert len(a["hs_by_seed"]) == 2 and a["hs"] == sum(a["hs_by_seed"]) / 2
        assert a["hs_ci"][0] <= a["hs"] <= a["hs_ci"][1] and a["fa_ci"][0] <= a["fa"] <= a["fa_ci"][1]
    for m in s["models"].values():
        assert m["hs_ci"][0] <= m["hs"] <= m["hs_ci"][1] and set(m["fa_ci"]) == set(m["fa"])
    table = {(r["model"], r["p"]): r for r in s["attack_table"]}
    assert {(c["a"], c["b"], c["p"], c["metric"]) for c in s["comparisons"]} == {
        ("vaa", "sft", p, m) for p in (0.0, 0.1) for m in ("avg/hs", "avg/fa")}
    for c in s["comparisons"]:
        key = c["metric"]
        assert c["diff"] == pytest.approx(table[("vaa", c["p"])][key] - table[("sft", c["p"])][key])
        assert c["ci"][0] <= c["diff"] <= c["ci"][1] and c["significant"] == (c["ci"][0] > 0 or c["ci"][1] < 0)
    assert s["contamination"] and set(s["contamination"].values()) == {0}
    assert 0 < s["vulnerability"]["n_forgettable"] <= s["vulnerability"]["n"]


def test_mlflow_run_tree(smoke_store):
    s = show(smoke_store)
    client = MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[s["mlflow"]["run_id"]]
    assert parent.info.status == "FINISHED" and parent.data.params["attack.n"] == "60"
    # Where it ran: numbers differ between CPUs whose kernels round differently.
    assert parent.data.tags["saferay.cpu"] == cpu_description() and ";" in parent.data.tags["saferay.cpu"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    stage_runs = {r.info.run_name: r for r in children}
    assert "train/loss" in stage_runs["align_sft"].data.metrics or stage_runs["align_sft"].data.tags.get("saferay.cached")
    evaluate = stage_runs["evaluate"]
    assert "sft/hs" in evaluate.data.metrics and "attack/sft/sentiment/p0.1/hs" in evaluate.data.metrics
    # Each aligned model and seed is a LoggedModel of the stage run that trained it, with what
    # evaluate measured linked to it; its weights stay in the store.
    key = next(st["key"] for st in s["stages"] if st["name"] == "evaluate")
    logged = {m.name: m for m in client.search_logged_models(
        experiment_ids=[exp.experiment_id], filter_string=f"tags.`saferay.key` = '{key}'")}
    assert set(logged) == {f"{n}-seed{seed}" for n in ("sft", "vaa", "vaa-sam") for seed in (0, 1)} | {"base-seed0"}
    for name, m in logged.items():
        model, seed = m.tags["saferay.model"], int(m.tags["saferay.seed"])
        trained_by = {"base": "base", "sft": "align_sft"}.get(model, "align_vaa")
        assert m.status == "READY" and m.source_run_id == stage_runs[trained_by].info.run_id, name
        metrics = {x.key.removeprefix(f"{name}/"): x.value for x in m.metrics}
        assert metrics["over_seeds/hs"] == pytest.approx(s["models"][model]["hs"]), name
        assert metrics["hs"] == pytest.approx(s["models"][model]["hs_by_seed"][seed]), name
        assert metrics["over_seeds/hs_ci_lo"] <= metrics["over_seeds/hs"] <= metrics["over_seeds/hs_ci_hi"], name
        assert evaluate.data.metrics[f"{name}/hs"] == metrics["hs"], "the run keeps each model's, not the last"
        assert os.path.isfile(os.path.join(m.tags["saferay.weights"], "model.safetensors")), name
        assert not client.list_logged_model_artifacts(m.model_id), "weights are referenced, not copied"
    # What the machine did while each computed stage ran (MLflow's system metrics). A stage with
    # nothing to train here (align_defences in the smoke study) may honestly have used no CPU.
    for name, run in stage_runs.items():
        if not run.data.tags.get("saferay.cached"):
            assert run.data.metrics["system/cpu_utilization_percentage"] >= 0, name
            assert run.data.metrics["system/system_memory_usage_megabytes"] > 0, name
    for name in ("align_sft", "align_vaa", "evaluate"):
        if not stage_runs[name].data.tags.get("saferay.cached"):
            assert stage_runs[name].data.metrics["system/cpu_utilization_percentage"] > 0, name
    # Attack cells are nested under the attack stage run of the execution that computed them.
    variants = {r.info.run_name: r for r in runs if r.data.tags.get("saferay.variant")}
    assert {by_id[r.data.tags["mlflow.parentRunId"]].info.run_name for r in variants.values()} == {"align_vaa"}
    q = client.get_metric_history(variants["vaa"].info.run_id, "vaa/q")
    assert len(q) == s["vaa"]["variants"]["vaa"]["steps"] and all(0.1 <= m.value <= 0.9 for m in q)
    for key in ("vaa/lambda", "vaa/eps_norm", "vaa/loss_vulnerable", "vaa/loss_invulnerable"):
        assert client.get_metric_history(variants["vaa"].info.run_id, key), key
    cells = [r for r in runs if r.data.tags.get("saferay.cell")]
    attack_parents = {r.data.tags["mlflow.parentRunId"] for r in cells}
    assert {by_id[p].info.run_name for p in attack_parents} == {"attack"}
    assert {r.data.params["p"] for r in cells} >= {"0.0", "0.1"}
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "summary.json" in artifacts
    # Harmful prompts and responses reach MLflow only with tracking.log_texts (off by default).
    assert "samples.json" not in [a.path for a in client.list_artifacts(evaluate.info.run_id)]
    # Every split is a dataset input of the data run that made it (schema and digest, not rows).
    data_run = next(r for r in runs if r.info.run_name == "data" and not r.data.tags.get("saferay.cached"))
    inputs = {d.dataset.name: d for d in client.get_run(data_run.info.run_id).inputs.dataset_inputs}
    assert {"align_train", "harmful", "harmful_eval", "task_sentiment_test"} <= set(inputs)
    assert inputs["harmful_eval"].tags[0].value == "eval" and inputs["align_train"].tags[0].value == "train"
    assert "align_train" in inputs["align_train"].dataset.source


def test_rerun_recomputes_nothing(smoke_store):
    start = time.perf_counter()
    out = saferay("run", str(SMOKE), store=smoke_store).stdout
    took = time.perf_counter() - start
    shown = show(smoke_store)
    assert set(statuses(shown).values()) == {"cached"}
    assert out.count("cached") >= len(STAGES)
    # What each stage cost when it was computed, not the cached run's 0.0 s.
    assert all(s["seconds"] == 0.0 and s["computed_seconds"] > 0 for s in shown["stages"])
    print(f"cached re-run: {took:.1f}s")


def test_until_and_a_second_study_reusing_data_and_base(smoke_store):
    """A second study of the same store adopts the smoke study's data and base (same keys) instead
    of recomputing them, and `--until base` stops there: nothing else runs, Ray is not started."""
    saferay("run", str(SMOKE), "--set", "study=smoke-second", "--until", "base", store=smoke_store)
    s = show(smoke_store, "smoke-second")
    assert s["status"] == "partial"
    assert statuses(s) == {name: "cached" if name in ("data", "base") else "pending" for name in STAGES}
    key = next(st["key"] for st in s["stages"] if st["name"] == "base")
    ours, theirs = (smoke_store / "studies" / study / "stages/base" / key / "model/model.safetensors"
                    for study in ("smoke-second", "smoke"))
    assert ours.stat().st_ino == theirs.stat().st_ino, "adopted by hard link, not recomputed or copied"
    state = json.loads((smoke_store / "studies/smoke-second/state.json").read_text())
    # Adopted from a study of this store that has them (the smoke study, or one that adopted them from it).
    sources = {r["name"]: r.get("from_study") for r in state["stages"][:2]}
    assert set(sources) == {"data", "base"} and all(
        (smoke_store / "studies" / study / "stages" / name).is_dir() and study != "smoke-second"
        for name, study in sources.items()), sources
    proc = saferay("run", str(SMOKE), "--until", "nope", store=smoke_store, check=False)
    assert proc.returncode == 2 and "--until: no stage 'nope'" in proc.stderr.replace("\n", "")


def test_changed_field_reruns_only_dependents(smoke_store):
    # A changed attack field re-runs attack and what follows it; asking for decoded texts changes
    # evaluate's key too, and evaluate then logs them. (tune runs before attack and reads it not:
    # it stays cached.)
    saferay("run", str(SMOKE), "--set", "attack.lr=0.0001", "--set", "tracking.log_texts=true",
            "--set", "tracking.log_models=copy", "--set", "tracking.register_models=true", store=smoke_store)
    s = show(smoke_store)
    assert statuses(s) == {"data": "cached", "base": "cached", "align_sft": "cached", "vulnerability": "cached",
                           "align_vaa": "cached", "align_defences": "cached", "attack": "complete",
                           "evaluate": "complete", "debias": "cached", "tune": "cached"}
    client = MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    evaluate = next(r for r in client.search_runs([s["mlflow"]["experiment_id"]], max_results=1000)
                    if r.data.tags.get("mlflow.parentRunId") == s["mlflow"]["run_id"] and r.info.run_name == "evaluate")
    assert "samples.json" in [a.path for a in client.list_artifacts(evaluate.info.run_id)]
    # Asked for, the models' weights are copied into MLflow and registered as `<study>-<model>`.
    copied = client.search_logged_models(experiment_ids=[s["mlflow"]["experiment_id"]], filter_string=(
        f"tags.`saferay.key` = '{next(st['key'] for st in s['stages'] if st['name'] == 'evaluate')}'"))
    assert copied and all("model.safetensors" in {f.path for f in client.list_logged_model_artifacts(m.model_id)}
                          for m in copied)
    versions = client.search_model_versions("name = 'smoke-sft'")
    sft = {m.artifact_location for m in copied if m.tags["saferay.model"] == "sft"}
    assert len(sft) == 2 and {v.source for v in versions} >= sft, "each seed's SFT model is a version"


def test_debias_section_and_bias_artifacts(smoke_store):
    from jobs.tsdi import load_bias

    s = show(smoke_store)
    d = s["debias"]
    assert (d["alpha"], d["length"], d["reference"]) == (1.0, 4, "base")
    assert set(d["models"]) == {"sft", "vaa", "over-aligned"}
    for name, m in d["models"].items():
        assert len(m["bias_norms"]) == 4 and all(v > 0 for v in m["bias_norms"])
        for when in ("without", "with"):
            assert 0 <= m[when]["hs"] <= 1 and 0 <= m[when]["over_refusal"] <= 1 and m[when]["hs_by_category"]
        assert [(r["alpha"], r["length"]) for r in m["sweep"]] == [(1.0, 2), (1.0, 4)]
    # The TSDI rows at (α, L) are the sweep's, and the untouched model matches the evaluate stage.
    assert d["models"]["sft"]["sweep"][1]["hs"] == d["models"]["sft"]["with"]["hs"]
    assert d["models"]["sft"]["without"]["hs"] == s["models"]["sft"]["hs_by_seed"][0]  # TSDI reads the first seed
    key = next(st["key"] for st in s["stages"] if st["name"] == "debias")
    bias, meta = load_bias(smoke_store / "studies" / "smoke" / "stages" / "debias" / key / "bias" / "sft.safetensors")
    assert bias.shape[0] == 4 and meta["m"] == 64 and meta["pool"] == "benign"
    client = MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    run = next(r for r in client.search_runs([s["mlflow"]["experiment_id"]], max_results=1000)
               if r.info.run_name == "debias" and r.data.tags.get("saferay.key") == key
               and not r.data.tags.get("saferay.cached"))
    assert len(client.get_metric_history(run.info.run_id, "sft/bias_norm")) == 4
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/safety_helpfulness.png"}


def test_vulnerability_section_and_artifacts(smoke_store):
    s = show(smoke_store)
    v = s["vulnerability"]
    assert v["n"] == 150 and 0 <= v["fraction_vulnerable"] <= 1 and v["threshold"] == 0
    assert set(v["forgot_histogram"]) == {"sentiment", "topic"}
    assert all(sum(h) == 150 and len(h) == 4 for h in v["forgot_histogram"].values())  # ForgotNum in 0..T=3
    assert [len(c) for c in v["hs_by_checkpoint"].values()] == [4, 4]
    pair = v["overlap"]["pairs"]["sentiment__topic"]
    assert {"expected", "obs_over_expected", "p_value", "p_value_within_category"} <= set(pair)
    assert len(v["by_category"]) == 14
    # The two proxy runs drew disjoint harmful examples.
    assert [r["harmful_examples"] for r in v["runs"]] == [6, 6]
    groups = (smoke_store / "studies/smoke/stages/vulnerability").glob("*/groups.csv")
    header = next(groups).read_text().splitlines()[0]
    assert header == "id,category,forgot_sentiment,forgot_topic,forgot_total,group"
    client = MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    run = next(r for r in client.search_runs([s["mlflow"]["experiment_id"]], max_results=1000)
               if r.info.run_name == "vulnerability" and not r.data.tags.get("saferay.cached"))
    assert "vuln/fraction_vulnerable" in run.data.metrics and "overlap/jaccard/sentiment__topic" in run.data.metrics
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/forgot_histogram.png", "plots/overlap_heatmap.png", "plots/forgetting_by_category.png"}


def test_groups_file_import_and_bad_id(smoke_store, tmp_path):
    ids = json.dumps(["align-1", "align-7"])
    good = tmp_path / "vulnerable.json"
    good.write_text(ids)
    # A study of its own (data and base adopted from the smoke study), so the smoke study's state stays as built.
    saferay("run", str(SMOKE), "--set", "study=smoke-groups", "--set", f"vulnerability.groups_file={good}",
            *ALIGN_SFT_ONLY, "--until", "vulnerability", store=smoke_store)
    v = show(smoke_store, "smoke-groups")["vulnerability"]
    assert v["imported"] == str(good) and v["fraction_vulnerable"] == 2 / 150
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["align-1", "align-99999"]))
    proc = saferay("run", str(SMOKE), "--set", "study=smoke-groups", "--set", f"vulnerability.groups_file={bad}",
                   *ALIGN_SFT_ONLY, "--until", "vulnerability", store=smoke_store, check=False)
    assert proc.returncode == 2
    assert "bad.json: entry 2: id 'align-99999' is not in the alignment set" in proc.stderr.replace("\n", "")


def test_pretrained_model_by_local_path(smoke_store, tmp_path):
    """The same study from a Hugging Face model directory instead of the tiny model built in-house."""
    base = next((smoke_store / "studies/smoke/stages/base").glob("*/model"))
    saferay("run", str(SMOKE), "--set", "study=smoke-path", "--set", f"model.source={base}",
            "--set", "vulnerability.enabled=false", *ALIGN_SFT_ONLY, store=smoke_store)
    s = show(smoke_store, "smoke-path")
    # Every evaluate result of the smoke study scored the same base model on the same prompts.
    tiny = json.loads(next((smoke_store / "studies/smoke/stages/evaluate").glob("*/result.json")).read_text())
    assert s["status"] == "complete" and s["models"]["base"]["hs"] == tiny["models"]["base"]["hs"]
    result = json.loads(next((smoke_store / "studies/smoke-path/stages/base").glob("*/result.json")).read_text())
    assert (result["model"], result["model_in_stage"], result["final_loss"]) == (str(base), False, None)  # not pretrained


def test_invalid_spec_exits_2_and_writes_nothing(tmp_path):
    store = tmp_path / "store"
    proc = saferay("run", str(SMOKE), "--set", "attack.ratios=[0.1, 2]", store=store, check=False)
    assert proc.returncode == 2
    assert "smoke.yaml: attack.ratios[1]: must be between 0 and 1" in proc.stderr.replace("\n", "")
    assert not store.exists()
    proc = saferay("show", "nope", store=store, check=False)
    assert proc.returncode == 2 and "no study 'nope'" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_study_on_localhost(smoke_store):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--store", str(smoke_store),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke"
        deadline = time.time() + 90
        while True:
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=5).read())
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        assert body["experiment"]["name"] == "smoke"
    finally:  # stop exactly what this test started: its own process group
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("strategy, zero_stage, workers, lora",
                         [("deepspeed", 2, 2, False), ("deepspeed", 3, 2, False), ("ddp", 2, 1, True)])
def test_alignment_strategies(smoke_store, strategy, zero_stage, workers, lora):
    # A study of its own (data and base adopted from the smoke study), so the smoke study's state stays as built.
    saferay("run", str(SMOKE), "--set", "study=smoke-strategies", "--set", f"align_sft.strategy={strategy}",
            "--set", f"align_sft.zero_stage={zero_stage}", "--set", f"align_sft.num_workers={workers}",
            "--set", f"align_sft.lora.enabled={str(lora).lower()}", "--set", "vulnerability.enabled=false",
            *ALIGN_SFT_ONLY, "--until", "align_sft", store=smoke_store)
    s = show(smoke_store, "smoke-strategies")
    assert statuses(s)["base"] == "cached" and statuses(s)["align_sft"] == "complete"
    key = next(st["key"] for st in s["stages"] if st["name"] == "align_sft")
    result = json.loads((smoke_store / "studies/smoke-strategies/stages/align_sft" / key / "result.json").read_text())
    name = f"deepspeed-zero{zero_stage}" if strategy == "deepspeed" else "ddp"
    assert result["strategy"] == name + ("+lora" if lora else "")
    ddp_key = next(p for p in (smoke_store / "studies/smoke/stages/align_sft").iterdir()
                   if json.loads((p / "result.json").read_text())["strategy"] == "ddp"
                   and json.loads((p / "result.json").read_text())["rows"] == result["rows"])
    ddp = json.loads((ddp_key / "result.json").read_text())
    assert result["steps"] == ddp["steps"] > 0
    # The exported model (ZeRO-3 shards gathered, LoRA merged) loads as a plain model and runs.
    from jobs.models import load_model

    exported = load_model(smoke_store / "studies/smoke-strategies/stages/align_sft" / key / "model")
    logits = exported(torch.tensor([[1, 5, 9, 13]])).logits
    assert logits.shape[-1] == exported.config.vocab_size and torch.isfinite(logits).all()
    if lora:  # adapters merged into a plain model: the attention weights moved, nothing else did
        from safetensors.torch import load_file

        base_key = next(st["key"] for st in s["stages"] if st["name"] == "base")
        before = load_file(smoke_store / "studies/smoke/stages/base" / base_key / "model/model.safetensors")
        after = load_file(smoke_store / "studies/smoke-strategies/stages/align_sft" / key / "model/model.safetensors")
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert moved and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                             for k in moved)
    else:  # same data, seed, global batch and loss: one loop gives the same numbers in every strategy
        assert result["final_loss"] == pytest.approx(ddp["final_loss"], rel=1e-3)
