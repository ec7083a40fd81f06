"""Calibration: per-channel statistics of the teacher's residual stream.

The statistics are taken at every residual-reading RMSNorm (each layer's input and
post-attention norms, and the final norm) by swapping those norms' forward for
``red_kernels.rmsnorm_with_stats``: one read of the residual gives the normalized output
the teacher needs and the statistics of both the raw and the normalized values.
Statistics are kept per sequence, so any score can be computed later from the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import red_kernels as K

from red.errors import RedError
from red.model.teacher import check_safetensors_file

STAT_NAMES = ("raw_abs_sum", "raw_sq_sum", "norm_abs_sum", "norm_sq_sum")


def norm_points(teacher) -> dict[str, torch.nn.Module]:
    """The residual-reading RMSNorm modules, by name, in forward order."""
    points = {}
    for i, layer in enumerate(teacher.model.layers):
        points[f"layers.{i}.input"] = layer.input_layernorm
        points[f"layers.{i}.post_attention"] = layer.post_attention_layernorm
    points["final"] = teacher.model.norm
    return points


@dataclass
class Calibration:
    """Per point, per sequence, per channel sums: stats[point, seq, stat, channel] (fp32)."""

    stats: torch.Tensor
    tokens_per_seq: int
    points: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return self.stats.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.stats.shape[-1]

    def save(self, path: str | Path) -> None:
        meta = dict(self.meta, points=self.points, tokens_per_seq=self.tokens_per_seq, stat_names=list(STAT_NAMES))
        save_file({"stats": self.stats.contiguous()}, str(path), metadata={"red": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        p = Path(path)
        if not p.is_file():
            raise RedError(f"calibration file {p} does not exist; run `red calibrate` or drop --calibration")
        check_safetensors_file(p, what="calibration file")
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("red")
        if raw is None:
            raise RedError(f"{p} is not a red calibration file (no 'red' metadata); run `red calibrate`")
        meta = json.loads(raw)
        stats = load_file(str(p))["stats"]
        return cls(stats=stats, tokens_per_seq=int(meta.pop("tokens_per_seq")), points=list(meta.pop("points")),
                   meta={k: v for k, v in meta.items() if k != "stat_names"})


def _stats_forward(pi: int, module, cursor: dict):
    """A replacement forward for the RMSNorm ``module`` (calibration point ``pi``) that also
    adds each sequence's channel statistics into ``cursor["into"][pi, cursor["start"] + b]``."""
    def forward(x):
        ys = []
        for b in range(x.shape[0]):
            y, st = K.rmsnorm_with_stats(x[b], module.weight, module.variance_epsilon)
            cursor["into"][pi, cursor["start"] + b] += st.float().cpu()
            ys.append(y)
        return torch.stack(ys)
    return forward


@torch.no_grad()
def _stats_buffers(teacher, sequences: torch.Tensor):
    """The norms to watch and a zeroed [points, N, stats, D] float32 buffer for ``sequences``
    [N, T]; RedError when there is no sequence to calibrate on."""
    if sequences.dim() != 2 or sequences.shape[0] == 0:
        raise RedError("calibration needs at least one sequence; give a corpus with enough text")
    points = norm_points(teacher)
    N, T = sequences.shape
    D = teacher.config.hidden_size
    return points, torch.zeros(len(points), N, len(STAT_NAMES), D, dtype=torch.float32), (N, T, D)


def _calibration_of(teacher, stats: torch.Tensor, tokens_per_seq: int, points) -> "Calibration":
    return Calibration(stats=stats, tokens_per_seq=tokens_per_seq, points=list(points),
                       meta={"model_type": teacher.config.model_type, "hidden_size": teacher.config.hidden_size,
                             "num_layers": len(teacher.model.layers)})


def calibrate(teacher, sequences: torch.Tensor, batch_size: int = 4, progress: bool = True) -> Calibration:
    """Run the teacher on ``sequences`` [N, T] and collect channel statistics at every
    residual-reading RMSNorm (teacher's own transformers forward, norms swapped)."""
    points, stats, (N, T, D) = _stats_buffers(teacher, sequences)
    cursor = {"start": 0, "into": stats}
    for pi, (name, module) in enumerate(points.items()):
        module.forward = _stats_forward(pi, module, cursor)
    device = teacher.model.embed_tokens.weight.device
    try:
        for start in tqdm(range(0, N, batch_size), desc="calibrate", disable=not progress, leave=False):
            cursor["start"] = start
            teacher(input_ids=sequences[start: start + batch_size].to(device), use_cache=False)
    finally:
        for module in points.values():
            del module.forward
    return _calibration_of(teacher, stats, T, points)


