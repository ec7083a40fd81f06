"""The `red` command: calibrate, distill, export, analyze, plan, bench, import.

Every option of `red distill` comes from a field of DistillConfig, so YAML keys and
flags are the same names (hidden_size <-> --hidden-size). User errors print one line
and exit with code 2.

Start-up is kept cheap: this module imports only the standard library, yaml and
red.config/red.errors, and each command imports torch/transformers (through the modules
doing the work) inside its handler, after the checks that need no weights. So
``red --help``, usage errors and config errors answer without loading torch.
``python -m red ...`` is the same command as ``red ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from red.config import EXPORT_ARCHS, EXPORT_DTYPES, PRECISION_CHOICES, PRESETS, TEACHER_DTYPES, TXT_SPLITS, DistillConfig
from red.errors import RedError


def _launched_by_torchrun() -> bool:
    # red.distributed.launched_by_torchrun, without importing torch (red.distributed does)
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _optional_float(s: str):
    # "null" stays a string here: None means "not given" to make_config
    return "null" if s.lower() in ("none", "null") else float(s)


def _add_config_options(p: argparse.ArgumentParser, cls=DistillConfig) -> None:
    """One option per dataclass field, help text with its default (None = not given)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.metadata.get("cli") is False:
            continue  # written by red itself (e.g. run.yaml's history), not a flag
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        preset_note = ""
        by_preset = {name: vals[f.name] for name, vals in PRESETS.items() if f.name in vals} if cls is DistillConfig else {}
        if by_preset:
            preset_note = "; by preset: " + ", ".join(f"{k} {v}" for k, v in by_preset.items())
        help_text = f"{f.metadata.get('help', '')} (default: {default!r}{preset_note})"
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "data" and cls is DistillConfig:
            p.add_argument(flag, action="append", default=None, metavar="PATH[:WEIGHT]", help=help_text)
        elif typing.get_origin(tp) is typing.Union:
            p.add_argument(flag, type=_optional_float, default=None, metavar="FLOAT|null", help=help_text)
        else:
            p.add_argument(flag, type=tp, default=None, help=help_text)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, "red <command>: error: ...", exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_import_parser(sub) -> None:
    """`red import`'s arguments (the dtype choices are config's, as red distill's --teacher-dtype)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("import", help="turn a GGUF file (Llama, Qwen2, Qwen3) into a teacher folder", formatter_class=fmt,
                       description="Dequantize a llama.cpp GGUF file into an ordinary Hugging Face teacher folder: "
                       "safetensors in --dtype, config.json, generation_config.json and the tokenizer with its chat "
                       "template. Needs the gguf package (pip install 'red[gguf]').")
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out", required=True, help="teacher folder to write")
    p.add_argument("--dtype", default="bfloat16", choices=TEACHER_DTYPES,
                   help="weight dtype (float32 keeps the dequantized values exactly)")
    p.add_argument("--overwrite", action="store_true", help="replace a teacher folder an earlier red import wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_distill_parser(sub) -> None:
    """`red distill`: the DistillConfig fields as flags, beside --config and --quiet."""
    p = sub.add_parser("distill", help="calibrate, initialize, train and export a student", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Distill TEACHER into a student of width --hidden-size. Options override --config "
                                   "(YAML with the same keys, e.g. OUT/run.yaml), which overrides the preset.")
    p.add_argument("--config", default=None, help="YAML file of options (default: None)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: False)")
    _add_config_options(p)


def _add_prepare_parser(sub) -> None:
    """`red prepare`: tokenize sources into a token store."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("prepare", help="tokenize a corpus once into a token store for red distill --data",
                       formatter_class=fmt, description="Tokenize --data sources (files, globs, saved Hugging Face "
                       "datasets; chat rows with the tokenizer's chat template) into a memory-mapped token store: "
                       "flat token file, document ends, loss mask for chat data, store.json manifest. Streams its "
                       "input in --workers processes; --append adds sources as a new part.")
    p.add_argument("--tokenizer", required=True, help="teacher folder (its tokenizer is used)")
    p.add_argument("--data", required=True, action="append", metavar="SOURCE",
                   help="a .txt/.jsonl/.parquet file, a glob, or a save_to_disk folder; repeat for several")
    p.add_argument("--out", required=True, help="store folder")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/dataset rows")
    p.add_argument("--txt-split", default="line", choices=TXT_SPLITS, help="documents of a .txt")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens held out, by whole documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core but one; 1: in this process)")
    p.add_argument("--append", action="store_true", help="add the sources to an existing store as a new part")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (only a red token store)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer folder's own code")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_calibrate_parser(sub) -> None:
    """`red calibrate`: the teacher's channel statistics into a file."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("calibrate", help="measure teacher channel statistics", formatter_class=fmt)
    p.add_argument("--teacher", required=True, help="teacher folder")
    p.add_argument("--data", required=True, help="corpus (.txt, .jsonl, .parquet)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet")
    p.add_argument("--txt-split", default="line", choices=TXT_SPLITS, help="documents of a .txt")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_export_parser(sub) -> None:
    """`red export`: a run's checkpoint as a Hugging Face model folder."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("export", help="export a run's checkpoint as a Hugging Face model", formatter_class=fmt)
    p.add_argument("--run", required=True, help="the --out folder of `red distill`")
    p.add_argument("--out", required=True, help="folder for the exported model")
    p.add_argument("--checkpoint", default=None, help="a checkpoints/step-* folder (default: the last)")
    p.add_argument("--dtype", default="auto", choices=EXPORT_DTYPES, help="weight dtype")
    p.add_argument("--arch", default="auto", choices=EXPORT_ARCHS,
                   help="auto: the teacher's architecture; llama: a Qwen2 student written as a Llama with attention "
                        "biases and a zero o_proj bias (the same logits), for llama.cpp and other stacks whose Qwen2 "
                        "assumes heads x head_dim = hidden size")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _add_demo_parser(sub) -> None:
    """`red demo`: the DemoConfig fields as flags."""
    from red.commands.demo.run import DemoConfig
    p = sub.add_parser("demo", help="show reasoning collapse (lrc) and RED's fix on the bundled tiny teacher",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Distill the bundled teacher on k<=2 problems with each preset, score every "
                                   "model on held-out problems of every k, write report.json and PNG plots.")
    p.add_argument("--quiet", action="store_true", help="no progress output (default: False)")
    _add_config_options(p, DemoConfig)


