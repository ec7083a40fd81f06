"""Linear layers whose weight is a projected teacher weight, without keeping it alive.

LRC's student weight is W_s = W_t·P (q, k, v, gate, up: side="in") or Pᵀ·W_t (o, down:
side="out"). Autograd through the eager composition keeps every W_s (and, for bf16
mixed precision, the casts of P) from forward to backward. This autograd op keeps one
W_s per linear in the compute dtype (``recompute_weights=False``, the default) or, when
memory is short, saves only x and re-makes W_s in the backward (``recompute_weights=True``:
one more GEMM of D/T the token GEMMs' cost); it returns dP directly
(in: dP = W_tᵀ·dW_s, out: dP = W_t·dW_sᵀ).

Precision: every GEMM runs in x's dtype (the compute dtype), with W_t and the fp32
master P cast to it; gradients for P come back in P's dtype. The op does not rely on
autocast, which does not reach custom autograd Functions and is off in backward.

No Triton here on purpose: every step is a GEMM, and cuBLAS is at the roofline for them;
re-making W_s costs ~D/T of the token GEMMs. Both backends run the same code.
"""
from __future__ import annotations

import torch

from ._backend import get_backend
from ._common import flatten_rows

_SIDES = ("in", "out")


def _make_ws(w_t: torch.Tensor, P: torch.Tensor, side: str, dtype: torch.dtype) -> torch.Tensor:
    w, p = w_t.to(dtype), P.to(dtype)
    return w @ p if side == "in" else p.t() @ w


class _ProjectedLinearGroup(torch.autograd.Function):
    """y_i = x @ W_s,iᵀ + b_i for i < n, one node so dx is accumulated once."""

    @staticmethod
    def forward(ctx, x, side, n, recompute, *params):
        w_ts, Ps, biases = params[:n], params[n:2 * n], params[2 * n:]
        x2 = flatten_rows(x)
        outs, kept = [], []
        for w_t, P, b in zip(w_ts, Ps, biases):
            ws = _make_ws(w_t, P, side, x.dtype)
            y = x2 @ ws.t()
            if b is not None:
                y = y + b.to(y.dtype)
            outs.append(y.reshape(*x.shape[:-1], ws.shape[0]))
            if not recompute:
                kept.append(ws)
            del ws
        ctx.save_for_backward(x2, *w_ts, *Ps, *kept)
        ctx.side, ctx.n, ctx.x_shape, ctx.recompute = side, n, x.shape, recompute
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n, side = ctx.n, ctx.side
        x2, *rest = ctx.saved_tensors
        w_ts, Ps, kept = rest[:n], rest[n:2 * n], rest[2 * n:]
        need_x = ctx.needs_input_grad[0]
        dx = None
        dPs = []
        for i, (w_t, P, dy) in enumerate(zip(w_ts, Ps, dys)):
            need_p = ctx.needs_input_grad[4 + n + i]
            if dy is None or not (need_x or need_p):
                dPs.append(None)
                continue
            dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
            ws = _make_ws(w_t, P, side, x2.dtype) if ctx.recompute else kept[i]
            if need_x:
                dx = dy2 @ ws if dx is None else dx.addmm_(dy2, ws)
            if need_p:
                dws = dy2.t() @ x2  # [out, d] (in) or [d, in] (out), compute dtype
                w = w_t.to(dws.dtype)
                dP = w.t() @ dws if side == "in" else w @ dws.t()
                dPs.append(dP.to(P.dtype))
            else:
                dPs.append(None)
            del ws
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        elif need_x:
            dx = torch.zeros(ctx.x_shape, dtype=x2.dtype, device=x2.device)
        return (dx, None, None, None, *([None] * n), *dPs, *([None] * n))


def _check(x, w_t, P, side, bias):
    if side not in _SIDES:
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    if side == "in":
        if w_t.shape[1] != P.shape[0] or x.shape[-1] != P.shape[1]:
            raise ValueError(f"side='in' needs w_t [out, D], P [D, d], x [..., d]; got "
                             f"{tuple(w_t.shape)}, {tuple(P.shape)}, {tuple(x.shape)}")
        out = w_t.shape[0]
    else:
        if w_t.shape[0] != P.shape[0] or x.shape[-1] != w_t.shape[1]:
            raise ValueError(f"side='out' needs w_t [D, in], P [D, d], x [..., in]; got "
                             f"{tuple(w_t.shape)}, {tuple(P.shape)}, {tuple(x.shape)}")
        out = P.shape[1]
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"bias must have shape ({out},), got {tuple(bias.shape)}")


def projected_linear_group(x: torch.Tensor, w_ts, Ps, side: str = "in", biases=None,
                           recompute_weights: bool = False):
    """Several projected linears reading the same x (q,k,v or gate,up): a tuple of outputs.

    w_ts and biases are frozen (no grad); x and every P get gradients. Every GEMM runs in
    x's dtype. ``recompute_weights`` re-makes each W_s in backward instead of keeping it.
    """
    w_ts, Ps = list(w_ts), list(Ps)
    if len(w_ts) != len(Ps) or not w_ts:
        raise ValueError("w_ts and Ps must be non-empty and of equal length")
    biases = list(biases) if biases is not None else [None] * len(w_ts)
    if len(biases) != len(w_ts):
        raise ValueError("biases must match w_ts in length")
    for w_t, P, b in zip(w_ts, Ps, biases):
        _check(x, w_t, P, side, b)
    get_backend(x, *Ps)  # same code on both backends; still validates a forced choice
    w_ts = [w.detach() for w in w_ts]
    biases = [b.detach() if b is not None else None for b in biases]
    return _ProjectedLinearGroup.apply(x, side, len(w_ts), bool(recompute_weights), *w_ts, *Ps, *biases)


def projected_linear(x: torch.Tensor, w_t: torch.Tensor, P: torch.Tensor, side: str,
                     bias: torch.Tensor | None = None, recompute_weights: bool = False) -> torch.Tensor:
    """y = x @ W_sᵀ (+ bias) with W_s = w_t @ P (side "in") or P.T @ w_t (side "out")."""
    return projected_linear_group(x, [w_t], [P], side, None if bias is None else [bias],
                                  recompute_weights)[0]


def naive_projected_linear(x, w_t, P, side, bias=None):
    """Eager composition: autograd keeps W_s alive until backward."""
    ws = w_t @ P if side == "in" else P.t() @ w_t
    return torch.nn.functional.linear(x, ws, bias)


def naive_projected_linear_group(x, w_ts, Ps, side="in", biases=None):
    biases = biases if biases is not None else [None] * len(w_ts)
    return tuple(naive_projected_linear(x, w, p, side, b) for w, p, b in zip(w_ts, Ps, biases))


class ProjectedLinear(torch.nn.Module):
    """A frozen teacher linear seen through a trainable projection P [D, d]."""

    def __init__(self, teacher: torch.nn.Linear, P: torch.nn.Parameter, side: str):
        super().__init__()
        if side not in _SIDES:
            raise ValueError(f"side must be 'in' or 'out', got {side!r}")
        self.register_buffer("w_t", teacher.weight.detach())
        self.register_buffer("bias", None if teacher.bias is None else teacher.bias.detach())
        self.P = P
        self.side = side

    def forward(self, x):
        return projected_linear(x, self.w_t, self.P, self.side, self.bias)
