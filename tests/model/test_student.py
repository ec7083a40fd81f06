"""The student's forward against transformers' own forward, and the red init's exactness."""
import copy

import pytest
import torch

from red.train.calibration import calibrate, channel_scores
from red.data.corpus import load_corpus
from red.train.initialization import initialize, select_channels, selection_matrix
from red.train.startup import build_student
from red.model.student import ProjectedStudent
from red.model.metrics import spectrum

ARCHS = ("llama", "qwen2", "qwen3")


def _ids(tok, corpus_file, n=4, T=24):
    return load_corpus(corpus_file, tok, T).train[:n]


@pytest.mark.parametrize("arch", ARCHS)
def test_lockstep_teacher_path_matches_transformers(arch, loaded_teachers, corpus_file):
    teacher, tok = loaded_teachers[arch]
    ids = _ids(tok, corpus_file)
    st = ProjectedStudent(teacher, 16)
    with torch.no_grad():
        *_, (_, h, _, _) = st.lockstep(ids)  # the last item: both streams after their final norms
        mine = h @ teacher.lm_head.weight.T
        ref = teacher(input_ids=ids).logits
    assert (mine - ref).abs().max() <= 1e-5 * ref.abs().max()


def _sliced_teacher(teacher, S):
    """The width-pruned teacher built independently: slice every tensor to channels S and
    load it into the teacher's own transformers class."""
    cfg = copy.deepcopy(teacher.config)
    cfg.hidden_size = len(S)
    cfg.head_dim = teacher.config.head_dim
    model = type(teacher)(cfg).eval()
    sd = {}
    for k, v in teacher.state_dict().items():
        if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            v = v[:, S]
        elif k.endswith(("o_proj.weight", "down_proj.weight")):
            v = v[S, :]
        elif k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or k == "model.norm.weight":
            v = v[S]
        elif k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = v[:, S]
        sd[k] = v.clone()
    model.load_state_dict(sd, strict=False)
    if cfg.tie_word_embeddings:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_red_init_equals_width_pruned_teacher(arch, loaded_teachers, corpus_file):
    teacher, tok = loaded_teachers[arch]
    corpus = load_corpus(corpus_file, tok, 24)
    cal = calibrate(teacher, corpus.train[:6], progress=False)
    d = 40
    student = build_student(teacher, d, "red", cal)
    S = select_channels(channel_scores(cal), d)
    assert torch.equal(student.channels, S)
    ids = corpus.train[6:10]
    with torch.no_grad():
        got = student(ids)
        ref = _sliced_teacher(teacher, S)(input_ids=ids).logits
    rel = (got - ref).norm() / ref.norm()
    assert rel <= 1e-5, rel
    # and it is not trivially equal to the full teacher
    with torch.no_grad():
        full = teacher(input_ids=ids).logits
    assert (got - full).norm() / full.norm() > 1e-3


def test_select_channels_top_d_ascending():
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0])
    S = select_channels(scores, 3)
    assert S.tolist() == [1, 3, 5]
    with pytest.raises(Exception, match="width"):
        select_channels(scores, 6)


def test_selection_matrix_gathers_columns_and_rows():
    W = torch.randn(5, 8)
    S = torch.tensor([1, 4, 6])
    P = selection_matrix(S, 8)
    assert torch.equal(W @ P, W[:, S])
    W2 = torch.randn(8, 5)
    assert torch.equal(P.T @ W2, W2[S, :])
    s = spectrum(P)
    assert abs(s["max"] - 1) < 1e-12 and abs(s["min"] - 1) < 1e-12


def test_initializations(loaded_teachers):
    teacher, _ = loaded_teachers["llama"]
    D, d = teacher.config.hidden_size, 32
    st = ProjectedStudent(teacher, d)
    initialize(st, "lrc", std=0.02, seed=1)
    allp = torch.cat([p.flatten() for p in st.projections().values()])
    assert abs(allp.std().item() - 0.02) < 0.002 and abs(allp.mean().item()) < 0.002
    assert all(torch.equal(g, torch.ones_like(g)) for g in st.gains().values())
    first = st.layers[0].q.detach().clone()
    assert not torch.equal(first, st.layers[0].k)  # independent draws per projection
    initialize(st, "lrc", std=0.02, seed=1)
    assert torch.equal(first, st.layers[0].q)  # seeded
    initialize(st, "lrc", std=None, seed=1)
    assert abs(st.layers[0].q.std().item() - D ** -0.5) < 0.15 * D ** -0.5

    initialize(st, "orthogonal", seed=2)
    for p in st.projections().values():
        assert torch.allclose(p.T @ p, torch.eye(d), atol=1e-5)

    S = initialize(st, "random-select", seed=3)
    assert S.numel() == d and S.unique().numel() == d
    for p in st.projections().values():
        assert torch.equal(p, selection_matrix(S, D))
    assert torch.equal(st.final_norm, teacher.model.norm.weight[S])
    assert torch.equal(st.layers[1].post_attention_norm, teacher.model.layers[1].post_attention_layernorm.weight[S])
    S2 = initialize(st, "random-select", seed=4)
    assert not torch.equal(S, S2)


def test_only_projections_and_gains_train(loaded_teachers, corpus_file):
    from red.model.student import LossSettings

    teacher, tok = loaded_teachers["qwen2"]
    st = ProjectedStudent(teacher, 32)
    initialize(st, "lrc", std=None)
    n_layers = teacher.config.num_hidden_layers
    assert len(st.projections()) == 7 * n_layers + 2  # untied: embed + lm_head
    assert len(st.gains()) == 2 * n_layers + 1
    assert set(dict(st.named_parameters())) == set(st.state_dict())
    out = st.distill_losses(_ids(tok, corpus_file), LossSettings())
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in st.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_hidden_size_out_of_range(loaded_teachers):
    teacher, _ = loaded_teachers["llama"]
    for bad in (0, -3, teacher.config.hidden_size, teacher.config.hidden_size + 5):
        with pytest.raises(Exception, match="--hidden-size .* must be"):
            ProjectedStudent(teacher, bad)
