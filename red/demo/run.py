"""`red demo`: reasoning collapse and RED's fix, in minutes on a CPU.

The bundled tiny teacher solves chains of mod-10 arithmetic (k steps). Students of half
its width are distilled on "general" data (mostly problems with k <= 2, plus a small share
of longer chains, as general text holds few long reasoning chains) with the `lrc` preset
and the `red` preset (same steps, data and seeds); then every model is scored on held-out
problems for every k. k <= 2 accuracy and held-out next-token loss are the "general"
score, k >= 3 accuracy the "reasoning" score.

Why not k <= 2 only: this task names its steps in a fixed order (i, j, k, ...), so the
tokens of steps 3+ never occur in k <= 2 data and every student, RED's included, learns to
stop after two steps (measured: 100/100 % on k <= 2, chance on k >= 3 for both inits).
``--long-share 0`` reproduces that.
"""
from __future__ import annotations

import json
import platform
import statistics
import functools
import importlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import RedError


class _Lazy:
    """A module imported on first attribute access: `red demo --help` (which needs only
    DemoConfig) must not pay for importing torch."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


torch = _Lazy("torch")
F = _Lazy("torch.nn.functional")


def _no_grad(fn):
    """``@torch.no_grad()`` without importing torch at import time."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper

TEACHER_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-teacher"


@dataclass
class DemoConfig:
    """Options of `red demo`; the defaults are the run the README reports."""

    out: str = field(default="red-demo", metadata={"help": "output folder"})
    teacher: str = field(default="", metadata={"help": "teacher folder (default: the bundled demo teacher)"})
    hidden_size: int = field(default=64, metadata={"help": "student width (the teacher's is 128)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps per student"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed sequence"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (same for every student)"})
    presets: str = field(default="lrc,red", metadata={"help": "comma-separated presets to distill"})
    inits: str = field(default="", metadata={"help": "extra ablation inits run with the red preset's losses: orthogonal, random-select, lrc"})
    seeds: str = field(default="0", metadata={"help": "comma-separated seeds; each run is repeated per seed"})
    init_std: Optional[float] = field(default=None, metadata={"help": "std of the lrc init; null = 1/sqrt(D) (LRC's 0.02 is ~1/sqrt(D) at D~2500)"})
    general_problems: int = field(default=20000, metadata={"help": "problems in the distillation corpus"})
    general_ks: str = field(default="1-2", metadata={"help": "step counts of most of the distillation corpus"})
    long_share: float = field(default=0.1, metadata={"help": "share of the corpus drawn from --long-ks (0: short chains only)"})
    long_ks: str = field(default="3-6", metadata={"help": "step counts of the long-chain share"})
    eval_ks: str = field(default="1-6", metadata={"help": "step counts evaluated"})
    n_per_k: int = field(default=100, metadata={"help": "held-out problems per k"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})


def _runs(cfg: DemoConfig) -> list[tuple[str, str, Optional[str]]]:
    from ..config import PRESETS

    runs = []
    for p in [x.strip() for x in cfg.presets.split(",") if x.strip()]:
        if p not in PRESETS:
            raise RedError(f"unknown preset {p!r} in --presets; use {', '.join(PRESETS)}")
        runs.append((p, p, None))
    for i in [x.strip() for x in cfg.inits.split(",") if x.strip()]:
        if i not in ("orthogonal", "random-select", "lrc", "red"):
            raise RedError(f"unknown init {i!r} in --inits; use orthogonal, random-select, lrc or red")
        runs.append((f"red-loss+{i}", "red", i))
    if not runs:
        raise RedError("nothing to run: give at least one preset or init")
    return runs


