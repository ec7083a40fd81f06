"""Loss terms against independent formulas; calibration statistics against hooks."""
import pytest
import torch
import torch.nn.functional as F

from red.train.calibration import Calibration, calibrate, channel_scores, norm_points
from red.data.corpus import load_corpus
from red.errors import RedError
from red.train.initialization import initialize
from red.model.student import LossSettings, ProjectedStudent


@pytest.fixture()
def setup(loaded_teachers, corpus_file):
    teacher, tok = loaded_teachers["qwen3"]
    st = ProjectedStudent(teacher, 32)
    initialize(st, "orthogonal", seed=0)
    with torch.no_grad():
        for g in st.gains().values():
            g.copy_(1 + 0.3 * torch.randn_like(g))
    ids = load_corpus(corpus_file, tok, 20).train[:3]
    return teacher, st, ids


@pytest.mark.parametrize("T,t2", [(1.0, False), (40.0, False), (4.0, True)])
def test_kl_and_lm_terms_match_direct_formulas(setup, T, t2):
    teacher, st, ids = setup
    loss = LossSettings(temperature=T, kl_t2_scale=t2, kl_weight=0.7, lm_weight=0.3, clone_weight=0.0)
    out = st.distill_losses(ids, loss)
    with torch.no_grad():
        zs = st(ids).double()[:, :-1]
        zt = teacher(input_ids=ids).logits.double()[:, :-1]
    pt = F.log_softmax(zt / T, -1)
    ps = F.log_softmax(zs / T, -1)
    kl = (pt.exp() * (pt - ps)).sum(-1).mean()
    lm = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), ids[:, 1:].reshape(-1))
    # at T=40 the KL is ~1e-5: fp32 logits limit its relative precision to ~1e-3
    assert torch.allclose(out["kl"].double(), kl, rtol=2e-3)
    assert torch.allclose(out["lm"].double(), lm, rtol=1e-4)
    scale = T * T if t2 else 1.0
    assert torch.allclose(out["loss"].double(), 0.7 * scale * kl + 0.3 * lm, rtol=1e-4, atol=1e-6)


def _layer_activations(model, ids) -> list[dict]:
    """Per decoder layer of a transformers model, the tensors the clone terms compare,
    caught by hooks on its own modules: q, k, v, gate, up and FFN outputs, attention output
    (o_proj's input)."""
    rec = [dict() for _ in model.model.layers]
    hooks = []
    for r, layer in zip(rec, model.model.layers):
        at, mlp = layer.self_attn, layer.mlp
        for name, mod in (("q", at.q_proj), ("k", at.k_proj), ("v", at.v_proj), ("gate", mlp.gate_proj),
                          ("up", mlp.up_proj), ("ffn", mlp.down_proj)):
            hooks.append(mod.register_forward_hook(lambda m, a, o, r=r, n=name: r.__setitem__(n, o)))
        hooks.append(at.o_proj.register_forward_hook(lambda m, a, o, r=r: r.__setitem__("attn", a[0])))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return rec


def test_clone_terms_match_transformers_activations(setup):
    """Each clone term against the activations of transformers' own forward of the teacher
    and of the exported student (the same weights as a plain model)."""
    from red.model.export import merged_state_dict, student_config

    teacher, st, ids = setup
    raw = st.distill_losses(ids, LossSettings(clone_norm="none"))
    normed = st.distill_losses(ids, LossSettings(clone_norm="teacher-ms"))
    plain = type(teacher)(student_config(teacher, st.hidden_size, st.norm_eps, torch.float32)).eval()
    plain.load_state_dict(merged_state_dict(st), strict=False)
    rt_all, rs_all = _layer_activations(teacher, ids), _layer_activations(plain, ids)
    want = {k: 0.0 for k in ("q", "k", "v", "attn", "gate", "up", "ffn")}
    want_n = dict(want)
    for i, (rt, rs) in enumerate(zip(rt_all, rs_all)):
        for k in want:
            target = rt[k] @ st.layers[i].down.detach() if k == "ffn" else rt[k]
            mse = ((rs[k].double() - target.double()) ** 2).mean()
            want[k] += mse
            want_n[k] += mse / (rt[k].double() ** 2).mean()
    for k in want:
        assert torch.allclose(raw[f"clone/{k}"].double(), torch.as_tensor(want[k]), rtol=1e-4), k
        assert torch.allclose(normed[f"clone/{k}"].double(), torch.as_tensor(want_n[k]), rtol=1e-4), k
    assert torch.allclose(raw["clone"], sum(raw[f"clone/{k}"] for k in want), rtol=1e-5)
    total = raw["kl"] + raw["lm"] + 0.2 * raw["clone"]
    assert torch.allclose(raw["loss"].detach(), total, rtol=1e-5)


def test_calibration_statistics_match_forward_hooks(loaded_teachers, corpus_file, tmp_path):
    teacher, tok = loaded_teachers["llama"]
    seqs = load_corpus(corpus_file, tok, 16).train[:5]
    cal = calibrate(teacher, seqs, batch_size=2, progress=False)
    points = norm_points(teacher)
    assert cal.points == list(points) and cal.stats.shape == (len(points), 5, 4, teacher.config.hidden_size)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append((a[0], o)))
             for n, m in points.items()]
    with torch.no_grad():
        for b in range(5):
            teacher(input_ids=seqs[b:b + 1])
    for h in hooks:
        h.remove()
    for pi, name in enumerate(points):
        for b, (x, y) in enumerate(seen[name]):
            x, y = x[0].double(), y[0].double()
            ref = torch.stack([x.abs().sum(0), (x * x).sum(0), y.abs().sum(0), (y * y).sum(0)])
            assert torch.allclose(cal.stats[pi, b].double(), ref, rtol=1e-5, atol=1e-6), (name, b)
    # the norms' own forward is restored
    assert all("forward" not in m.__dict__ for m in points.values())
    # scores from the definitions
    T = 16
    mean_abs = cal.stats[:, :, 2].double() / T
    minitron = mean_abs.pow(2).sum(1).sqrt().sum(0)
    assert torch.allclose(channel_scores(cal, "minitron").double(), minitron, rtol=1e-6)
    rms = (cal.stats[:, :, 1].double().sum(1) / (5 * T)).sqrt().sum(0)
    assert torch.allclose(channel_scores(cal, "rms").double(), rms, rtol=1e-6)
    # the loud embedding channels 0..3 of the tiny teacher rank at the top under "rms"
    assert set(channel_scores(cal, "rms").topk(4).indices.tolist()) == {0, 1, 2, 3}
    # round trip through safetensors
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    back = Calibration.load(path)
    assert torch.equal(back.stats, cal.stats) and back.points == cal.points and back.tokens_per_seq == T
    # a truncated file is refused by name
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(RedError, match="corrupt or truncated"):
        Calibration.load(bad)