def _gather_layers_on_entry(teacher, probe) -> list:
    """Hooks that all-gather each decoder layer and the final norm whole when its forward
    starts and put the shards back when it ends, so no more than one layer is whole at a
    time; returns the hooks' handles."""
    from red.distributed import local_tensor

    swapped: dict[int, list] = {}

    def gather(module, args):
        from torch.distributed.tensor import DTensor

        held, nbytes = [], 0
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if isinstance(p, DTensor):
                    full = p.full_tensor()
                    nbytes += local_tensor(p).numel() * p.element_size()  # the shard stays alive too
                    held.append((mod, name, p))
                    mod._parameters[name] = torch.nn.Parameter(full, requires_grad=False)
        swapped[id(module)] = held
        if probe is not None:  # the full layer is now among the teacher's parameters
            probe.sample("calibrate", extra=nbytes)

    def release(module, args, output):
        for mod, name, p in swapped.pop(id(module), []):
            mod._parameters[name] = p

    hooks = []
    for m in [*teacher.model.layers, teacher.model.norm]:
        hooks += [m.register_forward_pre_hook(gather), m.register_forward_hook(release)]
    return hooks


def _round_embedding_rows(embed, batches: torch.Tensor, shard: tuple[int, int], D: int, device, table: dict) -> None:
    """The embedding rows of the round's distinct tokens (``batches``: every rank's batch of
    the round), assembled from every rank's shard of rows ``shard`` = [a, b) (an all-reduce
    of exact rows and zeros, so exact), into ``table`` for the patched embedding forward."""
    import torch.distributed as dist

    from red.distributed import _collective_device, local_tensor

    a, b = shard
    ids = batches.reshape(-1).unique()  # sorted
    rows = torch.zeros(len(ids), D, dtype=torch.float32, device=_collective_device())
    held = (ids >= a) & (ids < b)
    rows[held.to(rows.device)] = local_tensor(embed.weight)[(ids[held] - a).to(device)].float().to(rows.device)
    dist.all_reduce(rows)
    table["ids"], table["rows"] = ids.to(device), rows.to(device=device, dtype=embed.weight.dtype)


def _round_batch(sequences: torch.Tensor, mine: list, r: int, batch_size: int, cursor: dict, stats: torch.Tensor,
                 scratch: torch.Tensor) -> torch.Tensor:
    """Rank ``r``'s batch of a round whose batches start at ``mine``, with ``cursor`` pointed
    at where its statistics go; a rank without a batch this round runs the round's first
    into ``scratch`` (zeroed, dropped) so that every rank makes the same collectives."""
    if r < len(mine):
        cursor["start"], cursor["into"] = mine[r], stats
        return sequences[mine[r]: mine[r] + batch_size]
    cursor["start"], cursor["into"] = 0, scratch.zero_()
    return sequences[mine[0]: mine[0] + batch_size]


def _patch_forwards(points: dict, cursor: dict, embed, table: dict) -> None:
    """Swap in calibration's forwards: each norm point records its statistics where
    ``cursor`` says, and the embedding looks the round's tokens up in ``table`` (the rows
    ``_round_embedding_rows`` assembled) instead of its sharded weight."""
    for pi, (name, module) in enumerate(points.items()):
        module.forward = _stats_forward(pi, module, cursor)

    def embed_forward(ids):
        return table["rows"][torch.searchsorted(table["ids"], ids)]

    embed.forward = embed_forward


def _undo_calibration_patches(hooks: list, points: dict, embed, table: dict, probe) -> None:
    """Put the teacher back as calibration found it: the gathering hooks removed, the
    statistics and embedding forwards unpatched, the round's rows dropped."""
    for h in hooks:
        h.remove()
    for module in points.values():
        del module.forward
    del embed.forward
    table.clear()
    if probe is not None:
        probe.hold(0)


