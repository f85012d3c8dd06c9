"""Per-weight importance scores over evaluation windows (the origin system's phase 2).

Five metrics, each a tensor with the shape of every `ParamSlice` of a (component, layer) group:

- ``grad_x_weight``: |g ⊙ W| with g = ∂L/∂W, L = mean per-token NLL over all scored tokens (first-order
  Taylor estimate of the loss change when the weight is removed).
- ``grad_sq``: diagonal of the empirical Fisher of the *per-token* loss, F_ii = (1/N) Σ_t (∂ℓ_t/∂W_i)², N the
  number of scored tokens. Per-token gradients cost one backward pass per token, so two estimators:
    * ``fisher_estimator="token"`` (default): per batch of windows, one backward of Σ_t r_t ℓ_t with
      independent Rademacher signs r_t per token. E_r[(Σ_t r_t g_t)²] = Σ_t g_t² exactly (cross terms have
      E[r_s r_t] = 0), so (1/N) Σ_batches (that gradient)² is unbiased for F_ii whatever the batching.
    * ``fisher_estimator="window"``: (1/N) Σ_w (∂ Σ_{t∈w} ℓ_t / ∂W_i)², the square of each window's summed-loss
      gradient. Equal to the token Fisher only when token gradients inside a window are uncorrelated; they are
      not (shared context), so it over-estimates. Squaring a plain per-*batch* gradient would add the
      cross-window terms as well; this estimator therefore runs one window per backward.
  Both are on the scale of the Hessian of L (mean per-token NLL), which `prediction.py` relies on.
- ``hutchinson``: diag(∇²L) ≈ mean_s v_s ⊙ (∇²L v_s) with Rademacher v_s (seeded), Hessian-vector products by
  double backprop, `hutchinson_samples` probes per batch and parameter (so more batches = more probes). Needs eager attention (fused SDPA kernels have no double backward): switched for the call.
- ``magnitude``: |W|.
- ``activation``: Wanda-style |W_ij| · rms_t(x_j) with x the module's input over all window positions. Wanda
  uses ‖x_j‖₂, which is rms·√T for a fixed token count, so rankings are identical; rms keeps the scale
  independent of the token budget. Norm gains: |w_j| · rms_t(x̂_j) with x̂ the normalised input; biases: |b|.
  Fused 3-D MoE expert tensors and the embedding have no per-feature input: the metric is left out there and
  a note says so.

Gradients need `requires_grad` on the touched parameters only; it is set for the call and restored (with
.grad cleared, eval mode and the attention implementation) afterwards, also when an error is raised. Weights
are never written.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F

from esa_pipeline.core.models.adapters.base import GLOBAL_COMPONENTS, ComponentNotApplicable, ParamSlice

METRICS: tuple[str, ...] = ("grad_x_weight", "grad_sq", "hutchinson", "magnitude", "activation")
GRADIENT_METRICS = frozenset({"grad_x_weight", "grad_sq", "hutchinson"})
FISHER_ESTIMATORS = ("token", "window")


@dataclass
class SliceGroupScores:
    """Scores of one (component, layer, expert) group: per metric one fp32 CPU tensor per ParamSlice."""

    component: str
    layer: int | None
    expert: int | None
    slices: list[ParamSlice]
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class ImportanceResult:
    model: str
    metrics: tuple[str, ...]
    groups: list[SliceGroupScores]
    n_windows: int
    n_tokens: int  # scored tokens N (the 1/N in every gradient metric)
    fisher_estimator: str
    hutchinson_samples: int
    seed: int
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def group(self, component: str, layer: int | None, expert: int | None = None) -> SliceGroupScores:
        for g in self.groups:
            if (g.component, g.layer, g.expert) == (component, layer, expert):
                return g
        scored = sorted({(g.component, g.layer) for g in self.groups}, key=str)
        raise KeyError(f"no scores for {component} layer {layer} expert {expert}: scored groups are {scored}")

    def scores_for(self, metric: str, component: str, layer: int | None,
                   expert: int | None = None) -> list[torch.Tensor]:
        """One tensor per slice, in `adapter.slices(...)` order: the `scores=` argument of `perturbed`."""
        g = self.group(component, layer, expert)
        if metric not in g.scores:
            raise KeyError(f"metric {metric!r} was not computed for {component} layer {layer}: "
                           f"available {sorted(g.scores)}")
        return g.scores[metric]


def unwrap_model(lm) -> torch.nn.Module:
    """The torch module of a LoadedModel (or the module itself)."""
    return lm if isinstance(lm, torch.nn.Module) else lm.model


def slice_of(tensor: torch.Tensor, ps: ParamSlice) -> torch.Tensor:
    """Apply a ParamSlice's reshape and index to a tensor shaped like its parameter (a gradient, a score)."""
    if ps.view_shape is not None:
        tensor = tensor.reshape(ps.view_shape)
    return tensor[ps.index]