@_no_grad
def heldout_nll(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of a causal LM on packed held-out text."""
    logits = model(input_ids=ids).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)))


def write_general_corpus(path: Path, n: int, ks, long_ks, long_share: float, seed: int = 0) -> None:
    """The distillation corpus: (1 - long_share) of n problems with k in ``ks``, the rest
    with k in ``long_ks``, shuffled; training split only (held-out questions never occur)."""
    import random

    from .task import format_problem, iter_problems

    if not 0 <= long_share < 1:
        raise RedError(f"--long-share must be in [0, 1) (got {long_share})")
    n_long = int(round(n * long_share))
    texts = [format_problem(p) for p in iter_problems(ks, "train", seed, n - n_long)]
    if n_long:
        texts += [format_problem(p) for p in iter_problems(long_ks, "train", seed + 1, n_long)]
    random.Random(seed).shuffle(texts)
    path.write_text("\n".join(texts) + "\n")


def _heldout_text_ids(tok, ks, seq_len, n_blocks, seed=123):
    from ..data import pack, tokenize_documents
    from .task import format_problem, generate_problems

    probs = generate_problems(n_blocks * seq_len // 40 + 50, ks, "heldout", seed)
    ids = pack(tokenize_documents([format_problem(p) for p in probs], tok), seq_len)
    return ids[:n_blocks]


def _machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the demo; writes report.json and PNG plots to ``cfg.out`` and returns the report."""
    from transformers import AutoModelForCausalLM

    from ..config import make_config
    from ..evaluation import parse_ks
    from ..metrics import erank, layer_eranks
    from ..pipeline import distill, prepare_output
    from ..teacher import load_teacher
    from .task import evaluate_reasoning

    t_start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    teacher_dir = Path(cfg.teacher) if cfg.teacher else TEACHER_DIR
    if not (teacher_dir / "config.json").is_file():
        if cfg.teacher:
            raise RedError(f"--teacher {teacher_dir} has no config.json; pass a Hugging Face model folder")
        raise RedError(f"demo teacher not found at {teacher_dir}; reinstall red or pass --teacher")
    runs = _runs(cfg)
    seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    eval_ks, gen_ks = parse_ks(cfg.eval_ks), parse_ks(cfg.general_ks)
    out = prepare_output(cfg.out, cfg.overwrite)

    teacher, tok = load_teacher(teacher_dir)
    D = teacher.config.hidden_size
    data = out / "general.txt"
    write_general_corpus(data, cfg.general_problems, gen_ks, parse_ks(cfg.long_ks), cfg.long_share)
    probe = _heldout_text_ids(tok, eval_ks, cfg.seq_len, 8)
    probe_general = _heldout_text_ids(tok, gen_ks, cfg.seq_len, 8, seed=321)

    def score(model, name):
        t0 = time.perf_counter()
        acc = evaluate_reasoning(model, tok, ks=eval_ks, n_per_k=cfg.n_per_k, seed=0)
        return {"accuracy": acc, "layer_erank": layer_eranks(model, probe),
                "heldout_nll_general": heldout_nll(model, probe_general), "eval_s": time.perf_counter() - t0}

    if progress:
        print(f"[demo] teacher {teacher_dir.name}: width {D}; evaluating on {len(eval_ks)} k x {cfg.n_per_k} problems")
    report: dict = {"config": asdict(cfg), "machine": _machine(), "teacher": score(teacher, "teacher"), "runs": []}
    for name, preset, init in runs:
        for seed in seeds:
            t0 = time.perf_counter()
            dc = make_config(teacher=str(teacher_dir), data=str(data), hidden_size=cfg.hidden_size,
                             out=str(out / "runs" / f"{name}-s{seed}"), preset=preset, init=init, steps=cfg.steps,
                             batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, seed=seed,
                             init_std=cfg.init_std if cfg.init_std is not None else "null", warmup=0.05,
                             eval_every=max(1, cfg.steps // 5), save_every=cfg.steps, log_every=5, val_batches=2,
                             overwrite=cfg.overwrite)  # a rerun with --overwrite replaces the earlier runs
            if progress:
                print(f"[demo] distilling {name} (seed {seed}): init {dc.init}, T={dc.temperature}, {cfg.steps} steps")
            res = distill(dc, progress=progress)
            train_s = time.perf_counter() - t0
            student = AutoModelForCausalLM.from_pretrained(res.out / "student").eval()
            row = {"name": name, "preset": preset, "init": dc.init, "seed": seed, "temperature": dc.temperature,
                   "train_s": train_s, **score(student, name),
                   "metrics": res.metrics.rows,
                   "projection_singular_values": {
                       n: torch.linalg.svdvals(p.detach().double()).tolist()
                       for n, p in res.student.projections().items()}}
            evals = [r for r in res.metrics.rows if "erank_last" in r]
            row["erank_last_step0"] = evals[0]["erank_last"] if evals and evals[0]["step"] == 0 else None
            row["erank_last_final"] = evals[-1]["erank_last"] if evals else None
            report["runs"].append(row)
            if progress:
                a = row["accuracy"]
                print(f"[demo] {name} s{seed}: general {a['general']:.2f}, reasoning {a['reasoning']:.2f} "
                      f"({train_s:.0f}s train)")
    report["summary"] = summarize(report, eval_ks)
    report["wall_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_demo(report, out, eval_ks)
    table = format_table(report, eval_ks)
    (out / "table.txt").write_text(table + "\n")
    return report


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(report: dict, ks) -> dict:
    """Mean and spread over seeds, per run name; the teacher as its own row."""
    names = list(dict.fromkeys(r["name"] for r in report["runs"]))
    out = {}
    t = report["teacher"]
    out["teacher"] = {"n": 1, **{f"k{k}": (t["accuracy"][f"k{k}"], 0.0) for k in ks},
                      "general": (t["accuracy"]["general"], 0.0), "reasoning": (t["accuracy"]["reasoning"], 0.0),
                      "heldout_nll_general": (t["heldout_nll_general"], 0.0),
                      "erank_last": (t["layer_erank"][-1], 0.0), "erank_last_step0": (None, None),
                      "train_s": (0.0, 0.0)}
    for n in names:
        rows = [r for r in report["runs"] if r["name"] == n]
        s = {"n": len(rows)}
        for k in ks:
            s[f"k{k}"] = _mean_std([r["accuracy"][f"k{k}"] for r in rows])
        for key in ("general", "reasoning"):
            s[key] = _mean_std([r["accuracy"][key] for r in rows])
        s["heldout_nll_general"] = _mean_std([r["heldout_nll_general"] for r in rows])
        s["erank_last"] = _mean_std([r["layer_erank"][-1] for r in rows])
        s["erank_last_step0"] = _mean_std([r["erank_last_step0"] for r in rows])
        s["train_s"] = _mean_std([r["train_s"] for r in rows])
        out[n] = s
    return out


def format_table(report: dict, ks) -> str:
    def cell(ms, pct=True, width=None):
        width = width or (9 if pct else 12)
        m, s = ms
        if m is None:
            return "-".rjust(width)
        txt = f"{100 * m:.0f}" if pct else f"{m:.2f}"
        if s:
            txt += f"±{100 * s:.0f}" if pct else f"±{s:.2f}"
        return txt.rjust(width)

    head = f"{'model':22s}{'n':>3s}" + "".join(f"{'k=' + str(k):>9s}" for k in ks)
    head += f"{'general':>9s}{'reason.':>9s}{'nll(k≤2)':>12s}{'eRank@0':>12s}{'eRank':>12s}{'train s':>12s}"
    lines = [head]
    for name, s in report["summary"].items():
        line = f"{name:22s}{s['n']:3d}" + "".join(cell(s[f'k{k}']) for k in ks)
        line += cell(s["general"]) + cell(s["reasoning"]) + cell(s["heldout_nll_general"], False)
        line += cell(s["erank_last_step0"], False) + cell(s["erank_last"], False) + cell(s["train_s"], False)
        lines.append(line)
    lines.append(f"accuracy in % (mean±std over seeds), {report['config']['n_per_k']} held-out problems per k; "
                 f"wall {report.get('wall_s', 0):.0f}s on {report['machine']}")
    return "\n".join(lines)


def plot_demo(report: dict, out: Path, ks) -> list[Path]:
    """The demo's PNG plots in ``out``; none, after one line on stderr, when matplotlib
    (the ``plots`` extra) is not installed."""
    from ..plots import pyplot

    plt = pyplot("demo", "report.json")
    if plt is None:
        return []
    paths = []
    names = list(report["summary"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        s = report["summary"][n]
        m = [100 * s[f"k{k}"][0] for k in ks]
        e = [100 * (s[f"k{k}"][1] or 0) for k in ks]
        ax.errorbar(ks, m, yerr=e, marker="o", capsize=3, label=n)
    ax.axhline(10, color="grey", ls=":", label="chance")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("reasoning steps k")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("Accuracy vs steps k (students distilled on general data)")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "accuracy_vs_k.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(report["teacher"]["layer_erank"], marker="o", color="k", label="teacher")
    for r in report["runs"]:
        ax.plot(r["layer_erank"], marker=".", alpha=0.8, label=f"{r['name']} s{r['seed']}")
    ax.set_xlabel("hidden state (0 = embedding, last = after final norm)")
    ax.set_ylabel("eRank")
    ax.set_title("Per-layer effective rank on held-out problems")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "erank_layers.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    seed0 = [r for r in report["runs"] if r["seed"] == report["runs"][0]["seed"]]
    fig, axes = plt.subplots(1, len(seed0), figsize=(4 * len(seed0), 3.5), squeeze=False)
    for ax, r in zip(axes[0], seed0):
        for sv in r["projection_singular_values"].values():
            ax.plot(sv, alpha=0.3, lw=0.8)
        ax.set_title(f"{r['name']}: projection spectra")
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
    fig.tight_layout()
    paths.append(out / "spectra.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["runs"]:
        rows = [m for m in r["metrics"] if "loss" in m]
        ax.plot([m["step"] for m in rows], [m["loss"] for m in rows], label=f"{r['name']} s{r['seed']}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (KL + LM + α·clone)")
    ax.set_title("Training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
