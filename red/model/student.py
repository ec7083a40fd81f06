"""The LRC student: the frozen teacher's weights seen through trainable projections.

For every layer there are seven projections P in R^{D x d} (q, k, v, gate, up read the
residual: W_t P; o, down write it: P^T W_t), one for the embedding (and one for an untied
LM head), plus new RMSNorm gains in R^d. Nothing else is trained (docs/method.md §1).

How a step runs (docs/method.md §6): the dense student weights
W_s = f(W_t, P, gains) are made once per optimizer step (``make_weights``), in the compute
dtype. Every micro-batch is then an ordinary dense forward and backward of a width-d
model on those weights (``F.linear``, SDPA, RMSNorm: the ops an ordinary training of the
exported student runs), in lockstep with the teacher's forward layer by layer, plus the
clone and KL terms; the weights' gradients add up over the micro-batches. At the end of
the step one GEMM per projected matrix turns them into the gradient of P
(``weight_backward``). A micro-batch therefore costs ordinary training plus a teacher
forward plus the loss terms, and the weight products are paid once per step.

``distill_losses`` without ``weights`` makes the weights inside autograd instead, so that
``loss.backward()`` reaches P directly: the plain API for one batch (and the reference the
tests hold the step against).

Precision (the README's "Precision policy"): the compute dtype is the teacher's weight
dtype. Projections and gains are fp32 masters, cast to the compute dtype once per step;
every activation and every GEMM of the step is in the compute dtype; loss reductions are
fp32; the weights' gradients are accumulated over micro-batches in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import red_kernels as K

from red.model.arch import PROJ_IN, PROJ_NAMES, PROJ_OUT, Arch, check_width, step_layer_shapes, trainable_shapes  # noqa: F401

CLONE_TERMS = ("q", "k", "v", "attn", "gate", "up", "ffn")
#: the teacher's linear of each projection name
TEACHER_LINEAR = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
#: order of the entries of the vector of logged terms (see ``distill_losses``)
TERMS = ("loss", "kl", "lm", "clone", *(f"clone/{t}" for t in CLONE_TERMS))


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the arithmetic of transformers' Llama/Qwen norms, in x's dtype.

    The gain is cast to x's dtype first, as the exported model stores it, so the output
    stays in the compute dtype (an fp32 gain would silently promote it).
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return gain.to(x.dtype) * y.to(x.dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def causal_attention(q, k, v, cos, sin, arch: Arch, q_norm=None, k_norm=None, attn_mask=None) -> torch.Tensor:
    """Teacher-shaped attention (QK-norm for Qwen3, RoPE, GQA, causal); [B,T,H*h] out.

    ``q_norm``/``k_norm`` (Qwen3) are the teacher's per-head gains, applied before RoPE.
    ``attn_mask`` (additive, [B,1,T,T]; see ``doc_attention``) replaces the plain causal
    mask for packed documents; None keeps SDPA's ``is_causal`` path.

    On CUDA the attention never falls back to PyTorch's MATH backend (which would keep a
    [T, T] score matrix per head for backward): the flash kernel runs bf16 causal GQA, and
    where it cannot (a mask, fp32) the key/value heads are repeated so that the
    memory-efficient kernel can; a layout no fused kernel takes is an error, not a slow
    path (``sdpa_backends``).
    """
    B, T, _ = q.shape
    hd = arch.head_dim
    q = q.view(B, T, -1, hd)
    k = k.view(B, T, -1, hd)
    v = v.view(B, T, -1, hd)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, arch.rms_norm_eps), rms_norm(k, k_norm, arch.rms_norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    gqa = arch.num_heads != arch.num_kv_heads
    if gqa and q.is_cuda and (attn_mask is not None or q.dtype == torch.float32):
        rep = arch.num_heads // arch.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    with sdpa_backends(q):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                             scale=hd ** -0.5, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(B, T, -1)


def sdpa_backends(x: torch.Tensor):
    """The SDPA backends allowed for ``x``: on CUDA every fused one and not MATH; on the
    CPU whatever PyTorch picks."""
    import contextlib

    if not x.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def doc_attention(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids [B,T], bool mask [B,1,T,T]) for rows that pack several documents.

    A document is a run of equal ``doc_ids`` along a row. Positions restart at 0 at each
    document start, and a token attends only to earlier-or-same positions of its own
    document, so every document sees exactly what it would see alone. Built from tensor
    ops only (no host read), once per forward, and shared by every layer.
    """
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    pos = idx - torch.where(start, idx, 0).cummax(1).values  # index minus its document's start
    seg = start.cumsum(1)
    mask = (seg[:, :, None] == seg[:, None, :]) & (idx[:, None] >= idx[None, :])
    return pos, mask.unsqueeze(1)


