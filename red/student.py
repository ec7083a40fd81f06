"""The LRC student: the frozen teacher's weights seen through trainable projections.

For every layer there are seven projections P in R^{D x d} (q, k, v, gate, up read the
residual: W_t P; o, down write it: P^T W_t), one for the embedding (and one for an untied
LM head), plus new RMSNorm gains in R^d. Nothing else is trained. Teacher and student run
layer by layer in lockstep, so each layer's teacher activations live only as long as the
clone loss that compares against them.

Precision (the README's "Precision policy"): the compute dtype is the teacher's weight
dtype (bf16 under ``--precision bf16``, fp32 under ``fp32``). Projections and gains are
fp32 masters, cast to the compute dtype where they enter a product, so every activation
and every GEMM of the step, forward and backward, is in the compute dtype; losses are
reduced in fp32. The casts are explicit, not autocast's, so the same arithmetic runs on
CPU and GPU and inside custom autograd Functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import red_kernels as K

from .errors import RedError
from .teacher import Arch

PROJ_IN = ("q", "k", "v", "gate", "up")
PROJ_OUT = ("o", "down")
PROJ_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
CLONE_TERMS = ("q", "k", "v", "attn", "gate", "up", "ffn")


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the arithmetic of transformers' Llama/Qwen norms, in x's dtype.

    The fp32 master gain is cast to x's dtype first, as the exported model stores it, so
    the output stays in the compute dtype (an fp32 gain would silently promote it).
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return gain.to(x.dtype) * y.to(x.dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def causal_attention(attn_module, q, k, v, cos, sin, arch: Arch, attn_mask=None) -> torch.Tensor:
    """Teacher-shaped attention (QK-norm for Qwen3, RoPE, GQA, causal); [B,T,H*h] out.

    ``attn_mask`` (bool [B,1,T,T], True = may attend; see ``doc_attention``) replaces the
    plain causal mask for packed documents; None keeps SDPA's ``is_causal`` path.
    """
    B, T, _ = q.shape
    hd = arch.head_dim
    q = q.view(B, T, -1, hd)
    k = k.view(B, T, -1, hd)
    v = v.view(B, T, -1, hd)
    if arch.qk_norm:
        q, k = attn_module.q_norm(q), attn_module.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    # GQA inside the attention kernel: no repeated copies of k and v
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                         scale=hd ** -0.5, enable_gqa=arch.num_heads != arch.num_kv_heads)
    return out.transpose(1, 2).reshape(B, T, -1)


def doc_attention(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids [B,T], bool mask [B,1,T,T]) for rows that pack several documents.

    A document is a run of equal ``doc_ids`` along a row. Positions restart at 0 at each
    document start, and a token attends only to earlier-or-same positions of its own
    document, so every document sees exactly what it would see alone. Built from tensor
    ops only (no host read), once per forward, and shared by every layer.

    A dense SDPA mask rather than flex attention: it runs eagerly on CPU and GPU alike
    (flex attention is only fast under torch.compile), and on CUDA SDPA's
    memory-efficient kernel takes a mask together with GQA.
    """
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    pos = idx - torch.where(start, idx, 0).cummax(1).values  # index minus its document's start
    seg = start.cumsum(1)
    mask = (seg[:, :, None] == seg[:, None, :]) & (idx[:, None] >= idx[None, :])
    return pos, mask.unsqueeze(1)


def next_token_labels(input_ids, doc_ids=None, loss_mask=None) -> torch.Tensor:
    """Next-token targets aligned with the rows, -100 where nothing is scored: the last
    position, a prediction across a document boundary (the next document's first token
    does not follow from the previous document), and a target token t with
    ``loss_mask[:, t]`` false."""
    for name, x in (("doc_ids", doc_ids), ("loss_mask", loss_mask)):
        if x is not None and x.shape != input_ids.shape:
            raise ValueError(f"{name} {tuple(x.shape)} must be [B, T] like input_ids {tuple(input_ids.shape)}")
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    if doc_ids is not None:
        labels[:, :-1] = labels[:, :-1].masked_fill(doc_ids[:, 1:] != doc_ids[:, :-1], -100)
    if loss_mask is not None:
        labels[:, :-1] = labels[:, :-1].masked_fill(~loss_mask[:, 1:].bool(), -100)
    return labels


