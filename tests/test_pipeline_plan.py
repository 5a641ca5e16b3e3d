"""The decode-and-judge pipeline's Ray Data plan (jobs/pipeline.py), built and not run: how many
actors each pool asks for, and that a pool on GPUs still gets whole blocks (one model's requests
per call), which Ray's public `map_batches` refuses."""

import pandas as pd
import pytest

from jobs.pipeline import judge_calls, pipeline, pool
from orchestrator.spec_sections import DecodingSpec


def test_no_pool_starts_more_actors_than_it_has_work_for():
    """An actor handed nothing still loads its engine or judge: a pipeline of one model (a Tune
    trial's, on one tuning task) starts one generation actor, whatever `decoding.actors` says."""
    blocks = [pd.DataFrame({"x": range(n)}) for n in (5, 130)]
    assert judge_calls(blocks, None) == 2 and judge_calls(blocks, 64) == 1 + 3
    sizes = [(p["compute"].min_size, p["compute"].max_size)
             for p in (pool(2, 0.5, 0, work=1), pool(2, 0.5, 0, work=5), pool(3, 0.5, 0, work=0))]
    assert sizes == [(1, 1), (1, 2), (1, 1)]


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_pools_on_gpus_get_whole_blocks(local_ray):
    """A spec that decodes and judges on GPUs (studies/vaa-llama2-7b.yaml) builds its plan: each
    generation call is one whole block, on the GPUs asked for."""
    decoding = DecodingSpec(gpus_per_actor=1, judge_pool={"gpus_per_actor": 0.5}).model_dump()
    blocks = [pd.DataFrame({"request": range(3), "prompt": "a"}), pd.DataFrame({"request": range(3, 5), "prompt": "b"})]
    ds = pipeline(blocks, decoding, "world", None)
    judge = ds._logical_plan.dag
    generate = judge.input_dependencies[0]
    assert (generate.name, judge.name) == ("MapBatches(Generate)", "MapBatches(Judge)")
    assert generate.min_rows_per_bundled_input is None and generate.batch_size is None, "a block is split"
    assert generate.ray_remote_args["num_gpus"] == 1 and judge.ray_remote_args["num_gpus"] == 0.5
    assert generate.compute.max_size == 2 and judge.compute.max_size == 1
