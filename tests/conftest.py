import pytest
import torch

# the suite runs servers and workers beside the test process on 2 cores: one thread each avoids thrashing
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dit():
    from tests.tiny_pipelines import tiny_dit_pipeline

    return tiny_dit_pipeline(num_layers=3)
