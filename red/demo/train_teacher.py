"""Train the tiny teacher bundled in red/assets/demo-teacher.

    python -m red.demo.train_teacher --out red/assets/demo-teacher --seed 0

A small LlamaForCausalLM trained from scratch on packed problems of every k (1..6) of
red.demo.task, with the engine's packing convention (labels = input_ids). One seed drives
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

from red.demo.task import (build_tokenizer, encode_document, evaluate_reasoning,
                           format_problem, generate_problems, iter_problems)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    ks = [int(k) for k in args.ks.split(",")]
    base = {k: majority_baseline(k, acc["n_per_k"], args.seed) for k in ks}
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    head = "| k | " + " | ".join(str(k) for k in ks) + " | general (k≤2) | reasoning (k≥3) |"
    sep = "|---" * (len(ks) + 3) + "|"
    row = ("| answer exact match, % | " + " | ".join(f"{100 * acc[f'k{k}']:.1f}" for k in ks)
           + f" | {100 * acc['general']:.1f} | {100 * acc['reasoning']:.1f} |")
    row2 = ("| whole completion exact, % | "
            + " | ".join(f"{100 * acc[f'cot_k{k}']:.1f}" for k in ks) + " | | |")
    row3 = ("| most frequent answer (baseline), % | "
            + " | ".join(f"{100 * base[k]:.1f}" for k in ks) + " | | |")
    cmd = (f"python -m red.demo.train_teacher --out {args.out} --seed {args.seed} "
           f"--steps {args.steps}")
    defaults = parse_args([])
    for name in ("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay",
                 "grad_clip", "layers", "hidden", "intermediate", "heads", "ks", "eval_every",
                 "eval_n", "final_eval_n", "threads", "log_every"):
        if getattr(args, name) != getattr(defaults, name):
            cmd += f" --{name.replace('_', '-')} {getattr(args, name)}"
    text = f"""# demo-teacher: tiny Llama teacher for the RED CPU demo

A {cfg.num_hidden_layers}-layer `LlamaForCausalLM` trained from scratch on the synthetic
multi-step reasoning task of `red/demo/task.py` (chains of mod-10 `+`/`-` with variable
lookups, chain of thought written out, k = number of steps). It is the teacher that the
demo distils into narrower students (RED channel-selection init vs LRC random init).
Everything here was produced by the command below; nothing was edited by hand.

## Architecture

| | |
|---|---|
| model | `LlamaForCausalLM` (transformers {__import__('transformers').__version__}) |
| layers | {cfg.num_hidden_layers} |
| hidden size (residual width D) | {cfg.hidden_size} |
| attention heads / KV heads / head dim | {cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim} |
| MLP intermediate size | {cfg.intermediate_size} (SiLU gated) |
| vocabulary | {cfg.vocab_size} (character level: `<pad>`=0 `<bos>`=1 `<eos>`=2 `<unk>`=3, then digits, 16 letters, `=,+-?:#`) |
| tie_word_embeddings | {cfg.tie_word_embeddings} (lm_head shares the embedding matrix) |
| RMSNorm eps | {cfg.rms_norm_eps} |
| RoPE theta | {cfg.rope_parameters.get('rope_theta') if isinstance(getattr(cfg, 'rope_parameters', None), dict) else 'default'} |
| max positions | {cfg.max_position_embeddings} |
| parameters | {n_params:,} (float32) |
| files on disk | {size / 1e6:.2f} MB in total |

## Training

- Data: an endless stream of `split="train"` problems, k cycling through {ks}, each
  document `[bos] + chars + [eos]`, concatenated and cut into blocks of {args.seq_len}
  tokens, labels = input_ids (the loss covers every token, as in the engine).
  Held-out problems (sha256 of the question ≡ 0 mod 10) are never trained on.
- {steps_done} steps × batch {args.batch_size} × {args.seq_len} tokens
  = {steps_done * args.batch_size * args.seq_len / 1e6:.1f} M tokens.
- AdamW (0.9, 0.98), lr {args.lr}, {args.warmup} warmup steps, cosine decay to
  {args.min_lr_ratio} × lr, weight decay {args.weight_decay}, grad clip {args.grad_clip}, float32.
- Seed {args.seed} for everything (init, data, evaluation problems).
- Final training loss (mean of the last {args.log_every} steps): {final_loss:.4f}.
- Wall time: {wall_s / 60:.1f} min on {machine}.
- Per-step log: `train_log.jsonl` (loss and lr; checkpoint evaluations with
  {args.eval_n} problems per k).

## Held-out accuracy (measured)

`red.demo.task.evaluate_reasoning(model, tokenizer, ks={ks}, n_per_k={acc['n_per_k']}, seed={args.seed})`:
greedy decoding from `[bos] + question + ":"`, the completion must be `…#<answer>` then eos.
Answers are digits; the last row is what always giving the most frequent answer of those
problems would score.

{head}
{sep}
{row}
{row2}
{row3}

## Regenerate

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
from red.demo.task import evaluate_reasoning
model = AutoModelForCausalLM.from_pretrained("red/assets/demo-teacher")
tok = AutoTokenizer.from_pretrained("red/assets/demo-teacher")
print(evaluate_reasoning(model, tok, n_per_k=200, seed=0))
```
"""
    (out / "README.md").write_text(text, encoding="utf-8")


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


def main(argv=None):
    args = parse_args(argv)
    if args.card_only:
        return rewrite_card(Path(args.out), args.threads)
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    machine = machine_description(args.threads)
    log = open(out / "train_log.jsonl", "w", encoding="utf-8")

    def logj(rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()

    logj({"event": "start", "args": vars(args), "n_params": n_params, "machine": machine,
          "argv": sys.argv})
    data = batches(tok, ks, args.seed, args.batch_size, args.seq_len)
    t0 = time.time()
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
