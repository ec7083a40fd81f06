"""The architectures red supports, from their config alone (no torch, no transformers):
which ones, the shape facts of a teacher (``Arch``), the one width rule, and the shapes of
the tensors a teacher holds and a student trains. Commands check their inputs with these
before torch is imported; the model code asks the same functions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from red.errors import RedError


SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def read_teacher_json(path: str | Path) -> dict:
    """The teacher folder's config.json as a dict, after the path and architecture checks."""
    p = Path(path)
    if not str(path):
        raise RedError("no teacher given; pass --teacher DIR (a local Hugging Face model folder)")
    if not p.exists():
        raise RedError(f"teacher folder {p} does not exist; pass --teacher DIR with a local Hugging Face model folder")
    if not p.is_dir():
        raise RedError(f"teacher path {p} is not a folder; pass the folder that holds config.json and *.safetensors")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise RedError(f"teacher folder {p} has no config.json; point --teacher at a Hugging Face model folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RedError(f"teacher config {cfg_file} is unreadable ({e}); restore the file") from None
    if not isinstance(raw, dict):
        raise RedError(f"teacher config {cfg_file} is not a JSON object; restore the file")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        names = ", ".join(SUPPORTED.values())
        raise RedError(f"teacher architecture {model_type!r} is not supported; supported: {names}")
    return raw


def check_width(D, d: int, flag: str = "--hidden-size") -> None:
    """The width rule: a student width strictly between 0 and the teacher's width ``D``
    (``d`` = D would be the teacher itself; only the residual width shrinks). ``D`` not an
    int (a config without it) leaves the upper bound to the loader's checks."""
    upper = D if isinstance(D, int) and not isinstance(D, bool) else None
    if not isinstance(d, int) or isinstance(d, bool) or d < 1 or (upper is not None and d >= upper):
        span = f"between 1 and {upper - 1} (the teacher's width is {upper})" if upper else "at least 1"
        raise RedError(f"{flag} {d} must be {span}")


def check_seq_len(raw: dict, seq_len: int) -> None:
    """``seq_len`` within the teacher's positions (a longer sequence is not what it was
    trained on, and a huge one would run for ever)."""
    max_pos = raw.get("max_position_embeddings")
    if isinstance(max_pos, int) and max_pos > 0 and seq_len > max_pos:
        raise RedError(f"--seq-len {seq_len} is above the teacher's max_position_embeddings={max_pos}; lower "
                       f"--seq-len to {max_pos} or less")


@dataclass(frozen=True)
class Arch:
    """The shape facts of a teacher that the student and the export need."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied: bool
    qk_norm: bool
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config) -> "Arch":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=config.model_type == "qwen3",
            rms_norm_eps=float(config.rms_norm_eps),
        )


def check_supported_features(config) -> None:
    """Refuse configurations of a supported architecture that the student cannot mirror
    (used by ``read_teacher_config`` and by ``red plan``, so both refuse the same teachers)."""
    model_type = config.model_type
    if getattr(config, "use_sliding_window", False):
        raise RedError("teachers with sliding-window attention are not supported; set use_sliding_window=false in config.json if it is unused")
    if getattr(config, "mlp_bias", False) or (model_type == "llama" and getattr(config, "attention_bias", False)):
        raise RedError("Llama teachers with attention_bias or mlp_bias are not supported; use a teacher without those biases")
    if model_type == "qwen3" and getattr(config, "attention_bias", False):
        # transformers then gives o_proj a bias too, which the student has no place for
        raise RedError("Qwen3 teachers with attention_bias are not supported; use a teacher without attention biases")


PROJ_IN = ("q", "k", "v", "gate", "up")


PROJ_OUT = ("o", "down")


PROJ_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def step_layer_shapes(arch: Arch, d: int) -> dict[str, tuple[int, ...]]:
    """Shape of each of one layer's step weights (``LAYER_WEIGHTS``): [out, d] for q, k, v,
    gate, up, [d, in] for o and down, [d] for the gains, [D, d] for P_down."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    I, D = arch.intermediate_size, arch.hidden_size
    out = {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (I, d), "up": (I, d), "down": (d, I)}
    return {**out, "input_norm": (d,), "post_attention_norm": (d,), "down_target": (D, d)}


def trainable_shapes(arch: Arch, d: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable tensor of a width-``d`` student of ``arch``, in the
    order of ``ProjectedStudent.state_dict()`` (computed from the config alone)."""
    D = arch.hidden_size
    out: dict[str, tuple[int, ...]] = {"embed": (D, d)}
    if not arch.tied:
        out["lm_head"] = (D, d)
    out["final_norm"] = (d,)
    for i in range(arch.num_layers):
        out.update({f"layers.{i}.{n}": (D, d) for n in PROJ_NAMES})
        out[f"layers.{i}.input_norm"] = (d,)
        out[f"layers.{i}.post_attention_norm"] = (d,)
    return out


def teacher_shapes(arch: Arch, attention_bias: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every teacher parameter (transformers' names; a tied head is
    counted once, as the embedding)."""
    D, I, V, h = arch.hidden_size, arch.intermediate_size, arch.vocab_size, arch.head_dim
    q, kv = arch.num_heads * h, arch.num_kv_heads * h
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
                    p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q)})
        if attention_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
        if arch.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,)})
        out.update({p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                    p + "mlp.down_proj.weight": (D, I), p + "input_layernorm.weight": (D,),
                    p + "post_attention_layernorm.weight": (D,)})
    out["model.norm.weight"] = (D,)
    if not arch.tied:
        out["lm_head.weight"] = (V, D)
    return out


def has_attention_bias(config) -> bool:
    """Whether the teacher's q/k/v projections carry biases: Qwen2 always (transformers
    hard-codes them), the others when ``attention_bias`` is set."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return get("model_type") == "qwen2" or bool(get("attention_bias", False))


def expected_teacher_shapes(config) -> dict[str, tuple[int, ...]]:
    """``teacher_shapes`` for a teacher's (transformers) config: what its safetensors must hold."""
    return teacher_shapes(Arch.from_config(config), has_attention_bias(config))


def student_weight_elements(arch: Arch, d: int) -> int:
    """Elements of one layer's student weights W_t P (q, k, v, o, gate, up, down)."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return (2 * q + 2 * kv + 3 * arch.intermediate_size) * d
