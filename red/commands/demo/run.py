"""`red demo`: reasoning collapse and RED's fix, in minutes on a CPU.

A bundled tiny teacher (``--teacher llama``, the default, or ``--teacher qwen3``) solves
chains of mod-10 arithmetic (k steps). Students of half its width are distilled on
"general" data that hold *no* long chain (problems with k <= 2 only, ``--long-share 0``),
with the `lrc` preset and the `red` preset (same steps, data and seeds); then every model
is scored on held-out problems for every k. k <= 2 accuracy and held-out next-token loss
are the "general" score, k >= 3 accuracy the "reasoning" score. The k <= 2 data hold
every token and token bigram of a long chain (the task draws the step names per problem,
see red.commands.demo.task), so a student that fails at k >= 3 has lost a skill, not missed a word.

A fair baseline: every run with the Gaussian (LRC) init gets its learning rate from a
small grid (``--lr-grid``), chosen on the first seed by the student's next-token loss on
the validation split of the *general* corpus at the last step (the run's ``val_lm``),
never by reasoning accuracy, at the same step budget as every other run; the other seeds
reuse that learning rate. ``--tune-lr all`` tunes every run the same way, ``none`` none.
The losing grid runs are not scored on reasoning at all.
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

from red.errors import RedError


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

ASSETS = Path(__file__).resolve().parents[2] / "assets"  # red/assets
TEACHERS = {"llama": ASSETS / "demo-teacher", "qwen3": ASSETS / "demo-teacher-qwen3"}
TEACHER_DIR = TEACHERS["llama"]
TUNE_CHOICES = ("gaussian", "all", "none")
DEMO_ENTRIES = ("general.txt", "general-store", "runs", "report.json", "report.partial.json", "table.txt",
                "accuracy_vs_k.png", "general_vs_reasoning.png", "erank_layers.png", "spectra.png",
                "loss_curves.png")  # what `red demo` writes in its folder
TUNE_CRITERION = "val_lm"  # the student's next-token loss on the general corpus's validation split


@dataclass
class DemoConfig:
    """Options of `red demo`; the defaults are the run the README reports."""

    out: str = field(default="red-demo", metadata={"help": "output folder"})
    teacher: str = field(default="llama", metadata={"help": "llama or qwen3 (the bundled teachers), or a Hugging Face model folder"})
    hidden_size: int = field(default=64, metadata={"help": "student width (the teachers' is 128)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps per student (the same for every run, grid runs included)"})
    batch_size: int = field(default=12, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed sequence"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate of the runs that are not tuned"})
    lr_grid: str = field(default="4e-3,8e-3,1.6e-2", metadata={"help": "learning rates tried for a tuned run (picked by general validation loss only)"})
    lr_grid_extend: int = field(default=2, metadata={"help": "when the pick is the grid's largest (smallest) lr, try up to this many more, each one step of the grid's outer ratio beyond it (still by general validation loss)"})
    tune_lr: str = field(default="gaussian", metadata={"help": "runs whose lr is tuned on --lr-grid: gaussian (every run with the lrc init), all, none"})
    presets: str = field(default="lrc,red", metadata={"help": "comma-separated presets to distill"})
    inits: str = field(default="", metadata={"help": "extra ablation inits run with the red preset's losses: orthogonal, random-select, lrc"})
    kl_reductions: str = field(default="", metadata={"help": "comma-separated KL reductions (sum, mean) each run is repeated with; empty: each preset's own"})
    seeds: str = field(default="0", metadata={"help": "comma-separated seeds; each run is repeated per seed"})
    init_std: Optional[float] = field(default=None, metadata={"help": "std of the lrc init; null = 1/sqrt(D) (LRC's 0.02 is ~1/sqrt(D) at D~2500)"})
    general_problems: int = field(default=20000, metadata={"help": "problems in the distillation corpus"})
    general_ks: str = field(default="1-2", metadata={"help": "step counts of the distillation corpus"})
    long_share: float = field(default=0.0, metadata={"help": "share of the corpus drawn from --long-ks (0, the default: no long chain at all)"})
    long_ks: str = field(default="3-6", metadata={"help": "step counts of the long-chain share"})
    eval_ks: str = field(default="1-6", metadata={"help": "step counts evaluated"})
    n_per_k: int = field(default=100, metadata={"help": "held-out problems per k"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})


@dataclass(frozen=True)
class RunSpec:
    name: str                    # row of the table
    preset: str
    init: Optional[str]          # None: the preset's
    kl_reduction: Optional[str]  # None: the preset's
    tuned: bool                  # lr picked from --lr-grid on general validation loss

    @property
    def folder(self) -> str:
        return self.name.replace("/", "-")


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _runs(cfg: DemoConfig) -> list[RunSpec]:
    from red.config import INITS, KL_REDUCTIONS, PRESETS, DistillConfig

    if cfg.tune_lr not in TUNE_CHOICES:
        raise RedError(f"unknown --tune-lr {cfg.tune_lr!r}; use {', '.join(TUNE_CHOICES)}")
    reductions = _split(cfg.kl_reductions)
    for r in reductions:
        if r not in KL_REDUCTIONS:
            raise RedError(f"unknown KL reduction {r!r} in --kl-reductions; use {', '.join(KL_REDUCTIONS)}")
    base = []
    for p in _split(cfg.presets):
        if p not in PRESETS:
            raise RedError(f"unknown preset {p!r} in --presets; use {', '.join(PRESETS)}")
        base.append((p, p, None))
    for i in _split(cfg.inits):
        if i not in INITS:
            raise RedError(f"unknown init {i!r} in --inits; use {', '.join(INITS)}")
        base.append((f"red-loss+{i}", "red", i))
    if not base:
        raise RedError("nothing to run: give at least one preset or init")
    runs = []
    for name, preset, init in base:
        eff_init = init or PRESETS[preset].get("init", DistillConfig.init)
        tuned = cfg.tune_lr == "all" or (cfg.tune_lr == "gaussian" and eff_init == "lrc")
        for r in reductions or [None]:
            runs.append(RunSpec(f"{name}/{r}" if r else name, preset, init, r, tuned))
    return runs


def lr_grid(cfg: DemoConfig) -> list[float]:
    try:
        grid = [float(x) for x in _split(cfg.lr_grid)]
    except ValueError:
        raise RedError(f"--lr-grid {cfg.lr_grid!r} is not a comma-separated list of learning rates") from None
    if not grid or any(not (g > 0) for g in grid):
        raise RedError(f"--lr-grid must list positive learning rates (got {cfg.lr_grid!r})")
    if cfg.lr_grid_extend < 0:
        raise RedError(f"--lr-grid-extend must be 0 or more (got {cfg.lr_grid_extend})")
    return sorted(set(grid))


def general_val_loss(metrics_rows: list[dict]) -> float:
    """The tuning criterion: ``val_lm`` (the student's next-token cross-entropy on the
    validation split of the general distillation corpus) at the last evaluation."""
    vals = [r[TUNE_CRITERION] for r in metrics_rows if TUNE_CRITERION in r]
    if not vals:
        raise RedError(f"the run logged no {TUNE_CRITERION}; cannot tune its learning rate")
    return float(vals[-1])


def at_grid_edge(lr: float, grid) -> bool:
    """True when the picked ``lr`` is the grid's smallest or largest (of two or more): the
    best learning rate may then lie outside the grid, and the report says so."""
    return len(set(grid)) > 1 and lr in (min(grid), max(grid))


def next_lr(lr: float, tried) -> float:
    """The learning rate one step beyond the grid edge ``lr``: the outer ratio of the tried
    values (sorted) repeated past it, rounded to 6 significant digits."""
    g = sorted(set(tried))
    beyond = g[-1] * g[-1] / g[-2] if lr == g[-1] else g[0] * g[0] / g[1]
    return float(f"{beyond:.6g}")


def pick_lr(grid_losses: dict[float, float]) -> float:
    """The learning rate with the lowest general validation loss (the smaller lr on a tie;
    a non-finite loss never wins). Reasoning accuracy is not an argument: it cannot count."""
    finite = {lr: v for lr, v in grid_losses.items() if v == v and v != float("inf")}
    if not finite:
        raise RedError("every learning rate of --lr-grid diverged; give smaller ones")
    return min(sorted(finite), key=lambda lr: finite[lr])


@_no_grad
def heldout_nll(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of a causal LM on packed held-out text."""
    logits = model(input_ids=ids).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)))


