"""The interpreter must fail where the GPU fails, and the GPU's bf16 regime must work on CPU.

``tl.dot`` on the GPU rejects mixed operand dtypes at compile time, while the interpreter
upcasts both and runs: every GEMM entry point checks operand dtypes itself (TypeError naming
the op and both dtypes). The trainer's regime (bf16 activations and teacher weights, fp32
master projections) must run through the ops, which cast the fp32 master P themselves, and
every launch must then see same-dtype GEMM operands (checked through ``_common.RECORD``).
"""
import pytest
import torch

import red_kernels
from red_kernels import _common, clone_mse, fused_linear_kl
from helpers import assert_close, randn

bf16, fp32 = torch.bfloat16, torch.float32
D, d, N, V = 96, 48, 37, 300


def _assert_names(excinfo, op):
    msg = str(excinfo.value)
    assert op in msg and "bfloat16" in msg and "float32" in msg, msg


@pytest.fixture
def record():
    """``_common.RECORD`` as a fresh list for the test; None again afterwards."""
    _common.RECORD = []
    try:
        yield _common.RECORD
    finally:
        _common.RECORD = None


# ---------------------------------------------------------------- mixed operands are refused

@pytest.mark.parametrize("order", ["bf16_fp32", "fp32_bf16"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_acc_tn_rejects_mixed_operands(impl, order, gen):
    acc = torch.zeros(24, 40, dtype=fp32, device=gen.device)
    a = randn(33, 24, dtype=bf16 if order == "bf16_fp32" else fp32, gen=gen)
    b = randn(33, 40, dtype=fp32 if order == "bf16_fp32" else bf16, gen=gen)
    with red_kernels.use_backend(impl):
        with pytest.raises(TypeError) as ei:
            _common.acc_tn_(acc, a, b, backend=impl)
    _assert_names(ei, "acc_tn_")
    assert torch.all(acc == 0)  # refused before anything was written


def test_acc_tn_same_dtype_bf16_runs(backend, gen):
    """The legitimate call: bf16 x bf16 summed into fp32 (as dP / dW are), vs fp64."""
    acc0 = randn(24, 40, gen=gen)
    a, b = randn(33, 24, dtype=bf16, gen=gen), randn(33, 40, dtype=bf16, gen=gen)
    acc = acc0.clone()
    _common.acc_tn_(acc, a, b, alpha=-0.5, backend=backend)
    ref = acc0.double() - 0.5 * a.double().t() @ b.double()
    assert acc.dtype == fp32
    assert_close(acc, ref, bf16)


@pytest.mark.parametrize("order", ["bf16_fp32", "fp32_bf16"])
def test_fused_linear_kl_rejects_mixed_student_operands(backend, order, gen):
    hs_dt, ws_dt = (bf16, fp32) if order == "bf16_fp32" else (fp32, bf16)
    h_s = randn(N, d, dtype=hs_dt, gen=gen, requires_grad=True)
    w_s = randn(V, d, dtype=ws_dt, gen=gen, scale=0.15, requires_grad=True)
    h_t, w_t = randn(N, D, dtype=bf16, gen=gen), randn(V, D, dtype=bf16, gen=gen, scale=0.15)
    labels = torch.randint(0, V, (N,), generator=gen, device=gen.device)
    with pytest.raises(TypeError) as ei:
        fused_linear_kl(h_s, w_s, h_t, w_t, labels)
    _assert_names(ei, "fused_linear_kl")


# ------------------------------------------------------------ the trainer's bf16 regime works

def test_fused_linear_kl_bf16_with_fp32_teacher_head(backend, gen):
    """Only the student GEMM is checked: a teacher head in another dtype is cast by the op."""
    h_s = randn(N, d, dtype=bf16, gen=gen, requires_grad=True)
    w_s = randn(V, d, dtype=bf16, gen=gen, scale=0.15, requires_grad=True)
    h_t, w_t = randn(N, D, dtype=bf16, gen=gen), randn(V, D, dtype=fp32, gen=gen, scale=0.15)
    loss, kl, _ = fused_linear_kl(h_s, w_s, h_t, w_t, None)
    ls = h_s.detach().double() @ w_s.detach().double().t()
    lt = h_t.double() @ w_t.double().t()
    ref = (torch.softmax(lt, -1) * (torch.log_softmax(lt, -1) - torch.log_softmax(ls, -1))).sum(-1).mean()
    assert loss.dtype == fp32
    assert_close(kl, ref, bf16, "kl", factor=2.0)
    loss.backward()
    assert h_s.grad.dtype == bf16 and w_s.grad.dtype == bf16


# ------------------------------------------------------------------------ launch recording

def _by_kernel(records):
    out = {}
    for r in records:
        out.setdefault(r["kernel"], []).append(r)
    return out


def test_record_lists_mse_launch(record, gen):
    s, t = randn(N, D, dtype=bf16, gen=gen, requires_grad=True), randn(N, D, dtype=bf16, gen=gen)
    with red_kernels.use_backend("triton"):
        clone_mse(s, t)[1].backward()
    recs = _by_kernel(record)
    assert set(recs) == {"_mse_kernel"}, list(recs)
    (r,) = recs["_mse_kernel"]
    sig = r["signature"]
    assert sig["s_ptr"] == sig["t_ptr"] == sig["g_ptr"] == "*bf16"
    assert sig["part_ptr"] == "*fp32"
    assert sig["T"] == sig["W"] == "i32" and sig["scale"] == "fp32"
    assert r["constexprs"]["STORE_G"] is True and "BLOCK_T" in r["constexprs"]


def test_record_bf16_regime_has_same_dtype_gemm_operands(record, gen):
    """The LM head in the bf16 regime: every GEMM kernel launch sees bf16 x bf16 operands and
    sums into fp32, and the head gradient is laid out so that the grid reads each logits
    block once (first grid axis over the head's columns)."""
    h_s = randn(N, d, dtype=bf16, gen=gen, requires_grad=True)
    w_s = randn(V, d, dtype=bf16, gen=gen, scale=0.15, requires_grad=True)
    h_t, w_t = randn(N, D, dtype=bf16, gen=gen), randn(V, D, dtype=bf16, gen=gen, scale=0.15)
    labels = torch.randint(0, V, (N,), generator=gen, device=gen.device)
    with red_kernels.use_backend("triton"):
        fused_linear_kl(h_s, w_s, h_t, w_t, labels)[0].backward()
    recs = _by_kernel(record)
    assert {"_kl_ce_kernel", "_acc_tn_kernel"} <= set(recs), list(recs)
    for r in recs["_acc_tn_kernel"]:
        sig = r["signature"]
        assert sig["a_ptr"] == sig["b_ptr"] == "*bf16" and sig["acc_ptr"] == "*fp32", sig
    # no kernel anywhere got an fp32 tensor next to a bf16 one among its GEMM operands
    for r in record:
        ops = {r["signature"][k] for k in ("a_ptr", "b_ptr") if k in r["signature"]}
        assert len(ops) <= 1, r


def test_record_is_off_by_default(gen):
    assert _common.RECORD is None
    s, t = randn(5, 16, gen=gen), randn(5, 16, gen=gen)
    with red_kernels.use_backend("triton"):
        clone_mse(s, t)
    assert _common.RECORD is None
