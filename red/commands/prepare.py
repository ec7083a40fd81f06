"""`red prepare`: tokenize sources once into a token store that any number of runs share.
The checks run before torch and transformers are imported, so a wrong path answers at once."""
from __future__ import annotations

from pathlib import Path

from red.config import OPEN_UNIT, SEED, at_least, check_values
from red.data.sources import expand_source, parse_data_spec
from red.errors import RedError
from red.files import check_out_path, check_separate


def check_prepare_inputs(data, tokenizer: str | Path, out: str | Path, *, val_fraction: float = 0.0, seed: int = 0,
                         workers: int = 0, append: bool = False, overwrite: bool = False) -> list[str]:
    """The sources' paths, once each ``--data`` entry names something that exists, carries
    no mixture weight and lies outside ``out``; RedError otherwise."""
    check_values({"--val-fraction": val_fraction, "--seed": seed, "--workers": workers},
                 (("--val-fraction", OPEN_UNIT), ("--seed", SEED), ("--workers", at_least(0))))
    if append and overwrite:
        raise RedError("--append and --overwrite exclude each other; pick one")
    if not Path(tokenizer).is_dir():
        raise RedError(f"tokenizer folder {tokenizer} does not exist; pass the teacher folder")
    check_out_path(out)
    sources = []
    for s in data:
        spec = parse_data_spec(s)
        if spec.weight is not None:
            raise RedError(f"--data {s}: mixture weights belong to red distill, not to a store; drop ':{spec.weight:g}'")
        sources.append(spec.path)
        for f in expand_source(spec.path):
            for one in getattr(f, "files", (f,)):
                check_separate(out, {"source": one})
    return sources


def prepare(data, tokenizer: str | Path, out: str | Path, *, text_field: str = "text", txt_split: str = "line",
            val_fraction: float = 0.05, seed: int = 0, workers: int = 0, append: bool = False,
            overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True):
    """Check the inputs, then tokenize them with the teacher's tokenizer into the store
    ``out`` (a new one, or a part added with ``append``); returns the TokenStore."""
    sources = check_prepare_inputs(data, tokenizer, out, val_fraction=val_fraction, seed=seed, workers=workers,
                                   append=append, overwrite=overwrite)
    from red.data.store import prepare_store
    from red.model.teacher import load_tokenizer

    tok = load_tokenizer(tokenizer, trust_remote_code)
    return prepare_store(sources, out, tok, text_field=text_field, txt_split=txt_split, val_fraction=val_fraction,
                         seed=seed, workers=workers, append=append, overwrite=overwrite, progress=progress)
