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
only part of the stored weights (σ = 0.001: 22–26 % of the touched elements, see `changed_fraction`), so the measured value falls below the prediction: use fp32.

Noise floor. A measured ΔNLL near zero is not a measurement of the quadratic term, and a ratio to it is noise
(tiny random models gave ratios from -4e3 to 6.5e5). Each row records the floor below which the measured value
cannot be told from evaluation noise, measured from the data:
    noise_floor = max(2 · measured_se, ε₃₂ · NLL̄),
measured_se = SD of the per-seed (antithetic) values / √seeds (the spread of the draws that remains after
pairing; NULL with one seed), and ε₃₂ · NLL̄ the resolution of a float32 per-token NLL (machine epsilon times
the baseline's mean NLL): a smaller difference may be rounding. Rows with |measured| below the floor have
below_noise_floor = true and ratio NULL (not computed), never a ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from esa_pipeline.core.importance.metrics import ImportanceResult, unwrap_model

PREDICTION_COLUMNS = ["model", "component", "layer", "strength", "predicted_delta_nll", "measured_delta_nll",
                      "measured_se", "noise_floor", "below_noise_floor", "ratio", "antithetic", "note"]
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


def noise_floor(seed_values: Sequence[float], mean_nll: float) -> tuple[float, float]:
    """(measured_se, noise_floor) of a seed-averaged ΔNLL (see the module docstring; nats/token).

    seed_values: the per-seed measured ΔNLL (antithetic pair means); mean_nll: the baseline's mean per-token
    NLL. measured_se is NaN with one seed, and the floor is then the float32 resolution alone.
    """
    values = np.asarray(seed_values, dtype=float)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else float("nan")
    resolution = float(np.finfo(np.float32).eps) * abs(float(mean_nll))
    return se, max(resolution, 2 * se) if math.isfinite(se) else resolution


def prediction_check(lm, base, result: ImportanceResult, strengths: Sequence[float], *,
                     seeds: Sequence[int] = (0, 1, 2), curvature: str = "grad_sq", adapter=None, cache=None,
                     groups: Sequence[tuple[str, int | None]] | None = None, antithetic: bool = True) -> pd.DataFrame:
    """`prediction_check` rows: predicted vs measured (seed-averaged) gaussian ΔNLL per component, layer, σ.

    antithetic=True measures each seed at +δ and −δ (two evaluations) and keeps their mean; False measures +δ.
    Rows below the noise floor (noise_floor()) are flagged below_noise_floor with ratio NaN; a prediction <= 0
    (possible with curvature "hutchinson") also gets ratio NaN; `note` says which.

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
            mean_measured = float(np.mean(measured))
            se, floor = noise_floor(measured, base.nll_sum / base.n_tokens)
            below = not abs(mean_measured) >= floor  # NaN measured counts as below: no ratio from it
            note = ""
            if below:
                note = "below the noise floor: no ratio"
            elif not predicted > 0:  # Hutchinson's H_ii need not be positive: no expected increase to compare
                note = f"predicted ΔNLL {predicted:g} <= 0 (the curvature estimate is not positive): no ratio"
            rows.append({"model": result.model, "component": component, "layer": layer,
                         "strength": float(strength), "predicted_delta_nll": predicted,
                         "measured_delta_nll": mean_measured, "measured_se": se, "noise_floor": floor,
                         "below_noise_floor": below,
                         "ratio": float("nan") if note else mean_measured / predicted,
                         "antithetic": antithetic, "note": note})
    df = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    return df
