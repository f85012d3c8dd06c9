"""Pruning masks for one weight slice (DESIGN §4, kind "prune"): which elements are set to zero.

`prune_mask(w, method, sparsity, scores, input_axis)` returns a bool mask (True = pruned) of `w`'s shape; the
input dimension is the last axis of Linear-style slices and axis 0 of GPT-2's Conv1D (see quantize.py).

Methods (strength = sparsity s, the fraction of the slice's elements set to 0):
  magnitude  unstructured: the round(s·numel) elements of smallest |W| in the whole slice (layer-wise
             magnitude pruning, the baseline of Sun et al. 2024 "A Simple and Effective Pruning Approach for
             LLMs" (Wanda)).
  wanda      per output row, the round(s·in) elements of smallest |W_ij|·‖X_j‖₂ (Wanda, Sun et al. 2024).
             `scores` must hold that product: esa_pipeline.core.importance's "activation" metric gives
             |W_ij|·rms_t(X_j) over the calibration windows, which is ‖X_j‖₂/√T — a constant factor per matrix,
             so the ranking within every row (and thus the mask) is Wanda's.
  2:4        semi-structured (NVIDIA sparse tensor cores): in every group of 4 consecutive inputs of a row
             the 2 of smallest |W| are pruned (`scores` replace |W| when given); sparsity must be 0.5.
Ties are broken by position (stable sort: the earlier element is pruned first), so masks are deterministic.
"""

from __future__ import annotations

import torch

PRUNE_METHODS: tuple[str, ...] = ("magnitude", "wanda", "2:4")


def validate_prune(method: str, sparsity: float) -> None:
    if method not in PRUNE_METHODS:
        raise ValueError(f"prune mode is the method: use one of {PRUNE_METHODS}, got {method!r}")
    if not 0 < sparsity < 1:
        raise ValueError(f"prune strength is the sparsity, a fraction in (0, 1), got {sparsity}")
    if method == "2:4" and sparsity != 0.5:
        raise ValueError(f"2:4 pruning removes exactly half of the weights: use strength 0.5, got {sparsity}")


def _lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest entries along the last axis of values [R, n] (stable: earlier first)."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    if k:
        order = torch.sort(values, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, order, True)
    return mask


def prune_mask(w: torch.Tensor, method: str, sparsity: float, scores: torch.Tensor | None = None,
               input_axis: int = -1) -> torch.Tensor:  # fmt: skip
    """Bool mask [w.shape], True where `method` prunes at `sparsity` (see the module docstring).

    Raises ValueError for an unknown method, a sparsity outside (0, 1), 2:4 at a sparsity other than 0.5, a
    tensor with fewer than 2 dimensions, wanda without scores, scores of another shape, or 2:4 on an input
    dimension that is not a multiple of 4.
    """
    validate_prune(method, sparsity)
    if w.dim() < 2:
        raise ValueError(f"prune needs a weight matrix [..., in], got shape {tuple(w.shape)}")
    if method == "wanda" and scores is None:
        raise ValueError("wanda pruning ranks |W|·‖X‖: pass scores (importance metric 'activation') per slice")
    if scores is not None and tuple(scores.shape) != tuple(w.shape):
        raise ValueError(f"scores have shape {tuple(scores.shape)}, the slice {tuple(w.shape)}")
    if input_axis not in (-1, w.dim() - 1):  # Conv1D [in, out]: rank along axis 0
        moved = None if scores is None else scores.movedim(input_axis, -1)
        return prune_mask(w.movedim(input_axis, -1), method, sparsity, moved).movedim(-1, input_axis)
    n_in = w.shape[-1]
    ranked = (w.detach().float().abs() if scores is None else scores.detach().float().abs()).cpu()
    rows = ranked.reshape(-1, n_in)  # [R, in]
    if method == "magnitude":
        mask = _lowest(rows.reshape(1, -1), round(sparsity * rows.numel()))
    elif method == "wanda":
        mask = _lowest(rows, round(sparsity * n_in))
    else:
        if n_in % 4:
            raise ValueError(f"2:4 pruning needs an input dimension divisible by 4, got {n_in}")
        mask = _lowest(rows.reshape(-1, 4), 2)
    return mask.reshape(w.shape).to(w.device)