@dataclass(frozen=True)
class ScoredWindow:
    """Model input [1, T] and the targets of its scored positions start..start+n (exclusive)."""

    input_ids: torch.Tensor  # [1, T] long
    target_ids: torch.Tensor  # [n] long
    start: int


def as_scored_windows(token_batches) -> list[ScoredWindow]:
    """Normalise the evaluation tokens.

    Accepts a PerplexityResult (its lm-eval rolling windows: exactly the tokens `evaluate_against` scores),
    a list of `TokenWindow`s, or integer id tensors [B, T] / [T] (every position after the first is scored).
    """
    items = getattr(token_batches, "token_windows", token_batches)
    out: list[ScoredWindow] = []
    for item in items:
        if hasattr(item, "target_ids") and hasattr(item, "input_ids"):  # windows.TokenWindow
            ids = torch.tensor(item.input_ids, dtype=torch.long)[None]  # [1, T]
            targets = torch.tensor(item.target_ids, dtype=torch.long)  # [n]
            out.append(ScoredWindow(ids, targets, ids.shape[1] - targets.numel()))
            continue
        if not isinstance(item, torch.Tensor) or item.dtype not in (torch.int32, torch.int64):
            raise TypeError("token_batches must be a PerplexityResult, TokenWindows or integer token-id "
                            f"tensors of shape [B, T] / [T]; got {type(item).__name__}")
        rows = item.reshape(1, -1) if item.dim() == 1 else item
        if rows.dim() != 2 or rows.shape[1] < 2:
            raise ValueError(f"each window needs >= 2 tokens in shape [B, T]; got {tuple(item.shape)}")
        for i in range(rows.shape[0]):
            ids = rows[i : i + 1].long()  # [1, T]
            out.append(ScoredWindow(ids[:, :-1], ids[0, 1:], 0))
    if not out:
        raise ValueError("no token windows given: pass a PerplexityResult or [B, T] tensors of token ids")
    return out


def token_nll(model: torch.nn.Module, window: ScoredWindow, device: torch.device) -> torch.Tensor:
    """NLL [B, n] in fp32 of the scored tokens of a (batched) window."""
    logits = model(input_ids=window.input_ids.to(device), use_cache=False).logits  # [B, T, V]
    n = window.target_ids.shape[-1]
    scored = logits[:, window.start : window.start + n].float()  # [B, n, V]
    targets = window.target_ids.reshape(-1, n).to(device)  # [B, n]
    return F.cross_entropy(scored.transpose(1, 2), targets, reduction="none")  # [B, n]


def batch_windows(windows: Sequence[ScoredWindow], batch_size: int) -> list[ScoredWindow]:
    """Stack consecutive windows of identical shape (no padding needed) into batches of <= batch_size."""
    out: list[ScoredWindow] = []
    group: list[ScoredWindow] = []

    def flush() -> None:
        if group:
            out.append(ScoredWindow(torch.cat([w.input_ids for w in group]),  # [B, T]
                                    torch.stack([w.target_ids for w in group]),  # [B, n]
                                    group[0].start))
            group.clear()

    for w in windows:
        if group and (len(group) == batch_size or w.input_ids.shape != group[0].input_ids.shape
                      or w.start != group[0].start or w.target_ids.shape != group[0].target_ids.shape):
            flush()
        group.append(w)
    flush()
    return out


