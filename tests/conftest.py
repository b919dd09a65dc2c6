import pytest

from autotune.sim.predict import Scenario
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.models import load_model
from autotune.spec.workload import PRESETS


def scenario(model: str, gpu: str = "H200", gpus: int = 8, workload: str = "natural-reasoning", **changes) -> Scenario:
    return Scenario(load_model(model), Cluster.of(load_gpu(gpu), gpus), PRESETS[workload].with_(**changes))


@pytest.fixture
def make_scenario():
    return scenario