def write_general_corpus(path: Path, n: int, ks, long_ks, long_share: float, seed: int = 0) -> None:
    """The distillation corpus: (1 - long_share) of n problems with k in ``ks``, the rest
    with k in ``long_ks``, shuffled; training split only (held-out questions never occur)."""
    import random

    from red.commands.demo.task import format_problem, iter_problems

    if not 0 <= long_share < 1:
        raise RedError(f"--long-share must be in [0, 1) (got {long_share})")
    n_long = int(round(n * long_share))
    texts = [format_problem(p) for p in iter_problems(ks, "train", seed, n - n_long)]
    if n_long:
        texts += [format_problem(p) for p in iter_problems(long_ks, "train", seed + 1, n_long)]
    random.Random(seed).shuffle(texts)
    path.write_text("\n".join(texts) + "\n")


def _heldout_text_ids(tok, ks, seq_len, n_blocks, seed=123):
    from red.data.corpus import pack, tokenize_documents
    from red.commands.demo.task import format_problem, generate_problems

    probs = generate_problems(n_blocks * seq_len // 40 + 50, ks, "heldout", seed)
    ids = pack(tokenize_documents([format_problem(p) for p in probs], tok), seq_len)
    return ids[:n_blocks]


def _machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def resolve_teacher(name: str) -> Path:
    """``llama``/``qwen3`` (or empty): a bundled teacher; anything else: a model folder."""
    if name in ("", *TEACHERS):
        folder = TEACHERS[name or "llama"]
        if not (folder / "config.json").is_file():
            raise RedError(f"demo teacher not found at {folder}; reinstall red or pass --teacher")
        return folder
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise RedError(f"--teacher {folder} has no config.json; pass llama, qwen3 or a Hugging Face model folder")
    return folder


def evaluate_reasoning(*args, **kwargs):
    """red.commands.demo.task.evaluate_reasoning (a module-level name, so that tests can watch
    which models are scored on reasoning)."""
    from red.commands.demo.task import evaluate_reasoning as ev

    return ev(*args, **kwargs)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the demo; writes report.json and PNG plots to ``cfg.out`` and returns the report."""
    from red.commands.eval import parse_ks

    t_start = time.perf_counter()
    # every option is checked before the slow imports and before anything is written
    teacher_dir = resolve_teacher(cfg.teacher)
    runs = _runs(cfg)
    grid = lr_grid(cfg)
    try:
        seeds = [int(s) for s in _split(cfg.seeds)]
    except ValueError:
        raise RedError(f"--seeds {cfg.seeds!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise RedError("--seeds is empty; give at least one seed, e.g. --seeds 0")
    eval_ks, gen_ks, long_ks = parse_ks(cfg.eval_ks), parse_ks(cfg.general_ks), parse_ks(cfg.long_ks)
    if not 0 <= cfg.long_share < 1:
        raise RedError(f"--long-share must be in [0, 1) (got {cfg.long_share})")
    from red.config import POSITIVE, at_least, check_values

    check_values({"--hidden-size": cfg.hidden_size, "--steps": cfg.steps, "--batch-size": cfg.batch_size,
                  "--seq-len": cfg.seq_len, "--lr": cfg.lr, "--n-per-k": cfg.n_per_k,
                  "--general-problems": cfg.general_problems, "--threads": cfg.threads},
                 (("--hidden-size", at_least(1)), ("--steps", at_least(1)), ("--batch-size", at_least(1)),
                  ("--seq-len", at_least(2)), ("--lr", POSITIVE),
                  ("--n-per-k", at_least(1, "every model is scored on --n-per-k held-out problems per k")),
                  ("--general-problems", at_least(1)), ("--threads", at_least(0))))

    from red.files import prepare_output

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # the demo's own names only: what the folder held before is never claimed or replaced
    folder = prepare_output(cfg.out, cfg.overwrite, DEMO_ENTRIES)
    try:
        folder.own(*DEMO_ENTRIES)  # so that --overwrite replaces exactly these
        return _run_demo(cfg, folder.root, teacher_dir, runs, grid, seeds, eval_ks, gen_ks, long_ks, t_start,
                         progress)
    finally:
        folder.unlock()


def _run_demo(cfg: DemoConfig, out: Path, teacher_dir: Path, runs, grid, seeds, eval_ks, gen_ks, long_ks,
              t_start: float, progress: bool) -> dict:
    """``run_demo`` once its folder is ready and locked."""
    from red.config import make_config
    from red.model.metrics import layer_eranks
    from red.commands.distill import distill
    from red.files import OwnedFolder
    from red.model.teacher import load_teacher

    runs_dir = OwnedFolder(out / "runs", what="demo runs folder")  # lists each run folder the demo made

    teacher, tok = load_teacher(teacher_dir)
    D = teacher.config.hidden_size
    store, probe, probe_general = _demo_data(cfg, out, tok, eval_ks, gen_ks, long_ks)

    def score(model):
        t0 = time.perf_counter()
        acc = evaluate_reasoning(model, tok, ks=eval_ks, n_per_k=cfg.n_per_k, seed=0)
        return {"accuracy": acc, "layer_erank": layer_eranks(model, probe),
                "heldout_nll_general": heldout_nll(model, probe_general), "eval_s": time.perf_counter() - t0}

    def train(spec: RunSpec, seed: int, lr: float, folder: str):
        t0 = time.perf_counter()
        extra = {"kl_reduction": spec.kl_reduction} if spec.kl_reduction else {}
        dc = make_config(teacher=str(teacher_dir), data=str(store.root), hidden_size=cfg.hidden_size,
                         out=str(out / "runs" / folder), preset=spec.preset, init=spec.init, steps=cfg.steps,
                         batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=lr, seed=seed,
                         init_std=cfg.init_std if cfg.init_std is not None else "null", warmup=0.05,
                         eval_every=max(1, cfg.steps // 5), save_every=cfg.steps, log_every=5, val_batches=4,
                         overwrite=cfg.overwrite, **extra)  # a rerun with --overwrite replaces the earlier runs
        if progress:
            print(f"[demo] distilling {spec.name} (seed {seed}): init {dc.init}, T={dc.temperature}, "
                  f"KL {dc.kl_reduction}, lr {lr:g}, {cfg.steps} steps")
        runs_dir.own(folder)  # refused if the user has a folder of that name there
        res = distill(dc, progress=progress)
        return dc, res, time.perf_counter() - t0

    if progress:
        print(f"[demo] teacher {teacher_dir.name} ({teacher.config.model_type}): width {D}; "
              f"evaluating on {len(eval_ks)} k x {cfg.n_per_k} problems")
    report: dict = {"config": asdict(cfg), "machine": _machine(), "teacher_dir": str(teacher_dir),
                    "teacher_type": teacher.config.model_type, "teacher": score(teacher), "runs": [],
                    "tuning": {}}
    for spec in runs:
        for i, seed in enumerate(seeds):
            if spec.tuned and i == 0:
                lr, (dc, res, train_s), report["tuning"][spec.name] = _tune_lr(cfg, spec, seed, grid, train, progress)
            else:
                lr = report["tuning"][spec.name]["chosen_lr"] if spec.tuned else cfg.lr
                dc, res, train_s = train(spec, seed, lr, f"{spec.folder}-s{seed}")
            row = _run_row(cfg, spec, seed, lr, dc, res, train_s, teacher, score, probe)
            report["runs"].append(row)
            # the runs so far, in case the demo is stopped (report.json is rewritten whole at the end)
            (out / "report.partial.json").write_text(json.dumps(report))
            if progress:
                a = row["accuracy"]
                print(f"[demo] {spec.name} s{seed}: general {a['general']:.2f}, reasoning {a['reasoning']:.2f} "
                      f"({train_s:.0f}s train)")
    _finish_report(report, out, eval_ks, t_start)
    return report


def _demo_data(cfg: DemoConfig, out: Path, tok, eval_ks, gen_ks, long_ks):
    """``(store, probe, probe_general)``: the general corpus written and tokenized once for
    every run, and the held-out blocks every model's eRank (all k) and next-token loss
    (general k) are measured on."""
    from red.config import DEFAULT_VAL_FRACTION
    from red.data.store import prepare_store

    data = out / "general.txt"
    write_general_corpus(data, cfg.general_problems, gen_ks, long_ks, cfg.long_share)
    # tokenized once for every run: the store a run would make of general.txt itself
    # (same split settings), so the runs read the same blocks without re-tokenizing
    store = prepare_store([str(data)], out / "general-store", tok, val_fraction=DEFAULT_VAL_FRACTION,
                          seed=0, overwrite=cfg.overwrite, progress=False)
    probe = _heldout_text_ids(tok, eval_ks, cfg.seq_len, 8)
    probe_general = _heldout_text_ids(tok, gen_ks, cfg.seq_len, 8, seed=321)
    return store, probe, probe_general


def _tune_lr(cfg: DemoConfig, spec: RunSpec, seed: int, grid: list, train, progress: bool):
    """The grid, on the first seed: ``(lr, (config, result, train seconds) of the winning run,
    the report's tuning entry)``. The winner is that seed's run; the rest are recorded by
    their general validation loss and never scored on reasoning. A pick at an edge of the
    grid may not be the best, so the grid is stepped past it, --lr-grid-extend times at most."""
    tried, losses, extended = {}, {}, []

    def attempt(lr):
        tried[lr] = train(spec, seed, lr, f"{spec.folder}-lr{lr:g}-s{seed}")
        losses[lr] = general_val_loss(tried[lr][1].metrics.rows)

    for lr in grid:
        attempt(lr)
    lr = pick_lr(losses)
    while at_grid_edge(lr, list(tried)) and len(extended) < cfg.lr_grid_extend:
        extended.append(next_lr(lr, tried))
        if progress:
            print(f"[demo] {spec.name}: {lr:g} is the grid's edge; trying {extended[-1]:g}")
        attempt(extended[-1])
        lr = pick_lr(losses)
    tuning = {"seed": seed, "criterion": TUNE_CRITERION, "chosen_lr": lr, "steps": cfg.steps,
              "at_edge": at_grid_edge(lr, list(tried)), "extended": extended,
              "grid": [{"lr": g, TUNE_CRITERION: losses[g], "train_s": tried[g][2]} for g in sorted(tried)]}
    if progress:
        print(f"[demo] {spec.name}: lr {lr:g} has the lowest general validation loss of "
              + ", ".join(f"{g:g}: {v:.4f}" for g, v in losses.items()))
        if at_grid_edge(lr, list(tried)):
            print(f"[demo] note: {lr:g} is still at the edge of the learning rates tried; a wider "
                  "--lr-grid (or --lr-grid-extend) may find a better one")
    return lr, tried[lr], tuning


def _run_row(cfg: DemoConfig, spec: RunSpec, seed: int, lr: float, dc, res, train_s: float, teacher, score,
             probe) -> dict:
    """One run's row of the report: its settings, the distilled student's scores, the eRank
    of its own initialization (rebuilt) and at the end, its metrics and projection spectra."""
    from transformers import AutoModelForCausalLM

    from red.model.metrics import layer_eranks
    from red.train.startup import build_student

    student = AutoModelForCausalLM.from_pretrained(res.out / "student").eval()
    torch.manual_seed(seed)  # the run's own initialization, rebuilt for its eRank at step 0
    init_student = build_student(teacher, cfg.hidden_size, dc.init, res.calibration, dc.score,
                                 dc.init_std, dc.norm_eps, seed)
    row = {"name": spec.name, "preset": spec.preset, "init": dc.init, "seed": seed,
           "temperature": dc.temperature, "kl_reduction": dc.kl_reduction, "lr": lr, "tuned": spec.tuned,
           "out": str(res.out), "train_s": train_s, **score(student),
           "layer_erank_step0": layer_eranks(init_student, probe),
           "val_lm": general_val_loss(res.metrics.rows),
           "metrics": res.metrics.rows,
           "projection_singular_values": {
               n: torch.linalg.svdvals(p.detach().double()).tolist()
               for n, p in res.student.projections().items()}}
    del init_student
    evals = [r for r in res.metrics.rows if "erank_last" in r]
    row["erank_last_step0"] = evals[0]["erank_last"] if evals and evals[0]["step"] == 0 else None
    row["erank_last_final"] = evals[-1]["erank_last"] if evals else None
    return row


def _finish_report(report: dict, out: Path, eval_ks, t_start: float) -> None:
    """The summary over seeds and the wall time added; report.json, the plots and table.txt
    written, and the partial report (kept in case the demo stopped) removed."""
    report["summary"] = summarize(report, eval_ks)
    report["wall_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.partial.json").unlink(missing_ok=True)
    plot_demo(report, out, eval_ks)
    table = format_table(report, eval_ks)
    (out / "table.txt").write_text(table + "\n")


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _mean_curve(curves):
    curves = [c for c in curves if c]
    if not curves:
        return None
    return [statistics.fmean(v) for v in zip(*curves)]


def summarize(report: dict, ks) -> dict:
    """Mean and spread over seeds, per run name; the teacher as its own row."""
    names = list(dict.fromkeys(r["name"] for r in report["runs"]))
    out = {}
    t = report["teacher"]
    out["teacher"] = {"n": 1, **{f"k{k}": (t["accuracy"][f"k{k}"], 0.0) for k in ks},
                      "general": (t["accuracy"]["general"], 0.0), "reasoning": (t["accuracy"]["reasoning"], 0.0),
                      "heldout_nll_general": (t["heldout_nll_general"], 0.0),
                      "erank_last": (t["layer_erank"][-1], 0.0), "erank_last_step0": (None, None),
                      "train_s": (0.0, 0.0), "lr": None, "layer_erank": t["layer_erank"], "layer_erank_step0": None}
    for n in names:
        rows = [r for r in report["runs"] if r["name"] == n]
        s = {"n": len(rows), "lr": rows[0]["lr"], "tuned": rows[0]["tuned"], "init": rows[0]["init"],
             "temperature": rows[0]["temperature"], "kl_reduction": rows[0]["kl_reduction"]}
        for k in ks:
            s[f"k{k}"] = _mean_std([r["accuracy"][f"k{k}"] for r in rows])
        for key in ("general", "reasoning"):
            s[key] = _mean_std([r["accuracy"][key] for r in rows])
        s["heldout_nll_general"] = _mean_std([r["heldout_nll_general"] for r in rows])
        s["erank_last"] = _mean_std([r["layer_erank"][-1] for r in rows])
        s["erank_last_step0"] = _mean_std([r["layer_erank_step0"][-1] for r in rows])
        s["train_s"] = _mean_std([r["train_s"] for r in rows])
        s["layer_erank"] = _mean_curve([r["layer_erank"] for r in rows])
        s["layer_erank_step0"] = _mean_curve([r["layer_erank_step0"] for r in rows])
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

    head = f"{'model':22s}{'n':>3s}{'lr':>8s}" + "".join(f"{'k=' + str(k):>9s}" for k in ks)
    head += f"{'general':>9s}{'reason.':>9s}{'nll(k≤2)':>12s}{'eRank@0':>12s}{'eRank':>12s}{'train s':>12s}"
    lines = [head]
    for name, s in report["summary"].items():
        lr = "-" if s["lr"] is None else f"{s['lr']:g}" + ("*" if s.get("tuned") else "")
        line = f"{name:22s}{s['n']:3d}{lr:>8s}" + "".join(cell(s[f'k{k}']) for k in ks)
        line += cell(s["general"]) + cell(s["reasoning"]) + cell(s["heldout_nll_general"], False)
        line += cell(s["erank_last_step0"], False) + cell(s["erank_last"], False) + cell(s["train_s"], False)
        lines.append(line)
    cfg = report["config"]
    lines.append(f"teacher {Path(report.get('teacher_dir', '')).name} ({report.get('teacher_type', '?')}); "
                 f"students of width {cfg['hidden_size']}, {cfg['steps']} steps each, distilled on k in "
                 f"{cfg['general_ks']}" + (f" plus {100 * cfg['long_share']:g}% k in {cfg['long_ks']}"
                                           if cfg["long_share"] else " only (no long chain)"))
    for name, s in report["summary"].items():
        if name != "teacher":
            lines.append(f"  {name}: init {s['init']}, T={s['temperature']:g}, KL {s['kl_reduction']}, lr {s['lr']:g}"
                         + (" (*)" if s.get("tuned") else ""))
    for name, t in report.get("tuning", {}).items():
        lines.append(f"(*) {name}: lr {t['chosen_lr']:g} of the grid "
                     + ", ".join(f"{g['lr']:g} ({t['criterion']} {g[t['criterion']]:.4f})" for g in t["grid"])
                     + f": the lowest general validation loss after {t['steps']} steps, seed {t['seed']}; "
                       "reasoning accuracy played no part"
                     + (f" ({', '.join(f'{x:g}' for x in t['extended'])} tried because the pick was at the grid's edge)"
                        if t.get("extended") else "")
                     + ("; NOTE: at the edge of the grid, a wider grid may do better" if t.get("at_edge") else ""))
    lines.append(f"accuracy in % (mean±std over seeds), {cfg['n_per_k']} held-out problems per k; eRank of the last "
                 f"hidden state at step 0 and at the end; wall {report.get('wall_s', 0):.0f}s on {report['machine']}")
    return "\n".join(lines)


def plot_demo(report: dict, out: Path, ks) -> list[Path]:
    """The demo's PNG plots in ``out``; none, after one line on stderr, when matplotlib
    (the ``plots`` extra) is not installed."""
    from red.commands.plots import pyplot

    plt = pyplot("demo", "report.json")
    if plt is None:
        return []
    paths = []
    for draw, name in ((_plot_accuracy_vs_k, "accuracy_vs_k.png"),
                       (_plot_general_vs_reasoning, "general_vs_reasoning.png"),
                       (_plot_erank_layers, "erank_layers.png"), (_plot_spectra, "spectra.png"),
                       (_plot_loss_curves, "loss_curves.png")):
        fig = draw(plt, report, ks)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _plot_accuracy_vs_k(plt, report: dict, ks):
    """Held-out accuracy against the number of steps k, per model (mean ± std over seeds)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in report["summary"]:
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
    return fig


def _plot_general_vs_reasoning(plt, report: dict, ks):
    """General (k <= 2) beside reasoning (k >= 3) accuracy, one pair of bars per model."""
    names = list(report["summary"])
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(names))
    gen = [100 * (report["summary"][n]["general"][0] or 0) for n in names]
    rea = [100 * (report["summary"][n]["reasoning"][0] or 0) for n in names]
    gen_e = [100 * (report["summary"][n]["general"][1] or 0) for n in names]
    rea_e = [100 * (report["summary"][n]["reasoning"][1] or 0) for n in names]
    ax.bar([i - 0.2 for i in x], gen, 0.4, yerr=gen_e, capsize=3, label="general (k ≤ 2)")
    ax.bar([i + 0.2 for i in x], rea, 0.4, yerr=rea_e, capsize=3, label="reasoning (k ≥ 3)")
    ax.axhline(10, color="grey", ls=":", label="chance")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("General vs reasoning accuracy per model")
    ax.legend(fontsize=8)
    return fig


def _plot_erank_layers(plt, report: dict, ks):
    """Per-layer eRank of the teacher and of each student at step 0 and at the end."""
    names = list(report["summary"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(report["teacher"]["layer_erank"], marker="o", color="k", label="teacher")
    for i, n in enumerate(names[1:]):
        s = report["summary"][n]
        color = f"C{i}"
        if s["layer_erank_step0"]:
            ax.plot(s["layer_erank_step0"], marker=".", ls="--", color=color, alpha=0.8, label=f"{n}, step 0")
        ax.plot(s["layer_erank"], marker=".", color=color, label=f"{n}, end")
    ax.set_xlabel("hidden state (0 = embedding, last = after final norm)")
    ax.set_ylabel("eRank")
    ax.set_title("Per-layer effective rank on held-out problems (mean over seeds)")
    ax.legend(fontsize=7)
    return fig


def _plot_spectra(plt, report: dict, ks):
    """The singular values of every projection, one panel per run of the first seed."""
    seed0 = [r for r in report["runs"] if r["seed"] == report["runs"][0]["seed"]]
    fig, axes = plt.subplots(1, len(seed0), figsize=(4 * len(seed0), 3.5), squeeze=False)
    for ax, r in zip(axes[0], seed0):
        for sv in r["projection_singular_values"].values():
            ax.plot(sv, alpha=0.3, lw=0.8)
        ax.set_title(f"{r['name']}: projection spectra")
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
    return fig


def _plot_loss_curves(plt, report: dict, ks):
    """The training loss of every run against the step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["runs"]:
        rows = [m for m in r["metrics"] if "loss" in m]
        ax.plot([m["step"] for m in rows], [m["loss"] for m in rows], label=f"{r['name']} s{r['seed']}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (KL + LM + α·clone)")
    ax.set_title("Training loss")
    ax.legend(fontsize=7)
    return fig
