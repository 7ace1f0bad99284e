import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield

pytest_plugins = ["pytester"]
