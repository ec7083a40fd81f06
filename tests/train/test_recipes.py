"""recipes/: every YAML loads through the config dataclass, holds the papers' settings, and
the README's memory table equals what `red plan` (plan_memory) computes for it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from red.config import make_config
from red.errors import RedError
from red.train.plan import plan_memory

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
GIB = 2 ** 30
TOKENS_PER_STEP = 524_288  # LRC: ~0.5M tokens per optimizer step

# recipe -> (teacher config folder, width, preset, init, temperature, clone_weight α)
PAPER = {
    "llama3.2-3b-red-1536.yaml": ("llama-3.2-3b", 1536, "red", "red", 1.0, 0.2),
    "llama3.2-3b-lrc-1536.yaml": ("llama-3.2-3b", 1536, "lrc", "lrc", 40.0, 0.2),
    "qwen2.5-3b-red-1024.yaml": ("qwen2.5-3b", 1024, "red", "red", 1.0, 0.5),
    "qwen2.5-3b-lrc-1024.yaml": ("qwen2.5-3b", 1024, "lrc", "lrc", 40.0, 0.5),
}
TEACHERS = {"llama-3.2-3b": (3072, 28, 128256), "qwen2.5-3b": (2048, 36, 151936)}
COLUMNS = ("total", "activations", "teacher", "optimizer", "projections", "gradients", "weights", "weight_grads",
           "gathered", "logits", "step_buffers")


def _load(path: Path, tmp_path: Path):
    return make_config(path, teacher=str(tmp_path / "teacher"), data=str(tmp_path / "c.jsonl"),
                       out=str(tmp_path / "out"))


def test_recipe_set_is_the_papers():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_loads_and_matches_paper(name, tmp_path):
    path = RECIPES / name
    raw = yaml.safe_load(path.read_text())
    assert raw["teacher"] and raw["data"] and raw["out"]  # placeholders, accepted as they are
    make_config(path)  # the file as shipped validates
    cfg = _load(path, tmp_path)
    cfg_dir, d, preset, init, temperature, alpha = PAPER[name]
    assert (cfg.hidden_size, cfg.preset, cfg.init, cfg.temperature, cfg.clone_weight) == \
        (d, preset, init, temperature, alpha)
    assert (cfg.lr, cfg.grad_clip, cfg.seq_len, cfg.precision) == (1e-4, 1.0, 2048, "bf16")
    assert cfg.batch_size * cfg.grad_accum * cfg.seq_len == TOKENS_PER_STEP
    assert abs(cfg.steps * TOKENS_PER_STEP - 10e9) < TOKENS_PER_STEP  # ~10 B tokens
    text = path.read_text()
    assert f"red distill --config recipes/{name}" in text  # how to run it, in the header
    assert f"recipes/configs/{cfg_dir}/config.json" in text


def test_unknown_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "llama3.2-3b-red-1536.yaml").read_text() + "learning_rate: 3.0e-4\n")
    with pytest.raises(RedError, match="unknown configuration key 'learning_rate'"):
        _load(bad, tmp_path)


@pytest.mark.parametrize("cfg_dir", sorted(TEACHERS))
def test_teacher_configs_are_the_public_ones(cfg_dir):
    from red.model.arch import read_teacher_json

    raw = read_teacher_json(RECIPES / "configs" / cfg_dir)
    assert (raw["hidden_size"], raw["num_hidden_layers"], raw["vocab_size"]) == TEACHERS[cfg_dir]
    assert raw["head_dim"] * raw["num_attention_heads"] == raw["hidden_size"]
    assert raw["tie_word_embeddings"] is True


def _plan(cfg, gpus: int, checkpointing: bool, sharding: str = "shard") -> dict:
    cfg_dir = PAPER[Path(cfg).name][0]
    c = make_config(cfg)
    return plan_memory(RECIPES / "configs" / cfg_dir / "config.json", c.hidden_size, c.seq_len, c.batch_size,
                       gpus, activation_checkpointing=checkpointing, teacher_sharding=sharding,
                       grad_accum=c.grad_accum)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_plan_runs_and_shrinks_on_8_gpus(name):
    for ckpt in (False, True):
        one = _plan(RECIPES / name, 1, ckpt)
        shard, rep = _plan(RECIPES / name, 8, ckpt)["per_gpu"], _plan(RECIPES / name, 8, ckpt, "replicate")["per_gpu"]
        assert 0 < shard["total"] < one["per_gpu"]["total"] and 0 < rep["total"] < one["per_gpu"]["total"]
        # 8 GPUs gather each layer's step weights, a sharded teacher's layers besides
        assert shard["gathered"] > rep["gathered"] > 0 == one["per_gpu"]["gathered"]
        assert rep["teacher"] == one["per_gpu"]["teacher"] > shard["teacher"]


def _readme_rows() -> dict:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| `(\S+)-\{red,lrc\}-(\d+)` \| (\d+) \| (\d+) \| (shard|replicate|-) \| (on|off) \|(.*)\|",
                         line)
        if m:
            rows[(m[1], int(m[2]), int(m[3]), m[5], m[6] == "on")] = (int(m[4]), [c.strip() for c in m[7].split("|")])
    return rows


def test_readme_table_is_what_plan_computes():
    rows = _readme_rows()
    assert len(rows) == 2 * (2 + 2 * 2)  # 2 teachers x (1 GPU + 8 GPUs x {shard, replicate}) x checkpointing off/on
    for name in PAPER:  # both recipes of a teacher share the row
        stem, d = re.fullmatch(r"(\S+)-(?:red|lrc)-(\d+)\.yaml", name).groups()
        for gpus, sharding in ((1, "-"), (8, "shard"), (8, "replicate")):
            for ckpt in (False, True):
                per_gpu_seqs, cells = rows[(stem, int(d), gpus, sharding, ckpt)]
                cfg = make_config(RECIPES / name)
                assert per_gpu_seqs == cfg.batch_size // gpus
                plan = _plan(RECIPES / name, gpus, ckpt, "shard" if sharding == "-" else sharding)
                expect = [f"{plan['per_gpu'][c] / GIB:.2f}" for c in COLUMNS] + \
                    [f"{plan['communication']['total'] / GIB:.2f}"]
                assert cells == expect, (name, gpus, sharding, ckpt)


def test_readme_drops_untested_vllm_claim():
    text = (ROOT / "README.md").read_text()
    intro = text.split("\n## ", 1)[0]
    assert "vLLM" not in intro
    assert "AutoModelForCausalLM" in text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
