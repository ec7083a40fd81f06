"""The LRC student: the frozen teacher's weights seen through trainable projections.

For every layer there are seven projections P in R^{D x d} (q, k, v, gate, up read the
residual: W_t P; o, down write it: P^T W_t), one for the embedding (and one for an untied
LM head), plus new RMSNorm gains in R^d. Nothing else is trained. Teacher and student run
layer by layer in lockstep, so each layer's teacher activations live only as long as the
clone loss that compares against them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import red_kernels as K

from .errors import RedError
from .teacher import Arch

PROJ_IN = ("q", "k", "v", "gate", "up")
PROJ_OUT = ("o", "down")
PROJ_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
CLONE_TERMS = ("q", "k", "v", "attn", "gate", "up", "ffn")


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the exact arithmetic of transformers' Llama/Qwen norms."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return gain * y.to(x.dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def causal_attention(attn_module, q, k, v, cos, sin, arch: Arch) -> torch.Tensor:
    """Teacher-shaped attention (QK-norm for Qwen3, RoPE, GQA, causal); [B,T,H*h] out."""
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
    rep = arch.num_heads // arch.num_kv_heads
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5)
    return out.transpose(1, 2).reshape(B, T, -1)


class StudentLayer(nn.Module):
    """Trainable tensors of one decoder layer: seven projections and two norm gains."""

    def __init__(self, D: int, d: int):
        super().__init__()
        for name in PROJ_NAMES:
            setattr(self, name, nn.Parameter(torch.empty(D, d)))
        self.input_norm = nn.Parameter(torch.ones(d))
        self.post_attention_norm = nn.Parameter(torch.ones(d))


@dataclass
class LossSettings:
    """How the distillation terms are weighted (see red-method.md §2)."""

    temperature: float = 1.0
    kl_weight: float = 1.0
    kl_t2_scale: bool = False
    lm_weight: float = 1.0
    clone_weight: float = 0.2
    clone_norm: str = "teacher-ms"


class ProjectedStudent(nn.Module):
    """A width-d student made from a frozen width-D teacher (LRC form).

    The teacher is held as a plain attribute, not a submodule: ``state_dict()`` holds only
    the trainable tensors (projections and gains), which is what checkpoints save.
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
        self.layers = nn.ModuleList(StudentLayer(D, d) for _ in range(arch.num_layers))
        self.channels: torch.Tensor | None = None  # the channel set S of a selection init
        dev = teacher.model.embed_tokens.weight.device
        self.to(dev)

    # -- the parameter groups ---------------------------------------------------------
    @property
    def head_projection(self) -> nn.Parameter:
        return self.embed if self.lm_head is None else self.lm_head

    def projections(self) -> dict[str, nn.Parameter]:
        """Every projection P by name ("embed", "lm_head", "layers.3.q", ...)."""
        return {n: p for n, p in self.named_parameters() if p.dim() == 2}

    def gains(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.dim() == 1}

    # -- forward pieces ---------------------------------------------------------------
    def _teacher_layers(self):
        return self.teacher.model.layers

    def _rope(self, h: torch.Tensor):
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
        return self.teacher.model.rotary_emb(h, pos)

    def _embed(self, input_ids):
        e_t = F.embedding(input_ids, self.teacher.model.embed_tokens.weight)
        return e_t, e_t @ self.embed.to(e_t.dtype)

    def _teacher_layer(self, i, h, cos, sin):
        tl = self._teacher_layers()[i]
        at, mlp = tl.self_attn, tl.mlp
        x = tl.input_layernorm(h)
        q, k, v = at.q_proj(x), at.k_proj(x), at.v_proj(x)
        a = causal_attention(at, q, k, v, cos, sin, self.arch)
        h = h + at.o_proj(a)
        x = tl.post_attention_layernorm(h)
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
        dn = mlp.down_proj(mlp.act_fn(g) * u)
        return h + dn, dict(q=q, k=k, v=v, attn=a, gate=g, up=u, ffn=dn)

    def _student_layer(self, i, h, cos, sin):
        tl, L = self._teacher_layers()[i], self.layers[i]
        at, mlp = tl.self_attn, tl.mlp
        x = rms_norm(h, L.input_norm, self.norm_eps)
        q, k, v = K.projected_linear_group(
            x, (at.q_proj.weight, at.k_proj.weight, at.v_proj.weight), (L.q, L.k, L.v), side="in",
            biases=(at.q_proj.bias, at.k_proj.bias, at.v_proj.bias))
        a = causal_attention(at, q, k, v, cos, sin, self.arch)
        h = h + K.projected_linear(a, at.o_proj.weight, L.o, side="out")
        x = rms_norm(h, L.post_attention_norm, self.norm_eps)
        g, u = K.projected_linear_group(x, (mlp.gate_proj.weight, mlp.up_proj.weight), (L.gate, L.up), side="in")
        dn = K.projected_linear(mlp.act_fn(g) * u, mlp.down_proj.weight, L.down, side="out")
        return h + dn, dict(q=q, k=k, v=v, attn=a, gate=g, up=u, ffn=dn)

    def head_weight(self) -> torch.Tensor:
        """The student's LM head W_lm P_lm, [V, d]."""
        w = self.teacher.lm_head.weight
        return w @ self.head_projection.to(w.dtype)

    # -- public forwards --------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Student hidden states: the embedding output, then each layer's output; the
        last entry is after the final norm (the convention of transformers)."""
        _, h = self._embed(input_ids)
        cos, sin = self._rope(h)
        out = [h]
        for i in range(self.arch.num_layers):
            h, _ = self._student_layer(i, h, cos, sin)
            out.append(h)
        out[-1] = rms_norm(h, self.final_norm, self.norm_eps)
        return out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Student logits [B, T, V] (materialized: for evaluation and tests, not training)."""
        h = self.hidden_states(input_ids)[-1]
        return h @ self.head_weight().to(h.dtype).T

    def distill_losses(self, input_ids: torch.Tensor, loss: LossSettings) -> dict[str, torch.Tensor]:
        """Run teacher and student in lockstep and return every loss term.

        Keys: "loss" (the weighted total, differentiable), "kl", "lm", "clone" and
        "clone/<term>" (each summed over layers; all but "loss" detached).
        """
        labels = torch.full_like(input_ids, -100)
        labels[:, :-1] = input_ids[:, 1:]
        with torch.no_grad():
            h_t, _ = self._embed(input_ids)
        _, h_s = self._embed(input_ids)
        cos, sin = self._rope(h_t)
        clone_terms = {t: h_s.new_zeros((), dtype=torch.float32) for t in CLONE_TERMS}
        for i in range(self.arch.num_layers):
            with torch.no_grad():
                h_t, rec_t = self._teacher_layer(i, h_t, cos, sin)
            h_s, rec_s = self._student_layer(i, h_s, cos, sin)
            if loss.clone_weight:
                for t in CLONE_TERMS:
                    clone_terms[t] = clone_terms[t] + self._clone_term(t, rec_s[t], rec_t[t], i, loss.clone_norm)
            del rec_t
        with torch.no_grad():
            ht_final = self.teacher.model.norm(h_t)
        hs_final = rms_norm(h_s, self.final_norm, self.norm_eps)
        kl_w = loss.kl_weight * (loss.temperature ** 2 if loss.kl_t2_scale else 1.0)
        total_logit, kl, lm = K.fused_linear_kl(
            hs_final.reshape(-1, self.hidden_size), self.head_weight(),
            ht_final.reshape(-1, self.arch.hidden_size), self.teacher.lm_head.weight,
            labels.reshape(-1), temperature=loss.temperature, kl_weight=kl_w, ce_weight=loss.lm_weight)
        clone = sum(clone_terms.values())
        total = total_logit + loss.clone_weight * clone
        out = {"loss": total, "kl": kl.detach(), "lm": lm.detach(), "clone": clone.detach()}
        out.update({f"clone/{t}": v.detach() for t, v in clone_terms.items()})
        return out

    def _clone_term(self, term, s, t, layer, norm):
        """One clone MSE; "ffn" compares in student space against the teacher output
        pushed through the student's own down projection (t P_down)."""
        scale = t.float().pow(2).mean().clamp_min(1e-12) if norm == "teacher-ms" else None
        if term == "ffn":
            mse = K.projected_mse_student_space(s, t, self.layers[layer].down)
        else:
            mse = F.mse_loss(s.float(), t.float())
        return mse / scale if scale is not None else mse
