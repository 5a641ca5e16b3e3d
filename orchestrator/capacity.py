"""Whether Ray can ever give a study what its runs and actors ask for. Ray queues what does not fit
yet, and Ray Train retries a worker group that cannot start without a limit, so a worker or an
actor that no node can hold, or a set of them that must be up at once and that the nodes cannot
hold together, waits forever. These checks refuse it first, naming the field that asks: for the
local Ray in preflight, and for a cluster once the driver has joined it (its nodes are known only
then; `cluster.autoscaling` turns the refusal into a warning where nodes are still to come)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from jobs.records import InputError
from orchestrator.spec import StudySpec

# Node types an autoscaler reports count as this many nodes at most (max_count -1: no limit).
AUTOSCALED_NODES = 16
# Placing mixed bundles is a search; past this many steps the check gives up and does not refuse.
SEARCH_STEPS = 100_000


@dataclass(frozen=True)
class Capacity:
    """What Ray has to give: each node's CPUs and GPUs (and the nodes an autoscaler may add, where
    the cluster reports them), and all of them together."""
    where: str  # "the local Ray", "the cluster at auto": how messages name it
    nodes: tuple[dict, ...]
    remedy: str = ""  # what else a user can do about a missing GPU there

    @property
    def total(self) -> dict:
        return _summed(self.nodes)

    def most(self, resource: str) -> float:
        return max((node.get(resource, 0) for node in self.nodes), default=0)

    def count(self, ask: dict) -> int:
        """How many of `ask` the nodes hold at once, each on one node."""
        ask = {k: v for k, v in ask.items() if v}
        return sum(min(_times(node.get(k, 0), v) for k, v in ask.items()) for node in self.nodes)

    def holds(self, ask: dict) -> bool:
        """Some one node has all of `ask` (a worker or an actor lives on one node)."""
        return self.fits([ask])

    def fits(self, bundles: list[dict]) -> bool:
        """All of `bundles` at once, each on one node, as Ray places workers and actors: counted
        for bundles all alike (a run's workers), searched for mixed ones (exact unless the search
        runs past SEARCH_STEPS, where it does not refuse). Whether Ray finds that placement is
        Ray's: this refuses only what no placement holds."""
        bundles = [b for b in ({k: v for k, v in b.items() if v} for b in bundles) if b]
        if not bundles:
            return True
        if all(b == bundles[0] for b in bundles):
            return self.count(bundles[0]) >= len(bundles)
        return _place(sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True),
                      [dict(node) for node in self.nodes], [SEARCH_STEPS])


def _summed(dicts) -> dict:
    return {k: sum(d.get(k, 0) for d in dicts) for k in ("CPU", "GPU")}


def _times(have: float, each: float) -> int:
    return math.floor(have / each + 1e-9)  # 0.3 CPUs hold three of 0.1, floats notwithstanding


def _place(bundles: list[dict], free: list[dict], steps: list[int], start: int = 0) -> bool:
    """Place `bundles` (largest first) on the `free` nodes, trying each node for the first one; a
    bundle like the one before it goes on that one's node or a later one (the same placements,
    not each of their orders)."""
    if not bundles:
        return True
    need, left = _summed(bundles), _summed(free)
    if any(need[k] > left[k] + 1e-9 for k in need):
        return False  # more than is left on all the nodes: no order of trying helps
    steps[0] -= 1
    if steps[0] < 0:
        return True  # too many ways to try: no refusal on a guess
    first, tried = bundles[0], set()
    alike = len(bundles) > 1 and bundles[1] == first
    for i in range(start, len(free)):
        node = free[i]
        state = tuple(sorted(node.items()))
        if state in tried or any(node.get(k, 0) + 1e-9 < v for k, v in first.items()):
            continue  # a node left as another already tried places the rest no better
        tried.add(state)
        for k, v in first.items():
            node[k] = node.get(k, 0) - v
        placed = _place(bundles[1:], free, steps, i if alike else 0)
        for k, v in first.items():
            node[k] += v
        if placed:
            return True
    return False


def local_cpus(spec: StudySpec) -> int:
    """The logical CPUs the embedded local Ray starts with (`runner.ensure_ray`): cores, at least 2,
    so that Ray Data has a slot beside the train workers (README's notes)."""
    return spec.cluster.num_cpus or max(2, os.cpu_count() or 2)


def local_capacity(spec: StudySpec) -> Capacity:
    gpus = _cuda_devices() if gpu_asks(spec) else 0  # importing torch costs a driver ~1 s: only if asked
    return Capacity("the local Ray", ({"CPU": local_cpus(spec), "GPU": gpus},))