def scored_targets(input_ids, doc_ids=None, loss_mask=None) -> torch.Tensor:
    """The number of targets ``next_token_labels`` scores, as a device scalar."""
    return (next_token_labels(input_ids, doc_ids, loss_mask) != -100).sum()


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


def decoder_layer(h, w: dict, arch: Arch, eps: float, cos, sin, act, attn_mask=None, targets: dict | None = None):
    """One Llama/Qwen decoder layer from explicit weights: ``(h_out, record)``.

    ``w`` holds the layer's matrices ``q`` ... ``down`` ([out, in], y = x Wᵀ), the gains
    ``input_norm`` and ``post_attention_norm``, and the teacher's frozen ``q_bias`` /
    ``k_bias`` / ``v_bias`` (Qwen2), ``q_norm`` / ``k_norm`` (Qwen3). The teacher and the
    student both run through here.

    Without ``targets`` (the teacher) ``record`` holds the tensors the clone terms compare
    (q, k, v before QK-norm and RoPE, attn before o_proj, gate, up, and the FFN output).
    With ``targets`` (the student, given the teacher's record) every one of those tensors
    goes through ``red_kernels.clone_mse`` on its way, and ``record`` is the list of
    (Σ squared error, Σ teacher square) pairs in ``CLONE_TERMS`` order, sums that
    ``distill_terms`` turns into means all at once; the FFN output is compared with the
    teacher's pushed through ``w["down_target"]`` (P_down in the compute dtype), and its
    normalizer is the teacher's own output (D wide).
    """
    terms = []

    def tap(name, s):
        if targets is None:
            return s
        t = targets[name]
        if name == "ffn":  # normalized by the teacher's own output, in its space (D wide)
            acc = torch.float64 if t.dtype == torch.float64 else torch.float32
            tsq = torch.linalg.vector_norm(t, dtype=acc).square()
            s, err, _ = K.clone_mse(s, t @ w["down_target"], mean=False)
        else:
            s, err, tsq = K.clone_mse(s, t, mean=False)
        terms.append((err, tsq))
        return s

    x = rms_norm(h, w["input_norm"], eps)
    q = tap("q", F.linear(x, w["q"], w.get("q_bias")))
    k = tap("k", F.linear(x, w["k"], w.get("k_bias")))
    v = tap("v", F.linear(x, w["v"], w.get("v_bias")))
    a = tap("attn", causal_attention(q, k, v, cos, sin, arch, w.get("q_norm"), w.get("k_norm"), attn_mask))
    h = h + F.linear(a, w["o"])
    x = rms_norm(h, w["post_attention_norm"], eps)
    g = tap("gate", F.linear(x, w["gate"]))
    u = tap("up", F.linear(x, w["up"]))
    dn = tap("ffn", F.linear(act(g) * u, w["down"]))
    if targets is not None:
        return h + dn, terms
    return h + dn, dict(q=q, k=k, v=v, attn=a, gate=g, up=u, ffn=dn)


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


@dataclass
class StepShare:
    """What one call of ``distill_losses`` (one micro-batch on one rank) is of the
    optimizer step it belongs to, so that the step's loss is the loss of its whole
    global batch, for any number of micro-batches and processes.

    - ``scored``: the scored targets of the whole step (all micro-batches, all ranks), a
      device scalar; the KL and LM means divide by it.
    - ``sequences``: the sequences of the whole step (the KL's "sum" reduction).
    - ``share``: this call's share of the step's tokens (1 / (micro-batches x ranks)); the
      clone means, which cover every token, are weighted by it.
    - ``mean_over_ranks``: averages the clone normalizers over the ranks of a micro-batch
      (None in one process).

    The default (None) is the call's own batch alone."""

    scored: torch.Tensor
    sequences: int
    share: float = 1.0
    mean_over_ranks: object = None


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


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor behind a parameter FSDP2 has sharded (a collective), else itself."""
    if t is None:
        return None
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _cast_full(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p`` whole in ``dtype``; a sharded fp32 master is cast before it is gathered, so the
    gather moves compute-dtype bytes."""
    return _full(p.detach().to(dtype))


