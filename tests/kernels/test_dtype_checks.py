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
from red_kernels import _common, fused_linear_kl, projected_mse, projected_mse_student_space
from red_kernels.projected_mse import _diff_gemm
from kernel_utils import assert_close, randn

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


def test_diff_gemm_rejects_mixed_operands(backend, gen):
    a, P, t = randn(N, d, dtype=bf16, gen=gen), randn(D, d, gen=gen), randn(N, D, dtype=bf16, gen=gen)
    with pytest.raises(TypeError) as ei:
        _diff_gemm(a, P, (P.stride(1), P.stride(0)), t, 1.0, 1.0, None)
    _assert_names(ei, "projected_mse")


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

def _grads_vs_ref(op, ref, inputs, grad_mask, factor=3.0):
    """Run ``op`` (loss scaled by ``factor``) and its fp64 reference on the same values."""
    ins = [t.requires_grad_(g) for t, g in zip(inputs, grad_mask)]
    loss = op(*ins)
    refs = [t.detach().double().requires_grad_(g) for t, g in zip(inputs, grad_mask)]
    lref = ref(*refs)
    (loss * factor).backward()
    (lref * factor).backward()
    return loss, lref, ins, refs


def test_projected_mse_student_space_bf16_with_fp32_master(backend, gen):
    y_s, y_t = randn(N, d, dtype=bf16, gen=gen), randn(N, D, dtype=bf16, gen=gen)
    P = randn(D, d, dtype=fp32, gen=gen, scale=0.2)
    loss, lref, (ys, _, Pg), (ysr, _, Pr) = _grads_vs_ref(
        projected_mse_student_space, lambda a, b, p: (a - b @ p).pow(2).mean(),
        [y_s, y_t, P], [True, False, True])
    assert loss.dtype == fp32
    assert_close(loss, lref, bf16, "loss")
    assert ys.grad.dtype == bf16 and Pg.grad.dtype == fp32
    assert_close(ys.grad, ysr.grad, bf16, "dy_s")
    assert_close(Pg.grad, Pr.grad, bf16, "dP")


@pytest.mark.parametrize("lead", [(N,), (3, 7)])
def test_projected_mse_bf16_with_fp32_master(backend, lead, gen):
    h_s, h_t = randn(*lead, d, dtype=bf16, gen=gen), randn(*lead, D, dtype=bf16, gen=gen)
    P = randn(D, d, dtype=fp32, gen=gen, scale=0.2)
    loss, lref, (hs, Pg, _), (hsr, Pr, _) = _grads_vs_ref(
        projected_mse, lambda a, p, b: (a @ p.t() - b).pow(2).mean(), [h_s, P, h_t], [True, True, False])
    assert loss.dtype == fp32
    assert_close(loss, lref, bf16, "loss")
    assert hs.grad.dtype == bf16 and Pg.grad.dtype == fp32
    assert_close(hs.grad, hsr.grad, bf16, "dh_s")
    assert_close(Pg.grad, Pr.grad, bf16, "dP")


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
        red_kernels.mse(s, t).backward()
    recs = _by_kernel(record)
    assert set(recs) == {"_mse_kernel"}, list(recs)
    (r,) = recs["_mse_kernel"]
    sig = r["signature"]
    assert sig["s_ptr"] == sig["t_ptr"] == sig["g_ptr"] == "*bf16"
    assert sig["part_ptr"] == "*fp32"
    assert sig["T"] == sig["W"] == "i32" and sig["scale"] == "fp32"
    assert r["constexprs"]["STORE_G"] is True and "BLOCK_T" in r["constexprs"]


def test_record_bf16_regime_has_same_dtype_gemm_operands(record, gen):
    """projected_mse_student_space with bf16 activations and an fp32 master P: every GEMM
    kernel launch sees bf16 x bf16 operands, sums into fp32."""
    y_s = randn(N, d, dtype=bf16, gen=gen, requires_grad=True)
    y_t = randn(N, D, dtype=bf16, gen=gen)
    P = randn(D, d, dtype=fp32, gen=gen, scale=0.2, requires_grad=True)
    with red_kernels.use_backend("triton"):
        projected_mse_student_space(y_s, y_t, P).backward()
    recs = _by_kernel(record)
    assert {"_diff_gemm_kernel", "_acc_tn_kernel"} <= set(recs), list(recs)
    for name in ("_diff_gemm_kernel", "_acc_tn_kernel"):
        for r in recs[name]:
            sig = r["signature"]
            assert sig["a_ptr"] == sig["b_ptr"] == "*bf16", (name, sig)
    (dg,) = recs["_diff_gemm_kernel"]
    assert dg["signature"]["part_ptr"] == "*fp32" and dg["signature"]["e_ptr"] == "*bf16"
    assert all(r["signature"]["acc_ptr"] == "*fp32" for r in recs["_acc_tn_kernel"])
    # no kernel anywhere got an fp32 tensor next to a bf16 one among its GEMM operands
    for r in record:
        ops = {r["signature"][k] for k in ("a_ptr", "b_ptr") if k in r["signature"]}
        assert len(ops) <= 1, r


def test_record_is_off_by_default(gen):
    assert _common.RECORD is None
    s, t = randn(5, 16, gen=gen), randn(5, 16, gen=gen)
    with red_kernels.use_backend("triton"):
        red_kernels.mse(s, t)
    assert _common.RECORD is None
