"""Small-σ prediction check: second-order Taylor estimate of the gaussian ΔNLL beside the measured one.

Derivation. L(W) = (1/N) Σ_t ℓ_t(W) is the mean per-token NLL over the N scored tokens of the baseline windows
(exactly what `evaluate_against` reports as `delta_nll`). The `gaussian` kind adds δ = σ·rms(W_s)·z_s, z ~ N(0, I),
to every slice s of the (component, layer). Taylor-expanding and taking the expectation over z, odd terms vanish:

    E[ΔL] = ½ σ² Σ_s rms(W_s)² Σ_{i∈s} H_ii + O(σ⁴),     H = ∇²L (Hessian of the *mean* per-token NLL).

The Hessian diagonal is replaced by a curvature estimate from `importance_scores`, on the same 1/N scale:
- ``grad_sq`` (default): F_ii = (1/N) Σ_t (∂ℓ_t/∂W_i)², the per-token empirical Fisher. For a model whose
  predictive distribution matches the data (a well-trained LM on in-distribution text) E[F] = E[H]
  (Fisher identity); far from that (random weights, odd text) they differ, and F ≥ 0 while H need not be.
- ``hutchinson``: an unbiased estimate of H_ii itself (more expensive, noisier per element, exact on average).

One measured point is a single draw of z: its linear term gᵀδ has mean 0 but standard deviation
σ·sqrt(Σ_s rms_s² ‖g_s‖²), which dominates at very small σ (the quadratic mean shrinks as σ², the linear noise
as σ). `prediction_check` therefore measures each seed as an antithetic pair, ½(ΔL(+δ) + ΔL(−δ)), in which the
linear term cancels exactly (odd terms vanish draw by draw, not only in expectation), and averages the seeds. In bf16, small σ changes
few stored weights (see `changed_fraction`), so the measured value falls below the prediction: use fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from esa_pipeline.core.importance.metrics import ImportanceResult, unwrap_model

PREDICTION_COLUMNS = ["model", "component", "layer", "strength", "predicted_delta_nll", "measured_delta_nll",
                      "ratio", "antithetic"]
CURVATURES = ("grad_sq", "hutchinson")


def predicted_delta_nll(lm, result: ImportanceResult, component: str, layer: int | None, strength: float, *,
                        curvature: str = "grad_sq", expert: int | None = None) -> float:
    """½σ² Σ_s rms(W_s)² Σ_{i∈s} curvature_ii for one (component, layer) group (see the module docstring)."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    model = unwrap_model(lm)
    group = result.group(component, layer, expert)
    curv = result.scores_for(curvature, component, layer, expert)
    total = 0.0
    for ps, diag in zip(group.slices, curv, strict=True):
        w = ps.get(model).float()
        rms_sq = float(w.pow(2).mean())  # perturb.py scales noise by rms of each slice separately
        total += rms_sq * float(diag.double().sum())
    return 0.5 * strength**2 * total


def prediction_check(lm, base, result: ImportanceResult, strengths: Sequence[float], *,
                     seeds: Sequence[int] = (0, 1, 2), curvature: str = "grad_sq", adapter=None, cache=None,
                     groups: Sequence[tuple[str, int | None]] | None = None, antithetic: bool = True) -> pd.DataFrame:
    """`prediction_check` rows: predicted vs measured (seed-averaged) gaussian ΔNLL per component, layer, σ.

    antithetic=True measures each seed at +δ and −δ (two evaluations) and keeps their mean; False measures +δ.

    `result` must have been scored on `base` (pass the PerplexityResult as `token_batches`) so that both use
    the same N tokens; groups default to every (component, layer) group of `result`.
    """
    from esa_pipeline.core.evaluation.paired import evaluate_against
    from esa_pipeline.core.perturbation.perturb import Perturbation

    if not seeds:
        raise ValueError("seeds must name at least one seed for the measured ΔNLL")
    if result.n_tokens != base.n_tokens:
        raise ValueError(f"importance scored {result.n_tokens} tokens but the baseline has {base.n_tokens}: "
                         "score with importance_scores(lm, adapter, base, ...) so both use the same windows")
    chosen = list(groups) if groups is not None else [(g.component, g.layer) for g in result.groups]
    rows = []
    for component, layer in chosen:
        kind = "router" if component == "moe.router" else "gaussian"
        for strength in strengths:
            signs = (False, True) if antithetic else (False,)
            measured = [
                sum(evaluate_against(lm, base, Perturbation(kind, component, layer, strength, seed, antithetic=neg),
                                     adapter=adapter, cache=cache).delta_nll for neg in signs) / len(signs)
                for seed in seeds
            ]  # fmt: skip
            predicted = predicted_delta_nll(lm, result, component, layer, strength, curvature=curvature)
            mean_measured = float(torch.tensor(measured, dtype=torch.float64).mean())
            rows.append({"model": result.model, "component": component, "layer": layer,
                         "strength": float(strength), "predicted_delta_nll": predicted,
                         "measured_delta_nll": mean_measured,
                         "ratio": mean_measured / predicted if predicted != 0 else float("nan"),
                         "antithetic": antithetic})
    df = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    return df