def _add_eval_parser(sub) -> None:
    """`red eval`: the synthetic benchmark and lm-eval tasks."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("eval", help="score a model: synthetic reasoning benchmark, optional lm-eval tasks",
                       formatter_class=fmt)
    p.add_argument("--model", required=True, help="model folder (e.g. OUT/student)")
    p.add_argument("--ks", default="1-6", help="step counts of the synthetic benchmark")
    p.add_argument("--n-per-k", type=int, default=200, help="held-out problems per k (0 skips the synthetic benchmark)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out problems")
    p.add_argument("--lm-eval-tasks", default="", help="comma-separated lm-evaluation-harness tasks, e.g. gsm8k,arc_easy (needs red[lm-eval])")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for lm-eval tasks (task default if unset)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation length for lm-eval generative tasks")
    p.add_argument("--apply-chat-template", action="store_true", help="format lm-eval prompts with the model's chat template")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task (for quick checks only)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAML files (your own tasks, e.g. over local data); repeat for "
                        "several")
    p.add_argument("--log-samples", action="store_true",
                   help="keep lm-eval's samples (each document's prompt, responses and metrics) in the --out report")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda[:N]; "
                   "holds the model for both benchmarks")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch of both benchmarks (default: 200 problems for the synthetic one, 8 for lm-eval)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report red wrote at --out")


def _add_plan_parser(sub) -> None:
    """`red plan`: memory, communication and speed from config.json alone."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("plan", help="memory, communication and speed of a distillation run, from the teacher's config alone",
                       formatter_class=fmt, description="Print what each GPU holds (teacher, projections, gradients, "
                       "optimizer state, the step's dense weights and their gradient sums, gathered teacher layers, "
                       "activations, logits) and moves per optimizer step, for --teacher-sharding shard and replicate "
                       "side by side, so a run can be sized before it starts; --speed adds the step's FLOPs, bytes and "
                       "modelled time by part on an H100 and an H200 beside ordinary training. Reads config.json only.")
    p.add_argument("--teacher", required=True, help="teacher folder (or its config.json)")
    p.add_argument("--hidden-size", type=int, required=True, help="student width d")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=8, help="global micro-batch (--batch-size of red distill), split over the GPUs")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (--grad-accum of red distill)")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (torchrun processes)")
    p.add_argument("--teacher-sharding", default="both", choices=("shard", "replicate", "both"),
                   help="plan the teacher sharded over the GPUs, replicated on each, or both side by side")
    p.add_argument("--step-weights", default="shard", choices=("shard", "replicate"),
                   help="the student's dense step weights on several GPUs: shard (fp32 rows per GPU, gathered per "
                        "layer every micro-batch) or replicate (whole on every GPU, all-reduced once a step)")
    p.add_argument("--activation-checkpointing", action="store_true", help="plan with per-layer activation checkpointing")
    p.add_argument("--teacher-dtype", default="bfloat16", choices=TEACHER_DTYPES,
                   help="teacher weight dtype, which is the step's compute dtype")
    p.add_argument("--logits-chunk", type=int, default=0, help="rows per logits chunk of the fused KL kernel (0: its default)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (--calib-samples of red distill)")
    p.add_argument("--gpu-memory", type=float, default=80.0,
                   help="GiB per GPU; a plan whose training or start-up peak is above it is refused (exit 2)")
    p.add_argument("--disk-gb-per-s", type=float, default=1.0,
                   help="write bandwidth of the --out file system, GB/s shared by all ranks, for the checkpoint time")
    p.add_argument("--speed", action="store_true",
                   help="also print the step's FLOPs, bytes and modelled ms by part (H100, H200) and the ratio to "
                        "ordinary training")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_bench_parser(sub) -> None:
    """`red bench`: kernel and step timings on the teacher's shapes."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("bench", help="time red_kernels and the distillation step on your teacher", formatter_class=fmt,
                       description="Time every red_kernels op at the teacher's shapes against its eager composition "
                       "(ms, peak memory, achieved TB/s or TFLOP/s, fraction of the device ceiling measured in the same "
                       "run) and one training step (red's own train_step over --grad-accum micro-batches) per kernel "
                       "backend (tokens/s, peak memory), against ordinary training of the exported student on the same "
                       "micro-batches and the teacher's forward alone (ratio, and the floor ordinary/(ordinary + teacher "
                       "forward)); then count the kernels a RED micro-batch launches against an ordinary one, per layer. "
                       "Token ids are random; the student is a random channel selection. On the CPU only the first 2 "
                       "layers are timed unless --layers is given.")
    p.add_argument("--teacher", required=True, help="teacher folder (Llama/Qwen2/Qwen3, safetensors)")
    p.add_argument("--hidden-size", type=int, required=True, help="student width d (0 < d < teacher's D)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--kernels", default=None, help="comma-separated red_kernels backends to time: torch,triton "
                   "(None: both on CUDA, torch on the CPU)")
    p.add_argument("--layers", type=int, default=None, help="time only the first N decoder layers "
                   "(None: all on CUDA, 2 on the CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="compute dtype: auto is bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--compile", action="store_true", help="also time the torch path with each layer under torch.compile")
    p.add_argument("--no-ordinary", action="store_true", help="skip the ordinary-training baseline")
    p.add_argument("--no-op-counts", action="store_true",
                   help="skip counting the kernels of a RED and an ordinary micro-batch (two more steps of each)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress still goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _add_analyze_parser(sub) -> None:
    """`red analyze`: per-layer eRank of teacher and student."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("analyze", help="per-layer eRank of teacher vs student, projection spectra", formatter_class=fmt)
    p.add_argument("--teacher", required=True, help="teacher folder")
    p.add_argument("--student", required=True, help="a `red distill` run folder or an exported model folder")
    p.add_argument("--data", required=True, help="corpus to take sequences from")
    p.add_argument("--out", default=None, help="folder for analysis.json and PNG plots (default: none)")
    p.add_argument("--samples", type=int, default=8, help="sequences to analyze")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet")


