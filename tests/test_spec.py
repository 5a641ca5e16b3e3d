import pytest

from orchestrator.spec import SpecError, flatten, load_spec

from conftest import ROOT, SMOKE


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_demo_is_short_and_fully_defaulted():
    spec = load_spec(ROOT / "studies" / "demo.yaml")
    assert spec.study == "demo" and spec.align_sft.strategy == "ddp" and spec.evaluate.judge == "world"
    lines = (ROOT / "studies" / "demo.yaml").read_text().splitlines()
    # Short: the study, its seeds and sizes, the paper's rows with their calibrated knobs, the grid,
    # the sweep.
    assert len([ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]) <= 22


@pytest.mark.parametrize("override, message", [
    ("attack.models=[sft, vaa-importance]", "attack.models[1]: 'vaa-importance' is not trained (add it to vaa.variants)"),
    ("vaa.enabled=false", "attack.models[1]: 'vaa' is not trained (add it to vaa.variants and set vaa.enabled: true)"),
    ("vaa.q_clip=[0.9, 0.1]", "vaa.q_clip: must be (low, high) with 0 < low <= high < 1"),
    ("debias.sweep_length=[1, 20]", "debias: sweep_length[1]: 20 must be between 1 and length (8)"),
    ("debias.models=[sft, teacher]", "debias.models[1]: 'teacher' is not an aligned model"),
    ("vaa.lam=1.5", "vaa.lam: Input should be less than or equal to 1"),
    ("corpora={source: files, files: {alignment: a, harmful: b, harmful_eval: c, lookalike: d}}",
     "corpora.files needs 'pretrain' to build the tiny model"),
    ("tune.space={vaa.momentum: {values: [1]}}", "tune: space: 'vaa.momentum' cannot be searched"),
    ("align_sft.offload=optimizer", "offload needs strategy: deepspeed with zero_stage: 3"),
    ("evaluate.judge=beaver-dam", "judge 'beaver-dam' needs judge_model"),
    ("corpora={source: files, files: {alignment: a, harmful: b, harmful_eval: c, lookalike: d, pretrain: e, "
     "task_topic_test: f}}", "files.task_topic_test: a standard test split needs its task's training corpus task_topic"),
    ("vulnerability.decode_actors=4", "vulnerability: decode_actors is now decoding.actors"),
])
def test_vaa_and_debias_fields_are_checked(override, message):
    with pytest.raises(SpecError) as e:
        load_spec(ROOT / "studies" / "demo.yaml", [override])
    assert message in str(e.value)


def test_free_text_tasks_are_not_scored_and_not_tuned_on():
    files = ("corpora={source: files, files: {alignment: a, harmful: b, harmful_eval: c, lookalike: d, pretrain: e, "
             "task_instruct: f, task_sentiment: g}, formats: {task_instruct: alpaca, task_sentiment: sst2}}")
    spec = load_spec(ROOT / "studies" / "demo.yaml", [files])
    assert spec.free_text_tasks == ["instruct"] and spec.decode_cfg()["free_text"] == ["instruct"]
    with pytest.raises(SpecError, match="tune.tasks: instruct has free-text answers"):
        load_spec(ROOT / "studies" / "demo.yaml", [files, "tune.enabled=true", "tune.tasks=[instruct]",
                                                   "tune.space={vaa.rho: {type: grid, values: [1.0]}}"])


def test_extends_merges_and_set_overrides():
    spec = load_spec(SMOKE, ["attack.ratios=[0, 0.2]", "align_sft.strategy=deepspeed", "seed=7"])
    assert spec.study == "smoke" and spec.attack.tasks == ["sentiment"]  # from smoke.yaml
    assert spec.model.prompt_template.startswith("<|user|>")  # from the defaults
    assert spec.attack.ratios == [0, 0.2] and spec.align_sft.strategy == "deepspeed" and spec.seed == 7


@pytest.mark.parametrize("text, override, message", [
    ("attack: {ratios: [0.1, 1.5]}", None, "attack.ratios[1]: must be between 0 and 1"),
    ("attack: {ratioz: [0.1]}", None, "attack.ratioz: unknown key"),
    ("align_sft: {epochs: many}", None, "align_sft.epochs: Input should be a valid integer"),
    ("align_sft: {strategy: fsdp}", None, "align_sft.strategy: Input should be 'ddp' or 'deepspeed'"),
    ("align_sft: {batch_size: 5, num_workers: 2}", None, "align_sft: batch_size 5 must be divisible by num_workers 2"),
    ("study: demo", "base.lr=-1", "base.lr: Input should be greater than 0"),
    ("study: 'bad name!'", None, "study: must be 1-64 letters"),
    ("model: {prompt_template: 'no placeholder'}", None, "model.prompt_template: must contain '{prompt}'"),
    ("attack:\n  ratios: [0.1\n", None, ":3: malformed YAML"),
    ("- a list", None, "a spec is a mapping"),
])
def test_errors_name_the_file_and_key(tmp_path, text, override, message):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(path, [override] if override else [])
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_file_and_extends_loop(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")
    write(tmp_path, "extends: b.yaml", "a.yaml")
    write(tmp_path, "extends: a.yaml", "b.yaml")
    with pytest.raises(SpecError, match="loops back"):
        load_spec(tmp_path / "a.yaml")


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_a_spec_read_back_from_yaml_gives_the_same_stage_keys(path):
    """`saferay submit` sends the spec as YAML; the job must find what a local run of the same
    spec computed (an int default of a float field once hashed as 16, and as 16.0 read back)."""
    import yaml

    from orchestrator.runner import plan
    from orchestrator.spec import StudySpec, spec_dict

    spec = load_spec(path)
    again = StudySpec.model_validate(yaml.safe_load(yaml.safe_dump(spec_dict(spec), sort_keys=False)))
    assert [key for _, key in plan(again)] == [key for _, key in plan(spec)]
