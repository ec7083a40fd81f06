"""Packed documents (doc_ids: block-diagonal causal attention, positions restarting at each
document) and the per-token loss mask, against each document run alone and against
transformers' own forward."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from red.train.initialization import initialize
from red.model.student import CLONE_TERMS, LossSettings, ProjectedStudent, doc_attention

ARCHS = ("llama", "qwen2", "qwen3")
# two packed rows of T=24, three documents each, of different lengths; ids are arbitrary labels
LENGTHS = ((7, 12, 5), (10, 4, 10))
LABELS = ((3, 8, 9), (0, 1, 5))
T = 24
TOL = 1e-5  # fp32: max |packed - alone| <= TOL * max |alone| (measured ~1e-7)


@pytest.fixture(params=ARCHS)
def setup(request, loaded_teachers, device):
    """(teacher, student, ids [2,T], doc_ids [2,T]) on the test device: an orthogonal
    student with randomized gains, so that it is not the teacher pruned."""
    teacher, _ = loaded_teachers[request.param]
    if teacher.device != device:
        teacher = copy.deepcopy(teacher).to(device)
    st = ProjectedStudent(teacher, 32)
    initialize(st, "orthogonal", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in st.gains().values():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(4, teacher.config.vocab_size, (2, T), generator=g).to(device)
    doc_ids = torch.tensor([sum(([lab] * n for lab, n in zip(labs, lens)), [])
                            for labs, lens in zip(LABELS, LENGTHS)], device=device)
    return teacher, st, ids, doc_ids


def _spans(b):
    """(start, end) of each document of row b."""
    out, s = [], 0
    for n in LENGTHS[b]:
        out.append((s, s + n))
        s += n
    return out


def _close(got, want, tol=TOL):
    err = (got - want).abs().max() / want.abs().max()
    assert err <= tol, float(err)


def _teacher_logits(st, ids, doc_ids=None):
    """The lockstep teacher path of the student, to logits."""
    with torch.no_grad():
        *_, (_, h, _, _) = st.lockstep(ids, doc_ids=doc_ids)  # after the final norms
        return h @ st.teacher.lm_head.weight.T


def test_doc_attention_positions_and_mask():
    doc_ids = torch.tensor([[5, 5, 5, 7, 7, 9], [0, 0, 0, 0, 0, 0]])
    pos, mask = doc_attention(doc_ids)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0], list(range(6))]
    want = torch.tensor([[[bool(doc_ids[b, q] == doc_ids[b, k] and k <= q) for k in range(6)] for q in range(6)]
                         for b in range(2)])
    assert mask.shape == (2, 1, 6, 6) and torch.equal(mask[:, 0], want)


def test_packed_student_equals_documents_alone(setup):
    teacher, st, ids, doc_ids = setup
    with torch.no_grad():
        hs = st.hidden_states(ids, doc_ids)
        logits = st(ids, doc_ids)
        plain = st(ids)
        for b in range(2):
            for s, e in _spans(b):
                alone = st.hidden_states(ids[b:b + 1, s:e])
                for h, ha in zip(hs, alone):
                    _close(h[b, s:e], ha[0])
                _close(logits[b, s:e], st(ids[b:b + 1, s:e])[0])
    # the mask and positions matter: without doc_ids later documents differ
    assert (plain[:, 7:] - logits[:, 7:]).abs().max() > 1e-2


def test_packed_teacher_path_equals_transformers_alone(setup):
    teacher, st, ids, doc_ids = setup
    got = _teacher_logits(st, ids, doc_ids)
    with torch.no_grad():
        for b in range(2):
            for s, e in _spans(b):
                ref = teacher(input_ids=ids[b:b + 1, s:e]).logits[0]
                _close(got[b, s:e], ref)


def _grads(st, fn):
    st.zero_grad(set_to_none=True)
    out = fn()
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in st.named_trainable_parameters()}
    st.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in out.items()}, grads


def test_no_doc_ids_and_no_mask_are_the_plain_path(setup):
    """Giving neither doc_ids nor a loss mask, or a mask that scores everything, is the plain
    path bit for bit; one document per row through the masked path is the same to rounding."""
    teacher, st, ids, _ = setup
    loss = LossSettings(temperature=2.0)
    want, gw = _grads(st, lambda: st.distill_losses(ids, loss))
    for call in (lambda: st.distill_losses(ids, loss, None, None),
                 lambda: st.distill_losses(ids, loss, None, torch.ones_like(ids, dtype=torch.bool))):
        got, gg = _grads(st, call)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(gg[k], gw[k]) for k in gw)
    one, _ = _grads(st, lambda: st.distill_losses(ids, loss, doc_ids=torch.zeros_like(ids)))
    for k in want:
        assert torch.allclose(one[k], want[k], rtol=1e-5, atol=1e-7), k


def test_distill_losses_packed_equals_documents_recombined(setup):
    """KL and LM are means over the scored rows (L_i - 1 per document: the boundary
    prediction is dropped), clone MSEs means over every token (L_i per document)."""
    teacher, st, ids, doc_ids = setup
    loss = LossSettings(temperature=2.0, clone_norm="none")
    with torch.no_grad():
        packed = st.distill_losses(ids, loss, doc_ids)
        parts = [(e - s, st.distill_losses(ids[b:b + 1, s:e], loss)) for b in range(2) for s, e in _spans(b)]
    scored = sum(n - 1 for n, _ in parts)
    tokens = sum(n for n, _ in parts)
    for k in ("kl", "lm"):
        want = sum((n - 1) * p[k].double() for n, p in parts) / scored
        assert torch.allclose(packed[k].double(), want, rtol=1e-5), k
    for k in ["clone"] + [f"clone/{t}" for t in CLONE_TERMS]:
        want = sum(n * p[k].double() for n, p in parts) / tokens
        assert torch.allclose(packed[k].double(), want, rtol=1e-5), k


def _direct_kl_lm(zs, zt, ids, scored, temp):
    """KL(teacher || student) at temperature temp and the student's CE, float64, averaged
    over the rows (b, t) where scored[b, t] (row t predicts token t + 1)."""
    zs, zt = zs[:, :-1].double()[scored], zt[:, :-1].double()[scored]
    lt, ls = F.log_softmax(zt / temp, -1), F.log_softmax(zs / temp, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    lm = F.cross_entropy(zs, ids[:, 1:][scored])
    return kl, lm


@pytest.mark.parametrize("packed", [False, True])
def test_loss_mask_restricts_kl_and_lm(setup, packed):
    teacher, st, ids, doc_ids = setup
    docs = doc_ids if packed else None
    g = torch.Generator().manual_seed(2)
    loss_mask = (torch.rand(ids.shape, generator=g) < 0.6).to(ids.device)
    loss = LossSettings(temperature=2.0)
    with torch.no_grad():
        out = st.distill_losses(ids, loss, docs, loss_mask.to(torch.uint8))
        unmasked = st.distill_losses(ids, loss, docs)
        if packed:  # the independent logits: every document run alone, side by side
            zs = torch.zeros(2, T, teacher.config.vocab_size, device=ids.device)
            zt = torch.zeros_like(zs)
            for b in range(2):
                for s, e in _spans(b):
                    zs[b, s:e] = st(ids[b:b + 1, s:e])[0]
                    zt[b, s:e] = teacher(input_ids=ids[b:b + 1, s:e]).logits[0]
        else:
            zs, zt = st(ids), teacher(input_ids=ids).logits
    scored = loss_mask[:, 1:].clone()
    if packed:
        scored &= doc_ids[:, 1:] == doc_ids[:, :-1]
    kl, lm = _direct_kl_lm(zs, zt, ids, scored, 2.0)
    assert torch.allclose(out["kl"].double(), kl, rtol=1e-4), (out["kl"], kl)
    assert torch.allclose(out["lm"].double(), lm, rtol=1e-4), (out["lm"], lm)
    assert not torch.allclose(out["kl"], unmasked["kl"], rtol=1e-3)  # the mask changed the rows
    for k in ["clone"] + [f"clone/{t}" for t in CLONE_TERMS]:
        assert torch.equal(out[k], unmasked[k]), k


def test_all_zero_loss_mask_rows_are_finite(setup):
    teacher, st, ids, doc_ids = setup
    loss = LossSettings()
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0] = False
    with torch.no_grad():
        out = st.distill_losses(ids, loss, doc_ids, mask)
        row1 = st.distill_losses(ids[1:], loss, doc_ids[1:])
    assert all(torch.isfinite(v).all() for v in out.values())
    for k in ("kl", "lm"):  # an unscored row adds nothing, not even to the denominator
        assert torch.allclose(out[k], row1[k], rtol=1e-6), k
    # no scored token in the whole batch: KL = LM = 0, the clone terms still train
    out, grads = _grads(st, lambda: st.distill_losses(ids, loss, doc_ids, torch.zeros_like(ids)))
    assert out["kl"] == 0 and out["lm"] == 0
    assert torch.allclose(out["loss"], loss.clone_weight * out["clone"])
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_gradients_with_doc_ids_and_loss_mask_and_checkpointing(setup):
    teacher, st, ids, doc_ids = setup
    loss_mask = torch.ones_like(ids)
    loss_mask[:, 3:9] = 0
    loss = LossSettings(temperature=2.0)
    run = lambda: st.distill_losses(ids, loss, doc_ids, loss_mask)  # noqa: E731
    out, plain = _grads(st, run)
    st.activation_checkpointing = True
    try:
        out_ck, ckpt = _grads(st, run)
    finally:
        st.activation_checkpointing = False
    assert torch.equal(out["loss"], out_ck["loss"])
    for n, g in plain.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
        assert torch.allclose(ckpt[n], g, rtol=1e-6, atol=1e-9), n
    # and the gradient differs from the unpacked, unmasked one: the new arguments reach it
    _, unpacked = _grads(st, lambda: st.distill_losses(ids, loss))
    assert not torch.allclose(unpacked["embed"], plain["embed"], rtol=1e-3)


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


def test_no_host_reads(setup):
    teacher, st, ids, doc_ids = setup
    with _HostReads() as mode:
        st.distill_losses(ids, LossSettings(), doc_ids, ids > 20)["loss"].backward()
    assert mode.n == 0


def test_doc_ids_shape_is_checked(setup):
    teacher, st, ids, doc_ids = setup
    with pytest.raises(ValueError, match="doc_ids"):
        st.distill_losses(ids, LossSettings(), doc_ids[:, :-1])
    with pytest.raises(ValueError, match="doc_ids"):
        st(ids, doc_ids[:1])
    with pytest.raises(ValueError, match="loss_mask"):
        st.distill_losses(ids, LossSettings(), doc_ids, torch.ones(2, T + 1, dtype=torch.bool))
