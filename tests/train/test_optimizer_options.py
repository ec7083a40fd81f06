"""The knobs TRL / transformers users expect (issue 22 item 4): --lr-scheduler linear|cosine|
constant|wsd with --min-lr, --weight-decay and --adam-betas. Each curve is checked at every
step against its formula written out here and against transformers' own schedulers; the
AdamW settings against the optimizer's groups and a step's arithmetic; and every one follows
--lr's rules: recorded in run.yaml, changed on --resume only with --allow-change."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from helpers import one_line
from red.cli import main
from red.train.trainer import lr_schedule, make_optimizer

ARGS = ["--hidden-size", "32", "--seq-len", "24", "--batch-size", "2", "--eval-every", "0", "--val-batches", "1",
        "--log-every", "1", "--quiet"]


def distill(teacher, data, out, *extra):
    return main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS,
                 *map(str, extra)])


def expected_lr(step: int, n: int, w: int, lr: float, low: float, shape: str, wsd_decay: float = 0.1) -> float:
    """The documented curve (README, "Learning rate and AdamW"), written out: warmup
    lr (step + 1) / w, then the shape from lr down to ``low`` at step n."""
    if step < w:
        return lr * (step + 1) / w
    if shape == "constant":
        return lr
    if shape == "linear":
        return low + (lr - low) * (n - step) / (n - w)
    start = w if shape == "cosine" else max(w, n - max(1, round(wsd_decay * n)))
    if step < start:
        return lr
    return low + (lr - low) * (1 + math.cos(math.pi * (step - start) / (n - start))) / 2


def transformers_lr(shape: str, step: int, n: int, w: int, lr: float, low: float, wsd_decay: float) -> float:
    """transformers' own scheduler of the same name at ``step``."""
    from transformers import optimization as O

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    if shape == "linear":
        assert low == 0  # transformers' linear has no floor
        s = O.get_linear_schedule_with_warmup(opt, w, n)
    elif shape == "cosine":
        s = O.get_cosine_with_min_lr_schedule_with_warmup(opt, w, n, min_lr=low)
    elif shape == "constant":
        s = O.get_constant_schedule_with_warmup(opt, w)
    else:
        s = O.get_wsd_schedule(opt, num_warmup_steps=w, num_decay_steps=max(1, round(wsd_decay * n)),
                               num_training_steps=n, min_lr_ratio=low / lr, decay_type="cosine")
    return lr * s.lr_lambdas[0](step)


@pytest.mark.parametrize("shape", ["linear", "cosine", "constant", "wsd"])
@pytest.mark.parametrize("n,warmup,low,wsd_decay", [(10, 2, 0.0, 0.1), (40, 0.1, 1e-3, 0.25), (7, 1, 2e-3, 0.5),
                                                     (25, 25, 0.0, 0.1)])
def test_each_scheduler_equals_its_formula_and_transformers(shape, n, warmup, low, wsd_decay):
    lr = 1e-2
    f = lr_schedule(n, warmup, None, lr, scheduler=shape, min_lr=low, wsd_decay=wsd_decay)
    w = max(1, round(warmup * n)) if warmup < 1 else int(warmup)
    for step in range(n):
        got = lr * f(step)
        assert got == pytest.approx(expected_lr(step, n, w, lr, low, shape, wsd_decay), rel=1e-12, abs=1e-15), step
        if step >= w and not (shape == "linear" and low):
            # after the warmup, transformers' scheduler of the same name (its warmup is one step behind)
            assert got == pytest.approx(transformers_lr(shape, step, n, w, lr, low, wsd_decay), rel=1e-9), step
    if shape != "constant" and w < n:
        assert lr * f(n - 1) > low  # the floor is reached at step n, after the last step, as transformers has it