def _set_grad(p: nn.Parameter, grad: torch.Tensor) -> None:
    """Add ``grad`` (the whole tensor's gradient, the same on every rank) to ``p.grad``; a
    sharded parameter keeps only its own rows."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        from red.distributed import shard_rows

        a, b = shard_rows(p)
        grad = DTensor.from_local(grad[a:b].contiguous(), p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    grad = grad.to(p.dtype)
    p.grad = grad if p.grad is None else p.grad + grad


LAYER_WEIGHTS = (*PROJ_NAMES, "input_norm", "post_attention_norm", "down_target")


class LayerWeights(nn.Module):
    """One decoder layer's dense student weights for a step, held as parameters so that
    FSDP2 can shard them over the processes of a run (``StudentWeights`` with units): each
    process keeps its rows in fp32, FSDP2 gathers them in the compute dtype for the layer's
    forward and again for its backward, and reduce-scatters the gradients in fp32 into
    each process's rows, where they add up over the micro-batches. So the step's weights
    and their sums take 8 bytes per weight divided by the number of processes, as the
    ordinary FSDP training of a model of the student's size would."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device)))

    def forward(self, h, extras, arch, eps, cos, sin, act, mask, targets):
        w = {name: getattr(self, name) for name in LAYER_WEIGHTS}
        return decoder_layer(h, {**w, **extras}, arch, eps, cos, sin, act, attn_mask=mask, targets=targets)


class StepUnits(nn.Module):
    """The FSDP2 root over the ``LayerWeights`` units: ``forward(fn, *args)`` runs ``fn``
    (the layer stack) inside the root, so that FSDP2 treats the units as the layers of one
    model (gathered one at a time, freed after use, gradients reduced at the end)."""

    def __init__(self, layers: list[LayerWeights]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, fn, *args):
        return fn(*args)