@contextlib.contextmanager
def gradients_on(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], *,
                 attn_implementation: str | None = None) -> Iterator[None]:
    """requires_grad on `params` only, eval mode (and optionally another attention kernel) for the block."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    old_attn = getattr(model.config, "_attn_implementation", None)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        if attn_implementation is not None and old_attn != attn_implementation:
            model.set_attn_implementation(attn_implementation)
        with torch.enable_grad():
            yield
    finally:
        if attn_implementation is not None and getattr(model.config, "_attn_implementation", None) != old_attn:
            model.set_attn_implementation(old_attn)
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def _rademacher(shape: torch.Size | tuple[int, ...], gen: torch.Generator, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    return (torch.randint(0, 2, tuple(shape), generator=gen) * 2 - 1).to(device=device, dtype=dtype)


def hutchinson_diagonal(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], samples: int,
                        gen: torch.Generator) -> list[torch.Tensor]:
    """diag(∇²f) ≈ mean_s v_s ⊙ (∇²f v_s), v_s Rademacher; `grads` = ∇f built with create_graph=True.

    Unbiased: E[v_i (Hv)_i] = Σ_j H_ij E[v_i v_j] = H_ii, and one sample has variance Σ_{j≠i} H_ij² over the
    probed j. Each parameter is probed on its own (its diagonal block H_pp): probing all touched parameters
    with one joint v would add every cross-parameter H_ij² to that variance — measured on tiny-llama, norm
    gains probed jointly with attention/FFN weights came out 25x off their exact trace with 32 samples. Costs
    one Hessian-vector product per parameter and sample. Returns fp32 CPU tensors shaped like `params`.
    """
    out = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    n_products = samples * len(params)
    done = 0
    for _ in range(samples):
        for acc, grad, param in zip(out, grads, params, strict=True):
            v = _rademacher(param.shape, gen, param.device, param.dtype)
            done += 1
            if not grad.requires_grad:  # the gradient does not depend on any parameter: H_pp = 0
                continue
            (hv,) = torch.autograd.grad(grad, param, grad_outputs=v, retain_graph=done < n_products,
                                        allow_unused=True)
            if hv is not None:  # None: ∂grad/∂param is identically zero
                acc += (v.float() * hv.detach().float()).cpu() / samples
    return out


class _ActivationRecorder:
    """Forward hooks accumulating Σ x² per input feature (linear-like) or per normalised channel (norms)."""

    def __init__(self, model: torch.nn.Module, param_names: Sequence[str]) -> None:
        self.sum_sq: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.unsupported: dict[str, str] = {}
        self._handles = []
        for name in param_names:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            param = getattr(module, attr)
            if attr == "bias":
                continue  # input is the constant 1: score is |b|
            if param.dim() == 1:
                if not _is_norm(module):
                    self.unsupported[name] = f"1-D weight of {type(module).__name__} is not a norm gain"
                    continue
                self._handles.append(module.register_forward_hook(self._norm_hook(name)))
            elif param.dim() == 2 and not isinstance(module, torch.nn.Embedding):
                self._handles.append(module.register_forward_hook(self._linear_hook(name, param.shape[-1])))
            else:
                self.unsupported[name] = (f"{type(module).__name__}.{attr} {tuple(param.shape)} has no "
                                          "per-feature input (embedding or fused 3-D experts)")

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1, x.shape[-1])  # [tokens, features]
        acc = flat.pow(2).sum(0).cpu()
        self.sum_sq[name] = self.sum_sq.get(name, torch.zeros_like(acc)) + acc
        self.count[name] = self.count.get(name, 0) + flat.shape[0]

    def _linear_hook(self, name: str, in_features: int):
        def hook(module, args, output):
            x = args[0]
            if x.shape[-1] != in_features:
                raise RuntimeError(f"{name}: input has {x.shape[-1]} features, weight expects {in_features}")
            self._accumulate(name, x)
        return hook

    def _norm_hook(self, name: str):
        def hook(module, args, output):
            self._accumulate(name, _normalised(module, args[0]))
        return hook

    def rms(self, name: str) -> torch.Tensor:
        return (self.sum_sq[name] / self.count[name]).sqrt()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or hasattr(module, "variance_epsilon")


def _normalised(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's input before its gain: LayerNorm (x-μ)/σ, RMSNorm x/rms(x)."""
    x = x.detach().float()
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)


