"""Initial values of the student's projections and gains (docs/method.md §3)."""
from __future__ import annotations

import math

import torch

from red.errors import RedError
from red.model.arch import check_width
from red.model.student import ProjectedStudent


def select_channels(scores: torch.Tensor, d: int) -> torch.Tensor:
    """The top-d channels by score, in ascending channel order (int64 [d])."""
    D = scores.numel()
    check_width(D, d)
    # a stable sort keeps the choice deterministic when scores tie
    top = torch.sort(scores.float(), descending=True, stable=True).indices[:d]
    return torch.sort(top).values.long()


def selection_matrix(channels: torch.Tensor, D: int, dtype=torch.float32) -> torch.Tensor:
    """P_S = [e_j1 ... e_jd], [D, d]: W P_S gathers columns S, P_S^T W gathers rows S."""
    P = torch.zeros(D, channels.numel(), dtype=dtype)
    P[channels.cpu(), torch.arange(channels.numel())] = 1.0
    return P


def _set_full(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


def _read_full(t: torch.Tensor) -> torch.Tensor:
    return t


def _init_selected(student: ProjectedStudent, channels: torch.Tensor | None, set_value, read) -> torch.Tensor:
    """"red" and "random-select": every P = P_S for the global channel set S (checked
    against the widths), the gains the teacher's RMSNorm gains at S; returns S."""
    D, d = student.arch.hidden_size, student.hidden_size
    teacher = student.teacher
    if channels is None:
        raise RedError("the red init needs a channel set; calibrate first (or pass --calibration)")
    channels = channels.long().cpu()
    if channels.numel() != d or channels.min() < 0 or channels.max() >= D or channels.unique().numel() != d:
        raise RedError(f"channel set must hold {d} distinct channels in [0, {D}); recalibrate for this width")
    P = selection_matrix(channels, D)
    for p in student.projections().values():
        set_value(p, P)
    for i, layer in enumerate(student.layers):
        tl = teacher.model.layers[i]
        set_value(layer.input_norm, read(tl.input_layernorm.weight).float()[channels])
        set_value(layer.post_attention_norm, read(tl.post_attention_layernorm.weight).float()[channels])
    set_value(student.final_norm, read(teacher.model.norm.weight).float()[channels])
    student.channels = channels
    return channels


def _init_random(student: ProjectedStudent, method: str, std: float | None, g: torch.Generator, set_value,
                 sharded: bool) -> None:
    """"lrc" (Gaussian P) and "orthogonal" (orthonormal columns), drawn from ``g`` matrix by
    matrix in one fixed order so every rank and a single process agree; gains = 1."""
    D, d = student.arch.hidden_size, student.hidden_size
    if method == "lrc":
        s = 1.0 / math.sqrt(D) if std is None else float(std)
        for p in student.projections().values():
            set_value(p, torch.randn(D, d, generator=g) * s)
    elif method == "orthogonal":
        for p in student.projections().values():
            q, r = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
            set_value(p, (q * torch.sign(torch.diagonal(r))).float())
    else:
        raise RedError(f"unknown init {method!r}; use red, lrc, orthogonal or random-select")
    for gain in student.gains().values():
        if sharded:
            from red.distributed import local_tensor

            local_tensor(gain).fill_(1.0)
        else:
            gain.fill_(1.0)
    student.channels = None


@torch.no_grad()
def initialize(student: ProjectedStudent, method: str, channels: torch.Tensor | None = None,
               std: float | None = 0.02, seed: int = 0, sharded: bool = False) -> torch.Tensor | None:
    """Set every projection and gain of ``student`` in place; returns the channel set used.

    - "red": every P = P_S for the given global channel set S; gains = teacher gamma[S].
    - "lrc": every P ~ N(0, std^2) independently (std None: 1/sqrt(D)); gains = 1.
    - "orthogonal": every P a random matrix with orthonormal columns; gains = 1.
    - "random-select": like "red" with S drawn at random (the shared-basis control).

    ``sharded``: ``student`` is already sharded by FSDP2 (``red.distributed``'s sharded
    start-up): every rank makes each full matrix in turn, from the same generator in the
    same order as a single process, keeps only its own rows (``write_shard``) and frees it,
    so no more than one D x d matrix is ever whole; teacher gains are gathered (D values).
    The values are those of a single process, bit for bit.
    """
    if sharded:
        from red.distributed import full_tensor, write_shard

        set_value, read = write_shard, full_tensor
    else:
        set_value, read = _set_full, _read_full
    D, d = student.arch.hidden_size, student.hidden_size
    g = torch.Generator().manual_seed(seed)
    if method in ("red", "random-select"):
        if method == "random-select":
            channels = torch.sort(torch.randperm(D, generator=g)[:d]).values
        return _init_selected(student, channels, set_value, read)
    _init_random(student, method, std, g, set_value, sharded)
    return None