class StudentLayer(nn.Module):
    """One decoder layer of the student: its trainable tensors and its lockstep forward.

    Parameters: seven projections and two norm gains (``q``, ..., ``down``, ``input_norm``,
    ``post_attention_norm``). The teacher's decoder layer is referenced as ``teacher_layer``:
    a plain attribute in a single process (so ``state_dict()`` and ``parameters()`` hold only
    trainable tensors), registered as a frozen submodule by ``register_teacher()`` before
    FSDP2 shards the layer, so that one ``fully_shard(layer)`` covers the teacher layer and
    its student tensors and their all-gather fires in this module's ``forward``.
    """

    def __init__(self, D: int, d: int, teacher_layer: nn.Module | None = None, arch: Arch | None = None):
        super().__init__()
        for name in PROJ_NAMES:
            setattr(self, name, nn.Parameter(torch.empty(D, d)))
        self.input_norm = nn.Parameter(torch.ones(d))
        self.post_attention_norm = nn.Parameter(torch.ones(d))
        object.__setattr__(self, "teacher_layer", teacher_layer)
        self.arch = arch

    def register_teacher(self) -> None:
        """Make the teacher layer a (frozen) submodule, for FSDP2; idempotent."""
        tl = self.__dict__.pop("teacher_layer", None)
        if tl is not None:
            self.add_module("teacher_layer", tl)

    def teacher_forward(self, h, cos, sin, attn_mask=None):
        """The teacher layer, op by op, returning every tensor a clone term compares."""
        tl = self.teacher_layer
        at, mlp = tl.self_attn, tl.mlp
        x = tl.input_layernorm(h)
        q, k, v = at.q_proj(x), at.k_proj(x), at.v_proj(x)
        a = causal_attention(at, q, k, v, cos, sin, self.arch, attn_mask)
        h = h + at.o_proj(a)
        x = tl.post_attention_layernorm(h)
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
        dn = mlp.down_proj(mlp.act_fn(g) * u)
        return h + dn, dict(q=q, k=k, v=v, attn=a, gate=g, up=u, ffn=dn)

    def student_forward(self, h, cos, sin, eps: float, recompute_weights: bool = False, attn_mask=None):
        """The student layer: teacher weights seen through this layer's projections."""
        tl = self.teacher_layer
        at, mlp = tl.self_attn, tl.mlp
        rw = recompute_weights
        x = rms_norm(h, self.input_norm, eps)
        q, k, v = K.projected_linear_group(
            x, (at.q_proj.weight, at.k_proj.weight, at.v_proj.weight), (self.q, self.k, self.v), side="in",
            biases=(at.q_proj.bias, at.k_proj.bias, at.v_proj.bias), recompute_weights=rw)
        a = causal_attention(at, q, k, v, cos, sin, self.arch, attn_mask)
        h = h + K.projected_linear(a, at.o_proj.weight, self.o, side="out", recompute_weights=rw)
        x = rms_norm(h, self.post_attention_norm, eps)
        g, u = K.projected_linear_group(x, (mlp.gate_proj.weight, mlp.up_proj.weight), (self.gate, self.up),
                                        side="in", recompute_weights=rw)
        dn = K.projected_linear(mlp.act_fn(g) * u, mlp.down_proj.weight, self.down, side="out", recompute_weights=rw)
        return h + dn, dict(q=q, k=k, v=v, attn=a, gate=g, up=u, ffn=dn)

    def clone_terms(self, rec_s: dict, rec_t: dict, norm: str, reduce_mean=None) -> dict[str, torch.Tensor]:
        """Every clone MSE of this layer. "ffn" compares in student space against the teacher
        output pushed through the student's own down projection (t P_down).

        With ``norm == "teacher-ms"`` each MSE is divided by the teacher activation's mean
        square; ``reduce_mean`` (data-parallel runs) averages those scales over the ranks so
        that every rank divides by the scale of the whole global micro-batch.

        Each same-space term is one fused op (``red_kernels.mse_with_target_ms``) that reads
        student and teacher activations once, returns the MSE and the teacher's mean square
        in fp32, and keeps only the gradient (in the compute dtype) for backward.
        """
        mses, ms = {}, {}
        for t in CLONE_TERMS:
            s, tt = rec_s[t], rec_t[t]
            if t == "ffn":
                mses[t] = K.projected_mse_student_space(s, tt, self.down)
                ms[t] = torch.linalg.vector_norm(tt, dtype=torch.float32).square() / max(tt.numel(), 1)
            else:
                mses[t], ms[t] = K.mse_with_target_ms(s, tt)
        if norm != "teacher-ms":
            return mses
        scales = torch.stack([ms[t] for t in CLONE_TERMS])
        if reduce_mean is not None:
            scales = reduce_mean(scales)
        scales = scales.clamp_min(1e-12)
        return {t: mses[t] / scales[j] for j, t in enumerate(CLONE_TERMS)}

    def forward(self, h_s, cos, sin, eps: float, h_t=None, clone_norm: str | None = None, reduce_mean=None,
                recompute_weights: bool = False, attn_mask=None):
        """One lockstep step: ``(h_s, h_t, clone)``.

        Runs the teacher layer (no grad) when ``h_t`` is given, then the student layer, then
        the clone terms when ``clone_norm`` is given (else ``clone`` is None). ``attn_mask``
        (packed documents) is a tensor or None, so FSDP2 and checkpointing pass it through.
        """
        rec_t = None
        if h_t is not None:
            with torch.no_grad():
                h_t, rec_t = self.teacher_forward(h_t, cos, sin, attn_mask)
        h_s, rec_s = self.student_forward(h_s, cos, sin, eps, recompute_weights, attn_mask)
        clone = None
        if rec_t is not None and clone_norm is not None:
            clone = self.clone_terms(rec_s, rec_t, clone_norm, reduce_mean)
        return h_s, h_t, clone