def cluster_capacity(address: str) -> Capacity:
    """The alive nodes of the cluster Ray has joined, and the node types an autoscaler could add
    where they were reported to Ray's GCS (the cluster config that Ray Train's own check reads).
    Nothing in Ray 2.60 reports them: `cluster.autoscaling` is how a user says nodes will come."""
    import ray

    nodes = [{k: n["Resources"].get(k, 0) for k in ("CPU", "GPU")} for n in ray.nodes() if n["Alive"]]
    return Capacity(f"the cluster at {address}", tuple(nodes + _autoscaled_nodes()), remedy=", or add GPU nodes")


def _autoscaled_nodes() -> list[dict]:
    """Each reported node type's nodes, up to its `max_count` (those already up are counted again
    among the alive nodes: lenient, as a check that must not refuse what could run)."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
        if config is None:
            return []
        return [{k: group.resources.get(k, 0) for k in ("CPU", "GPU")}
                for group in config.node_group_configs if group.max_count != 0
                for _ in range(AUTOSCALED_NODES if group.max_count < 0 else min(group.max_count, AUTOSCALED_NODES))]
    except Exception:  # noqa: BLE001 - a private API: without it, the nodes alone are what is known
        return []


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def training_sections(spec: StudySpec) -> dict:
    """The sections whose runs go to Ray Train in this study: base only trains the tiny model, and
    vulnerability only without a groups file. (VAA, the defences, the over-aligned model and Tune's
    trials train with align_sft's scaling.)"""
    sections = {"align_sft": spec.align_sft, "attack": spec.attack}
    if spec.model.source == "tiny":
        sections["base"] = spec.base
    if spec.vulnerability.enabled and not spec.vulnerability.groups_file:
        sections["vulnerability"] = spec.vulnerability
    return sections


def worker_ask(section) -> dict:
    """What Ray Train asks of a node for one worker (`jobs/launch.py`: one GPU, or the CPUs)."""
    return {"GPU": 1} if section.use_gpu else {"CPU": section.cpus_per_worker}


def actor_ask(pool) -> dict:
    return {"CPU": pool.cpus_per_actor, "GPU": pool.gpus_per_actor}


def pools(spec: StudySpec) -> dict:
    d = spec.decoding
    return {"decoding": d.generation(), "decoding.judge_pool": d.judge_pool}


def gpu_asks(spec: StudySpec) -> list[tuple[str, float]]:
    """What one run or one actor asks of the GPUs: each GPU training section's worker group (one
    GPU a worker) and each pool's actor, by the field that sets it."""
    asks = [(f"{name}.num_workers", float(s.num_workers)) for name, s in training_sections(spec).items() if s.use_gpu]
    return asks + [(f"{field}.gpus_per_actor", pool.gpus_per_actor) for field, pool in pools(spec).items()
                   if pool.gpus_per_actor]


def trials(spec: StudySpec, cap: Capacity) -> list[dict]:
    """The bundles Tune's running trials hold for as long as they run (none with tune off): as
    many as `tune.max_concurrent_trials`, or as fit (Tune starts what fits, the rest wait)."""
    t = spec.tune
    if not t.enabled:
        return []
    trial = {"CPU": t.cpus_per_trial}
    return [trial] * min(t.max_concurrent_trials, cap.count(trial))


def check_capacity(spec: StudySpec, cap: Capacity) -> None:
    check_gpus(spec, cap)
    check_nodes(spec, cap)
    check_together(spec, cap)


def check_cluster(spec: StudySpec, cap: Capacity) -> str | None:
    """`check_capacity` on a cluster's nodes; with `cluster.autoscaling`, what does not fit yet is
    a warning to show (the autoscaler may add the nodes it needs), not a refusal."""
    try:
        check_capacity(spec, cap)
    except InputError as e:
        if not spec.cluster.autoscaling:
            raise InputError(f"{e} (a cluster whose autoscaler adds nodes as runs ask: set cluster.autoscaling: "
                             f"true)") from None
        return f"{e}; cluster.autoscaling is on, so the study waits for the autoscaler to add nodes"
    return None


def check_gpus(spec: StudySpec, cap: Capacity) -> None:
    """A run or an actor asking for GPUs that are not there, or for more at once than there are."""
    asks, gpus = gpu_asks(spec), cap.total["GPU"]
    if asks and not gpus:
        fields = [f.replace(".num_workers", ".use_gpu") for f, _ in asks]
        them = "it" if len(fields) == 1 else "them"
        raise InputError(f"{', '.join(fields)}: {cap.where} has no GPU (set {them} to false / 0{cap.remedy})")
    over = [f"{field} asks for {n:g}" for field, n in asks if n > gpus]
    if over:
        raise InputError(f"{'; '.join(over)} GPUs at once: {cap.where} has {gpus:g} "
                         f"(fewer workers or actors{cap.remedy})")


def check_nodes(spec: StudySpec, cap: Capacity) -> None:
    """Each worker, each actor, each Tune trial and each debias task fits on some one node."""
    worker, actor = {"CPU": "cpus_per_worker", "GPU": "use_gpu"}, {"CPU": "cpus_per_actor", "GPU": "gpus_per_actor"}
    shapes = [(name, "a worker", worker_ask(s), worker) for name, s in training_sections(spec).items()]
    shapes += [(field, "an actor", actor_ask(pool), actor) for field, pool in pools(spec).items()]
    if spec.tune.enabled:
        shapes.append(("tune", "a trial", {"CPU": spec.tune.cpus_per_trial}, {"CPU": "cpus_per_trial"}))
    if spec.debias.enabled:
        from orchestrator.stages.debias import bias_task

        cpus, gpus = bias_task(spec)
        shapes.append(("debias", "a bias-estimation task (a whole CPU at least, and a GPU where the generation "
                       "actors have one)", {"CPU": cpus, "GPU": gpus}, {"CPU": "enabled", "GPU": "enabled"}))
    for section, what, ask, fields in shapes:
        ask = {k: n for k, n in ask.items() if n}
        if cap.holds(ask):
            continue
        short = [k for k, n in ask.items() if n > cap.most(k)] or list(ask)  # or no one node has them all
        asked = " and ".join(f"{n:g} {k}" for k, n in ask.items())
        most = " and ".join(f"{cap.most(k):g} {k}" for k in ask)
        named = dict.fromkeys(f"{section}.{fields[k]}" for k in short)  # in order, once each
        raise InputError(f"{', '.join(named)}: {what} asks for {asked} on one "
                         f"node; no node of {cap.where} has that much (the most any node has: {most})")


def check_together(spec: StudySpec, cap: Capacity) -> None:
    """What must be up at once fits the nodes at once: a run's workers; a trial's run beside the
    trials Tune keeps running; a generation actor and a judge actor beside them (the pipeline runs
    only with one of each up, and one that started first keeps its resources while it waits)."""
    held = trials(spec, cap)
    for name, s in training_sections(spec).items():
        workers = [worker_ask(s)] * s.num_workers
        if not cap.fits(workers):
            short, over = _short(cap, workers)
            raise InputError(f"{name}: {s.num_workers} workers × {_words(worker_ask(s))} {short} (lower "
                             f"{name}.num_workers{cap.remedy if 'GPU' in over else f' or {name}.cpus_per_worker'})")
    t = spec.tune
    for name, run in (("align_sft", "alignment"), ("attack", "attack")):
        s = getattr(spec, name)
        if held and not cap.fits(held + [worker_ask(s)] * s.num_workers):
            raise InputError(f"tune: {len(held)} trials × {t.cpus_per_trial:g} CPU leave no room for a trial's {run} "
                             f"run ({name}: {s.num_workers} × {_words(worker_ask(s))}) on {cap.where}'s "
                             f"{_have(cap)} (lower tune.max_concurrent_trials or tune.cpus_per_trial)")
    d = spec.decoding
    pair = [actor_ask(d.generation()), actor_ask(d.judge_pool)]
    if not cap.fits(held + pair):
        beside = f" beside tune's {len(held)} trials × {t.cpus_per_trial:g} CPU" if held else ""
        short, over = _short(cap, held + pair)
        knob = "gpus" if over == ["GPU"] else "cpus"
        raise InputError(f"decoding: a generation actor ({_words(pair[0])}) and a judge actor ({_words(pair[1])})"
                         f"{beside} {short} (lower decoding.{knob}_per_actor or decoding.judge_pool.{knob}_per_actor)")


def _words(ask: dict) -> str:
    return ", ".join(f"{n:g} {k}" for k, n in ask.items() if n) or "nothing"


def _have(cap: Capacity) -> str:
    return f"{cap.total['CPU']:g} CPUs" + (f" on {len(cap.nodes)} nodes" if len(cap.nodes) > 1 else "")


def _short(cap: Capacity, bundles: list[dict]) -> tuple[str, list[str]]:
    """Why `bundles` do not fit, and which resources all the nodes together have too few of (none
    when it is the nodes' sizes)."""
    need = _summed(bundles)
    over = [k for k in ("CPU", "GPU") if need[k] > cap.total[k] + 1e-9]
    if over:
        return (f"need {' and '.join(f'{need[k]:g} {k}s' for k in over)} at once; {cap.where} has "
                f"{' and '.join(f'{cap.total[k]:g}' for k in over)}"), over
    sizes = ", ".join(_words(node) for node in cap.nodes[:8]) + (", …" if len(cap.nodes) > 8 else "")
    return f"do not fit on {cap.where}'s nodes at once ({sizes}), though they add up to enough", over
