"""A fine-tune as a Ray Train `TorchTrainer`: its config for `jobs/train_loop.py`, its scaling, and
`fit`. Stages call `fit` from Ray tasks (several runs at once); a Tune trial calls it from its
own process, as Ray's docs do."""

from __future__ import annotations

import os

# The fields of a stage's training section the loop reads (RunSpec in orchestrator/spec.py).
TRAIN_FIELDS = ("epochs", "lr", "batch_size", "weight_decay", "warmup", "schedule", "grad_clip", "strategy",
                "zero_stage", "num_workers", "cpus_per_worker", "use_gpu", "lora", "bf16", "offload")


def run_config(train: dict, *, model_dir: str, data: str, seed: int, pad_id: int, max_len: int,
               out_dir: str | None = None, tokenizer_dir: str | None = None, step: str = "sft",
               step_config: dict | None = None, **extra) -> dict:
    """The loop's config: a stage's training section (`train`, a RunSpec dump) plus what this run
    trains from and on, where it writes its model, and which step it takes."""
    cfg = {k: train[k] for k in TRAIN_FIELDS if k in train}
    return {**cfg, "model_dir": model_dir, "tokenizer_dir": tokenizer_dir or model_dir, "data": data, "seed": seed,
            "pad_id": pad_id, "max_len": max_len, "out_dir": out_dir, "step": step, "step_config": step_config or {},
            "threads": max(1, int(cfg.get("cpus_per_worker", 1))), **extra}


def strategy_name(cfg: dict) -> str:
    name = f"deepspeed-zero{cfg['zero_stage']}" if cfg.get("strategy") == "deepspeed" else cfg.get("strategy", "ddp")
    return name + ("+lora" if cfg.get("lora", {}).get("enabled") else "")


def fit(cfg: dict, name: str, storage: str, max_failures: int = 2) -> dict:
    """Train one run on Ray Train; its history (rank 0's return value). The same `name` and
    `storage` resume the run from its last epoch checkpoint (a restarted stage, a lost worker)."""
    return fit_group([cfg], name, storage, max_failures)[0]


SCALING_FIELDS = ("num_workers", "cpus_per_worker", "use_gpu", "strategy", "zero_stage")
# The training thread sets its own torch threads (`threads`); the worker's other threads get one.
# GNU OpenMP keeps a thread pool per thread that has run parallel work, and once its pools hold
# more threads than there are CPUs it stops spin-waiting between parallel regions: in one process
# on 2 CPUs, a training loop in a second thread ran at 0.55-0.65 of its speed once the main thread
# had a pool of its own (docs/results.md). A Ray Train worker runs training in such a thread.
WORKER_ENV = {"env_vars": {"OMP_NUM_THREADS": "1"}}


# What a study's Ray job sets for the Ray Train controllers its fine-tunes start (each reads its own
# environment); a value in the driver's environment wins.
CONTROLLER_ENV = {
    # The controller looks at its workers every 2 s by default, and each step of a run's start and
    # end waits for a look: at 0.5 s an attack-cell-sized run took 11.6 s instead of 13.5, which
    # short runs (attack cells, trials, tests) save every time (`python -m bench startup`).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Each worker group otherwise starts an actor (a process of its own, its imports) that watches
    # for node preemption, for `ray.train.get_preemption_info()`, which the loop never asks; a
    # preempted node still fails its workers, and the run restarts from its last checkpoint.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def controller_env() -> dict[str, str]:
    """CONTROLLER_ENV, each value overridden by the driver's environment."""
    return {name: os.environ.get(name, value) for name, value in CONTROLLER_ENV.items()}


def fit_group(cfgs: list[dict], name: str, storage: str, max_failures: int = 2) -> list[dict]:
    """Train several runs in turn on one Ray Train worker group; their histories, in order. Short
    runs (an attack cell trains for seconds) then pay the group's start-up and teardown once, not
    each. The runs share the first one's scaling; a restarted group resumes where it stopped."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_loop import train_loop_per_worker

    cfg = cfgs[0]
    for other in cfgs[1:]:
        differ = [k for k in SCALING_FIELDS if other.get(k) != cfg.get(k)]
        if differ:
            raise ValueError(f"runs of one worker group must share their scaling; these differ: {differ}")
    gpu = cfg.get("use_gpu", False)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"runs": cfgs},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.get("num_workers", 1), use_gpu=gpu,
                                     resources_per_worker=None if gpu else {"CPU": cfg.get("cpus_per_worker", 1)}),
        # Resuming needs only the latest epoch checkpoint (at 7B, one is ~100 GB with optimizer states).
        run_config=RunConfig(name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), worker_runtime_env=WORKER_ENV))
    return _fit_keeping_ctrl_c(trainer, name)


def _fit_keeping_ctrl_c(trainer, name: str) -> list[dict]:
    """`trainer.fit()`, with Ctrl-C meaning what it means everywhere else in a study: the stage is
    interrupted (KeyboardInterrupt), and the next `saferay run` resumes it.

    From a driver's main thread (an alignment run), Ray Train's `fit` installs its own SIGINT
    handler, which asks the run's controller to abort and leaves itself installed. A terminal's
    Ctrl-C reaches the controller too, so the abort fails and the handler exits the driver
    (SystemExit 1: the stage recorded as failed), and a later Ctrl-C would go to a finished run.
    Ray Train installs no handler outside the main thread (as in Tune), so `fit` runs in a thread
    of its own while this one waits, where Python's own handler raises KeyboardInterrupt."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # a Ray task or a Tune trial
        return trainer.fit().return_value
    outcome: dict = {}

    def fit_in_thread():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the waiting thread as it is
            outcome["error"] = e

    thread = threading.Thread(target=fit_in_thread, name=f"fit-{name}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"].return_value