def importance_scores(
    lm,
    adapter,
    token_batches,
    metrics: Sequence[str] = METRICS,
    *,
    components: Sequence[str] | None = None,
    layers: Sequence[int | None] | None = None,
    hutchinson_samples: int = 4,
    fisher_estimator: str = "token",
    seed: int = 0,
    batch_size: int = 4,
) -> ImportanceResult:
    """Score every weight of the requested (component, layer) groups over `token_batches` (see module doc).

    token_batches: a PerplexityResult (score exactly the tokens `evaluate_against` scores), TokenWindows, or
    [B, T] id tensors. batch_size: windows of equal shape per forward pass (1 for fisher_estimator="window").
    lm: a LoadedModel (or the torch module); components default to all per-layer components of the
    architecture, layers to all decoder layers; "embedding" is scored with layer None. Components an
    architecture lacks raise ComponentNotApplicable. Results are fp32 CPU tensors (bf16 models are scored in
    their dtype and accumulated in fp32; Hutchinson in bf16 is noisy, prefer fp32).
    """
    model = unwrap_model(lm)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown or '(none given)'}: choose from {', '.join(METRICS)}")
    if fisher_estimator not in FISHER_ESTIMATORS:
        raise ValueError(f"fisher_estimator must be one of {FISHER_ESTIMATORS}, got {fisher_estimator!r}")
    if "hutchinson" in metrics and hutchinson_samples < 1:
        raise ValueError("hutchinson_samples must be >= 1 (or drop 'hutchinson' from metrics)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = as_scored_windows(token_batches)
    groups = _groups(adapter, components, layers)
    param_names = sorted({ps.param_name for g in groups for ps in g.slices})
    params = [model.get_parameter(n) for n in param_names]
    device = params[0].device
    n_tokens = sum(w.target_ids.numel() for w in windows)
    gen = torch.Generator().manual_seed(seed)
    wanted = set(metrics)

    grad_sum = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in zip(param_names, params, strict=True)}
    fisher = {n: torch.zeros_like(g) for n, g in grad_sum.items()} if "grad_sq" in wanted else {}
    hdiag = {n: torch.zeros_like(g) for n, g in grad_sum.items()} if "hutchinson" in wanted else {}
    need_grad = bool(wanted & GRADIENT_METRICS)
    need_forward = need_grad or "activation" in wanted
    recorder = _ActivationRecorder(model, param_names) if "activation" in wanted else None
    attn = "eager" if "hutchinson" in wanted else None
    try:
        with gradients_on(model, params if need_grad else [], attn_implementation=attn):
            # the window estimator squares each window's own gradient: one window per backward
            per_pass = 1 if fisher_estimator == "window" else batch_size
            for window in batch_windows(windows, per_pass) if need_forward else []:
                if not need_grad:
                    with torch.no_grad():
                        model(input_ids=window.input_ids.to(device), use_cache=False)
                    continue
                nll = token_nll(model, window, device)  # [B, n]
                hutch = "hutchinson" in wanted
                # g = ∂(window's share of L)/∂W, with L = mean NLL over all N tokens
                grads = torch.autograd.grad(nll.sum() / n_tokens, params, create_graph=hutch, retain_graph=True)
                for n, g in zip(param_names, grads, strict=True):
                    g32 = g.detach().float().cpu()
                    grad_sum[n] += g32
                    if fisher_estimator == "window" and "grad_sq" in wanted:
                        fisher[n] += (g32 * n_tokens).pow(2) / n_tokens  # (Σ_t g_t)² / N
                if fisher_estimator == "token" and "grad_sq" in wanted:
                    signs = _rademacher(nll.shape, gen, device, nll.dtype)  # [B, n]
                    signed = torch.autograd.grad((signs * nll).sum(), params, retain_graph=hutch)
                    for n, g in zip(param_names, signed, strict=True):
                        fisher[n] += g.detach().float().cpu().pow(2) / n_tokens  # (Σ_t r_t g_t)² / N
                if hutch:
                    estimate = hutchinson_diagonal(grads, params, hutchinson_samples, gen)
                    for n, d in zip(param_names, estimate, strict=True):
                        hdiag[n] += d
                del nll, grads
    finally:
        if recorder is not None:
            recorder.close()

    notes: list[str] = []
    if recorder is not None:
        notes.extend(f"activation not computed for {n}: {why}" for n, why in recorder.unsupported.items())
    full: dict[str, dict[str, torch.Tensor]] = {}
    for n, p in zip(param_names, params, strict=True):
        w = p.detach().float().cpu().abs()
        per = full.setdefault(n, {})
        if "magnitude" in wanted:
            per["magnitude"] = w
        if "grad_x_weight" in wanted:
            per["grad_x_weight"] = (grad_sum[n] * w).abs()
        if "grad_sq" in wanted:
            per["grad_sq"] = fisher[n]
        if "hutchinson" in wanted:
            per["hutchinson"] = hdiag[n]
        if recorder is not None and n not in recorder.unsupported:
            per["activation"] = w if n.endswith(".bias") else _activation_score(w, recorder.rms(n))
    for g in groups:
        for metric in metrics:
            if all(metric in full[ps.param_name] for ps in g.slices):
                g.scores[metric] = [slice_of(full[ps.param_name][metric], ps).clone() for ps in g.slices]
    name = getattr(getattr(lm, "spec", None), "name", type(model).__name__)
    return ImportanceResult(model=name, metrics=tuple(metrics), groups=groups, n_windows=len(windows),
                            n_tokens=n_tokens, fisher_estimator=fisher_estimator,
                            hutchinson_samples=hutchinson_samples if "hutchinson" in wanted else 0,
                            seed=seed, notes=notes,
                            param_shapes={n: tuple(p.shape) for n, p in zip(param_names, params, strict=True)})