@torch.no_grad()
def calibrate_sharded(teacher, sequences: torch.Tensor, ctx, batch_size: int = 4, progress: bool = True,
                      probe=None) -> Calibration:
    """``calibrate`` on a teacher whose parameters FSDP2 has sharded over ``ctx``'s ranks
    (``red.distributed``'s sharded start-up); every rank gets the same statistics as one
    process computing ``calibrate(full teacher, sequences, batch_size)``.

    The batches are those of ``calibrate`` (``batch_size`` consecutive sequences), dealt
    round-robin to the ranks: in round k rank r runs batch k*N + r (a rank without one
    runs the round's first batch and drops its statistics, so that every rank makes the
    same collectives). Each decoder layer and the final norm are all-gathered on entry and
    dropped on exit (one layer whole at a time, ``DTensor.full_tensor``); the embedding is
    never gathered: each round, the rows of the round's distinct tokens are assembled
    from every rank's shard (all-reduce of exact rows and zeros, so exact). Statistics are
    kept per sequence, each sequence's by exactly one rank, and summed over ranks (x + 0:
    exact). The teacher's own transformers forward runs on each batch, so the statistics
    are those of a single process up to the arithmetic of a batch, which is the same
    batch in the same order: bit-identical on CPU in the tests.
    """
    import torch.distributed as dist

    from red.distributed import _collective_device, local_tensor, shard_rows

    points, stats, (N, T, D) = _stats_buffers(teacher, sequences)
    scratch = torch.zeros(len(points), batch_size, len(STAT_NAMES), D, dtype=torch.float32)
    cursor = {"start": 0, "into": stats}
    embed = teacher.model.embed_tokens
    table = {}
    hooks = _gather_layers_on_entry(teacher, probe)
    _patch_forwards(points, cursor, embed, table)
    device = local_tensor(embed.weight).device
    starts = list(range(0, N, batch_size))
    W, r = ctx.world_size, ctx.rank
    shard = shard_rows(embed.weight)
    try:
        for k in tqdm(range(0, len(starts), W), desc="calibrate", disable=not progress, leave=False):
            mine = starts[k: k + W]
            _round_embedding_rows(embed, torch.cat([sequences[s: s + batch_size] for s in mine]), shard, D,
                                  device, table)
            if probe is not None:  # the round's embedding rows count as teacher bytes while they live
                probe.hold(table["rows"].numel() * table["rows"].element_size())
                probe.sample("calibrate")
            batch = _round_batch(sequences, mine, r, batch_size, cursor, stats, scratch)
            teacher.model(input_ids=batch.to(device), use_cache=False)
    finally:
        _undo_calibration_patches(hooks, points, embed, table, probe)
    summed = stats.to(_collective_device())
    dist.all_reduce(summed)
    return _calibration_of(teacher, summed.cpu(), T, points)


def check_calibration_teacher(cal: Calibration, path: str | Path, teacher_dir: str | Path, arch) -> None:
    """Refuse a calibration file made on another teacher than ``teacher_dir`` (whose
    ``red.model.teacher.Arch`` is ``arch``).

    Files written since the teacher's fingerprint is stored (``meta["teacher_fingerprint"]``,
    set where the teacher folder is known: ``red.commands.distill.run_calibration`` and the
    calibration ``red distill`` makes) must match the fingerprint of ``teacher_dir``. Older
    files without one are accepted when their width matches the teacher's: a file from
    another teacher of the same width cannot be told apart then.
    """
    from red.model.teacher import teacher_matches

    if cal.hidden_size != arch.hidden_size:
        raise RedError(f"calibration {path} was made for width {cal.hidden_size}, the teacher has "
                       f"{arch.hidden_size}; recalibrate with this teacher (red calibrate --teacher {teacher_dir}) "
                       "or drop --calibration")
    fp = cal.meta.get("teacher_fingerprint")
    if fp is None:
        return
    if not teacher_matches(fp, teacher_dir):
        made = cal.meta.get("teacher") or "an unknown folder"
        kind = f"{cal.meta.get('model_type', '?')}, {cal.meta.get('num_layers', '?')} layers"
        raise RedError(f"calibration {path} was made on another teacher ({made}: {kind}), not {teacher_dir} "
                       f"({arch.model_type}, {arch.num_layers} layers); recalibrate with "
                       f"red calibrate --teacher {teacher_dir}, or drop --calibration")


def channel_scores(cal: Calibration, method: str = "minitron") -> torch.Tensor:
    """Importance of each residual channel, [D] (higher = keep).

    - "minitron": per norm output, mean over tokens of |y_j|, L2 over sequences,
      summed over all norm points (Minitron's hidden-channel importance).
    - "rms": RMS of the raw residual stream entering each norm, summed over points.
    """
    s = cal.stats.double()
    T, N = cal.tokens_per_seq, cal.num_sequences
    if method == "minitron":
        per_seq = s[:, :, 2] / T
        return per_seq.pow(2).sum(1).sqrt().sum(0).float()
    if method == "rms":
        return (s[:, :, 1].sum(1) / (N * T)).sqrt().sum(0).float()
    raise RedError(f"unknown channel score {method!r}; use minitron or rms")
