"""red.train.trainer.train_step: one optimizer step, one host read-back, nothing stepped on NaN."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from red.data.corpus import load_corpus
from red.train.startup import build_student
from red.model.student import LossSettings
from red.train.trainer import StepError, make_optimizer, train_step


class ScalarReads(TorchDispatchMode):
    """Collects the tensors read back to the host by item()/float()/bool()."""

    def __init__(self):
        super().__init__()
        self.read = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.read.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def setup(loaded_teachers, corpus_file):
    teacher, tok = loaded_teachers["qwen3"]
    corpus = load_corpus(corpus_file, tok, 16)
    torch.manual_seed(0)
    st = build_student(teacher, 32, "orthogonal")
    return st, corpus


def test_one_host_read_per_step(setup, monkeypatch):
    """Loss terms and the gradient norm come back in one transfer, however many
    micro-batches; the only other scalar reads are AdamW's CPU step counters (which on a
    GPU live on the host and cost no synchronization)."""
    st, corpus = setup
    opt = make_optimizer(st.trainable_parameters(), 1e-3, "cpu")
    train_step(st, opt, [corpus.train[:2]], LossSettings())  # AdamW state exists from here on
    calls = []
    orig = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.shape) or orig(self))
    mode = ScalarReads()
    with mode:
        out = train_step(st, opt, [corpus.train[2:4], corpus.train[4:6], corpus.train[6:8]], LossSettings())
    steps = [s["step"] for s in opt.state.values()]
    others = [t for t in mode.read if not any(t is s for s in steps)]
    assert len(calls) == 1 and calls[0] == (len(out),), calls
    assert not others, f"{len(others)} extra host reads"
    assert {"loss", "kl", "lm", "clone", "grad_norm"} <= set(out)


def test_micro_batches_average(setup):
    """Two micro-batches give the mean of their losses and the gradient of that mean."""
    st, corpus = setup
    a, b = corpus.train[:2], corpus.train[2:4]
    loss = LossSettings()
    with torch.no_grad():
        la, lb = float(st.distill_losses(a, loss)["loss"]), float(st.distill_losses(b, loss)["loss"])
    opt = torch.optim.SGD(st.trainable_parameters(), lr=0.0)
    out = train_step(st, opt, [a, b], loss)
    assert out["loss"] == pytest.approx((la + lb) / 2, rel=1e-5)


def test_nonfinite_loss_steps_nothing(setup):
    st, corpus = setup
    opt = make_optimizer(st.trainable_parameters(), 1e-3, "cpu")
    before = {k: v.clone() for k, v in st.state_dict().items()}
    with torch.no_grad():
        st.final_norm.fill_(float("nan"))
    before["final_norm"] = st.final_norm.detach().clone()
    with pytest.raises(StepError, match="non-finite loss"):
        train_step(st, opt, [corpus.train[:2]], LossSettings())
    after = st.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) or (torch.isnan(v).all() and torch.isnan(after[k]).all()), k
    assert not opt.state  # AdamW never stepped


def test_fused_adamw_on_cuda_only(setup):
    st, _ = setup
    params = st.trainable_parameters()
    assert make_optimizer(params, 1e-3, "cpu").defaults["fused"] in (None, False)
    assert make_optimizer(params, 1e-3, torch.device("cuda")).defaults["fused"] is True