#: one parser builder per command, in the order `red --help` lists them
PARSER_BUILDERS = (_add_distill_parser, _add_prepare_parser, _add_calibrate_parser, _add_export_parser,
                   _add_demo_parser, _add_eval_parser, _add_plan_parser, _add_bench_parser, _add_import_parser,
                   _add_analyze_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="red", description="RED distillation: narrow a Hugging Face teacher "
                                     "into a student that keeps its reasoning.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add_parser in PARSER_BUILDERS:
        add_parser(sub)
    return parser


def _and_plots(folder) -> str:
    """" and plots" when the folder holds PNGs (matplotlib is an optional extra)."""
    return " and plots" if any(Path(folder).glob("*.png")) else ""


def _cmd_distill(args) -> int:
    from red.config import make_config

    overrides = {f.name: getattr(args, f.name) for f in fields(DistillConfig) if f.metadata.get("cli") is not False}
    cfg = make_config(args.config, **overrides)  # validates: config errors answer before torch is imported
    from red.commands.checks import check_distill_inputs

    inputs = check_distill_inputs(cfg)  # wrong paths, architecture or width: also before torch
    from red.commands.distill import distill

    result = distill(cfg, progress=not args.quiet, inputs=inputs)
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports
    last = [r for r in result.metrics.rows if "val_loss" in r]
    tail = f"; final val_loss {last[-1]['val_loss']:.4f}, eRank {last[-1]['erank_last']:.2f}" if last else ""
    print(f"student written to {result.out / 'student'}{tail}")
    return 0


def _cmd_prepare(args) -> int:
    from red.commands.prepare import prepare

    store = prepare(args.data, args.tokenizer, args.out, text_field=args.text_field, txt_split=args.txt_split,
                    val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, append=args.append,
                    overwrite=args.overwrite, trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    m = store.manifest
    part = m["parts"][-1]
    print(f"token store {args.out}: {part['tokens']:,} tokens in {part['documents']:,} documents added "
          f"({m['tokens']:,} tokens, {len(m['parts'])} part(s) in all; {m['dtype']}; fingerprint {m['fingerprint']})")
    return 0


def _cmd_calibrate(args) -> int:
    from red.config import DEVICE, at_least, check_values

    check_values({"--calib-samples": args.calib_samples, "--seq-len": args.seq_len, "--device": args.device},
                 (("--calib-samples", at_least(1)), ("--seq-len", at_least(2)), ("--device", DEVICE)))
    from red.commands.checks import check_calibrate_inputs

    check_calibrate_inputs(args.teacher, args.data, args.out, args.overwrite)  # paths answer before torch
    from red.train.calibration import channel_scores
    from red.commands.calibrate import run_calibration

    cal = run_calibration(args.teacher, args.data, args.out, args.calib_samples, args.seq_len, args.text_field,
                          args.txt_split, args.device, args.overwrite, progress=not args.quiet)
    top = channel_scores(cal).topk(min(8, cal.hidden_size)).indices.tolist()
    print(f"calibration of {cal.num_sequences} sequences x {cal.tokens_per_seq} tokens written to {args.out}; "
          f"top channels {top}")
    return 0


def _cmd_export(args) -> int:
    from red.commands.checks import check_export_inputs

    check_export_inputs(args.run, args.out, args.checkpoint, args.overwrite)  # paths answer before torch
    from red.commands.export import export_run

    out = export_run(args.run, args.out, args.checkpoint, args.dtype, args.overwrite, arch=args.arch)
    print(f"exported to {out}")
    return 0


def _cmd_analyze(args) -> int:
    from red.commands.checks import check_analyze_paths

    check_analyze_paths(args.teacher, args.student, args.data, args.out)  # before torch is imported
    from red.commands.analyze import analyze, check_analyze_inputs, check_analyze_models, format_report, load_run_student
    from red.data.corpus import load_corpus
    from red.model.teacher import load_teacher

    check_analyze_inputs(args.samples, args.seq_len, args.out)
    check_analyze_models(args.teacher, args.student)
    teacher, tok = load_teacher(args.teacher)
    sp = Path(args.student)
    if (sp / "run.yaml").is_file():
        student, _, _ = load_run_student(sp)
    else:
        student, _ = load_teacher(sp, with_tokenizer=False)
    corpus = load_corpus(args.data, tok, args.seq_len, 0.5, args.text_field)
    ids = corpus.train[: args.samples]
    report = analyze(teacher, student, ids, args.out)
    print(format_report(report))
    if args.out:
        print(f"analysis.json{_and_plots(args.out)} written to {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from red.commands.demo.run import DemoConfig, format_table, run_demo
    from red.commands.eval import parse_ks

    given = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if getattr(args, f.name) is not None}
    if given.get("init_std") == "null":
        given["init_std"] = None
    report = run_demo(DemoConfig(**given), progress=not args.quiet)
    print(format_table(report, parse_ks(report["config"]["eval_ks"])))
    print(f"report.json{_and_plots(report['config']['out'])} written to {report['config']['out']}")
    return 0


def _cmd_eval(args) -> int:
    import json

    from red.commands.eval import evaluate_model

    report = evaluate_model(args.model, args.ks, args.n_per_k, args.seed, args.lm_eval_tasks, args.num_fewshot,
                            args.max_gen_toks, args.apply_chat_template, args.limit, args.out,
                            device=args.device, batch_size=args.batch_size, overwrite=args.overwrite,
                            include_paths=args.include_path or (), log_samples=args.log_samples)
    syn = report.get("synthetic")
    if syn:
        ks = [k for k in syn if k.startswith("k")]
        print("  ".join(f"{k}={100 * syn[k]:.0f}%" for k in ks)
              + f"  general={100 * syn['general']:.0f}%"
              + (f"  reasoning={100 * syn['reasoning']:.0f}%" if syn["reasoning"] is not None else ""))
    if "lm_eval" in report:  # the scores; the whole record (task configs, versions, samples) is in --out
        lm = report["lm_eval"]
        print(json.dumps({"settings": lm["settings"], "results": lm["results"]}, indent=1))
    return 0


def _cmd_plan(args) -> int:
    from red.config import at_least, check_values, validate_plan_inputs

    validate_plan_inputs(args.hidden_size, args.seq_len, args.micro_batch, args.gpus, args.logits_chunk)
    check_values({"--grad-accum": args.grad_accum}, (("--grad-accum", at_least(1, "pass 1 or more micro-batches")),))
    for flag, v in (("--gpu-memory", args.gpu_memory), ("--disk-gb-per-s", args.disk_gb_per_s),
                    ("--calib-samples", args.calib_samples)):
        if not v > 0 or v != v or v == float("inf"):
            raise RedError(f"{flag} {v} must be a positive number")
    from red.commands.checks import check_plan_inputs

    check_plan_inputs(args.teacher, args.hidden_size)  # before torch is imported
    from red.commands.plan import plan_command

    print(plan_command(args))
    return 0


def _cmd_bench(args) -> int:
    import json

    from red.config import DEVICE, at_least, check_values

    check_values({"--device": args.device, "--seq-len": args.seq_len, "--batch-size": args.batch_size,
                  "--grad-accum": args.grad_accum, "--steps": args.steps, "--layers": args.layers},
                 (("--device", DEVICE), ("--seq-len", at_least(2)), ("--batch-size", at_least(1)),
                  ("--grad-accum", at_least(1)), ("--steps", at_least(1)), ("--layers", at_least(1))))
    from red.commands.checks import check_bench_inputs

    check_bench_inputs(args.teacher, args.hidden_size, args.seq_len)  # before torch is imported
    from red.commands.bench import format_report, run_bench

    def progress(row):
        what = f"{row['name']}[{row.get('impl') or row.get('variant') or ''}]"
        took = (f"{row['ms']:.4g} ms" if "ms" in row else f"RED/ordinary {row['ratio']:.2f}x") \
            if row.get("status") == "ok" else f"{row.get('status')}: {row.get('error', '')}"
        print(f"red bench: {what} {took}", file=sys.stderr, flush=True)

    res = run_bench(args.teacher, args.hidden_size, args.seq_len, args.batch_size, args.kernels, args.layers,
                    args.steps, args.device, args.precision, include_compile=args.compile,
                    include_ordinary=not args.no_ordinary, grad_accum=args.grad_accum,
                    include_op_counts=not args.no_op_counts, on_row=None if args.quiet else progress)
    print(json.dumps(res, indent=1) if args.json else format_report(res))
    return 0


def _cmd_import(args) -> int:
    from red.commands.import_gguf import import_command

    print(import_command(args.gguf, args.out, args.dtype, args.overwrite, progress=not args.quiet))
    return 0


COMMANDS = {"import": _cmd_import, "prepare": _cmd_prepare, "plan": _cmd_plan, "bench": _cmd_bench, "demo": _cmd_demo, "eval": _cmd_eval, "distill": _cmd_distill, "calibrate": _cmd_calibrate, "export": _cmd_export, "analyze": _cmd_analyze}


def main(argv: list[str] | None = None) -> int:
    """Run one `red` command; returns the exit code (2 for any user error, one line)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(f"red {args.command}: error: unrecognized arguments: {' '.join(extra)}; see red {args.command} --help",
              file=sys.stderr)
        return 2
    quiet = _launched_by_torchrun() and os.environ.get("RANK", "0") != "0"  # rank 0 alone reports
    try:
        return COMMANDS[args.command](args)
    except RedError as e:
        if not quiet:
            print(f"red {args.command}: error: {e}", file=sys.stderr)
        _order_error_exit(quiet)
        return 2
    except KeyboardInterrupt:
        print(f"red {args.command}: interrupted; completed checkpoints are kept", file=sys.stderr)
        return 130
    except Exception as e:
        # the last line of defence for a disk that fills up or fails under a write no
        # writer turned into a RedError itself: one line, and what was saved stays
        if not _is_disk_error(e):
            raise
        if not quiet:
            print(f"red {args.command}: error: a write failed ({' '.join(str(e).split())[:200]}); free space or "
                  "fix the disk, then run again (a run continues with --resume from its last complete checkpoint)",
                  file=sys.stderr)
        _order_error_exit(quiet)
        return 2


def _order_error_exit(quiet: bool) -> None:
    """Under torchrun rank 0 alone prints the error; it says when it has, and the other
    ranks wait for that (bounded) so that their exit cannot get rank 0 stopped first."""
    if not _launched_by_torchrun():
        return
    from red.distributed import mark_error_reported, wait_for_error_report

    if quiet:
        wait_for_error_report()
    else:
        sys.stderr.flush()
        mark_error_reported()


def _is_disk_error(e: BaseException) -> bool:
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
    return type(e).__name__ == "SafetensorError" and "I/O error" in str(e)


def run(argv: list[str] | None = None) -> int:
    """``python -m red`` / the ``red`` script. Under torchrun the process group is torn
    down and the process leaves with ``os._exit``: gloo groups can abort at interpreter
    exit after the work is done, which would turn a finished run into a failed exit code."""
    rc = main(argv)
    if _launched_by_torchrun():
        dist = sys.modules.get("torch.distributed")  # no process group unless the work imported it
        if dist is not None and dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    raise SystemExit(run())
