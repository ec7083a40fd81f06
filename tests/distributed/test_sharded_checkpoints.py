"""Sharded checkpoints: each rank writes its own safetensors shard, rank 0 an index.

CPU, gloo, under torchrun (as tests/distributed/test_distributed.py). One uninterrupted
single-process run is the reference; a 3-process run, and runs resumed from its step-2
checkpoint on 2 and on 1 process(es) and from the single-process step-2 checkpoint on 3,
must end on the same trained tensors and losses: the runs differ only in the order of
float32 reductions (tolerances and AdamW's raised eps: tests/helpers.py).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from red.run.checkpoint import INDEX, check_checkpoint, list_checkpoints, load_tensors, row_range, shard_file_name
from red.cli import main
from red.errors import RedError
from helpers import ADAM_EPS, ATOL, assert_close_tensors, assert_same_metrics
from helpers import child_env, free_port, ok_result, torchrun

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--hidden-size", 32, "--steps", 4, "--seq-len", 24, "--batch-size", 6, "--grad-accum", 1,
        "--save-every", 2, "--eval-every", 2, "--val-batches", 1, "--log-every", 1, "--lr", 3e-3, "--adam-eps", ADAM_EPS,
        "--warmup", 1, "--quiet"]


def args(teacher, corpus, out, *extra):
    return ["distill", "--teacher", teacher, "--data", corpus, "--out", out, *ARGS, *extra]


def in_process(*a) -> None:
    assert main([str(x) for x in a]) == 0


def launch(n: int, *a) -> None:
    p = torchrun(n, *a, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]


def torchrun_cmd(nproc: int, module: str, *a) -> tuple[list[str], dict]:
    """torchrun running ``python -m module a...`` (tests/ importable) on ``nproc`` ranks."""
    env = child_env()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", module, *map(str, a)], env


def ckpt(out: Path, step: int) -> Path:
    return out / f"checkpoints/step-{step:07d}"


def assert_matches(out: Path, ref: Path) -> float:
    """The run in ``out`` ended where ``ref`` did: final tensors (student and AdamW state)
    within ATOL, every metrics row's losses within RTOL."""
    worst = assert_close_tensors(load_tensors(ckpt(ref, 4)), load_tensors(ckpt(out, 4)))
    print(f"\n{out.name}: max |diff| of the final tensors vs {ref.name}: {worst:.2e}")
    assert_same_metrics(ref, out)
    return worst


def resumable_copy(src: Path, dst: Path) -> Path:
    """``src`` with its step-4 checkpoint and result dropped: --resume continues from step 2."""
    shutil.copytree(src, dst)
    shutil.rmtree(ckpt(dst, 4))
    (dst / "result.json").unlink()
    return dst


