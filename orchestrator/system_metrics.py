"""What the machines did while a stage computed: MLflow's system metrics (CPU, memory, disk,
network; GPU utilisation and memory where a GPU is) logged to the stage's MLflow run, from every
node of the Ray cluster. The driver's node is sampled by a thread of the driver; each other node
by an actor placed on it (no CPU held), its metrics named `system/<node ip>/...`."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger("saferay")


def cpu_description() -> str:
    """The driver's CPU and the widest vector instructions it has ("Intel(R) Xeon(R) Processor;
    amx_tile"): the same study gives different numbers on CPUs whose kernels round differently
    (docs/results.md), so each study run records where it ran."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    model = next((v.strip() for k, v in fields.items() if k.strip() in ("model name", "Model", "cpu model")),
                 platform.machine())
    flags = set(next((v.split() for k, v in fields.items() if k.strip() in ("flags", "Features")), []))
    widest = next((f for f in ("amx_tile", "avx512f", "avx2", "sve", "asimd") if f in flags), "none known")
    return f"{model}; {widest}"


def _monitor_class():
    import psutil
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class StageMonitor(SystemMetricsMonitor):
        started = False

        def collect_metrics(self):
            # psutil's CPU percentage covers the time since the calling thread's previous call, so
            # the sample MLflow takes as the stage starts, a new thread's first, measures nothing of
            # the stage (0.0): it only marks the start.
            if not self.started:
                self.started = True
                psutil.cpu_percent()
                return {}
            return super().collect_metrics()

        def monitor(self):
            try:
                super().monitor()
            finally:
                # A closing sample, on this thread (psutil keeps its state per thread): the time
                # since the last sample, which MLflow's loop drops at shutdown (all of a stage
                # shorter than one interval).
                if self.started:
                    super().collect_metrics()

        def finish(self):
            """MLflow's `finish` joins the sampling thread but logs nothing of what it sampled since
            its last interval: log that."""
            super().finish()
            last = self.aggregate_metrics()
            try:  # samples are not worth failing a stage for (a tracking server gone, say)
                if last:
                    self.publish_metrics(last)
                    self.mlflow_logger.flush()
            except Exception as e:
                log.warning("system metrics of run %s: the last samples were not logged (%s)", self._run_id, e)

    return StageMonitor


class NodeMonitor:
    """A Ray actor sampling the node it runs on."""

    def __init__(self, run_id: str, interval: float, node: str, tracking_uri: str):
        self.monitor = _monitor_class()(run_id, sampling_interval=interval, resume_logging=True, node_id=node,
                                        tracking_uri=tracking_uri)
        self.monitor.start()

    def finish(self) -> None:
        self.monitor.finish()


@contextlib.contextmanager
def system_metrics(interval: float, tracker, run_id: str):
    """Sample every node while the block runs (nothing when off, or while MLflow does not answer:
    these samples are not worth a journal)."""
    if not interval or tracker.offline:
        yield
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    monitors = [ray.remote(NodeMonitor).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        run_id, interval, n["NodeManagerAddress"], tracker.uri) for n in others]
    local = _monitor_class()(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=tracker.uri)
    local.start()
    try:
        yield
    finally:
        local.finish()
        for m in monitors:
            with contextlib.suppress(Exception):  # a node that died with the stage
                ray.get(m.finish.remote(), timeout=60)
            with contextlib.suppress(Exception):
                ray.kill(m)
