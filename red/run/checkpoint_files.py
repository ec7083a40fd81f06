"""Where a checkpoint's files are and whether they are all there: standard library only.

`red.run.checkpoint` reads and writes checkpoints (and needs torch); the layout rules it
shares with the run folder's checks live here, so that `red distill` can tell a folder
holding a run from one that does not before torch is imported (``list_checkpoints``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from red.errors import RedError

STEP_DIR = re.compile(r"^step-(\d+)$")
SINGLE_FILE = "state.safetensors"
INDEX = "index.json"
INDEX_FORMAT = "red-sharded-checkpoint"
#: safetensors dtype names a checkpoint may hold
ST_DTYPE_NAMES = ("F32", "F64", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


def shard_file_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def _parse_index(path: Path) -> dict:
    """index.json of the sharded checkpoint ``path``, its structure checked (ValueError,
    OSError or a JSON error otherwise)."""
    idx = json.loads((path / INDEX).read_text())
    if not isinstance(idx, dict) or idx.get("format") != INDEX_FORMAT or idx.get("version") != 1:
        raise ValueError(f"not a {INDEX_FORMAT} index of version 1")
    world = idx["world_size"]
    files = idx["files"]
    if not (isinstance(world, int) and world >= 1 and isinstance(files, list) and len(files) == world):
        raise ValueError(f"{len(files) if isinstance(files, list) else 'no'} files for world size {world!r}")
    for r, f in enumerate(files):
        if f.get("name") != shard_file_name(r, world) or not isinstance(f.get("bytes"), int) \
                or not re.fullmatch(r"[0-9a-f]{64}", str(f.get("sha256"))):
            raise ValueError(f"file entry {r} is malformed")
    tensors = idx["tensors"]
    if not isinstance(tensors, dict):
        raise ValueError("tensors is not a mapping")
    for name, e in tensors.items():
        shape, shards = e["shape"], e["shards"]
        if e["dtype"] not in ST_DTYPE_NAMES or not all(isinstance(n, int) and n >= 0 for n in shape) \
                or not all(isinstance(s.get("file"), int) and 0 <= s["file"] < world for s in shards):
            raise ValueError(f"entry {name!r} is malformed")
        if not shape:
            if len(shards) != 1:
                raise ValueError(f"scalar {name!r} must be in one file")
            continue
        at = 0  # the pieces must tile rows [0, rows) in order
        for s in shards:
            if s["start"] != at or not at < s["stop"] <= shape[0]:
                raise ValueError(f"rows of {name!r} are not a partition of [0, {shape[0]})")
            at = s["stop"]
        if at != shape[0]:
            raise ValueError(f"rows of {name!r} stop at {at} of {shape[0]}")
    return idx


def _read_index(path: Path) -> dict:
    try:
        return _parse_index(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RedError(f"checkpoint {path} has an unreadable {INDEX} ({type(e).__name__}: {str(e)[:120]}); "
                       "pick another checkpoint or delete this one") from None


def _files_problem(path: Path) -> str | None:
    """Why the tensor files of checkpoint folder ``path`` are not all there (None when they
    are): a missing state.safetensors, or a shard file the index names that is missing or
    has another size. Only stat() calls."""
    if not (path / INDEX).is_file():
        return None if (path / SINGLE_FILE).is_file() else f"no {SINGLE_FILE} or {INDEX}"
    try:
        idx = _parse_index(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{INDEX} is unreadable ({type(e).__name__})"
    for f in idx["files"]:
        p = path / f["name"]
        if not p.is_file():
            return f"shard file {f['name']} is missing"
        size = p.stat().st_size
        if size != f["bytes"]:
            return f"shard file {f['name']} has {size} bytes, the index records {f['bytes']}"
    return None


def _problem(path: Path) -> str | None:
    """Why step folder ``path`` is not a complete checkpoint (None when it is)."""
    if not (path / "trainer.json").is_file():
        return "no trainer.json"
    return _files_problem(path)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first: a step folder with trainer.json and
    its tensor files (every shard file its index names, with the size it records)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and _problem(p) is None:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]
