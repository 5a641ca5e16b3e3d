"""A Ray Train run of the one loop resumes exactly.

- A driver killed after a run's final epoch checkpoint leaves a run with no step left; the next
  `saferay run` resumes it (same run name, same storage) and must get the same history back as
  the uninterrupted run, not an empty one (which left such a study unable to resume, ever).
- A worker process that dies in the middle of an epoch (an attack cell's SFT, a VAA run) is
  restarted by Ray Train from the last epoch checkpoint, and the run ends with the same losses
  (and q trajectory) as an uninterrupted run of the same seed.
- A worker group that trains several runs in turn (the attack grid's cells) gives each run the
  history it has alone, and a worker killed in its second run resumes that run, not the first.

Each Ray Train fit costs ~30 s of start-up here, so the tests share the uninterrupted runs: one
SFT and one VAA run alone, and the same two as one worker group (six fits in all).
"""

import pytest
from test_vaa_strategies import _cfg, setup  # noqa: F401 (the tiny model, tokenizer, Ray session)

from jobs.launch import fit, fit_group

TRAJECTORY = ("loss", "grad_norm", "tokens_per_rank", "steps")
VAA_TRAJECTORY = (*TRAJECTORY, "q", "group", "lambda", "eps_norm")
EPOCHS = 3


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("train-resume")


@pytest.fixture(scope="module")
def cfgs(setup, storage):  # noqa: F811
    tmp, tok, _ = setup
    sft = {**_cfg(tmp, tok, "ddp"), "step": "sft", "step_config": {}, "steps_per_epoch": None}
    vaa = {**_cfg(tmp, tok, "ddp"), "seed": 5}
    return [{**sft, "epochs": EPOCHS, "out_dir": str(storage / "sft")},
            {**vaa, "epochs": EPOCHS, "out_dir": str(storage / "vaa")}]


@pytest.fixture(scope="module")
def alone(cfgs, storage):
    """Each run uninterrupted, on a worker group of its own."""
    return [fit(cfg, f"alone-{i}", storage) for i, cfg in enumerate(cfgs)]


@pytest.fixture(scope="module")
def together(cfgs, storage):
    """The same two runs in turn on one worker group."""
    return fit_group(cfgs, "together", storage)


def test_a_group_of_runs_trains_each_as_alone(alone, together, storage):
    for one, other in zip(alone, together):
        for key in TRAJECTORY:
            assert other[key] == one[key], key
    assert together[1]["q"] == alone[1]["q"]
    assert (storage / "sft/model.safetensors").exists() and (storage / "vaa/model.safetensors").exists()


def test_runs_resumed_from_their_final_checkpoint_return_their_history(setup, cfgs, together, storage):  # noqa: F811
    _, _, rows = setup
    again = fit_group(cfgs, "together", storage)
    # The group's last checkpoint is the VAA run's final epoch; the SFT run before it comes back whole.
    assert again[1]["start_epoch"] == EPOCHS, "the second fit should resume past the end"
    assert again[0]["start_epoch"] == 0
    assert len(together[0]["loss"]) == together[0]["steps"] == EPOCHS * (len(rows) // 4)
    assert together[1]["steps"] == EPOCHS * cfgs[1]["steps_per_epoch"]
    for first, resumed, keys in zip(together, again, (TRAJECTORY, VAA_TRAJECTORY)):
        for key in keys:
            assert resumed[key] == first[key], key
        assert 0 < resumed["seconds"] <= first["seconds"], "the time spent before the restart counts"


def test_a_worker_killed_mid_run_resumes_to_the_same_trajectory(cfgs, alone, storage):
    whole = alone[0]
    per_epoch = whole["steps"] // EPOCHS
    once = storage / "sft-died"
    # Rank 0's process exits (os._exit) one step into the third epoch, once. Ray Train registers
    # a reported checkpoint asynchronously, so the restart resumes from the first or second epoch's.
    killed = fit({**cfgs[0], "out_dir": str(storage / "sft-killed"),
                  "fault": {"exit_at_step": 2 * per_epoch + 1, "once_file": str(once)}}, "sft-killed", storage)
    assert once.exists(), "the worker should have died once"
    assert killed["start_epoch"] >= 1, "the restarted worker group should resume from an epoch checkpoint"
    for key in TRAJECTORY:
        assert killed[key] == whole[key], key


def test_a_group_killed_in_its_second_run_resumes_that_run(cfgs, together, storage):
    once = storage / "vaa-died"
    # Dies one step into the VAA run's third epoch: by then one of its epoch checkpoints is
    # registered (Ray Train does it asynchronously), and the SFT run before it must not train again.
    faulty = [{**cfgs[0], "out_dir": str(storage / "k")},
              {**cfgs[1], "out_dir": str(storage / "k-vaa"),
               "fault": {"exit_at_step": 2 * cfgs[1]["steps_per_epoch"] + 1, "once_file": str(once)}}]
    killed = fit_group(faulty, "together-killed", storage)
    assert once.exists(), "the worker should have died once"
    assert killed[0]["start_epoch"] == 0 and killed[0]["loss"] == together[0]["loss"], (
        "the first run came back whole", [k["start_epoch"] for k in killed])
    assert killed[1]["start_epoch"] >= 1, "the second run should resume from one of its own epoch checkpoints"
    # A first run trained again would have written its model after the death.
    assert (storage / "k/model.safetensors").stat().st_mtime < once.stat().st_mtime, "the first run was trained again"
    for key in VAA_TRAJECTORY:
        assert killed[1][key] == together[1][key], key