def test_schedule_changes_continue_from_the_curve():
    lr, low = 1e-2, 1e-3
    # nothing but grad_clip changes: the curve is the same
    same = lr_schedule(10, 2, [{"step": 4, "changed": {"grad_clip": [1.0, 0.5]}}], lr, scheduler="cosine", min_lr=low)
    plain = lr_schedule(10, 2, None, lr, scheduler="cosine", min_lr=low)
    assert [same(s) for s in range(10)] == [plain(s) for s in range(10)]
    # only lr changes (floor 0): the old curve, scaled by new / old
    f = lr_schedule(10, 2, [{"step": 4, "changed": {"lr": [lr, lr / 2]}}], lr / 2, scheduler="cosine")
    for s in range(4, 10):
        assert lr * f(s) == pytest.approx(expected_lr(s, 10, 2, lr, 0.0, "cosine") / 2, rel=1e-12)
    # cosine -> constant mid-run: held at the value it had
    f = lr_schedule(10, 2, [{"step": 5, "changed": {"lr_scheduler": ["cosine", "constant"]}}], lr,
                    scheduler="constant", min_lr=low)
    at = expected_lr(5, 10, 2, lr, low, "cosine")
    assert [lr * f(s) for s in range(5, 10)] == pytest.approx([at] * 5, rel=1e-12)
    # a finished linear run extended by 6 steps as wsd: over the 6, a fresh 2-step warmup, stable, then
    # the decay over their last round(0.5 * 6) = 3
    f = lr_schedule(16, 2, [{"step": 10, "changed": {"steps": [10, 16], "lr_scheduler": ["linear", "wsd"]}}], lr,
                    scheduler="wsd", min_lr=low, wsd_decay=0.5)
    assert [lr * f(s) for s in range(10, 16)] == pytest.approx(
        [lr / 2, lr, lr] + [low + (lr - low) * (1 + math.cos(math.pi * k / 3)) / 2 for k in (0, 1, 2)], rel=1e-12)


@pytest.mark.parametrize("shape", ["linear", "cosine", "constant", "wsd"])
def test_distill_follows_each_scheduler_at_every_step(shape, teacher_dirs, corpus_file, tmp_path):
    out = tmp_path / "run"
    low = 0.0 if shape == "linear" else 1e-3
    assert distill(teacher_dirs["llama"], corpus_file, out, "--steps", "8", "--warmup", "2", "--lr", "1e-2",
                   "--lr-scheduler", shape, "--min-lr", low, "--wsd-decay", "0.25", "--save-every", "8") == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lrs) == list(range(1, 9))
    for step, got in lrs.items():  # the lr a row logs is the one its step trained with
        assert got == pytest.approx(expected_lr(step - 1, 8, 2, 1e-2, low, shape, 0.25), rel=1e-12), step
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert (saved["lr_scheduler"], saved["min_lr"], saved["wsd_decay"]) == (shape, low, 0.25)


