import pytest
import torch

# the suite runs servers and workers beside the test process on 2 cores: one thread each avoids thrashing
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dit():
    from tests.tiny_pipelines import tiny_dit_pipeline

    return tiny_dit_pipeline(num_layers=3)


LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    """A tiny DiT pipeline saved as a local diffusers directory (with id2label), as users pass to --model."""
    from models.pipeline_io import save_dit_pipeline
    from tests.tiny_pipelines import tiny_dit_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-dit"
    save_dit_pipeline(tiny_dit_pipeline(num_layers=3), path, LABELS)
    return path


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The figures of the fault-injection tests (README, Reliability), when any ran."""
    import json
    import os

    from tests.faults import LEDGERS

    if not LEDGERS:
        return
    terminalreporter.section("reliability figures (fault injection)")
    for ledger in LEDGERS:
        terminalreporter.write_line(json.dumps(ledger.figures()))
    path = os.environ.get("FASTCACHE_RELIABILITY_REPORT")
    if path:
        with open(path, "w") as out:
            json.dump([ledger.figures() for ledger in LEDGERS], out, indent=2)
