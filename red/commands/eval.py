"""`red eval`: the synthetic reasoning benchmark on any model, and lm-evaluation-harness
tasks when the optional `lm-eval` extra is installed.

An lm-eval score is kept with what reproduces it: lm-eval's own record of the run (each
task's config, its version, few-shot count, number of samples, the model arguments and the
package versions) and, with ``--log-samples``, every sample with its prompt and responses.
Task names are checked before any model loads (``lm_eval_task_manager``): a name lm-eval
does not know, or a task whose data is neither local nor in this machine's Hugging Face
cache (red eval does not download), is one line."""
from __future__ import annotations

import glob
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
                      model_dir: str | Path | None = None, overwrite: bool = False, include_paths=(),
                      log_samples: bool = False) -> None:
    """Every check of `red eval`'s inputs that needs no model, run before any work (paths
    first: they need no heavy import). ``--out`` follows the rule of every file red
    writes: apart from the model folder, and an existing file is replaced only with
    ``--overwrite`` and only when it is a report red wrote."""
    from red.config import DEVICE, NON_NEGATIVE, SEED, at_least, check_values
    from red.files import check_out_path, check_output_file

    for folder in include_paths:
        if not Path(folder).is_dir():
            raise RedError(f"--include-path {folder} is not a folder; pass a folder of lm-eval task YAML files")
    if (include_paths or log_samples) and not lm_eval_tasks.strip():
        flag = "--include-path" if include_paths else "--log-samples"
        raise RedError(f"{flag} is for lm-eval tasks and no --lm-eval-tasks are given; name the tasks with "
                       "--lm-eval-tasks")
    if log_samples and not out:
        raise RedError("--log-samples writes every sample into the report; give --out FILE for it")

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


#: datasets' builders that read local files (``dataset_path: json`` with ``data_files``)
FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


def lm_eval_task_manager(tasks: list[str], include_paths=()):
    """lm-eval's ``TaskManager`` (its tasks and the YAML files under ``include_paths``),
    once every name of ``tasks`` is checked, before any model loads: a task, group or tag
    lm-eval knows, each of whose tasks reads data this machine has (``task_data_problem``).
    RedError (one line) otherwise, or when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RedError("lm-evaluation-harness is not installed; install it with: pip install 'red[lm-eval]'") from None
    manager = TaskManager(include_path=[str(p) for p in include_paths] or None)
    index = manager.task_index
    for name in tasks:
        if name not in index:
            import difflib

            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise RedError(f"--lm-eval-tasks: lm-eval {_version('lm_eval')} has no task, group or tag named "
                           f"{name!r}{hint}; list them with `lm-eval ls tasks`, or add a folder of task YAML "
                           "files with --include-path DIR")
        for leaf, cfg in _leaf_tasks(index, name):
            problem = task_data_problem(cfg)
            if problem:
                where = "" if leaf == name else f" (of {name})"
                raise RedError(f"--lm-eval-tasks: task {leaf!r}{where} {problem}")
    return manager


def _leaf_tasks(index: dict, name, seen=None) -> list[tuple[str, dict | None]]:
    """(task name, its YAML config) of every task ``name`` stands for: itself, a group's
    members (names or inline configs), a tag's members; None for a Python-class task."""
    seen = set() if seen is None else seen
    if isinstance(name, dict):  # a task written inline in a group's YAML
        return [(str(name.get("task", "?")), name)] if "dataset_path" in name or "custom_dataset" in name else \
            _leaf_tasks(index, name.get("task"), seen)
    if name in seen or name not in index:
        return []
    seen.add(name)
    entry = index[name]
    kind = getattr(entry.kind, "name", str(entry.kind)).lower()
    cfg = entry.cfg or {}
    if kind == "group":
        members = cfg.get("task") or []
        return [t for m in (members if isinstance(members, list) else [members]) for t in _leaf_tasks(index, m, seen)]
    if kind == "tag":
        return [t for m in sorted(entry.tags) for t in _leaf_tasks(index, m, seen)]
    return [(name, None if kind == "py_task" or "class" in cfg else cfg)]


def task_data_problem(cfg: dict | None) -> str | None:
    """Why an lm-eval task cannot read its data here without a download, or None.

    Local: ``dataset_path`` an existing file or folder, or one of datasets' file builders
    (``FILE_BUILDERS``) whose ``data_files`` (or ``data_dir``) exist here; or a
    ``custom_dataset`` function. A Hub dataset (``dataset_path: openai/gsm8k``) only when
    this machine's Hugging Face cache holds it (the hub download cache or datasets' own
    prepared copy). A Python-class task (``cfg`` None) is left to lm-eval: its data cannot
    be read from a config."""
    if cfg is None or cfg.get("custom_dataset"):
        return None
    path = cfg.get("dataset_path")
    if not path:
        return "names no dataset_path; give its YAML a dataset_path"
    path = str(path)
    if path in FILE_BUILDERS:
        kwargs = cfg.get("dataset_kwargs") or {}
        files = kwargs.get("data_files")
        if files is None:
            data_dir = kwargs.get("data_dir")
            if data_dir and Path(data_dir).is_dir():
                return None
            return (f"reads dataset_path {path} but names no local data_files (or data_dir); give them in its "
                    "dataset_kwargs")
        flat = [files] if isinstance(files, str) else \
            [f for v in (files.values() if isinstance(files, dict) else files)
             for f in ([v] if isinstance(v, str) else v)]
        for f in flat:
            if "://" in str(f):
                return f"reads {f}, which is not on this machine, and red eval does not download; give a local file"
            if not glob.glob(str(f), recursive=True):
                return f"reads data_files {f}, which matches no file here; fix the path in its YAML"
        return None
    if Path(path).exists():
        return None
    if "://" in path or not _hub_cached(path):
        return (f"reads the Hugging Face Hub dataset {path!r}, which this machine's Hugging Face cache does not "
                "hold, and red eval does not download; fetch it once where there is network (python -c "
                f"\"import datasets; datasets.load_dataset('{path}'"
                + (f", '{cfg['dataset_name']}'" if cfg.get("dataset_name") else "") + ")\") or give a task over "
                "local files with --include-path DIR")
    return None


