"""Whether Ray can ever give a study what its runs and actors ask for. Ray queues what does not fit
yet, and Ray Train retries a worker group that cannot start without a limit, so a worker or an
actor that no node can hold, or a run that all the nodes together cannot hold, waits forever.
These checks refuse it first, naming the field that asks: for the local Ray in preflight, and for
a cluster once the driver has joined it (its nodes are known only then)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from jobs.records import InputError
from orchestrator.spec import StudySpec


@dataclass(frozen=True)
class Capacity:
    """What Ray has to give: each node's CPUs and GPUs (and each node type an autoscaler may add,
    where the cluster reports them), and all of them together."""
    where: str  # "the local Ray", "the cluster at auto": how messages name it
    nodes: tuple[dict, ...]
    total: dict
    remedy: str = ""  # what else a user can do about a missing GPU there

    def most(self, resource: str) -> float:
        return max((node.get(resource, 0) for node in self.nodes), default=0)

    def holds(self, ask: dict) -> bool:
        """Some one node has all of `ask` (a worker or an actor lives on one node)."""
        return any(all(node.get(k, 0) >= v for k, v in ask.items() if v) for node in self.nodes)


def local_capacity(spec: StudySpec) -> Capacity:
    cpus = spec.cluster.num_cpus or max(2, os.cpu_count() or 2)
    gpus = _cuda_devices() if gpu_asks(spec) else 0  # importing torch costs a driver ~1 s: only if asked
    node = {"CPU": cpus, "GPU": gpus}
    return Capacity("the local Ray", (node,), node)


def cluster_capacity(address: str) -> Capacity:
    """The alive nodes of the cluster Ray has joined, and the node types an autoscaler could add
    where they were reported to Ray's GCS (the cluster config that Ray Train's own check reads).
    Nothing in Ray 2.60 reports them, so there a node type scaled to zero is not seen
    (`cluster/README.md`)."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    config = _autoscaler_config()
    if config is not None:
        nodes += [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
        most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
        total = {k: max(v, most.get(k, 0)) for k, v in total.items()}
    return Capacity(f"the cluster at {address}", tuple(nodes), total, remedy=", or add GPU nodes")


def _autoscaler_config():
    import ray

    try:
        return ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it, the nodes alone are what is known
        return None


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def training_sections(spec: StudySpec) -> dict:
    """The sections whose runs go to Ray Train in this study: base only trains the tiny model, and
    vulnerability only without a groups file."""
    sections = {"align_sft": spec.align_sft, "attack": spec.attack}
    if spec.model.source == "tiny":
        sections["base"] = spec.base
    if spec.vulnerability.enabled and not spec.vulnerability.groups_file:
        sections["vulnerability"] = spec.vulnerability
    return sections


def worker_ask(section) -> dict:
    """What Ray Train asks of a node for one worker (`jobs/launch.py`: one GPU, or the CPUs)."""
    return {"GPU": 1} if section.use_gpu else {"CPU": section.cpus_per_worker}


def pools(spec: StudySpec) -> dict:
    d = spec.decoding
    return {"decoding": d.generation(), "decoding.judge_pool": d.judge_pool}


def gpu_asks(spec: StudySpec) -> list[tuple[str, float]]:
    """What one run or one actor asks of the GPUs: each GPU training section's worker group (one
    GPU a worker) and each pool's actor, by the field that sets it."""
    asks = [(f"{name}.num_workers", float(s.num_workers)) for name, s in training_sections(spec).items() if s.use_gpu]
    return asks + [(f"{field}.gpus_per_actor", pool.gpus_per_actor) for field, pool in pools(spec).items()
                   if pool.gpus_per_actor]


def trial_cpus(spec: StudySpec) -> float:
    """The CPUs Tune's running trials hold for as long as they run (none with tune off)."""
    t = spec.tune
    return t.max_concurrent_trials * t.cpus_per_trial if t.enabled else 0


def check_capacity(spec: StudySpec, cap: Capacity) -> None:
    check_gpus(spec, cap)
    check_nodes(spec, cap)
    check_totals(spec, cap)


def check_gpus(spec: StudySpec, cap: Capacity) -> None:
    """A run or an actor asking for GPUs that are not there, or for more at once than there are."""
    asks, gpus = gpu_asks(spec), cap.total.get("GPU", 0)
    if asks and not gpus:
        fields = [f.replace(".num_workers", ".use_gpu") for f, _ in asks]
        them = "it" if len(fields) == 1 else "them"
        raise InputError(f"{', '.join(fields)}: {cap.where} has no GPU (set {them} to false / 0{cap.remedy})")
    over = [f"{field} asks for {n:g}" for field, n in asks if n > gpus]
    if over:
        raise InputError(f"{'; '.join(over)} GPUs at once: {cap.where} has {gpus:g} "
                         f"(fewer workers or actors{cap.remedy})")


def check_nodes(spec: StudySpec, cap: Capacity) -> None:
    """Each worker and each actor fits on some one node."""
    shapes = [(name, "a worker", worker_ask(s), {"CPU": "cpus_per_worker", "GPU": "use_gpu"})
              for name, s in training_sections(spec).items()]
    shapes += [(field, "an actor", {"CPU": pool.cpus_per_actor, "GPU": pool.gpus_per_actor},
                {"CPU": "cpus_per_actor", "GPU": "gpus_per_actor"}) for field, pool in pools(spec).items()]
    for section, what, ask, fields in shapes:
        ask = {k: n for k, n in ask.items() if n}
        if cap.holds(ask):
            continue
        short = [k for k, n in ask.items() if n > cap.most(k)] or list(ask)  # or no one node has them all
        asked = " and ".join(f"{n:g} {k}" for k, n in ask.items())
        most = " and ".join(f"{cap.most(k):g} {k}" for k in ask)
        raise InputError(f"{', '.join(f'{section}.{fields[k]}' for k in short)}: {what} asks for {asked} on one "
                         f"node; no node of {cap.where} has that much (the most any node has: {most})")


def check_totals(spec: StudySpec, cap: Capacity) -> None:
    """What must run at once fits all the nodes together: a run's workers; a trial's run beside the
    CPUs Tune's trials hold; a generation actor and a judge actor (the pipeline runs only with one
    of each up, and one that started first keeps its CPUs while it waits for the other)."""
    cpus = cap.total.get("CPU", 0)
    for name, s in training_sections(spec).items():
        need = s.num_workers * s.cpus_per_worker
        if not s.use_gpu and need > cpus:
            raise InputError(f"{name}: {s.num_workers} workers × {s.cpus_per_worker:g} CPU need {need:g} CPUs; "
                             f"{cap.where} has {cpus:g} (lower {name}.num_workers or {name}.cpus_per_worker)")
    t, held = spec.tune, trial_cpus(spec)
    for name, run in (("align_sft", "alignment"), ("attack", "attack")):
        s = getattr(spec, name)
        if held and not s.use_gpu and held + s.num_workers * s.cpus_per_worker > cpus:
            raise InputError(f"tune: {t.max_concurrent_trials} trials × {t.cpus_per_trial:g} CPU leave no room for a "
                             f"trial's {run} run ({name}: {s.num_workers} × {s.cpus_per_worker:g} CPU) on "
                             f"{cap.where}'s {cpus:g} CPUs")
    d = spec.decoding
    if (need := held + d.cpus_per_actor + d.judge_pool.cpus_per_actor) > cpus:
        trials = f" beside tune's {t.max_concurrent_trials} trials × {t.cpus_per_trial:g} CPU" if held else ""
        raise InputError(f"decoding: a generation actor ({d.cpus_per_actor:g} CPU) and a judge actor "
                         f"({d.judge_pool.cpus_per_actor:g} CPU){trials} need {need:g} CPUs at once; {cap.where} "
                         f"has {cpus:g} (lower decoding.cpus_per_actor or decoding.judge_pool.cpus_per_actor)")
