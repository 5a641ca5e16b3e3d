"""A Ray Train run of the one loop resumes exactly.

- A driver killed after a run's final epoch checkpoint leaves a run with no step left; the next
  `saferay run` resumes it (same run name, same storage) and must get the same history back as
  the uninterrupted run, not an empty one (which left such a study unable to resume, ever).
- A worker process that dies in the middle of an epoch (an attack cell's SFT, a VAA run) is
  restarted by Ray Train from the last epoch checkpoint, and the run ends with the same losses
  (and q trajectory) as an uninterrupted run of the same seed.
- A worker group that trains several runs in turn (the attack grid's cells) gives each run the
  history it has alone, and a worker killed in its second run resumes that run, not the first.
"""

import pytest
from test_vaa_strategies import _cfg, setup  # noqa: F401 (the tiny model, tokenizer, Ray session)

from jobs.launch import fit, fit_group

TRAJECTORY = ("loss", "grad_norm", "tokens_per_rank", "steps")
VAA_TRAJECTORY = (*TRAJECTORY, "q", "group", "lambda", "eps_norm")


def _sft(cfg: dict) -> dict:
    return {**cfg, "step": "sft", "step_config": {}, "steps_per_epoch": None, "epochs": 2}


def test_sft_run_resumed_from_its_final_checkpoint_returns_its_history(setup, tmp_path):  # noqa: F811
    tmp, tok, rows = setup
    cfg = _sft(_cfg(tmp, tok, "ddp"))
    first = fit(cfg, "sft", tmp_path)
    again = fit(cfg, "sft", tmp_path)
    assert first["start_epoch"] == 0 and again["start_epoch"] == 2, "the second fit should resume past the end"
    assert len(first["loss"]) == first["steps"] == 2 * (len(rows) // 4)
    for key in TRAJECTORY:
        assert again[key] == first[key], key


def test_vaa_run_resumed_from_its_final_checkpoint_returns_its_trajectory(setup, tmp_path):  # noqa: F811
    tmp, tok, _ = setup
    cfg = _cfg(tmp, tok, "ddp")
    first = fit(cfg, "vaa", tmp_path)
    again = fit(cfg, "vaa", tmp_path)
    assert again["start_epoch"] == cfg["epochs"]
    for key in VAA_TRAJECTORY:
        assert again[key] == first[key], key
    assert first["steps"] == cfg["epochs"] * cfg["steps_per_epoch"]
    assert 0 < again["seconds"] <= first["seconds"], "the time spent before the restart counts"


@pytest.mark.parametrize("kind", ["sft", "vaa"])
def test_a_worker_killed_mid_run_resumes_to_the_same_trajectory(setup, tmp_path, kind):  # noqa: F811
    tmp, tok, _ = setup
    cfg = {**(_cfg(tmp, tok, "ddp") if kind == "vaa" else _sft(_cfg(tmp, tok, "ddp"))), "epochs": 3}
    whole = fit(cfg, f"{kind}-whole", tmp_path)
    per_epoch = whole["steps"] // cfg["epochs"]
    once = tmp_path / "died"
    # Rank 0's process exits (os._exit) one step into the third epoch, once. Ray Train registers
    # a reported checkpoint asynchronously, so the restart resumes from the first or second epoch's.
    killed = fit({**cfg, "fault": {"exit_at_step": 2 * per_epoch + 1, "once_file": str(once)}}, f"{kind}-killed",
                 tmp_path)
    assert once.exists(), "the worker should have died once"
    assert killed["start_epoch"] >= 1, "the restarted worker group should resume from an epoch checkpoint"
    for key in VAA_TRAJECTORY if kind == "vaa" else TRAJECTORY:
        assert killed[key] == whole[key], key


def test_a_group_of_runs_trains_each_as_alone_and_resumes_the_run_it_lost(setup, tmp_path):  # noqa: F811
    tmp, tok, _ = setup
    runs = [{**_sft(_cfg(tmp, tok, "ddp")), "out_dir": str(tmp_path / "a")},
            {**_cfg(tmp, tok, "ddp"), "seed": 5, "epochs": 4, "out_dir": str(tmp_path / "b")}]
    alone = [fit(cfg, f"alone-{i}", tmp_path) for i, cfg in enumerate(runs)]
    together = fit_group(runs, "together", tmp_path)
    for one, other in zip(alone, together):
        for key in TRAJECTORY:
            assert other[key] == one[key], key
    assert together[1]["q"] == alone[1]["q"]
    assert (tmp_path / "a/model.safetensors").exists() and (tmp_path / "b/model.safetensors").exists()

    once = tmp_path / "died"
    # Dies one step into the second run's last epoch: by then one of that run's epoch checkpoints
    # is registered (Ray Train does it asynchronously), and the first run must not train again.
    faulty = [{**runs[0], "out_dir": str(tmp_path / "k")}, {**runs[1], "fault": {"exit_at_step": 3 * runs[1]["steps_per_epoch"] + 1,
                                             "once_file": str(once)}}]
    killed = fit_group(faulty, "together-killed", tmp_path)
    assert once.exists(), "the worker should have died once"
    assert killed[0]["start_epoch"] == 0 and killed[0]["loss"] == together[0]["loss"], (
        "the first run came back whole", [k["start_epoch"] for k in killed])
    assert killed[1]["start_epoch"] >= 1, "the second run should resume from one of its own epoch checkpoints"
    # A first run trained again would have written its model after the death.
    assert (tmp_path / "k/model.safetensors").stat().st_mtime < once.stat().st_mtime, "the first run was trained again"
    for key in VAA_TRAJECTORY:
        assert killed[1][key] == together[1][key], key