def layout(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    if "state.safetensors" in names:
        return "one file"
    return f"{sum(n.startswith('shard-') for n in names)} shards"


@pytest.fixture(scope="module")
def runs(teacher_dirs, corpus_file, tmp_path_factory):
    """The uninterrupted single-process reference and an uninterrupted 3-process run."""
    root = tmp_path_factory.mktemp("sharded")
    t = teacher_dirs["llama"]
    in_process(*args(t, corpus_file, root / "one"))
    launch(3, *args(t, corpus_file, root / "three"))
    ok_result(root / "three", 3)
    return {"t": t, "c": corpus_file, "one": root / "one", "three": root / "three", "root": root}


def test_three_ranks_write_their_own_shards_and_an_index(runs):
    one, three = runs["one"], runs["three"]
    assert [c.name for c in list_checkpoints(three / "checkpoints")] == ["step-0000002", "step-0000004"]
    shards = [shard_file_name(r, 3) for r in range(3)]
    for step in (2, 4):
        c = ckpt(three, step)
        assert sorted(p.name for p in c.iterdir()) == sorted([INDEX, "trainer.json", *shards])
        idx = json.loads((c / INDEX).read_text())
        assert idx["world_size"] == 3 and idx["step"] == step
        assert json.loads((c / "trainer.json").read_text())["world_size"] == 3
        for r, f in enumerate(idx["files"]):
            data = (c / f["name"]).read_bytes()
            assert f["rank"] == r and f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
        # every sharded tensor: rank r holds torch.chunk's rows [start, stop) of dim 0
        for name, e in idx["tensors"].items():
            if e["shape"]:
                assert e["shards"] == [{"file": r, "start": a, "stop": b}
                                       for r in range(3) for a, b in [row_range(e["shape"][0], r, 3)]], name
        assert idx["tensors"]["student.embed"]["shards"][-1] == {"file": 2, "start": 44, "stop": 64}  # uneven: 22/22/20
    # each file holds ~1/3 of the trainable tensor bytes (student + AdamW moments)
    c = ckpt(three, 4)
    per_file = []
    for name in shards:
        sd = load_file(str(c / name))
        per_file.append(sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith(("student.", "opt."))
                            and v.dim()))
    single = load_file(str(ckpt(one, 4) / "state.safetensors"))
    total = sum(v.numel() * v.element_size() for k, v in single.items() if k.startswith(("student.", "opt.")) and v.dim())
    assert sum(per_file) == total
    assert all(0.30 * total <= b <= 0.36 * total for b in per_file), (per_file, total)
    sizes = [(c / n).stat().st_size for n in shards]
    one_size = (ckpt(one, 4) / "state.safetensors").stat().st_size
    assert max(sizes) <= 0.4 * one_size, (sizes, one_size)
    print(f"\ntrainable bytes per shard {per_file} of {total}; files {sizes} bytes vs one file {one_size}")
    # the same training as one process, and the same exported student
    assert_matches(three, one)
    e1 = load_file(str(one / "student/model.safetensors"))
    e3 = load_file(str(three / "student/model.safetensors"))
    assert set(e1) == set(e3) and all((e1[k] - e3[k]).abs().max() <= ATOL for k in e1)
    # check_checkpoint (resume's test) and the single-process reader take both layouts
    for path in (ckpt(one, 4), ckpt(three, 4)):
        check_checkpoint(path, {"hidden_size": 32}, None, verify_hashes=True)


def test_three_rank_checkpoint_resumes_on_two_and_on_one(runs, tmp_path):
    t, c, one = runs["t"], runs["c"], runs["one"]
    two = resumable_copy(runs["three"], tmp_path / "3to2")
    launch(2, *args(t, c, two, "--resume"))
    ok_result(two, 2)
    assert layout(ckpt(two, 2)) == "3 shards" and layout(ckpt(two, 4)) == "2 shards"
    print("\n2-rank shard files:", [f.stat().st_size for f in sorted(ckpt(two, 4).glob("shard-*"))])
    assert_matches(two, one)
    single = resumable_copy(runs["three"], tmp_path / "3to1")
    in_process(*args(t, c, single, "--resume"))
    ok_result(single, 1)
    assert layout(ckpt(single, 4)) == "one file"
    assert_matches(single, one)


def test_one_process_checkpoint_resumes_on_three(runs, tmp_path):
    three = resumable_copy(runs["one"], tmp_path / "1to3")
    launch(3, *args(runs["t"], runs["c"], three, "--resume"))
    ok_result(three, 3)
    assert layout(ckpt(three, 2)) == "one file" and layout(ckpt(three, 4)) == "3 shards"
    assert_matches(three, runs["one"])


def test_sigkill_inside_a_sharded_write_keeps_the_previous_checkpoint(runs, tmp_path):
    """Two ranks; rank 0 is held (tests/helpers.py, hold) after every shard of checkpoint 4 and the
    index are on disk in the temporary folder, before trainer.json and the rename; then
    both workers and torchrun are SIGKILLed (torchrun starts each worker in a session of
    its own, so the workers are found as torchrun's children and killed by pid)."""
    out = tmp_path / "killed"
    cmd, env = torchrun_cmd(2, "helpers", "hold", "save:4", *args(runs["t"], runs["c"], out))
    log = open(tmp_path / "killed.log", "w")
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    marker = out / "checkpoints/.hold-save-4"
    t0 = time.time()
    try:
        while not marker.exists():
            assert p.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() - t0 < 240, "fault point not reached"
            time.sleep(0.1)
    finally:
        workers = children(p.pid)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        p.kill()
        p.wait()
        log.close()
        while any(alive(pid) for pid in workers):
            time.sleep(0.05)
    assert len(workers) == 2
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-0000002"]
    half = list((out / "checkpoints").glob(".step-0000004.tmp-*"))
    assert len(half) == 1
    assert sorted(f.name for f in half[0].iterdir()) == sorted([INDEX, shard_file_name(0, 2), shard_file_name(1, 2)])
    # the killed workers are not this test's children: their folder lock goes with their
    # last open file, which the kernel may close a moment after /proc shows them gone
    from red.run.folder import RunDir

    deadline = time.time() + 30
    while RunDir(out).holder() is not None and time.time() < deadline:
        time.sleep(0.05)
    in_process(*args(runs["t"], runs["c"], out, "--resume"))
    ok_result(out, 1)
    assert not list((out / "checkpoints").glob(".step-*"))  # the half-written set was cleaned
    assert_matches(out, runs["one"])