def test_a_resume_that_changes_the_schedule(teacher_dirs, corpus_file, tmp_path, monkeypatch, capfd):
    """A cosine run stopped at step 4 of 10, resumed as wsd over 12 steps: from the value the
    cosine had at step 4, stable, then a cosine to the floor over the last 6 steps."""
    import red.run.folder

    def stop_at_4(event, step, folder):
        if event == "step-done" and step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    t = teacher_dirs["llama"]
    base = ["--warmup", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--save-every", "2"]
    monkeypatch.setattr(red.run.folder, "HOOKS", [stop_at_4])
    assert distill(t, corpus_file, out, "--steps", "10", "--lr-scheduler", "cosine", *base) == 130
    monkeypatch.setattr(red.run.folder, "HOOKS", [])
    capfd.readouterr()
    change = ["--steps", "12", "--lr-scheduler", "wsd", "--wsd-decay", "0.5"]
    one_line(capfd, distill(t, corpus_file, out, "--resume", *base, *change),
             "lr_scheduler 'cosine' -> 'wsd'", "--allow-change lr_scheduler", "--allow-change wsd_decay")
    assert distill(t, corpus_file, out, "--resume", *base, *change, "--allow-change",
                   "steps,lr_scheduler,wsd_decay") == 0
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert saved["history"] == [{"step": 4, "changed": {"steps": [10, 12], "lr_scheduler": ["cosine", "wsd"],
                                                        "wsd_decay": [0.1, 0.5]}}]
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    assert sorted(lrs) == list(range(1, 13))
    lr, low = 1e-2, 1e-3
    at = expected_lr(4, 10, 2, lr, low, "cosine")
    want = {s: expected_lr(s, 10, 2, lr, low, "cosine") for s in range(4)}
    want.update({s: at for s in (4, 5)})  # wsd decays over its last round(0.5 * 12) = 6 steps: 6 ... 11
    want.update({s: low + (at - low) * (1 + math.cos(math.pi * (s - 6) / 6)) / 2 for s in range(6, 12)})
    for step, got in lrs.items():
        assert got == pytest.approx(want[step - 1], rel=1e-12), step


def test_weight_decay_and_betas_reach_adamw_and_follow_the_resume_rules(teacher_dirs, corpus_file, tmp_path, capfd):
    t = teacher_dirs["llama"]
    out = tmp_path / "run"
    run = lambda *a: distill(t, corpus_file, out, "--save-every", "2", *a)
    assert run("--steps", "4", "--weight-decay", "0.1", "--adam-betas", "0.8, 0.95") == 0
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert (saved["weight_decay"], saved["adam_betas"]) == (0.1, "0.8,0.95")
    info = lambda step: json.loads((out / f"checkpoints/step-{step:07d}/trainer.json").read_text())
    groups, names = info(4)["optimizer_param_groups"], info(4)["optimizer_param_names"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["betas"] for g in groups] == [[0.8, 0.95], [0.8, 0.95]]
    # the decayed group is exactly the projections; the gains (norm weights) get no decay
    from safetensors.torch import load_file

    state = load_file(str(out / "checkpoints/step-0000004/state.safetensors"))
    dims = {k[len("student."):]: v.dim() for k, v in state.items() if k.startswith("student.")}
    n_proj = sum(d == 2 for d in dims.values())
    assert [dims[n] for n in names] == [2] * n_proj + [1] * (len(names) - n_proj) and n_proj > 0
    # the same values written another way are no change; a change needs --allow-change, then takes effect
    assert run("--resume", "--steps", "4", "--weight-decay", "0.1", "--adam-betas", "0.80,0.950") == 0
    for flag, value, text in (("--weight-decay", "0.2", "weight_decay 0.1 -> 0.2"),
                              ("--adam-betas", "0.9,0.99", "adam_betas '0.8,0.95' -> '0.9,0.99'")):
        one_line(capfd, run("--resume", "--steps", "6", "--allow-change", "steps", "--weight-decay", "0.1",
                            "--adam-betas", "0.8,0.95", flag, value), text, "--allow-change " + text.split()[0])
    assert run("--resume", "--steps", "6", "--weight-decay", "0.2", "--adam-betas", "0.9,0.99", "--allow-change",
               "steps,weight_decay,adam_betas") == 0
    groups = info(6)["optimizer_param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0] and [g["betas"] for g in groups] == [[0.9, 0.99]] * 2
    history = yaml.safe_load((out / "run.yaml").read_text())["history"]
    assert history == [{"step": 4, "changed": {"steps": [4, 6], "weight_decay": [0.1, 0.2],
                                               "adam_betas": ["0.8,0.95", "0.9,0.99"]}}]


def test_weight_decay_is_adamws_decoupled_shrink_on_the_projections_only(loaded_teachers):
    """One step from the same state and gradients with and without weight decay differs by
    exactly -lr * weight_decay * P on every projection (AdamW's decoupled decay) and by
    nothing on the gains; the betas are AdamW's."""
    from red.train.startup import build_student

    teacher, _ = loaded_teachers["llama"]
    lr, wd = 1e-2, 0.3
    after = []
    for decay in (0.0, wd):
        st = build_student(teacher, 32, "orthogonal", seed=0)
        opt = make_optimizer(st.trainable_parameters(), lr, "cpu", betas=(0.5, 0.75), weight_decay=decay)
        assert [g["betas"] for g in opt.param_groups] == [(0.5, 0.75)] * 2
        assert [g["weight_decay"] for g in opt.param_groups] == [decay, 0.0]
        before = {n: p.detach().clone() for n, p in st.named_trainable_parameters()}
        torch.manual_seed(0)
        for _, p in st.named_trainable_parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        after.append({n: p.detach().clone() for n, p in st.named_trainable_parameters()})
    for n, p0 in before.items():
        diff = after[1][n] - after[0][n]
        if p0.dim() == 2:
            assert torch.allclose(diff, -lr * wd * p0, rtol=1e-4, atol=1e-9), n
        else:
            assert torch.equal(diff, torch.zeros_like(diff)), n


@pytest.mark.parametrize("args,needles", [
    (["--lr-scheduler", "cosin"], ["lr_scheduler='cosin'", "linear, cosine, constant, wsd"]),
    (["--lr", "1e-3", "--min-lr", "2e-3"], ["min_lr=0.002 is above lr=0.001", "--min-lr"]),
    (["--min-lr", "-1"], ["min_lr must be at least 0"]),
    (["--weight-decay", "-0.1"], ["weight_decay must be at least 0"]),
    (["--adam-betas", "0.9"], ["adam_betas='0.9' is not two numbers B1,B2", "--adam-betas 0.9,0.999"]),
    (["--adam-betas", "0.9,1"], ["adam_betas='0.9,1'", "0 <= B < 1"]),
    (["--adam-betas", "a,b"], ["adam_betas='a,b'"]),
    (["--wsd-decay", "0"], ["wsd_decay must be above 0 and at most 1"]),
    (["--weight-decay", "nan"], ["weight_decay=nan is not a finite number"]),
])
def test_bad_values_are_one_line_and_write_nothing(args, needles, teacher_dirs, corpus_file, tmp_path, capfd):
    out = tmp_path / "run"
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, out, "--steps", "2", *args), *needles)
    assert not out.exists()


