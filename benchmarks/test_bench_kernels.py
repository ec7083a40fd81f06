"""CPU benchmarks of red_kernels' ops (pytest-benchmark): what a CPU can honestly show is memory.

Run with ``python -m pytest benchmarks``; ``tests/`` never collects this directory.
Time is reported by pytest-benchmark for the torch backend's chunked paths and the eager
compositions of the ops the step runs (fused_linear_kl, clone_mse); the Triton interpreter
is skipped (far too slow to time). The peak memory above the inputs (fwd + bwd) is
recorded in ``extra_info`` and printed. The whole step: ``benchmarks/cpu_step.py``.
"""
import pytest
import torch

import red_kernels as rk
from cpu_memory import AVAILABLE, peak_extra_bytes

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="needs glibc mallinfo2")
MB = 2 ** 20


def _kl_inputs(T=2048, V=32000, d=64, D=128):
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(T, d, generator=g).requires_grad_()
    w_s = (torch.randn(V, d, generator=g) * 0.05).requires_grad_()
    h_t = torch.randn(T, D, generator=g)
    w_t = torch.randn(V, D, generator=g) * 0.05
    labels = torch.randint(0, V, (T,), generator=g)
    return h_s, w_s, h_t, w_t, labels


def _step(fn, *leaves):
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
    return run


def _record(benchmark, name, fn):
    peak = peak_extra_bytes(fn)
    benchmark.extra_info["peak_extra_MB"] = round(peak / MB, 1)
    print(f"\n{name}: peak memory above inputs {peak / MB:.1f} MB")
    benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)  # the peak run warmed up
    return peak


_PEAKS = {}


@pytest.mark.parametrize("impl", ["eager", "chunked"])
def test_fused_linear_kl_memory(benchmark, impl):
    """T=2048, V=32000 (fp32): eager holds [T, V] logits x several; chunked holds [c, V]."""
    h_s, w_s, h_t, w_t, labels = _kl_inputs()
    f = rk.naive_fused_linear_kl if impl == "eager" else rk.fused_linear_kl
    with rk.use_backend("torch"):
        peak = _record(benchmark, f"fused_linear_kl[{impl}]",
                       _step(lambda: f(h_s, w_s, h_t, w_t, labels), h_s, w_s))
    _PEAKS[("kl", impl)] = peak
    if impl == "chunked":
        assert ("kl", "eager") in _PEAKS
        ratio = _PEAKS[("kl", "eager")] / max(peak, 1)
        benchmark.extra_info["memory_ratio_vs_eager"] = round(ratio, 2)
        print(f"fused_linear_kl: eager/chunked peak memory = {ratio:.1f}x")
        assert ratio > 4


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_clone_mse_memory(benchmark, impl):
    """One clone tap in the bf16 regime, T=4096 x W=2048. What matters in a step is what
    each of the 7 taps x L layers holds from forward to backward: F.mse_loss on fp32
    copies keeps both copies (64 MB here); clone_mse keeps the bf16 gradient g (16 MB)."""
    from cpu_memory import in_use_bytes

    g = torch.Generator().manual_seed(0)
    s = torch.randn(4096, 2048, generator=g).bfloat16().requires_grad_()
    t = torch.randn(4096, 2048, generator=g).bfloat16()
    f = rk.naive_clone_mse if impl == "eager" else rk.clone_mse
    with rk.use_backend("torch"):
        base = in_use_bytes()
        out = f(s, t)
        kept = in_use_bytes() - base
        del out
        _record(benchmark, f"clone_mse[{impl}]", _step(lambda: (f(s, t)[1],), s))
    benchmark.extra_info["kept_for_backward_MB"] = round(kept / MB, 1)
    print(f"clone_mse[{impl}]: kept from forward to backward {kept / MB:.1f} MB")
    _PEAKS[("clone", impl)] = kept
    if impl == "fused":
        ratio = _PEAKS[("clone", "eager")] / max(kept, 1)
        benchmark.extra_info["kept_ratio_vs_eager"] = round(ratio, 2)
        print(f"clone_mse: eager/fused memory kept for backward = {ratio:.2f}x")
        assert ratio > 3


@pytest.mark.parametrize("chunk", [256, 1024], ids=["chunk256", "chunk1024"])
def test_fused_linear_kl_chunk_rows(benchmark, chunk):
    """T=4096, V=32000, d=256 on CPU: 256-row chunks (the CPU default) against 1024 (the GPU
    default, where dW traffic per chunk decides; here the fp32 softmax temporaries do)."""
    h_s, w_s, h_t, w_t, labels = _kl_inputs(T=4096, d=256, D=512)
    with rk.use_backend("torch"):
        _record(benchmark, f"fused_linear_kl[chunk={chunk}]",
                _step(lambda: rk.fused_linear_kl(h_s, w_s, h_t, w_t, labels, chunk_size=chunk), h_s, w_s))


_DIV_VARIANTS = {
    "forward-kl": dict(),
    "reverse-kl": dict(divergence="reverse-kl"),
    "jsd": dict(divergence="jsd", jsd_beta=0.5),
    "top64": dict(top_k=64),  # forward KL over the teacher's top-64 tokens + a tail bucket
}
_DIV_RESULTS = {}


@pytest.mark.parametrize("impl", ["naive", "fused"])
@pytest.mark.parametrize("variant", list(_DIV_VARIANTS))
def test_fused_linear_kl_divergences(benchmark, variant, impl):
    """forward+backward of each divergence option at N=1024, V=8192, d=256, D=512 (fp32, CPU,
    torch backend), fused (chunked, the CPU default chunk) next to the eager composition;
    time from pytest-benchmark, peak memory above the inputs in extra_info. The last
    parametrization prints the whole table."""
    import time

    h_s, w_s, h_t, w_t, labels = _kl_inputs(T=1024, V=8192, d=256, D=512)
    f = rk.naive_fused_linear_kl if impl == "naive" else rk.fused_linear_kl
    kw = _DIV_VARIANTS[variant]
    with rk.use_backend("torch"):
        fn = _step(lambda: f(h_s, w_s, h_t, w_t, labels, temperature=2.0, **kw), h_s, w_s)
        peak = _record(benchmark, f"fused_linear_kl {variant} [{impl}]", fn)
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        secs = (time.perf_counter() - t0) / 3
    benchmark.extra_info["mean_s"] = round(secs, 4)
    _DIV_RESULTS[(variant, impl)] = (secs, peak)
    if len(_DIV_RESULTS) == 2 * len(_DIV_VARIANTS):
        print("\nfused_linear_kl fwd+bwd, N=1024 V=8192 d=256 D=512 fp32 CPU (torch backend)")
        print(f"{'variant':<11} {'naive ms':>9} {'fused ms':>9} {'naive MB':>9} {'fused MB':>9} {'mem ratio':>9}")
        for v in _DIV_VARIANTS:
            (tn, pn), (tf, pf) = _DIV_RESULTS[(v, "naive")], _DIV_RESULTS[(v, "fused")]
            print(f"{v:<11} {tn * 1e3:9.1f} {tf * 1e3:9.1f} {pn / MB:9.1f} {pf / MB:9.1f} {pn / max(pf, 1):9.2f}")