@dataclass
class LossSettings:
    """How the distillation terms are weighted (see docs/method.md §2)."""

    temperature: float = 1.0
    kl_weight: float = 1.0
    kl_t2_scale: bool = False
    lm_weight: float = 1.0
    clone_weight: float = 0.2
    clone_norm: str = "teacher-ms"
    kl_reduction: str = "mean"       # "sum": over the scored tokens of a sequence, mean over sequences
    divergence: str = "forward-kl"   # "reverse-kl" or "jsd" (generalized JSD with jsd_beta)
    jsd_beta: float = 0.5
    teacher_top_k: int = 0           # 0: the full vocabulary


def divergence_options(loss: LossSettings, n_sequences: int) -> dict:
    """The fused KL op's divergence arguments for ``loss``; only those that differ from the
    op's defaults, so a default run takes the op's default path."""
    opts = {}
    if loss.divergence != "forward-kl":
        opts["divergence"] = loss.divergence
        if loss.divergence == "jsd":
            opts["jsd_beta"] = loss.jsd_beta
    if loss.teacher_top_k:
        opts["top_k"] = loss.teacher_top_k
    if loss.kl_reduction == "sum":  # LRC's scale: summed over a sequence's tokens, mean over sequences
        opts.update(kl_reduction="sum", n_sequences=n_sequences)
    return opts


FROZEN_MODULES = ("frozen", "teacher_layer")  # names of the teacher's pieces once registered for FSDP2


def is_trainable_name(name: str) -> bool:
    """True for the names of trainable tensors ("layers.0.q"), False for teacher pieces."""
    return not any(part in FROZEN_MODULES for part in name.split("."))


