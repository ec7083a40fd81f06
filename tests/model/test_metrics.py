import math

import pytest
import torch

from red.model.metrics import erank, mean_token_cosine, spectrum


def test_erank_known_values():
    assert erank(torch.eye(7)) == pytest.approx(7.0, rel=1e-9)
    u, v = torch.randn(30, 1, dtype=torch.float64), torch.randn(1, 12, dtype=torch.float64)
    assert erank(u @ v) == pytest.approx(1.0, abs=1e-6)
    # two equal singular values and one zero -> 2
    X = torch.diag(torch.tensor([3.0, 3.0, 0.0]))
    assert erank(X) == pytest.approx(2.0, rel=1e-9)


def test_erank_matches_entropy_definition_and_bounds():
    X = torch.randn(50, 20) @ torch.diag(torch.linspace(0.01, 3, 20))
    s = torch.linalg.svdvals(X.double())
    p = s / s.sum()
    want = math.exp(float(-(p * p.log()).sum()))
    assert erank(X) == pytest.approx(want, rel=1e-9)
    assert 1 <= erank(X) <= 20
    assert erank(5 * X) == pytest.approx(erank(X), rel=1e-6)  # scale invariant
    assert erank(X.view(5, 10, 20)) == pytest.approx(erank(X), rel=1e-9)  # leading dims flattened


def test_mean_token_cosine_and_spectrum():
    same = torch.ones(6, 4)
    assert mean_token_cosine(same) == pytest.approx(1.0)
    orth = torch.eye(4)
    assert mean_token_cosine(orth) == pytest.approx(0.0, abs=1e-12)
    P = torch.diag(torch.tensor([2.0, 0.5]))
    s = spectrum(P)
    assert s["max"] == pytest.approx(2.0) and s["min"] == pytest.approx(0.5) and s["ratio"] == pytest.approx(4.0)
