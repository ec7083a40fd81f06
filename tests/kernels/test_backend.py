import pytest
import torch

import red_kernels
from red_kernels import _backend


def test_auto_picks_torch_for_cpu_tensors():
    assert red_kernels.get_backend(torch.zeros(2)) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA tensors")
def test_auto_picks_triton_for_cuda_tensors():
    assert red_kernels.get_backend(torch.zeros(2, device="cuda")) == "triton"


def test_env_var_forces_backend(monkeypatch, device):
    x = torch.zeros(2, device=device)
    monkeypatch.setenv("RED_KERNELS", "torch")
    assert red_kernels.get_backend(x) == "torch"
    monkeypatch.setenv("RED_KERNELS", "triton")
    assert red_kernels.get_backend(x) == "triton"  # CUDA, or CPU under the interpreter
    if not _backend.INTERPRET:  # a GPU machine: CPU tensors would need the interpreter
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            red_kernels.get_backend(torch.zeros(2))


def test_env_var_read_at_call_time(monkeypatch):
    monkeypatch.setenv("RED_KERNELS", "auto")
    assert _backend.forced_backend() == "auto"
    monkeypatch.setenv("RED_KERNELS", "torch")
    assert _backend.forced_backend() == "torch"


def test_context_manager_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv("RED_KERNELS", "torch")
    with red_kernels.use_backend("triton"):
        assert _backend.forced_backend() == "triton"
        with red_kernels.use_backend("auto"):
            assert _backend.forced_backend() == "auto"
        assert _backend.forced_backend() == "triton"
    assert _backend.forced_backend() == "torch"


def test_set_backend_and_auto_restores(monkeypatch):
    monkeypatch.setenv("RED_KERNELS", "triton")
    red_kernels.set_backend("torch")
    assert red_kernels.get_backend(torch.zeros(2)) == "torch"
    red_kernels.set_backend("auto")
    assert _backend.forced_backend() == "triton"


@pytest.mark.parametrize("bad", ["cuda", "Triton2", ""])
def test_bad_name_raises_value_error(bad, monkeypatch):
    with pytest.raises(ValueError, match="auto, triton, torch"):
        red_kernels.set_backend(bad)
    with pytest.raises(ValueError, match="auto, triton, torch"):
        with red_kernels.use_backend(bad):
            pass
    monkeypatch.setenv("RED_KERNELS", bad or "nope")
    with pytest.raises(ValueError, match="valid"):
        red_kernels.get_backend(torch.zeros(2))


def test_forced_triton_without_runnable_triton_raises(monkeypatch, device):
    if device.type == "cuda":  # kernels built for the interpreter cannot take CUDA tensors
        monkeypatch.setattr(_backend, "INTERPRET", True)
        with red_kernels.use_backend("triton"):
            with pytest.raises(RuntimeError, match="cannot run GPU tensors"):
                red_kernels.get_backend(torch.zeros(2, device=device))
    monkeypatch.setattr(_backend, "INTERPRET", False)
    with red_kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="cannot run"):
            red_kernels.get_backend(torch.zeros(2))
    monkeypatch.setattr(_backend, "HAS_TRITON", False)
    with red_kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="not installed"):
            red_kernels.get_backend(torch.zeros(2))