def children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _one_line_error(capfd, rc, *needles):
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("red export: error:"), err
    assert all(n in lines[0] for n in needles), err


def test_a_tampered_set_is_not_a_checkpoint(runs, tmp_path, capfd):
    run = tmp_path / "tampered"
    shutil.copytree(runs["three"], run)
    c2, c4 = ckpt(run, 2), ckpt(run, 4)

    def export(checkpoint=None):
        capfd.readouterr()
        extra = ["--checkpoint", str(checkpoint)] if checkpoint else []
        return main(["export", "--run", str(run), "--out", str(tmp_path / "export"), "--overwrite", *extra])

    # the intact set exports the student of the single-process run (the rows joined)
    assert export() == 0
    e1 = load_file(str(runs["one"] / "student/model.safetensors"))
    e3 = load_file(str(tmp_path / "export/model.safetensors"))
    assert set(e1) == set(e3) and all((e1[k] - e3[k]).abs().max() <= ATOL for k in e1)
    # a byte changed inside a shard (size and header intact): its sha256 gives it away
    f = c4 / shard_file_name(1, 3)
    good = f.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF
    f.write_bytes(bytes(bad))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-0000002", "step-0000004"]
    _one_line_error(capfd, export(c4), str(c4), shard_file_name(1, 3), "sha256")
    # a shard from another save (step 2's, the same size): the save id gives it away
    shutil.copy(c2 / shard_file_name(1, 3), f)
    with pytest.raises(RedError, match="belongs to another save"):
        check_checkpoint(c4, {})
    f.write_bytes(good)
    # a shard file deleted: step 4 is no checkpoint, the last complete one is step 2
    (c4 / shard_file_name(2, 3)).unlink()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-0000002"]
    _one_line_error(capfd, export(c4), str(c4), f"shard file {shard_file_name(2, 3)} is missing")
    # a shard file truncated: no checkpoint is complete any more
    g = c2 / shard_file_name(0, 3)
    size = g.stat().st_size
    g.write_bytes(g.read_bytes()[:-100])
    assert list_checkpoints(run / "checkpoints") == []
    _one_line_error(capfd, export(c2), f"shard file {shard_file_name(0, 3)} has {size - 100} bytes, "
                                       f"the index records {size}")
    rc = export()
    err = capfd.readouterr().err
    assert rc == 2 and "has no complete checkpoint" in err


def test_disk_full_on_one_rank_keeps_the_last_checkpoint(runs, tmp_path):
    """Rank 1 of 2 runs out of space inside its shard of checkpoint 4 (a partial file, then
    ENOSPC; see the __main__ block below): every rank stops with exit code 2, rank 0 says
    so in one line, the partial set is removed and step 2 stays the last checkpoint."""
    out = tmp_path / "full"
    cmd, env = torchrun_cmd(2, "helpers", "disk-full", "1:4", *args(runs["t"], runs["c"], out))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode != 0 and "exitcode  : 2" in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("red distill: error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert all(s in lines[0] for s in (f"could not write checkpoint {ckpt(out, 4)}", "No space left on device on rank 1",
                                       f"the last complete checkpoint {ckpt(out, 2)} is kept")), lines[0]
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-0000002"]
    assert not list((out / "checkpoints").glob(".step-*"))
    in_process(*args(runs["t"], runs["c"], out, "--resume"))
    ok_result(out, 1)