class StudentWeights:
    """The dense width-d student of one optimizer step: W_s = f(W_t, P, gains).

    Entries: ``layers.I.{q,k,v,o,gate,up,down}`` ([out, in], compute dtype),
    ``layers.I.input_norm`` / ``post_attention_norm`` / ``final_norm`` (the gains in the
    compute dtype), ``layers.I.down_target`` (P_down in the compute dtype: the FFN clone
    target is the teacher's output times it), ``head`` (W_lm P_lm, [V, d], which is also
    the embedding table of a tied teacher) and, untied, ``embed`` (P_e in the compute
    dtype: the embedding is the teacher's row times it).

    Made by ``ProjectedStudent.make_weights``: leaves whose gradients add up over the
    micro-batches of a step (``accumulate`` folds each micro-batch's low-precision
    gradients into fp32), or (``differentiable``) tensors still tied to P by autograd. In
    a multi-process run the layers' entries live in ``units`` (FSDP2-sharded
    ``LayerWeights``) and only the root's entries are tensors here, whole on every rank.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], differentiable: bool, units: StepUnits | None = None):
        self.tensors = tensors
        self.differentiable = differentiable
        self.units = units
        self._fp32: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        pre = f"layers.{i}."
        return {k[len(pre):]: v for k, v in self.tensors.items() if k.startswith(pre)}

    def leaves(self) -> list[torch.Tensor]:
        """The whole entries that collect gradients (the layers' too in one process)."""
        return [t for t in self.tensors.values() if t.requires_grad and t.is_leaf]

    def run(self, fn, *args):
        """``fn(*args)``, inside the FSDP2 root when the layers are sharded."""
        return fn(*args) if self.units is None else self.units(fn, *args)

    def layer_forward(self, i, h, extras, arch, eps, cos, sin, act, mask=None, targets=None):
        """``decoder_layer`` of student layer ``i`` on these weights (plus the teacher's
        frozen ``extras``)."""
        if self.units is None:
            return decoder_layer(h, {**self.layer(i), **extras}, arch, eps, cos, sin, act, attn_mask=mask, targets=targets)
        return self.units.layers[i](h, extras, arch, eps, cos, sin, act, mask, targets)

    def accumulate(self) -> None:
        """Fold the gradients of the last backward into the step's fp32 sums (fp32 and fp64
        leaves accumulate in ``.grad`` by themselves; bf16 ones would lose bits there)."""
        low = [(k, t) for k, t in self.tensors.items()
               if t.is_leaf and t.grad is not None and t.dtype in (torch.bfloat16, torch.float16)]
        if not low:
            return
        have = [k for k, _ in low if k in self._fp32]
        if have:
            torch._foreach_add_([self._fp32[k] for k in have], [self.tensors[k].grad for k in have])
        for k, t in low:
            if k not in self._fp32:
                self._fp32[k] = t.grad.float()
            t.grad = None

    def grad(self, name: str) -> torch.Tensor | None:
        """The step's gradient of entry ``name`` so far (fp32, or the leaf's own dtype when
        it is fp32), None if it got none; a sharded layer's entry is gathered whole (a
        collective, fp32)."""
        if self.units is not None and name.startswith("layers."):
            _, i, n = name.split(".")
            g = getattr(self.units.layers[int(i)], n).grad
            # FSDP2 averaged over the ranks; each rank's loss is its share of the global
            # mean (StepShare), so the step's gradient is the sum
            return None if g is None else _full(g) * g.device_mesh.size()
        if name in self._fp32:
            return self._fp32[name]
        return self.tensors[name].grad

    def reduce(self, all_reduce_sum) -> None:
        """Sum the gradients of the whole (unsharded) entries over the ranks of a
        data-parallel run, in one flat collective (FSDP2 has reduced the layers' already)."""
        self.accumulate()
        names = [k for k in self.tensors if self.grad(k) is not None]
        if not names:
            return
        acc = torch.promote_types(self.tensors[names[0]].dtype, torch.float32)
        flat = all_reduce_sum(torch.cat([self.grad(k).to(acc).reshape(-1) for k in names]))
        off = 0
        for k in names:
            n = self.tensors[k].numel()
            self._fp32[k] = flat[off: off + n].view(self.tensors[k].shape)
            self.tensors[k].grad = None
            off += n


class StudentLayer(nn.Module):
    """One decoder layer's trainable tensors: seven projections and two norm gains
    (``q``, ..., ``down``, ``input_norm``, ``post_attention_norm``).

    The teacher's decoder layer is referenced as ``teacher_layer``: a plain attribute in a
    single process (so ``state_dict()`` and ``parameters()`` hold only trainable tensors),
    registered as a frozen submodule by ``register_teacher()`` when FSDP2 shards the
    teacher with the layer (``red.distributed``)."""

    def __init__(self, D: int, d: int, teacher_layer: nn.Module | None = None):
        super().__init__()
        for name in PROJ_NAMES:
            setattr(self, name, nn.Parameter(torch.empty(D, d)))
        self.input_norm = nn.Parameter(torch.ones(d))
        self.post_attention_norm = nn.Parameter(torch.ones(d))
        object.__setattr__(self, "teacher_layer", teacher_layer)

    def register_teacher(self) -> None:
        """Make the teacher layer a (frozen) submodule, for FSDP2; idempotent."""
        tl = self.__dict__.pop("teacher_layer", None)
        if tl is not None:
            self.add_module("teacher_layer", tl)


class ProjectedStudent(nn.Module):
    """A width-d student made from a frozen width-D teacher (LRC form).

    The teacher is held as a plain attribute, not a submodule: ``state_dict()``,
    ``parameters()``, ``projections()`` and ``gains()`` hold only the trainable tensors
    (projections and gains), which is what checkpoints save. ``activation_checkpointing``
    recomputes each layer (teacher and student) in backward.

    For FSDP2 (see ``red.distributed``) ``register_teacher()`` makes the teacher's pieces
    frozen submodules, so that they are sharded with the layer they belong to. The student
    never runs through FSDP2's hooks: it gathers what it needs itself (``make_weights``,
    ``weight_backward``, and the teacher's layers in each forward when they are sharded).
    """

    def __init__(self, teacher, hidden_size: int, norm_eps: float | None = None,
                 activation_checkpointing: bool = False):
        super().__init__()
        arch = Arch.from_config(teacher.config)
        D, d = arch.hidden_size, int(hidden_size)
        check_width(D, d)
        object.__setattr__(self, "teacher", teacher)
        self.arch = arch
        self.hidden_size = d
        self.norm_eps = float(arch.rms_norm_eps if norm_eps is None else norm_eps)
        self.activation_checkpointing = bool(activation_checkpointing)
        # a multi-process run with --step-weights shard keeps each layer's step weights as
        # FSDP2-sharded rows (``StepUnits``); else they are whole on every rank
        self.shard_step_weights = False
        self.embed = nn.Parameter(torch.empty(D, d))
        self.lm_head = None if arch.tied else nn.Parameter(torch.empty(D, d))
        self.final_norm = nn.Parameter(torch.ones(d))
        self.layers = nn.ModuleList(StudentLayer(D, d, teacher.model.layers[i]) for i in range(arch.num_layers))
        self.channels: torch.Tensor | None = None  # the channel set S of a selection init
        self.act = teacher.model.layers[0].mlp.act_fn  # a parameter-free module (SiLU)
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
    def device(self) -> torch.device:
        from red.distributed import local_tensor

        return local_tensor(self.embed).device

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

    # -- the teacher's tensors, whole ---------------------------------------------------
    def teacher_layer_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i`` of the teacher as ``decoder_layer`` takes it (gathered when sharded)."""
        tl = self.teacher.model.layers[i]
        at = tl.self_attn
        w = {name: _full(tl.get_submodule(path).weight) for name, path in TEACHER_LINEAR.items()}
        w["input_norm"] = _full(tl.input_layernorm.weight)
        w["post_attention_norm"] = _full(tl.post_attention_layernorm.weight)
        w.update(self._frozen_extras(at))
        return w

    def _frozen_extras(self, at) -> dict[str, torch.Tensor]:
        """The teacher's attention pieces the student keeps: q/k/v biases, Q/K norms."""
        w = {}
        for n in ("q", "k", "v"):
            b = getattr(at, f"{n}_proj").bias
            if b is not None:
                w[f"{n}_bias"] = _full(b).detach()
        if self.arch.qk_norm:
            w["q_norm"], w["k_norm"] = _full(at.q_norm.weight).detach(), _full(at.k_norm.weight).detach()
        return w

    def teacher_root(self) -> dict[str, torch.Tensor]:
        """The teacher's embedding, final norm gain and LM head (gathered when sharded)."""
        m = self.teacher.model
        emb = _full(m.embed_tokens.weight)
        head = emb if self.arch.tied else _full(self.teacher.lm_head.weight)
        return {"embed": emb, "norm": _full(m.norm.weight), "head": head}

    # -- the step's dense weights ---------------------------------------------------------
    def make_weights(self, differentiable: bool = False, requires_grad: bool = True,
                     root: dict | None = None) -> StudentWeights:
        """W_s = f(W_t, P, gains) for every student tensor, in the compute dtype.

        ``differentiable``: made inside autograd, so that a backward through them reaches P
        and the gains (the one-batch API). Otherwise made without autograd as leaves that
        ``requires_grad`` (the training step: ``weight_backward`` turns their gradients
        into P's). ``root``: the teacher's ``teacher_root()`` if already gathered."""
        cdt = self.compute_dtype
        out: dict[str, torch.Tensor] = {}
        root = root or self.teacher_root()
        cast = (lambda p: p.to(cdt)) if differentiable else (lambda p: _cast_full(p, cdt))
        units = None if differentiable else self._step_units()
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            for i, layer in enumerate(self.layers):
                tw = self.teacher_layer_weights(i)
                lw = {}
                for name in PROJ_NAMES:
                    P = cast(getattr(layer, name))
                    w_t = tw[name].detach()
                    lw[name] = w_t @ P if name in PROJ_IN else P.t() @ w_t
                    if name == "down":
                        lw["down_target"] = P
                lw["input_norm"] = cast(layer.input_norm)
                lw["post_attention_norm"] = cast(layer.post_attention_norm)
                if units is None:
                    out.update({f"layers.{i}.{k}": v for k, v in lw.items()})
                else:  # each rank keeps its rows of this layer; the whole layer is freed here
                    from red.distributed import write_shard

                    for k, v in lw.items():
                        p = getattr(units.layers[i], k)
                        write_shard(p, v)
                        p.grad = None
                del lw, tw
            out["final_norm"] = cast(self.final_norm)
            out["head"] = root["head"].detach() @ cast(self.head_projection)
            if not self.arch.tied:
                out["embed"] = cast(self.embed)
        if not differentiable:
            # leaves of the step (in fp32 compute a gain's or P's cast is the master itself,
            # shared, not copied: the step reads it before AdamW writes it)
            out = {k: t.detach().requires_grad_(requires_grad) for k, t in out.items()}
        return StudentWeights(out, differentiable, units)

    def _step_units(self) -> StepUnits | None:
        """The FSDP2-sharded holders of the layers' step weights in a multi-process run
        (made once, on the first step; None in one process)."""
        from torch.distributed.tensor import DTensor

        if not (self.shard_step_weights and isinstance(self.embed, DTensor)):
            return None
        units = self.__dict__.get("_units")
        if units is None:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            a = self.arch
            shapes = step_layer_shapes(a, self.hidden_size)
            cdt = self.compute_dtype
            units = StepUnits([LayerWeights(shapes, self.device) for _ in range(a.num_layers)])
            # fp32 rows on each rank, gathered in the compute dtype, gradients reduced in fp32
            mp = MixedPrecisionPolicy(param_dtype=cdt, reduce_dtype=torch.float32, cast_forward_inputs=False)
            mesh = self.embed.device_mesh
            for unit in units.layers:
                fully_shard(unit, mesh=mesh, mp_policy=mp)
            fully_shard(units, mesh=mesh, mp_policy=mp)

            object.__setattr__(self, "_units", units)  # not a submodule: never in state_dict
        return units

    @torch.no_grad()
    def weight_backward(self, weights: StudentWeights, root: dict | None = None) -> None:
        """Add the gradient of every projection and gain to its ``.grad`` from the step's
        weight gradients: dP = W_tᵀ·dW_s (q, k, v, gate, up, head), W_t·dW_sᵀ (o, down), plus
        the FFN target's and the untied embedding's own gradient; the gains' gradient is
        their weight's. One compute-dtype GEMM per projected matrix, results in fp32."""
        weights.accumulate()
        cdt = self.compute_dtype
        acc = torch.promote_types(cdt, torch.float32)  # fp32 (fp64 for fp64 runs)
        root = root or self.teacher_root()
        g = weights.grad
        for i, layer in enumerate(self.layers):
            tw = self.teacher_layer_weights(i)
            for name in PROJ_NAMES:
                gw = g(f"layers.{i}.{name}")
                total = None
                if gw is not None:
                    gw = gw.to(cdt)
                    total = (tw[name].t() @ gw if name in PROJ_IN else tw[name] @ gw.t()).to(acc)
                if name == "down" and g(f"layers.{i}.down_target") is not None:
                    gt = g(f"layers.{i}.down_target").to(acc)
                    total = gt if total is None else total + gt
                if total is not None:
                    _set_grad(getattr(layer, name), total)
            for name in ("input_norm", "post_attention_norm"):
                if g(f"layers.{i}.{name}") is not None:
                    _set_grad(getattr(layer, name), g(f"layers.{i}.{name}").to(acc))
        if g("final_norm") is not None:
            _set_grad(self.final_norm, g("final_norm").to(acc))
        if g("head") is not None:
            _set_grad(self.head_projection, (root["head"].t() @ g("head").to(cdt)).to(acc))
        if not self.arch.tied and g("embed") is not None:
            _set_grad(self.embed, g("embed").to(acc))

    # -- forwards -----------------------------------------------------------------------
    def _attention_inputs(self, h: torch.Tensor, doc_ids: torch.Tensor | None):
        """(cos, sin, attn_mask) shared by every layer of one forward; attn_mask is None
        (plain causal attention, positions 0..T-1) without ``doc_ids``."""
        B, T = h.shape[:2]
        if doc_ids is None:
            pos = torch.arange(T, device=h.device).unsqueeze(0).expand(B, -1)
            return (*self.teacher.model.rotary_emb(h, pos), None)
        if doc_ids.shape != (B, T):
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must be [B, T] like input_ids {(B, T)}")
        pos, mask = doc_attention(doc_ids)
        # additive, in the compute dtype, made once: SDPA would otherwise convert a bool
        # mask in every layer (and autograd could keep one copy per layer for backward)
        bias = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        return (*self.teacher.model.rotary_emb(h, pos), bias)

    def _student_embed(self, input_ids, w: StudentWeights, root: dict) -> torch.Tensor:
        if self.arch.tied:
            return F.embedding(input_ids, w["head"])  # E_t P_e = W_lm P_lm: the head's rows
        return F.embedding(input_ids, root["embed"]) @ w["embed"]

    def _lockstep_layer(self, i, h_s, h_t, cos, sin, mask, w: StudentWeights):
        """Teacher layer ``i`` (no grad) then the student's, with its clone terms."""
        with torch.no_grad():
            h_t, rec = decoder_layer(h_t, self.teacher_layer_weights(i), self.arch, self.arch.rms_norm_eps, cos, sin,
                                     self.act, mask)
        extras = self._frozen_extras(self.teacher.model.layers[i].self_attn)
        return (h_t, *w.layer_forward(i, h_s, extras, self.arch, self.norm_eps, cos, sin, self.act, mask, rec))

    def _lockstep_layers(self, h_s, h_t, cos, sin, mask, w: StudentWeights):
        for i in range(self.arch.num_layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                h_t, h_s, terms = torch.utils.checkpoint.checkpoint(
                    self._lockstep_layer, i, h_s, h_t, cos, sin, mask, w, use_reentrant=False)
            else:
                h_t, h_s, terms = self._lockstep_layer(i, h_s, h_t, cos, sin, mask, w)
            yield i, h_t, h_s, terms

    def lockstep(self, input_ids: torch.Tensor, weights: StudentWeights | None = None,
                 doc_ids: torch.Tensor | None = None, root: dict | None = None):
        """Run teacher and student layer by layer: yields ``(i, h_t, h_s, terms)`` after each
        layer ``i`` (``terms``: the (MSE, teacher mean square) pairs of ``CLONE_TERMS``), then
        ``(None, h_t, h_s, None)`` after the final norms. The public seam for looking inside
        one lockstep forward (tests, analysis). With sharded step weights the layers run
        inside the FSDP2 root first, and their results are yielded after."""
        root = root or self.teacher_root()
        w = weights if weights is not None else self.make_weights(differentiable=True, root=root)
        with torch.no_grad():
            h_t = F.embedding(input_ids, root["embed"])
        h_s = self._student_embed(input_ids, w, root)
        cos, sin, mask = self._attention_inputs(h_t, doc_ids)
        args = (h_s, h_t, cos, sin, mask, w)
        layers = self._lockstep_layers(*args) if w.units is None else \
            w.run(lambda *a: list(self._lockstep_layers(*a)), *args)
        for item in layers:
            yield item
        _, h_t, h_s, _ = item
        with torch.no_grad():
            h_t = rms_norm(h_t, root["norm"], self.arch.rms_norm_eps)
        yield None, h_t, rms_norm(h_s, w["final_norm"], self.norm_eps), None

    def _student_layers(self, h, cos, sin, mask, w: StudentWeights) -> list:
        out = []
        for i in range(self.arch.num_layers):
            extras = self._frozen_extras(self.teacher.model.layers[i].self_attn)
            h, _ = w.layer_forward(i, h, extras, self.arch, self.norm_eps, cos, sin, self.act, mask)
            out.append(h)
        return out

    def hidden_states(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                      weights: StudentWeights | None = None) -> list[torch.Tensor]:
        """Student hidden states: the embedding output, then each layer's output; the
        last entry is after the final norm (the convention of transformers). ``doc_ids``
        [B, T]: see ``distill_losses``."""
        root = self.teacher_root()
        w = weights if weights is not None else self.make_weights(differentiable=True, root=root)
        h = self._student_embed(input_ids, w, root)
        cos, sin, mask = self._attention_inputs(h, doc_ids)
        out = [h, *w.run(self._student_layers, h, cos, sin, mask, w)]
        out[-1] = rms_norm(out[-1], w["final_norm"], self.norm_eps)
        return out

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Student logits [B, T, V] (materialized: for evaluation and tests, not training)."""
        w = self.make_weights(differentiable=True)
        h = self.hidden_states(input_ids, doc_ids, weights=w)[-1]
        return h @ w["head"].to(h.dtype).T

    def head_weight(self) -> torch.Tensor:
        """The student's LM head W_lm P_lm, [V, d] (differentiable)."""
        w = self.teacher_root()["head"]
        return w @ self.head_projection.to(w.dtype)

    def _clone_scales(self, tokens: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per clone term: 1 / numel of the student's tensor (the MSE's mean) and numel of the
        teacher's / numel of the student's (1, and D/d for the FFN): constants per shape,
        made once on the device (a host list copied every micro-batch would sync)."""
        key = (tokens, like.device, like.dtype)
        cache = self.__dict__.setdefault("_clone_scale_cache", {})
        if key not in cache:
            a = self.arch
            q, kv, I, d = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size, self.hidden_size
            widths = {"q": q, "k": kv, "v": kv, "attn": q, "gate": I, "up": I, "ffn": d}
            per = torch.tensor([1.0 / max(tokens * widths[t], 1) for t in CLONE_TERMS], dtype=like.dtype)
            ratio = torch.tensor([a.hidden_size / d if t == "ffn" else 1.0 for t in CLONE_TERMS], dtype=like.dtype)
            cache[key] = per.to(like.device), ratio.to(like.device)
        return cache[key]

    def distill_losses(self, input_ids: torch.Tensor, loss: LossSettings, doc_ids: torch.Tensor | None = None,
                       loss_mask: torch.Tensor | None = None, weights: StudentWeights | None = None,
                       share: StepShare | None = None, root: dict | None = None) -> dict[str, torch.Tensor]:
        """Run teacher and student in lockstep and return every loss term.

        Keys: "loss" (the weighted total, differentiable), "kl", "lm", "clone" and
        "clone/<term>" (each summed over layers; all but "loss" detached). See
        ``distill_terms`` for the arguments.
        """
        total, vec = self.distill_terms(input_ids, loss, doc_ids, loss_mask, weights, share, root)
        return {"loss": total, **{k: vec[j] for j, k in enumerate(TERMS) if k != "loss"}}

    def distill_terms(self, input_ids: torch.Tensor, loss: LossSettings, doc_ids: torch.Tensor | None = None,
                      loss_mask: torch.Tensor | None = None, weights: StudentWeights | None = None,
                      share: StepShare | None = None, root: dict | None = None):
        """``(loss, terms)``: the weighted total (differentiable) and every logged term in
        ``TERMS`` order as one detached vector (fp32; fp64 in an fp64 run), so that a
        training step adds micro-batches up with one op and reads them back once.

        ``weights``: the step's ``StudentWeights`` (the trainer's path: the backward lands
        on them); None makes them inside autograd, so that the backward reaches P.
        ``share``: see ``StepShare``; None scores this batch alone.

        ``doc_ids`` [B, T] (packed rows: a document is a run of equal ids) makes attention
        block-diagonal causal and restarts rotary positions at each document, for teacher
        and student alike, and drops the prediction across each boundary. ``loss_mask``
        [B, T] (bool or 0/1) scores token t as a target only where it is true. KL and LM
        average over the scored rows only; the clone terms cover every token. A batch with
        no scored row gives KL = LM = 0, not NaN.
        """
        labels = next_token_labels(input_ids, doc_ids, loss_mask)
        root = root or self.teacher_root()
        w = weights if weights is not None else self.make_weights(differentiable=True, root=root)
        errs, mss = [], []
        clone_on = bool(loss.clone_weight)
        for i, h_t, h_s, terms in self.lockstep(input_ids, w, doc_ids, root):
            if i is not None and clone_on:
                for err, ms in terms:
                    errs.append(err)
                    mss.append(ms)
        L, C = self.arch.num_layers, len(CLONE_TERMS)
        B = input_ids.shape[0]
        if share is None:
            share = StepShare(scored=(labels != -100).sum(), sequences=B)
        kl_w = loss.kl_weight * (loss.temperature ** 2 if loss.kl_t2_scale else 1.0)
        total, kl, lm = K.fused_linear_kl(
            h_s.reshape(-1, self.hidden_size), w["head"], h_t.reshape(-1, self.arch.hidden_size), root["head"],
            labels.reshape(-1), temperature=loss.temperature, kl_weight=kl_w, ce_weight=loss.lm_weight,
            denominator=share.scored, **divergence_options(loss, n_sequences=share.sequences))
        if clone_on:
            err = torch.stack(errs).view(L, C)  # Σ (s − t)² per layer and term
            per_elem, ratio = self._clone_scales(input_ids.numel(), err)
            if loss.clone_norm == "teacher-ms":
                # mean / teacher mean square = Σ err / Σ t², times numel(t) / numel(s) (D/d for the FFN)
                tsq = torch.stack(mss).view(L, C)
                if share.mean_over_ranks is not None:
                    tsq = share.mean_over_ranks(tsq)
                err = err / tsq.clamp_min(1e-30) * ratio
            else:
                err = err * per_elem
            per_term = err.sum(0) * share.share
            clone = per_term.sum()
            total = total + loss.clone_weight * clone
        else:
            per_term = torch.zeros(C, dtype=total.dtype, device=h_s.device)
            clone = per_term.sum()
        acc = torch.promote_types(total.dtype, torch.float32)  # fp32, or fp64 for fp64 runs (tests)
        vec = torch.cat([torch.stack([total.detach(), kl, lm, clone.detach()]).to(acc), per_term.detach().to(acc)])
        return total, vec