class ProjectedStudent(nn.Module):
    """A width-d student made from a frozen width-D teacher (LRC form).

    The teacher is held as a plain attribute, not a submodule: ``state_dict()``,
    ``parameters()``, ``projections()`` and ``gains()`` hold only the trainable tensors
    (projections and gains), which is what checkpoints save.

    For FSDP2 (see ``red.distributed.shard_student``) ``register_teacher()`` makes the
    teacher's pieces frozen submodules: each decoder layer under its ``StudentLayer``, the
    embedding, final norm, LM head and rotary embedding under ``frozen`` in this root
    module. ``state_dict()`` and the named accessors keep naming only trainable tensors.
    """

    def __init__(self, teacher, hidden_size: int, norm_eps: float | None = None):
        super().__init__()
        arch = Arch.from_config(teacher.config)
        D, d = arch.hidden_size, int(hidden_size)
        if not 0 < d < D:
            raise RedError(f"student hidden size {d} must be between 1 and the teacher's hidden size {D} - 1; "
                           f"pick --hidden-size in (0, {D})")
        object.__setattr__(self, "teacher", teacher)
        self.arch = arch
        self.hidden_size = d
        self.norm_eps = float(arch.rms_norm_eps if norm_eps is None else norm_eps)
        self.embed = nn.Parameter(torch.empty(D, d))
        self.lm_head = None if arch.tied else nn.Parameter(torch.empty(D, d))
        self.final_norm = nn.Parameter(torch.ones(d))
        self.layers = nn.ModuleList(StudentLayer(D, d, teacher.model.layers[i], arch) for i in range(arch.num_layers))
        self.channels: torch.Tensor | None = None  # the channel set S of a selection init
        self.activation_checkpointing = False  # recompute each layer in backward (set by the trainer's config)
        self.recompute_weights = False  # re-make each W_t P in backward instead of keeping it (trainer's config)
        self.reduce_mean = None  # data-parallel runs: averages the clone-norm scales over ranks
        dev = teacher.model.embed_tokens.weight.device
        self.to(dev)

    def register_teacher(self) -> None:
        """Put the teacher's pieces into the module tree (frozen), so FSDP2 can shard them."""
        if "frozen" not in self._modules:
            m = self.teacher.model
            self.frozen = nn.ModuleDict(dict(embed_tokens=m.embed_tokens, norm=m.norm, lm_head=self.teacher.lm_head,
                                             rotary_emb=m.rotary_emb))
        for layer in self.layers:
            layer.register_teacher()

    # -- the parameter groups ---------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of every activation and GEMM of the step: the teacher's weight dtype."""
        return self.teacher.model.embed_tokens.weight.dtype

    @property
    def head_projection(self) -> nn.Parameter:
        return self.embed if self.lm_head is None else self.lm_head

    def named_trainable_parameters(self):
        """(name, parameter) of every trainable tensor, in registration order."""
        return [(n, p) for n, p in self.named_parameters() if is_trainable_name(n)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def projections(self) -> dict[str, nn.Parameter]:
        """Every projection P by name ("embed", "lm_head", "layers.3.q", ...)."""
        return {n: p for n, p in self.named_trainable_parameters() if p.dim() == 2}

    def gains(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_trainable_parameters() if p.dim() == 1}

    def state_dict(self, *args, **kwargs):
        """Only the trainable tensors, named as in a single process ("layers.0.q", "embed")."""
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if not is_trainable_name(k)]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load trainable tensors; ``strict`` checks exactly those names (teacher pieces are
        never in a checkpoint)."""
        own = set(self.state_dict())
        if strict:
            missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
            if missing or unexpected:
                raise RuntimeError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # -- forward pieces ---------------------------------------------------------------
    def _teacher_layers(self):
        return self.teacher.model.layers

    def _rope(self, h: torch.Tensor, position_ids: torch.Tensor | None = None):
        pos = position_ids
        if pos is None:
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
        return self.teacher.model.rotary_emb(h, pos)

    def _attention_inputs(self, h: torch.Tensor, doc_ids: torch.Tensor | None):
        """(cos, sin, attn_mask) shared by every layer of one forward; attn_mask is None
        (plain causal attention, positions 0..T-1) without ``doc_ids``."""
        if doc_ids is None:
            return (*self._rope(h), None)
        if doc_ids.shape != h.shape[:2]:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must be [B, T] like input_ids {tuple(h.shape[:2])}")
        pos, mask = doc_attention(doc_ids)
        # additive, in the compute dtype, made once: SDPA would otherwise convert a bool
        # mask in every layer (and autograd could keep one copy per layer for backward)
        bias = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        return (*self._rope(h, pos), bias)

    def _embed(self, input_ids):
        e_t = F.embedding(input_ids, self.teacher.model.embed_tokens.weight)
        return e_t, e_t @ self.embed.to(e_t.dtype)

    def _teacher_layer(self, i, h, cos, sin, attn_mask=None):
        return self.layers[i].teacher_forward(h, cos, sin, attn_mask)

    def _student_layer(self, i, h, cos, sin, attn_mask=None):
        return self.layers[i].student_forward(h, cos, sin, self.norm_eps, self.recompute_weights, attn_mask)

    def _run_layer(self, i, h_s, cos, sin, h_t=None, clone_norm=None, attn_mask=None):
        """Call layer ``i`` (through its module call, so FSDP2's hooks fire), recomputed in
        backward when activation checkpointing is on."""
        layer = self.layers[i]
        args = (h_s, cos, sin, self.norm_eps, h_t, clone_norm, self.reduce_mean, self.recompute_weights, attn_mask)
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def head_weight(self) -> torch.Tensor:
        """The student's LM head W_lm P_lm, [V, d]."""
        w = self.teacher.lm_head.weight
        return w @ self.head_projection.to(w.dtype)

    def _hidden_states(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        _, h = self._embed(input_ids)
        cos, sin, mask = self._attention_inputs(h, doc_ids)
        out = [h]
        for i in range(self.arch.num_layers):
            h, _, _ = self._run_layer(i, h, cos, sin, attn_mask=mask)
            out.append(h)
        out[-1] = rms_norm(h, self.final_norm, self.norm_eps)
        return out

    # -- public forwards --------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Student hidden states: the embedding output, then each layer's output; the
        last entry is after the final norm (the convention of transformers). ``doc_ids``
        [B, T]: see ``distill_losses``."""
        return self._hidden_states(input_ids, doc_ids)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Student logits [B, T, V] (materialized: for evaluation and tests, not training)."""
        h = self._hidden_states(input_ids, doc_ids)[-1]
        return h @ self.head_weight().to(h.dtype).T

    def distill_losses(self, input_ids: torch.Tensor, loss: LossSettings, doc_ids: torch.Tensor | None = None,
                       loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run teacher and student in lockstep and return every loss term.

        Keys: "loss" (the weighted total, differentiable), "kl", "lm", "clone" and
        "clone/<term>" (each summed over layers; all but "loss" detached).

        ``doc_ids`` [B, T] (packed rows: a document is a run of equal ids) makes attention
        block-diagonal causal and restarts rotary positions at each document, for teacher
        and student alike, and drops the prediction across each boundary. ``loss_mask``
        [B, T] (bool or 0/1) scores token t as a target only where it is true. KL and LM
        average over the scored rows only; the clone terms cover every token. A batch with
        no scored row gives KL = LM = 0 (the fused op divides by max(n, 1)), not NaN.
        """
        labels = next_token_labels(input_ids, doc_ids, loss_mask)
        with torch.no_grad():
            h_t, _ = self._embed(input_ids)
        _, h_s = self._embed(input_ids)
        cos, sin, mask = self._attention_inputs(h_t, doc_ids)
        clone_terms = {t: h_s.new_zeros((), dtype=torch.float32) for t in CLONE_TERMS}
        clone_norm = loss.clone_norm if loss.clone_weight else None
        for i in range(self.arch.num_layers):
            h_s, h_t, terms = self._run_layer(i, h_s, cos, sin, h_t, clone_norm, mask)
            if terms is not None:
                for t in CLONE_TERMS:
                    clone_terms[t] = clone_terms[t] + terms[t]
        with torch.no_grad():
            ht_final = self.teacher.model.norm(h_t)
        hs_final = rms_norm(h_s, self.final_norm, self.norm_eps)
        kl_w = loss.kl_weight * (loss.temperature ** 2 if loss.kl_t2_scale else 1.0)
        total_logit, kl, lm = K.fused_linear_kl(
            hs_final.reshape(-1, self.hidden_size), self.head_weight(),
            ht_final.reshape(-1, self.arch.hidden_size), self.teacher.lm_head.weight,
            labels.reshape(-1), temperature=loss.temperature, kl_weight=kl_w, ce_weight=loss.lm_weight,
            **divergence_options(loss, n_sequences=input_ids.shape[0]))
        clone = sum(clone_terms.values())
        total = total_logit + loss.clone_weight * clone
        out = {"loss": total, "kl": kl.detach(), "lm": lm.detach(), "clone": clone.detach()}
        out.update({f"clone/{t}": v.detach() for t, v in clone_terms.items()})
        return out


def trainable_shapes(arch: Arch, d: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable tensor of a width-``d`` student of ``arch``, in the
    order of ``ProjectedStudent.state_dict()`` (computed from the config alone)."""
    D = arch.hidden_size
    out: dict[str, tuple[int, ...]] = {"embed": (D, d)}
    if not arch.tied:
        out["lm_head"] = (D, d)
    out["final_norm"] = (d,)
    for i in range(arch.num_layers):
        out.update({f"layers.{i}.{n}": (D, d) for n in PROJ_NAMES})
        out[f"layers.{i}.input_norm"] = (d,)
        out[f"layers.{i}.post_attention_norm"] = (d,)
    return out
