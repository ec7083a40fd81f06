"""Kernel-test fixtures: NaN-poisoned outputs, both backends, backend state reset, a random
generator on the test device (the ``device`` fixture of tests/conftest.py)."""
import pytest
import torch

import red_kernels
from red_kernels import _common


@pytest.fixture(autouse=True)
def _poison_and_reset(monkeypatch):
    """Kernel outputs start as NaN (unwritten elements fail); backend choice never leaks."""
    monkeypatch.setattr(_common, "POISON", True)
    monkeypatch.delenv("RED_KERNELS", raising=False)
    red_kernels.set_backend("auto")
    yield
    red_kernels.set_backend("auto")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run the test body with each backend forced."""
    with red_kernels.use_backend(request.param):
        yield request.param


@pytest.fixture
def gen(device):
    """A fresh random generator per test on the test device (seeded from the global RNG, so
    inputs differ); tensors drawn from it live on ``gen.device``."""
    g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    return g
