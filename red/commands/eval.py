"""`red eval`: the synthetic reasoning benchmark on any model, and lm-evaluation-harness
tasks when the optional `lm-eval` extra is installed."""
from __future__ import annotations

import json
from pathlib import Path

from red.errors import RedError

SYNTHETIC_BATCH = 200  # problems generated at once by the synthetic benchmark unless --batch-size says
LM_EVAL_BATCH = 8  # lm-eval's batch unless --batch-size says


def parse_ks(text: str) -> list[int]:
    """"1-6" or "1,3,5" -> [1, ...]."""
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            ks = list(range(int(a), int(b) + 1))
        else:
            ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RedError(f"--ks {text!r} is not a range like 1-6 or a list like 1,2,3") from None
    from red.commands.demo.task import MAX_K

    if not ks or min(ks) < 1 or max(ks) > MAX_K:
        raise RedError(f"--ks {text!r} must name step counts between 1 and {MAX_K} (the benchmark's longest problems)")
    return ks


REPORT_MARK = "red eval"  # the report's "written_by": how --overwrite knows a file is one of red's reports


def is_eval_report(path: str | Path) -> bool:
    """Whether ``path`` is a report `red eval` wrote (JSON with its mark)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        return json.loads(head).get("written_by") == REPORT_MARK
    except (OSError, ValueError, AttributeError):
        return False


def check_eval_inputs(ks="1-6", n_per_k: int = 200, seed: int = 0, lm_eval_tasks: str = "",
                      num_fewshot: int | None = None, max_gen_toks: int = 256, limit: int | None = None,
                      out: str | Path | None = None, device: str = "auto", batch_size: int | None = None,
                      model_dir: str | Path | None = None, overwrite: bool = False) -> None:
    """Every check of `red eval`'s inputs that needs no model, run before any work (paths
    first: they need no heavy import). ``--out`` follows the rule of every file red
    writes: apart from the model folder, and an existing file is replaced only with
    ``--overwrite`` and only when it is a report red wrote."""
    from red.config import DEVICE, NON_NEGATIVE, SEED, at_least, check_values
    from red.files import check_out_path, check_output_file

    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise RedError(f"model folder {model_dir} does not exist; pass an exported student (OUT/student)")
        if not (Path(model_dir) / "config.json").is_file():
            raise RedError(f"model folder {model_dir} has no config.json; pass an exported model folder "
                           "(OUT/student)")
    if out:
        check_out_path(out)  # first: a name too long for the file system fails any other test
        if Path(out).is_dir():
            raise RedError(f"--out {out} is a folder; --out takes the JSON file to write, e.g. "
                           f"{Path(out) / 'eval.json'}")
        check_output_file(out, overwrite, is_eval_report, "report", {"model folder": model_dir or ""})
    check_values({"--n-per-k": n_per_k, "--seed": seed, "--num-fewshot": num_fewshot,
                  "--max-gen-toks": max_gen_toks, "--limit": limit, "--device": device, "--batch-size": batch_size},
                 (("--n-per-k", NON_NEGATIVE), ("--seed", SEED), ("--num-fewshot", NON_NEGATIVE),
                  ("--max-gen-toks", at_least(1)), ("--limit", at_least(1)), ("--device", DEVICE),
                  ("--batch-size", at_least(1))))
    if n_per_k == 0 and not lm_eval_tasks.strip():
        raise RedError("--n-per-k 0 skips the synthetic benchmark and no --lm-eval-tasks are given, so there is "
                       "nothing to evaluate; give --n-per-k of at least 1 or --lm-eval-tasks")
    if n_per_k > 0 and isinstance(ks, str):
        parse_ks(ks)


def resolve_eval_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when CUDA is present, else "cpu"; "cuda[:N]" without CUDA is refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RedError(f"--device {device} was asked for but CUDA is not available; use --device cpu or auto")
    return device


def synthetic_benchmark(model_dir: str | Path, ks=range(1, 7), n_per_k: int = 200, seed: int = 0,
                        batch_size: int = SYNTHETIC_BATCH, device: str = "cpu") -> dict:
    """Exact-match accuracy per k of held-out multi-step problems (red.commands.demo.task), with the
    model on ``device``."""
    from red.commands.demo.task import CHARS, evaluate_reasoning
    from red.model.teacher import load_teacher

    model, tok = load_teacher(model_dir, device=device)
    missing = [c for c in CHARS if tok.convert_tokens_to_ids(c) in (None, tok.unk_token_id)]
    if missing:
        raise RedError(f"the tokenizer of {model_dir} lacks the task's characters {''.join(missing)!r}; the synthetic "
                       "benchmark runs on the demo teacher and its students")
    return evaluate_reasoning(model, tok, ks=list(ks), n_per_k=n_per_k, seed=seed, batch_size=batch_size)


def lm_eval_benchmark(model_dir: str | Path, tasks: list[str], num_fewshot: int | None = None,
                      max_gen_toks: int = 256, apply_chat_template: bool = False, limit: int | None = None,
                      batch_size: int = LM_EVAL_BATCH, device: str = "cpu") -> dict:
    """lm-evaluation-harness tasks through its Python API. Returns the per-task metrics
    and the settings that decide reasoning scores (few-shot count, generation length,
    chat template, limit), so they travel with the numbers."""
    try:
        import lm_eval
    except ImportError:
        raise RedError("lm-evaluation-harness is not installed; install it with: pip install 'red[lm-eval]'") from None
    settings = {"tasks": tasks, "num_fewshot": num_fewshot, "max_gen_toks": max_gen_toks,
                "apply_chat_template": apply_chat_template, "limit": limit, "batch_size": batch_size,
                "device": device, "greedy": True}
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "auto"}, tasks=tasks,
        num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
        gen_kwargs={"max_gen_toks": max_gen_toks, "do_sample": False}, apply_chat_template=apply_chat_template)
    return {"settings": settings, "results": out.get("results", {})}


def evaluate_model(model_dir: str | Path, ks="1-6", n_per_k: int = 200, seed: int = 0,
                   lm_eval_tasks: str = "", num_fewshot: int | None = None, max_gen_toks: int = 256,
                   apply_chat_template: bool = False, limit: int | None = None, out: str | Path | None = None,
                   device: str = "auto", batch_size: int | None = None, overwrite: bool = False) -> dict:
    """What `red eval` does; writes the report to ``out`` (JSON) when given (an existing
    file only with ``overwrite``, and only a report red wrote).

    ``device`` ("auto": CUDA when present) holds the model for both benchmarks;
    ``batch_size`` (None: 200 problems for the synthetic benchmark, 8 for lm-eval) is the
    batch of both. The report records the device and batch sizes used."""
    check_eval_inputs(ks, n_per_k, seed, lm_eval_tasks, num_fewshot, max_gen_toks, limit, out, device, batch_size,
                      model_dir, overwrite)
    dev = resolve_eval_device(device)
    report: dict = {"written_by": REPORT_MARK, "model": str(model_dir), "device": dev, "batch_size": batch_size}
    if n_per_k > 0:
        syn_batch = batch_size or SYNTHETIC_BATCH
        report["synthetic"] = synthetic_benchmark(model_dir, parse_ks(ks) if isinstance(ks, str) else ks,
                                                  n_per_k, seed, batch_size=syn_batch, device=dev)
        report["synthetic"]["batch_size"] = syn_batch
    if lm_eval_tasks:
        tasks = [t.strip() for t in lm_eval_tasks.split(",") if t.strip()]
        report["lm_eval"] = lm_eval_benchmark(model_dir, tasks, num_fewshot, max_gen_toks, apply_chat_template, limit,
                                              batch_size=batch_size or LM_EVAL_BATCH, device=dev)
    if out:
        from red.files import check_output_file, write_file_atomic

        # checked again: the file may have appeared while the benchmarks ran
        check_output_file(out, overwrite, is_eval_report, "report", {"model folder": model_dir})
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(out, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    return report
