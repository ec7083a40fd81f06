"""Train the tiny teachers bundled in red/assets/demo-teacher (Llama) and
red/assets/demo-teacher-qwen3 (Qwen3: q/k-norm).

    python -m red.commands.demo.train_teacher --out red/assets/demo-teacher --seed 0
    python -m red.commands.demo.train_teacher --arch qwen3 --out red/assets/demo-teacher-qwen3 --seed 0

A small LlamaForCausalLM or Qwen3ForCausalLM trained from scratch on packed problems of every k (1..6) of
red.commands.demo.task, with the engine's packing convention (labels = input_ids). One seed drives
everything: weight init, training data, and the held-out evaluation problems. Writes
config.json, model.safetensors, generation_config.json, the tokenizer files,
train_log.jsonl and a model card README.md into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from red.commands.demo.task import (build_tokenizer, encode_document, evaluate_reasoning,
                           format_problem, generate_problems, iter_problems)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama", choices=("llama", "qwen3"),
                   help="llama, or qwen3 (Qwen3's q/k RMSNorm in every attention layer)")
    p.add_argument("--out", default="red/assets/demo-teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ks", default="1,2,3,4,5,6", help="comma-separated step counts")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-n", type=int, default=100, help="problems per k, checkpoints")
    p.add_argument("--final-eval-n", type=int, default=200, help="problems per k, final")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--init-from", default="",
                   help="start from the weights of this teacher folder (same vocabulary) instead of a "
                        "random init; a Llama folder can start a qwen3 run (q/k-norm gains are then set "
                        "to the mean per-head RMS of the queries and keys on one training batch)")
    p.add_argument("--card-only", action="store_true",
                   help="do not train: rewrite README.md of --out from its train_log.jsonl "
                        "and check the saved model still scores the logged accuracy")
    return p.parse_args(argv)


def batches(tokenizer, ks, seed, batch_size, seq_len):
    """Endless [batch_size, seq_len] blocks of packed training documents."""
    buf: list = []
    need = batch_size * seq_len
    for p in iter_problems(ks, "train", seed):
        buf.extend(encode_document(format_problem(p), tokenizer))
        if len(buf) >= need:
            yield torch.tensor(buf[:need], dtype=torch.long).view(batch_size, seq_len)
            buf = buf[need:]


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def machine_description(threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs visible (shared), "
            f"torch.set_num_threads({threads}), no GPU; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


@torch.no_grad()
def warm_start(model, folder, batch) -> dict:
    """Load the weights of ``folder`` into ``model``; returns what was done, for the card.

    Every tensor of the source must exist in ``model`` with the same shape. Tensors only
    ``model`` has may be the q/k-norm gains (a Llama source for a Qwen3 model); they are set
    so that the normalized queries and keys keep, on average, the source's scale."""
    from safetensors.torch import load_file

    sd = load_file(str(Path(folder) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    bad = [k for k in missing if not k.endswith(("q_norm.weight", "k_norm.weight"))]
    if unexpected or bad:
        raise SystemExit(f"--init-from {folder}: tensors that do not fit: {unexpected + bad}")
    gains = {}
    if missing:
        seen = {}
        hooks = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            for name in ("q_proj", "k_proj"):
                def hook(mod, inp, out, key=(i, name), hd=attn.head_dim):
                    x = out.reshape(*out.shape[:-1], -1, hd).float()
                    seen[key] = float(x.pow(2).mean(-1).sqrt().mean())
                hooks.append(getattr(attn, name).register_forward_hook(hook))
        model(input_ids=batch)
        for h in hooks:
            h.remove()
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_norm.weight.fill_(seen[(i, "q_proj")])
            layer.self_attn.k_norm.weight.fill_(seen[(i, "k_proj")])
            gains[i] = (round(seen[(i, "q_proj")], 3), round(seen[(i, "k_proj")], 3))
    return {"from": str(folder), "qk_norm_gains": gains}


# How to get the folder given to --init-from for the bundled teachers (the previous bundled
# Llama teacher, trained from scratch on the earlier version of the task).
WARM_START_NOTE = ("That folder is the previous bundled Llama teacher, trained from scratch for 6000 steps on "
                   "the earlier version of this task (fixed step names, bindings first; its card holds its "
                   "command); get it with `mkdir -p /tmp/v1 && git archive 3e3da49 red/assets/demo-teacher | "
                   "tar -x -C /tmp/v1`. A warm start because this task, trained from scratch, stays at "
                   "chance for its first ~2500 steps on this 2-core CPU (the earlier teacher's log shows the "
                   "same), more than the time this teacher was allowed.")


def save(model, tokenizer, out: Path):
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def majority_baseline(k, n, seed):
    """Accuracy of always answering the most frequent answer of the held-out problems."""
    from collections import Counter
    answers = [p.answer for p in generate_problems(n, [k], "heldout", seed)]
    return Counter(answers).most_common(1)[0][1] / len(answers)


def write_card(out: Path, args, cfg, n_params, acc, wall_s, steps_done, final_loss, machine,
               note=""):
    """README.md of ``out``, the teacher's model card: what it is, how it was trained, what it
    scores and the command that makes it again, every number taken from the run."""
    ks = [int(k) for k in args.ks.split(",")]
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    text = (_card_intro(out, args, cfg) + _card_architecture(cfg, n_params, size)
            + _card_training(args, cfg, ks, steps_done, final_loss, wall_s, machine)
            + _card_accuracy(args, acc, ks) + _card_regenerate(out, args, note))
    (out / "README.md").write_text(text, encoding="utf-8")


def _card_class(cfg) -> str:
    """The transformers class name of ``cfg``'s model (``LlamaConfig`` -> ``LlamaForCausalLM``)."""
    return type(cfg).__name__.replace("Config", "ForCausalLM")


def _card_intro(out: Path, args, cfg) -> str:
    """The card's title and opening paragraph: what the teacher is and what it is for."""
    cls = _card_class(cfg)
    init_from = getattr(args, "init_from", "")
    qk = (" It is Qwen3-shaped: every attention layer RMS-normalizes its queries and keys per head "
          "(q/k-norm), so the demo's result is not tied to one model family."
          if cfg.model_type == "qwen3" else "")
    return f"""# {out.name}: tiny {"Qwen3" if cfg.model_type == "qwen3" else "Llama"} teacher for the RED CPU demo

A {cfg.num_hidden_layers}-layer `{cls}` trained {"from scratch" if not init_from else "(from a warm start, see Training)"} on the synthetic
multi-step reasoning task of `red/commands/demo/task.py` (chains of mod-10 `+`/`-` with variable
lookups, chain of thought written out, k = number of steps). It is the teacher that the
demo distils into narrower students (RED channel-selection init vs LRC random init).
Everything here was produced by the command below; nothing was edited by hand.{qk}

"""


def _card_architecture(cfg, n_params: int, size: int) -> str:
    """The card's architecture table, from the model's config."""
    cls = _card_class(cfg)
    return f"""## Architecture

| | |
|---|---|
| model | `{cls}` (transformers {__import__('transformers').__version__}) |
| layers | {cfg.num_hidden_layers} |
| hidden size (residual width D) | {cfg.hidden_size} |
| attention heads / KV heads / head dim | {cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim} |
| MLP intermediate size | {cfg.intermediate_size} (SiLU gated) |
| q/k-norm | {"yes (RMSNorm over each head's queries and keys)" if cfg.model_type == "qwen3" else "no"} |
| vocabulary | {cfg.vocab_size} (character level: `<pad>`=0 `<bos>`=1 `<eos>`=2 `<unk>`=3, then digits, 16 letters, `=,+-?:#`) |
| tie_word_embeddings | {cfg.tie_word_embeddings} (lm_head shares the embedding matrix) |
| RMSNorm eps | {cfg.rms_norm_eps} |
| RoPE theta | {cfg.rope_parameters.get('rope_theta') if isinstance(getattr(cfg, 'rope_parameters', None), dict) else 'default'} |
| max positions | {cfg.max_position_embeddings} |
| parameters | {n_params:,} (float32) |
| files on disk | {size / 1e6:.2f} MB in total |

"""


def _card_training(args, cfg, ks: list, steps_done: int, final_loss: float, wall_s: float, machine: str) -> str:
    """The card's training section: data, schedule, initialization, loss and wall time."""
    init_from = getattr(args, "init_from", "")
    init_line = ("Initialization: random (`initializer_range` 0.02)." if not init_from else
                 f"Initialization: the weights of `{init_from}` (`--init-from`), then every weight trained."
                 + (" Its q/k-norm gains, absent from that Llama checkpoint, start at the mean per-head RMS "
                    "of the queries and keys on one training batch." if cfg.model_type == "qwen3" else "")
                 + f" {WARM_START_NOTE}")
    return f"""## Training

- Data: an endless stream of `split="train"` problems, k cycling through {ks}, each
  document `[bos] + chars + [eos]`, concatenated and cut into blocks of {args.seq_len}
  tokens, labels = input_ids (the loss covers every token, as in the engine).
  Held-out problems (sha256 of the question ≡ 0 mod 10) are never trained on.
- {steps_done} steps × batch {args.batch_size} × {args.seq_len} tokens
  = {steps_done * args.batch_size * args.seq_len / 1e6:.1f} M tokens.
- AdamW (0.9, 0.98), lr {args.lr}, {args.warmup} warmup steps, cosine decay to
  {args.min_lr_ratio} × lr, weight decay {args.weight_decay}, grad clip {args.grad_clip}, float32.
- {init_line}
- Seed {args.seed} for everything (init, data, evaluation problems).
- Final training loss (mean of the last {args.log_every} steps): {final_loss:.4f}.
- Wall time: {wall_s / 60:.1f} min on {machine}.
- Per-step log: `train_log.jsonl` (loss and lr; checkpoint evaluations with
  {args.eval_n} problems per k).

"""


def _card_accuracy(args, acc: dict, ks: list) -> str:
    """The card's held-out accuracy table, beside always giving the most frequent answer."""
    base = {k: majority_baseline(k, acc["n_per_k"], args.seed) for k in ks}
    head = "| k | " + " | ".join(str(k) for k in ks) + " | general (k≤2) | reasoning (k≥3) |"
    sep = "|---" * (len(ks) + 3) + "|"
    row = ("| answer exact match, % | " + " | ".join(f"{100 * acc[f'k{k}']:.1f}" for k in ks)
           + f" | {100 * acc['general']:.1f} | {100 * acc['reasoning']:.1f} |")
    row2 = ("| whole completion exact, % | "
            + " | ".join(f"{100 * acc[f'cot_k{k}']:.1f}" for k in ks) + " | | |")
    row3 = ("| most frequent answer (baseline), % | "
            + " | ".join(f"{100 * base[k]:.1f}" for k in ks) + " | | |")
    return f"""## Held-out accuracy (measured)

`red.commands.demo.task.evaluate_reasoning(model, tokenizer, ks={ks}, n_per_k={acc['n_per_k']}, seed={args.seed})`:
greedy decoding from `[bos] + question + ":"`, the completion must be `…#<answer>` then eos.
Answers are digits; the last row is what always giving the most frequent answer of those
problems would score.

{head}
{sep}
{row}
{row2}
{row3}

"""


def _card_command(args) -> str:
    """The command line that makes this teacher again: the options that differ from the defaults."""
    arch = getattr(args, "arch", "llama")
    cmd = "python -m red.commands.demo.train_teacher " + (f"--arch {arch} " if arch != "llama" else "")
    cmd += f"--out {args.out} --seed {args.seed} --steps {args.steps}"
    defaults = parse_args([])
    for name in ("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay",
                 "grad_clip", "layers", "hidden", "intermediate", "heads", "ks", "eval_every",
                 "eval_n", "final_eval_n", "threads", "log_every", "init_from"):
        if getattr(args, name) != getattr(defaults, name):
            cmd += f" --{name.replace('_', '-')} {getattr(args, name)}"
    return cmd


def _card_regenerate(out: Path, args, note: str) -> str:
    """The card's last sections: the command that remakes the teacher, and how to load it."""
    cmd = _card_command(args)
    return f"""## Regenerate

```
{cmd}
```

Data, initialization and evaluation problems are fixed by the seed, and one CPU thread is
used, so a rerun with the same torch build should give the same weights; this was not
checked by a second full run. Other machines or torch versions may differ slightly.
{note}

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from red.commands.demo.task import evaluate_reasoning
model = AutoModelForCausalLM.from_pretrained("red/assets/{out.name}")
tok = AutoTokenizer.from_pretrained("red/assets/{out.name}")
print(evaluate_reasoning(model, tok, n_per_k=200, seed=0))
```
"""


def rewrite_card(out: Path, threads: int):
    """Model card from the log of a finished run (for card format changes after a run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    recs = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    start = next(r for r in recs if r.get("event") == "start")
    final = next(r for r in recs if r.get("event") == "final_eval")
    last_loss = [r for r in recs if "loss" in r][-1]
    run_args = argparse.Namespace(**start["args"])
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ks = [int(k) for k in run_args.ks.split(",")]
    acc = evaluate_reasoning(model, tok, ks=ks, n_per_k=final["n_per_k"], seed=run_args.seed)
    for key in [f"k{k}" for k in ks] + [f"cot_k{k}" for k in ks]:
        if acc[key] != final[key]:
            raise SystemExit(f"saved model scores {key}={acc[key]}, log says {final[key]}")
    write_card(out, run_args, model.config, start["n_params"], acc, final["wall_s"],
               final["step"], last_loss["loss"], start["machine"],
               note="\nThis card was rewritten from `train_log.jsonl` by `--card-only`, after "
                    "re-evaluating the saved model and checking it gives the logged numbers.\n")
    print(json.dumps(acc))


def _new_model(args, tok):
    """A randomly initialized Llama (or, ``--arch qwen3``, Qwen3: q/k-norm) of the shape the
    arguments give, with ``tok``'s vocabulary and special tokens and a tied head."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    if args.arch == "qwen3":  # q/k-norm is part of Qwen3's attention; no biases, no sliding window
        return Qwen3ForCausalLM(Qwen3Config(**shape, attention_bias=False, use_sliding_window=False))
    return LlamaForCausalLM(LlamaConfig(**shape))


def _make_optimizer(model, args):
    """AdamW (0.9, 0.98) with weight decay on the matrices only (not on gains or biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.98))


def _train_steps(model, opt, data, tok, ks, args, out: Path, logj, t0: float) -> list:
    """The training loop: ``args.steps`` steps on ``data`` at ``lr_at``'s schedule, the mean
    loss logged every ``--log-every`` steps, and every ``--eval-every`` steps (but the last)
    an evaluation logged and a checkpoint saved; returns the last ``--log-every`` losses."""
    from tqdm.auto import tqdm

    recent = []
    model.train()
    bar = tqdm(range(args.steps), desc="teacher", dynamic_ncols=True, mininterval=10)
    for step in bar:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(data)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        recent = recent[-args.log_every:]
        if (step + 1) % args.log_every == 0:
            logj({"step": step + 1, "loss": sum(recent) / len(recent), "lr": lr,
                  "grad_norm": float(gn), "elapsed_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc = evaluate_reasoning(model, tok, ks=ks, n_per_k=args.eval_n, seed=args.seed)
            logj({"event": "eval", "step": step + 1, "elapsed_s": round(time.time() - t0, 1),
                  **acc})
            tqdm.write(f"step {step + 1}: " + " ".join(
                f"k{k}={100 * acc[f'k{k}']:.0f}" for k in ks))
            save(model, tok, out)  # a usable checkpoint even if the run is stopped
            model.train()
    return recent


def main(argv=None):
    args = parse_args(argv)
    if args.card_only:
        return rewrite_card(Path(args.out), args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    tok = build_tokenizer()
    model = _new_model(args, tok)
    n_params = sum(p.numel() for p in model.parameters())
    data = batches(tok, ks, args.seed, args.batch_size, args.seq_len)
    warm = warm_start(model, args.init_from, next(data)) if args.init_from else None
    opt = _make_optimizer(model, args)
    machine = machine_description(args.threads)
    log = open(out / "train_log.jsonl", "w", encoding="utf-8")

    def logj(rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()

    logj({"event": "start", "args": vars(args), "n_params": n_params, "machine": machine,
          "argv": sys.argv, "warm_start": warm})
    t0 = time.time()
    recent = _train_steps(model, opt, data, tok, ks, args, out, logj, t0)
    train_s = time.time() - t0
    final_loss = sum(recent) / len(recent)
    acc = evaluate_reasoning(model, tok, ks=ks, n_per_k=args.final_eval_n, seed=args.seed)
    wall_s = time.time() - t0
    logj({"event": "final_eval", "step": args.steps, "train_s": round(train_s, 1),
          "wall_s": round(wall_s, 1), **acc})
    log.close()
    save(model, tok, out)
    write_card(out, args, model.config, n_params, acc, wall_s, args.steps, final_loss, machine)
    print(json.dumps(acc))
    print(f"wall time {wall_s / 60:.1f} min; wrote {out}")
    return acc


if __name__ == "__main__":
    main()