def _activation_score(abs_w: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    # abs_w [out, in] (or [C] for a norm gain), rms [in] / [C]: broadcast along the input-feature axis
    return abs_w * rms


def _groups(adapter, components: Sequence[str] | None,
            layers: Sequence[int | None] | None) -> list[SliceGroupScores]:
    comps = list(components) if components is not None else adapter.components()
    layer_list = list(layers) if layers is not None else list(range(adapter.num_layers))
    groups: list[SliceGroupScores] = []
    for comp in comps:
        comp_layers = [None] if comp in GLOBAL_COMPONENTS else layer_list
        for layer in comp_layers:
            try:
                slices = adapter.slices(comp, layer)
            except ComponentNotApplicable as err:
                raise ComponentNotApplicable(f"{err}; drop it from components") from err
            groups.append(SliceGroupScores(comp, layer, None, slices))
    if not groups:
        raise ValueError("no (component, layer) groups to score: pass components and layers")
    return groups


def param_flat_indices(shape: Sequence[int], ps: ParamSlice) -> torch.Tensor:
    """Flat index into the full parameter (of `shape`) of every element of the slice (slice-shaped int64)."""
    return slice_of(torch.arange(math.prod(shape)).view(tuple(shape)), ps)


WEIGHT_IMPORTANCE_COLUMNS = ["model", "metric", "scope", "component", "layer", "expert", "param_name",
                             "flat_index", "row", "col", "score", "rank", "k"]
SCOPES = ("layer", "global")


def top_k(result: ImportanceResult, k: int, scope: str = "layer", *,
          metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """The k highest-scoring weights as `weight_importance` rows.

    scope "layer": top-k within each (component, layer) group (what validation perturbs); "global": top-k
    over every scored weight of the metric. flat_index indexes the full parameter (`param.view(-1)`); row/col
    are the last two axes of the parameter (col NULL for 1-D gains/biases); expert comes from the leading axis
    of fused 3-D expert tensors. rank 1 = most important.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    chosen = list(metrics) if metrics is not None else list(result.metrics)
    frames = []
    for metric in chosen:
        groups = [g for g in result.groups if metric in g.scores]
        if not groups:
            raise KeyError(f"metric {metric!r} was not computed: available {list(result.metrics)}")
        batches = [groups] if scope == "global" else [[g] for g in groups]
        for batch in batches:
            frames.append(_top_rows(result, metric, scope, batch, k))
    return pd.concat(frames, ignore_index=True)[WEIGHT_IMPORTANCE_COLUMNS]


def _top_rows(result: ImportanceResult, metric: str, scope: str, groups: list[SliceGroupScores],
              k: int) -> pd.DataFrame:
    scores, flat, owner = [], [], []
    owners: list[tuple[SliceGroupScores, ParamSlice]] = []
    for g in groups:
        for ps, sc in zip(g.slices, g.scores[metric], strict=True):
            scores.append(sc.reshape(-1))
            flat.append(param_flat_indices(result.param_shapes[ps.param_name], ps).reshape(-1))
            owner.append(torch.full((sc.numel(),), len(owners), dtype=torch.int64))
            owners.append((g, ps))
    all_scores, all_flat, all_owner = torch.cat(scores), torch.cat(flat), torch.cat(owner)  # [n] each
    bad = ~torch.isfinite(all_scores)
    if bad.any():  # torch.topk ranks NaN above every number: it would be stored as the most important weight
        g = owners[int(all_owner[bad.nonzero()[0, 0]])][0]
        where = f"{g.component} layer {g.layer}" + (f" expert {g.expert}" if g.expert is not None else "")
        n_bad = int(bad.sum())
        raise ValueError(f"{metric} has {n_bad} non-finite score{'s' if n_bad > 1 else ''} (NaN/inf), the first in {where}: "
                         "a ranking of them means nothing; score in float32 (a bf16 gradient can overflow)")
    top = torch.topk(all_scores, min(k, all_scores.numel()))
    rows = []
    for rank, (value, pos) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1):
        g, ps = owners[int(all_owner[pos])]
        flat_index = int(all_flat[pos])
        row, col, expert = _coordinates(flat_index, result.param_shapes[ps.param_name])
        rows.append({"model": result.model, "metric": metric, "scope": scope, "component": g.component,
                     "layer": g.layer, "expert": g.expert if g.expert is not None else expert,
                     "param_name": ps.param_name, "flat_index": flat_index, "row": row, "col": col,
                     "score": value, "rank": rank, "k": k})
    df = pd.DataFrame(rows)
    for col in ("layer", "expert", "row", "col"):
        df[col] = df[col].astype("Int64")
    return df


def _coordinates(flat_index: int, shape: Sequence[int]) -> tuple[int, int | None, int | None]:
    """(row, col, expert) of a flat index: last two axes, leading axis of a 3-D (expert) tensor."""
    if len(shape) == 1:
        return flat_index, None, None
    cols, rows = shape[-1], shape[-2]
    expert = flat_index // (rows * cols) if len(shape) == 3 else None
    return (flat_index // cols) % rows, flat_index % cols, expert