def _hub_cached(repo: str) -> bool:
    """Whether the Hugging Face cache holds the Hub dataset ``repo``: the hub's download
    cache (``datasets--org--name``) or datasets' prepared copy (``org___name``)."""
    from huggingface_hub import constants

    if (Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}").is_dir():
        return True
    try:
        import datasets.config
    except ImportError:
        return False
    return (Path(datasets.config.HF_DATASETS_CACHE) / repo.replace("/", "___")).is_dir()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _plain(obj):
    """``obj`` as JSON can hold it (lm-eval's record has numpy numbers and torch dtypes)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def lm_eval_benchmark(model_dir: str | Path, tasks: list[str], num_fewshot: int | None = None,
                      max_gen_toks: int = 256, apply_chat_template: bool = False, limit: int | None = None,
                      batch_size: int = LM_EVAL_BATCH, device: str = "cpu", task_manager=None,
                      include_paths=(), log_samples: bool = False) -> dict:
    """lm-evaluation-harness tasks through its Python API. Returns the settings that decide
    reasoning scores (few-shot count, generation length, chat template, limit), the
    per-task metrics, and lm-eval's record of the run so a score can be reproduced from it:
    ``configs`` (each task's full config), ``versions``, ``n-shot``, ``n-samples``,
    ``higher_is_better``, ``group_subtasks``, ``config`` (model arguments, seeds),
    ``lm_eval_version``, ``transformers_version``, the tokenizer's special tokens, and
    ``packages`` (the versions of the libraries that computed it); ``samples`` (each
    document with its prompt, responses and metrics) only with ``log_samples``.
    ``task_manager``: from ``lm_eval_task_manager`` (built here when None)."""
    if task_manager is None:
        task_manager = lm_eval_task_manager(tasks, include_paths)
    import lm_eval

    settings = {"tasks": tasks, "num_fewshot": num_fewshot, "max_gen_toks": max_gen_toks,
                "apply_chat_template": apply_chat_template, "limit": limit, "batch_size": batch_size,
                "device": device, "greedy": True, "include_paths": [str(p) for p in include_paths],
                "log_samples": log_samples}
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "auto"}, tasks=tasks,
        num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
        gen_kwargs={"max_gen_toks": max_gen_toks, "do_sample": False}, apply_chat_template=apply_chat_template,
        task_manager=task_manager, log_samples=log_samples)
    record = {k: v for k, v in (out or {}).items() if k != "samples" or log_samples}
    packages = {p: _version(p) for p in ("lm_eval", "transformers", "torch", "datasets", "tokenizers")}
    return _plain({"settings": settings, "results": record.pop("results", {}), **record, "packages": packages})


def evaluate_model(model_dir: str | Path, ks="1-6", n_per_k: int = 200, seed: int = 0,
                   lm_eval_tasks: str = "", num_fewshot: int | None = None, max_gen_toks: int = 256,
                   apply_chat_template: bool = False, limit: int | None = None, out: str | Path | None = None,
                   device: str = "auto", batch_size: int | None = None, overwrite: bool = False,
                   include_paths=(), log_samples: bool = False) -> dict:
    """What `red eval` does; writes the report to ``out`` (JSON) when given (an existing
    file only with ``overwrite``, and only a report red wrote).

    ``device`` ("auto": CUDA when present) holds the model for both benchmarks;
    ``batch_size`` (None: 200 problems for the synthetic benchmark, 8 for lm-eval) is the
    batch of both. The report records the device and batch sizes used. lm-eval tasks
    (``lm_eval_tasks``, with the task YAML folders ``include_paths``) are checked before
    the model loads; ``log_samples`` keeps lm-eval's samples in the report."""
    check_eval_inputs(ks, n_per_k, seed, lm_eval_tasks, num_fewshot, max_gen_toks, limit, out, device, batch_size,
                      model_dir, overwrite, include_paths, log_samples)
    tasks = [t.strip() for t in lm_eval_tasks.split(",") if t.strip()]
    manager = lm_eval_task_manager(tasks, include_paths) if tasks else None  # before any model loads
    dev = resolve_eval_device(device)
    report: dict = {"written_by": REPORT_MARK, "model": str(model_dir), "device": dev, "batch_size": batch_size}
    if n_per_k > 0:
        syn_batch = batch_size or SYNTHETIC_BATCH
        report["synthetic"] = synthetic_benchmark(model_dir, parse_ks(ks) if isinstance(ks, str) else ks,
                                                  n_per_k, seed, batch_size=syn_batch, device=dev)
        report["synthetic"]["batch_size"] = syn_batch
    if tasks:
        report["lm_eval"] = lm_eval_benchmark(model_dir, tasks, num_fewshot, max_gen_toks, apply_chat_template, limit,
                                              batch_size=batch_size or LM_EVAL_BATCH, device=dev,
                                              task_manager=manager, include_paths=include_paths,
                                              log_samples=log_samples)
    if out:
        from red.files import check_output_file, write_file_atomic

        # checked again: the file may have appeared while the benchmarks ran
        check_output_file(out, overwrite, is_eval_report, "report", {"model folder": model_dir})
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(out, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    return report
