"""red_kernels: Triton kernels for RED distillation, each beside a plain-PyTorch reference.

(Interim: plain-PyTorch references only, until the Triton kernels land.)
"""
import torch
import torch.nn.functional as F


def set_backend(name):
    if name not in ("auto", "triton", "torch"):
        raise ValueError(name)


def rmsnorm_with_stats(x, weight, eps):
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    x2, y2 = xf.reshape(-1, x.shape[-1]), y.float().reshape(-1, x.shape[-1])
    return y, torch.stack([x2.abs().sum(0), x2.pow(2).sum(0), y2.abs().sum(0), y2.pow(2).sum(0)])


def projected_linear(x, w_t, P, side, bias=None):
    W = w_t @ P.to(w_t.dtype) if side == "in" else P.to(w_t.dtype).T @ w_t
    return F.linear(x, W.to(x.dtype), bias)


def projected_linear_group(x, w_ts, Ps, side="in", biases=None):
    biases = biases or (None,) * len(w_ts)
    return tuple(projected_linear(x, w, P, side, b) for w, P, b in zip(w_ts, Ps, biases))


def projected_mse_student_space(y_s, y_t, P):
    return F.mse_loss(y_s.float(), y_t.float() @ P.float())


def fused_linear_kl(h_s, w_s, h_t, w_t, labels=None, temperature=1.0, kl_weight=1.0, ce_weight=1.0,
                    ignore_index=-100, chunk_size=None):
    ls = (h_s.float() @ w_s.float().T)
    lt = (h_t.float() @ w_t.float().T)
    valid = labels != ignore_index if labels is not None else torch.ones(ls.shape[0], dtype=torch.bool)
    n = valid.sum().clamp_min(1)
    lps = F.log_softmax(ls / temperature, -1)
    lpt = F.log_softmax(lt / temperature, -1)
    kl = ((lpt.exp() * (lpt - lps)).sum(-1) * valid).sum() / n
    ce = F.cross_entropy(ls, labels, ignore_index=ignore_index, reduction="sum") / n if labels is not None else ls.new_zeros(())
    return kl_weight * kl + ce_weight * ce, kl.detach(), ce.detach()
