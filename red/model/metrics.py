"""Effective rank and related diagnostics (docs/method.md §5)."""
from __future__ import annotations

import torch


def erank(X: torch.Tensor) -> float:
    """Effective rank of a [tokens, features] matrix (Roy & Vetterli, 2007).

    p_i = s_i / sum(s) over the singular values; eRank = exp(-sum p_i log p_i). It lies in
    [1, min(tokens, features)]; 1 for rank one, the full size for a flat spectrum. The
    data are not centred. Leading dimensions are flattened into tokens.
    """
    X = X.reshape(-1, X.shape[-1]).double()
    s = torch.linalg.svdvals(X)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_token_cosine(X: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of token vectors (near 1: tokens indistinguishable)."""
    X = torch.nn.functional.normalize(X.reshape(-1, X.shape[-1]).double(), dim=-1)
    n = X.shape[0]
    if n < 2:
        return 1.0
    G = X @ X.T
    return float((G.sum() - G.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def hidden_states(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer hidden states of a transformers causal LM or a ProjectedStudent:
    embedding output, then every layer's output (the last after the final norm)."""
    if hasattr(model, "distill_losses"):
        return model.hidden_states(input_ids)
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    return list(out.hidden_states)


def layer_eranks(model, input_ids: torch.Tensor) -> list[float]:
    """eRank of every hidden state over all tokens of the batch."""
    return [erank(h.float()) for h in hidden_states(model, input_ids)]


def spectrum(P: torch.Tensor) -> dict:
    """Singular-value spread of a projection: max, min, max/min and eRank."""
    s = torch.linalg.svdvals(P.detach().double().cpu())
    smin = float(s.min())
    return {"max": float(s.max()), "min": smin, "ratio": float(s.max()) / smin if smin > 0 else float("inf"),
            "erank": erank(P.detach())}
