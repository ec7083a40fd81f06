"""Small helpers shared by the kernel tests."""
import torch

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 5e-3, torch.float64: 1e-10}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf (never passes)."""
    out = out.detach().double()
    ref = ref.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num if denom == 0 else num / denom


def assert_close(out, ref, dtype, name="", factor=1.0):
    e = rel_err(out, ref)
    assert e <= TOL[dtype] * factor, f"{name}: rel err {e:.3e} > {TOL[dtype] * factor:.1e}"


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0, requires_grad=False, device=None):
    """float64 normal samples rounded to ``dtype``, on ``device`` (default: ``gen``'s device)."""
    if device is None:
        device = gen.device if gen is not None else "cpu"
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)