def test_adam_betas_from_yaml_as_a_list(teacher_dirs, corpus_file, tmp_path):
    from red.config import make_config

    f = tmp_path / "c.yaml"
    f.write_text("adam_betas: [0.9, 0.95]\nlr_scheduler: cosine\n")
    cfg = make_config(f, teacher=str(teacher_dirs["llama"]), data=str(corpus_file), hidden_size=32, out="x")
    assert cfg.adam_betas == "0.9,0.95" and cfg.lr_scheduler == "cosine"


def test_a_checkpoint_of_one_optimizer_group_resumes_as_the_same_run(teacher_dirs, corpus_file, tmp_path):
    """Checkpoints written before the optimizer had two groups (one group in the student's
    registration order, no names) resume to exactly what the new layout resumes to."""
    from safetensors.torch import load_file, save_file

    t = teacher_dirs["llama"]
    a = tmp_path / "a"
    assert distill(t, corpus_file, a, "--steps", "2", "--save-every", "2") == 0
    b = tmp_path / "b"
    shutil.copytree(a, b)
    ck = b / "checkpoints" / "step-0000002"
    info = json.loads((ck / "trainer.json").read_text())
    names = info.pop("optimizer_param_names")
    state = load_file(str(ck / "state.safetensors"))
    from red.commands.analyze import load_run_student

    st, _, _ = load_run_student(a)
    registration = [n for n, _ in st.named_trainable_parameters()]  # the one group's order, as red wrote it
    assert sorted(names) == sorted(registration) and names != registration  # the new layout reorders
    old_index = {n: i for i, n in enumerate(registration)}
    legacy = {}
    for k, v in state.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            legacy[f"opt.{old_index[names[int(idx)]]}.{key}"] = v
        else:
            legacy[k] = v
    info["optimizer_scalars"] = {f"{old_index[names[int(k.split('.', 1)[0])]]}.{k.split('.', 1)[1]}": v
                                 for k, v in info["optimizer_scalars"].items()}
    group = dict(info["optimizer_param_groups"][0])
    group["weight_decay"] = 0.0
    info["optimizer_param_groups"] = [group]
    for key in ("base_lrs", "_last_lr"):
        info["scheduler"][key] = info["scheduler"][key][:1]
    save_file(legacy, str(ck / "state.safetensors"))
    (ck / "trainer.json").write_text(json.dumps(info))
    for run in (a, b):
        assert distill(t, corpus_file, run, "--resume", "--steps", "4", "--save-every", "2", "--allow-change",
                       "steps") == 0
    sa = load_file(str(a / "checkpoints/step-0000004/state.safetensors"))
    sb = load_file(str(b / "checkpoints/step-0000004/state.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("rng."))
