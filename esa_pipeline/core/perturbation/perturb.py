"""Exact, reproducible weight perturbations (DESIGN §4).

A `Perturbation` is a frozen spec. `perturbed(model, adapter, spec)` is a context manager that
  1. validates everything (spec, layer, component, scores) before touching any weight,
  2. snapshots ONLY the touched parameter slices,
  3. writes the perturbed values, computed in fp32 from noise drawn on CPU by a generator seeded with a
     sha256 of the whole spec (so any point can be recomputed alone, in any order, on any machine),
  4. on exit (also on exceptions) copies the snapshots back and verifies bit-equality.

Kinds (strength meaning in brackets):
  gaussian  W += strength * rms(W_slice) * N(0, 1)                        [sigma in rms units]
  router    the same on the MoE router (component "moe.router")          [sigma in rms units]
  neurons   a fraction of FFN intermediate neurons get noise (noise_sigma * rms of the slice) or are zeroed
            (mode "zero"), only in the component named: `ffn.gate` / `ffn.up` touch only their own rows of
            the selected neurons, `ffn.down` only its columns; component `ffn.neurons` perturbs whole neurons
            (gate and up rows and down columns, the SAME neurons). Selection: "random" (seeded), or "top" /
            "bottom" by neuron weight norm (`neuron_norms`: the L2 norm of the neuron's gate row, up row and
            down column together, so every component ranks the same neurons).  [fraction of neurons]
  scale     norm gains (weights, not LayerNorm biases) * strength        [multiplicative factor]
            Gemma-family norms compute x̂ · (1 + w): the factor multiplies the effective gain (1 + w), and
            gaussian noise and relative_change are measured on it too (`ParamSlice.gain_offset`).
  zero, sign_flip, bit_flip  on a set of elements per slice chosen by `selection`: "random", or "top" /
            "bottom" by |scores| (scores must be given)                   [fraction of slice elements]
Compression-facing kinds (deterministic: the seed draws nothing; biases and norm gains are left alone):
  quantize  round-to-nearest fake quantization along the input dimension (quantize.py); mode = scheme
            ("symmetric" | "asymmetric"), group_size (0 = per-channel | 32 | 64 | 128)   [bit width]
  prune     zero the elements chosen by prune.py; mode = method ("magnitude" | "wanda" | "2:4"); wanda
            needs scores = |W|·‖X‖ (importance metric "activation")                       [sparsity]
  layer_drop  bypass a sub-block: component "block" | "block.attention" | "block.mlp" (layer_drop.py)
                                                                                          [1.0]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch

from esa_pipeline.core.checks import check_index, check_int, check_real
from esa_pipeline.core.models.adapters import (
    COMPONENT_NAMES,
    FFN_COMPONENTS,
    NORM_COMPONENTS,
    Adapter,
    ComponentNotApplicable,
    ParamSlice,
)
from esa_pipeline.core.perturbation.layer_drop import LAYER_DROP_COMPONENTS, layer_drop_slices
from esa_pipeline.core.perturbation.prune import prune_mask, validate_prune
from esa_pipeline.core.perturbation.quantize import fake_quantize, validate_quantize

KINDS: tuple[str, ...] = ("gaussian", "neurons", "scale", "router", "zero", "sign_flip", "bit_flip",
                          "quantize", "prune", "layer_drop")
WEIGHT_LEVEL_KINDS: tuple[str, ...] = ("zero", "sign_flip", "bit_flip")
COMPRESSION_KINDS: tuple[str, ...] = ("quantize", "prune", "layer_drop")
MODES: tuple[str, ...] = ("noise", "zero")
SELECTIONS: tuple[str, ...] = ("top", "random", "bottom")


# The int seed a seed-independent spec carries (Perturbation requires one; such a point draws nothing from it).
UNUSED_SEED = 0


def seed_independent(kind: str, selection: str | None = "random", mode: str | None = "noise") -> bool:
    """True when a point's perturbed weights do not depend on its seed (the seed draws nothing).

    Norm `scale` multiplies gains by the strength; compression kinds are deterministic by construction; a
    top/bottom selection picks elements by magnitude (zero/sign_flip/bit_flip) or neurons by norm — except
    `neurons` in mode "noise", whose noise on those neurons is still drawn from the seed. Such points are
    measured once (sweep variant `<component>__fixed`, seed NULL) and are left out of seed consistency.
    """
    if kind == "scale" or kind in COMPRESSION_KINDS:
        return True
    if selection in ("top", "bottom"):
        return not (kind == "neurons" and mode == "noise")
    return False


def seed_independent_rows(df: pd.DataFrame) -> pd.Series:
    """Per row of a frame with `kind` (and optionally `selection`, `mode`): seed_independent of its setting.

    Top/bottom `neurons` in mode "noise" still draw their noise from the seed, so they stay stochastic."""
    kind = df["kind"].astype(object)
    selection = df["selection"].astype(object) if "selection" in df.columns else pd.Series(None, index=df.index)
    mode = df["mode"].astype(object) if "mode" in df.columns else pd.Series(None, index=df.index)
    return pd.Series([seed_independent(k, None if pd.isna(s) else s, None if pd.isna(m) else m)
                      for k, s, m in zip(kind, selection, mode, strict=True)], index=df.index, dtype=bool)

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}
_EXPONENT_MSB = {torch.float32: 30, torch.bfloat16: 14, torch.float16: 14, torch.float64: 62}


class RestoreError(RuntimeError):
    """The restored weights are not bit-identical to the snapshot: the model must not be used further."""


@dataclass(frozen=True)
class Perturbation:
    kind: str  # gaussian | neurons | scale | router | zero | sign_flip | bit_flip
    component: str
    layer: int | None
    strength: float  # see the module docstring for its meaning per kind
    seed: int
    expert: int | None = None  # MoE expert index; None = all experts
    mode: str = "noise"  # neurons: "noise" | "zero"
    noise_sigma: float = 0.1  # neurons/noise: sigma (rms units) applied to selected neurons
    selection: str = "random"  # weight-level: "top" | "random" | "bottom"
    bit: int | None = None  # bit_flip: bit index in the stored dtype (default: exponent MSB)
    # gaussian/router: add -z instead of z, with the same draw z as the spec with antithetic=False. The mean
    # of a ± pair cancels the first-order term gᵀδ exactly (importance/prediction.py).
    antithetic: bool = False
    group_size: int | None = None  # quantize: inputs per scale group, 0 = per-channel; None for other kinds

    def __post_init__(self) -> None:
        # Types first (a bool is an int to Python: expert=True would silently mean expert 1), then normalize
        # numbers so that 1 and 1.0 hash identically.
        check_index("layer", self.layer)
        check_index("expert", self.expert)
        check_int("seed", self.seed)
        check_index("bit", self.bit)
        check_int("group_size", self.group_size, minimum=0, allow_none=True)
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"antithetic must be True or False, got {self.antithetic!r}")
        object.__setattr__(self, "strength", check_real("strength", self.strength, positive=True))
        object.__setattr__(self, "noise_sigma", check_real("noise_sigma", self.noise_sigma, positive=True))
        for name in ("layer", "expert", "seed", "bit", "group_size"):  # numpy ints (read from a frame) -> int:
            value = getattr(self, name)  # the spec hash serialises them, and equal specs must compare equal
            if value is not None:
                object.__setattr__(self, name, int(value))
        _validate_spec(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Perturbation:
        return cls(**data)

    def spec_seed(self) -> int:
        """Stable 63-bit seed: sha256 of the sorted spec fields (python's hash() is salted per process).

        `antithetic` is left out so that a ± pair shares its draw (and seeds of earlier results still hold);
        `group_size` only when None, for the same reason (it was added after those results)."""
        fields = {k: v for k, v in self.to_dict().items()
                  if k != "antithetic" and not (k == "group_size" and v is None)}
        payload = json.dumps(fields, sort_keys=True).encode()
        return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & (2**63 - 1)


@dataclass
class PerturbationReport:
    spec: Perturbation
    relative_change: float  # ||W' - W|| / ||W|| over all touched slices, fp32 from stored values
    changed_fraction: float  # n_changed / n_elements
    n_elements: int  # elements in the touched slices
    n_changed: int  # elements whose stored value differs after the write
    restored: bool | None  # None inside the block; True once restored and verified bit-identical
    elapsed_s: float  # apply + restore time (excludes the body of the with-block)
    notes: list[str] = field(default_factory=list)


def _validate_compression(p: Perturbation) -> None:
    if p.kind == "layer_drop":
        if p.component not in LAYER_DROP_COMPONENTS:
            raise ValueError(f"layer_drop bypasses a sub-block: use component one of {', '.join(LAYER_DROP_COMPONENTS)}")
        if p.strength != 1.0:
            raise ValueError(f"layer_drop bypasses the whole sub-block: use strength 1.0, got {p.strength}")
        if p.mode != "noise" or p.layer is None or p.expert is not None:
            raise ValueError("layer_drop takes a layer, no expert and no mode: set layer, leave mode/expert at "
                             "their defaults")
    else:
        if p.component not in COMPONENT_NAMES:  # a typo is not "a norm gain"
            raise ValueError(f"unknown component {p.component!r}: use one of {', '.join(COMPONENT_NAMES)}")
        if p.component.startswith("norm.") or p.component in NORM_COMPONENTS:
            raise ValueError(f"{p.kind} acts on weight matrices: use a component other than norm gains, got "
                             f"{p.component!r}")
        if p.kind == "quantize":
            validate_quantize(p.strength, p.group_size, p.mode)
        else:
            validate_prune(p.mode, p.strength)
    if p.group_size is not None and p.kind != "quantize":
        raise ValueError(f"group_size is only used by kind 'quantize': leave it None for kind {p.kind!r}")


NEURON_COMPONENT = "ffn.neurons"  # whole FFN neurons (kind "neurons" only)


def _validate_spec(p: Perturbation) -> None:
    if p.kind not in KINDS:
        raise ValueError(f"unknown perturbation kind {p.kind!r}: use one of {', '.join(KINDS)}")
    if p.layer is not None and (isinstance(p.layer, bool) or not isinstance(p.layer, int) or p.layer < 0):
        raise ValueError(f"layer must be a non-negative int (or None for a global component), got {p.layer!r}")
    if not math.isfinite(p.strength) or p.strength <= 0:
        raise ValueError(f"strength must be a finite number > 0, got {p.strength} (kind {p.kind})")
    if p.kind in COMPRESSION_KINDS:
        _validate_compression(p)
        if p.selection != "random" or p.antithetic or p.bit is not None:
            raise ValueError(f"{p.kind} is deterministic: leave selection='random', antithetic=False, bit=None")
        return
    if p.group_size is not None:
        raise ValueError(f"group_size is only used by kind 'quantize': leave it None for kind {p.kind!r}")
    if p.component == NEURON_COMPONENT and p.kind != "neurons":
        raise ValueError(f"{NEURON_COMPONENT} names whole FFN neurons: use kind 'neurons' (or an ffn.* matrix)")
    if p.component not in COMPONENT_NAMES + (NEURON_COMPONENT,):
        raise ValueError(f"unknown component {p.component!r}: use one of {', '.join(COMPONENT_NAMES)}")
    if p.kind in ("neurons",) + WEIGHT_LEVEL_KINDS and p.strength > 1:
        raise ValueError(f"{p.kind} strength is a fraction in (0, 1], got {p.strength}: use e.g. 0.1 for 10%")
    if p.kind == "neurons" and p.component not in FFN_COMPONENTS + (NEURON_COMPONENT,):
        raise ValueError(f"kind 'neurons' acts on FFN neurons: use component one of "
                         f"{', '.join(FFN_COMPONENTS + (NEURON_COMPONENT,))}")
    if p.kind == "scale" and not (p.component.startswith("norm.") or p.component in NORM_COMPONENTS):
        raise ValueError(f"kind 'scale' multiplies norm gains: use a norm component ({', '.join(NORM_COMPONENTS)})")
    if p.kind == "router" and p.component != "moe.router":
        raise ValueError("kind 'router' perturbs the MoE router: use component 'moe.router'")
    if p.mode not in MODES:
        raise ValueError(f"unknown mode {p.mode!r}: use one of {', '.join(MODES)}")
    if not math.isfinite(p.noise_sigma) or p.noise_sigma <= 0:
        raise ValueError(f"noise_sigma must be > 0, got {p.noise_sigma}")
    if p.selection not in SELECTIONS:
        raise ValueError(f"unknown selection {p.selection!r}: use one of {', '.join(SELECTIONS)}")
    if p.selection != "random" and p.kind not in WEIGHT_LEVEL_KINDS + ("neurons",):
        # gaussian/router/neurons/scale act on the whole slice (or on seeded neurons): a "top" request would
        # otherwise be silently measured as a whole-slice perturbation and stored under the wrong label
        raise ValueError(
            f"selection {p.selection!r} picks individual weights, which kind {p.kind!r} does not: use kind one of "
            f"{', '.join(WEIGHT_LEVEL_KINDS)} for top/bottom-k weights, 'neurons' for top/bottom neurons, or leave "
            "selection='random'"
        )
    if p.antithetic and p.kind not in ("gaussian", "router"):
        raise ValueError(f"antithetic negates gaussian noise: kind {p.kind!r} has no sign to flip, leave it False")
    if p.bit is not None and p.kind != "bit_flip":
        raise ValueError(f"bit is only used by kind 'bit_flip': leave bit=None for kind {p.kind!r}")


# ---- slice resolution --------------------------------------------------------------------------------
def resolve_slices(adapter: Adapter, p: Perturbation) -> list[ParamSlice]:
    """The slices `p` touches (raises ValueError / ComponentNotApplicable for a bad component/layer)."""
    if p.kind == "layer_drop":
        return layer_drop_slices(adapter, p.component, p.layer)
    if p.kind in ("quantize", "prune"):  # weight-only: biases keep full precision / stay dense
        return [s for s in adapter.slices(p.component, p.layer, p.expert) if not s.param_name.endswith("bias")]  # ".bias", GPT-OSS "_bias"
    if p.kind == "neurons":
        return _neuron_slices(adapter, p, FFN_COMPONENTS if p.component == NEURON_COMPONENT else (p.component,))
    slices = adapter.slices(p.component, p.layer, p.expert)
    if p.kind == "scale":
        return [s for s in slices if s.param_name.endswith(".weight")]  # gains, not LayerNorm biases
    return slices


def _neuron_slices(adapter: Adapter, p: Perturbation, components: tuple[str, ...]) -> list[ParamSlice]:
    slices = []
    for component in components:
        try:
            slices += adapter.slices(component, p.layer, p.expert)
        except ComponentNotApplicable:  # e.g. GPT-NeoX has no gate: its neurons live in up/down only
            if component == p.component:
                raise
    return [s for s in slices if s.neuron_axis is not None]  # down_proj's bias is not per-neuron


def neuron_norms(model: torch.nn.Module, adapter: Adapter, p: Perturbation) -> torch.Tensor:
    """[I] fp32 L2 norm of each FFN intermediate neuron's weights: its gate row, up row and down column (and
    per-neuron biases), summed over experts when `p.expert` is None. The importance that ranks neurons for
    selection "top" / "bottom" (the magnitude criterion of neuron pruning, e.g. Li et al. 2017, "Pruning
    Filters for Efficient ConvNets"), identical for every ffn.* component of a layer."""
    total = None
    for s in _neuron_slices(adapter, p, FFN_COMPONENTS):
        view = s.get(model).float()
        axes = [d for d in range(view.dim()) if d != s.neuron_axis]
        squares = view.pow(2).sum(dim=axes) if axes else view.pow(2)  # [I]
        total = squares if total is None else total + squares
    assert total is not None
    return total.sqrt().cpu()


def _check_scores(p: Perturbation, views: list[torch.Tensor], scores: list[torch.Tensor] | None) -> None:
    wanda = p.kind == "prune" and p.mode == "wanda"
    if (p.kind not in WEIGHT_LEVEL_KINDS or p.selection == "random") and not wanda:
        return
    if wanda and scores is None:
        raise ValueError("prune mode 'wanda' ranks |W|·‖X‖: pass scores=[one tensor per slice], e.g. "
                         "ImportanceResult.scores_for('activation', component, layer)")
    if scores is None:
        raise ValueError(
            f"selection {p.selection!r} ranks weights by |scores|: pass scores=[one tensor per slice] "
            "(e.g. from esa_pipeline.core.importance), or use selection='random'"
        )
    if len(scores) != len(views):
        raise ValueError(f"got {len(scores)} score tensors for {len(views)} slices of {p.component}: "
                         "pass one per adapter.slices(...) entry")
    for i, (s, v) in enumerate(zip(scores, views, strict=True)):
        if tuple(s.shape) != tuple(v.shape):
            raise ValueError(f"scores[{i}] has shape {tuple(s.shape)} but slice {i} has {tuple(v.shape)}")
        bad = int((~torch.isfinite(s)).sum())
        if bad:  # torch.topk ranks NaN above every number: that weight would silently be "top"
            raise ValueError(f"scores[{i}] has {bad} non-finite value{'s' if bad > 1 else ''} (NaN/inf): a ranking "
                             "of them means nothing; recompute the importance scores (in float32 if they overflowed)")


def _check_bit(p: Perturbation, views: list[torch.Tensor]) -> None:
    if p.kind != "bit_flip":
        return
    for view in views:
        if view.dtype not in _INT_VIEW:
            raise ValueError(f"bit_flip supports float32/bfloat16/float16/float64 weights, not {view.dtype}")
        n_bits = view.element_size() * 8
        if p.bit is not None and not 0 <= p.bit < n_bits:
            raise ValueError(f"bit {p.bit} does not exist in {view.dtype}: use 0..{n_bits - 1} "
                             f"(or None for the exponent MSB, bit {_EXPONENT_MSB[view.dtype]})")


# ---- new values --------------------------------------------------------------------------------------
def _norm(x: torch.Tensor) -> float:
    """L2 norm; fp32 unless the squares overflow it (bit flips make ~1e38 weights), then fp64."""
    norm = float(torch.linalg.vector_norm(x))
    return norm if math.isfinite(norm) else float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _rms(w32: torch.Tensor) -> float:
    return _norm(w32) / math.sqrt(w32.numel())


def _randn(shape: torch.Size, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on CPU in fp32 so the numbers do not depend on the device the model lives on.
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device)


def _n_selected(fraction: float, total: int) -> int:
    return min(total, max(1, round(fraction * total)))


def _gaussian(view: torch.Tensor, sigma: float, gen: torch.Generator, gain_offset: float = 0.0) -> torch.Tensor:
    w32 = view.float()
    scale = _rms(w32 + gain_offset) if gain_offset else _rms(w32)  # rms of the effective gain (1 + w)
    return _randn(view.shape, gen, view.device).mul_(sigma * scale).add_(w32)


def _neurons(view: torch.Tensor, axis: int, chosen: torch.Tensor, p: Perturbation,
             gen: torch.Generator) -> torch.Tensor:
    w32 = view.float().clone()
    idx = chosen.to(view.device)
    if p.mode == "zero":
        return w32.index_fill_(axis, idx, 0.0)
    rows = w32.index_select(axis, idx)  # the selected neurons' rows/columns
    rows += p.noise_sigma * _rms(w32) * _randn(rows.shape, gen, view.device)
    return w32.index_copy_(axis, idx, rows)


def _element_indices(p: Perturbation, numel: int, score: torch.Tensor | None,
                     gen: torch.Generator) -> torch.Tensor:
    k = _n_selected(p.strength, numel)
    if p.selection == "random":
        return torch.randperm(numel, generator=gen)[:k]
    assert score is not None
    magnitude = score.detach().float().abs().reshape(-1).cpu()
    return torch.topk(magnitude, k, largest=p.selection == "top", sorted=False).indices


def _weight_level(view: torch.Tensor, p: Perturbation, score: torch.Tensor | None,
                  gen: torch.Generator) -> torch.Tensor:
    # Works in the stored dtype: bit flips act on stored bits, zero/sign flips are exact in any dtype.
    new = view.clone().contiguous()
    flat = new.view(-1)
    idx = _element_indices(p, flat.numel(), score, gen).to(view.device)
    if p.kind == "zero":
        flat[idx] = 0
    elif p.kind == "sign_flip":
        flat[idx] = -flat[idx]
    else:
        int_dtype = _INT_VIEW[view.dtype]
        n_bits = torch.iinfo(int_dtype).bits
        bit = _EXPONENT_MSB[view.dtype] if p.bit is None else p.bit
        mask = 1 << bit
        if mask >= 1 << (n_bits - 1):  # the sign bit as a two's-complement value
            mask -= 1 << n_bits
        ints = flat.view(int_dtype)
        ints[idx] = ints[idx] ^ mask
    return new


def input_axis(model: torch.nn.Module, s: ParamSlice) -> int:
    """The axis of slice `s` along which its module reads inputs: what the adapter declares (`input_axis`, e.g.
    GPT-OSS's [E, H, 2I] experts), else the last for nn.Linear-style [out, in] storage (and its fused views /
    3-D experts), 0 for transformers' Conv1D, which stores [in, out] (GPT-2)."""
    if s.input_axis is not None:
        return s.input_axis
    owner = model.get_submodule(s.param_name.rsplit(".", 1)[0]) if "." in s.param_name else model
    return 0 if type(owner).__name__ == "Conv1D" else -1


def _new_values(p: Perturbation, slices: list[ParamSlice], views: list[torch.Tensor],
                scores: list[torch.Tensor] | None, gen: torch.Generator,
                axes: list[int] | None = None) -> list[torch.Tensor]:  # fmt: skip
    axes = axes or [-1] * len(views)
    if p.kind in ("gaussian", "router"):
        sigma = -p.strength if p.antithetic else p.strength
        return [_gaussian(v, sigma, gen, s.gain_offset) for s, v in zip(slices, views, strict=True)]
    if p.kind == "scale":  # (w + offset) * factor - offset: the factor multiplies the effective gain
        return [(v.float() + s.gain_offset) * p.strength - s.gain_offset
                for s, v in zip(slices, views, strict=True)]
    if p.kind == "neurons":
        n_neurons = views[0].shape[slices[0].neuron_axis]
        k = _n_selected(p.strength, n_neurons)
        if p.selection == "random":
            chosen = torch.randperm(n_neurons, generator=gen)[:k]
        else:
            assert scores is not None and len(scores) == 1  # [I] neuron norms, from perturbed()
            chosen = torch.topk(scores[0], k, largest=p.selection == "top").indices
        chosen = chosen.sort().values
        return [_neurons(v, s.neuron_axis, chosen, p, gen) for s, v in zip(slices, views, strict=True)]
    if p.kind == "quantize":
        return [fake_quantize(v, int(p.strength), p.group_size, p.mode, a)  # type: ignore[arg-type]
                for v, a in zip(views, axes, strict=True)]  # fmt: skip
    if p.kind == "prune":  # 2:4 and magnitude rank |W|; only wanda uses the scores
        ranks = [scores[i] if p.mode == "wanda" else None for i in range(len(views))]  # type: ignore[index]
        return [v.masked_fill(prune_mask(v, p.mode, p.strength, r, a), 0)
                for v, r, a in zip(views, ranks, axes, strict=True)]  # fmt: skip
    if p.kind == "layer_drop":
        return [torch.zeros_like(v) for v in views]
    return [_weight_level(v, p, None if scores is None else scores[i], gen) for i, v in enumerate(views)]


# ---- measuring and restoring -------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same storage reinterpreted as integers, so NaN and -0.0 compare bitwise."""
    int_dtype = _INT_VIEW.get(t.dtype)
    return t if int_dtype is None else t.view(int_dtype)


def _n_changed(after: torch.Tensor, before: torch.Tensor) -> int:
    """Elements whose value changed (NaN -> NaN and 0.0 -> -0.0 count as unchanged)."""
    differs = after != before  # -0.0 == 0.0 already; only NaN needs care
    if bool(after.isnan().any()):
        differs &= ~(after.isnan() & before.isnan())
    return int(differs.sum())


def _bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


@contextmanager
def perturbed(model: torch.nn.Module, adapter: Adapter, p: Perturbation,
              scores: list[torch.Tensor] | None = None) -> Iterator[PerturbationReport]:
    """Apply `p` inside the with-block; restore bit-exactly on exit (also when the block raises)."""
    started = time.perf_counter()
    slices = resolve_slices(adapter, p)
    if not slices:
        raise ValueError(f"{p.kind} on {p.component} touches no parameter of {adapter.architecture}")
    views = [s.get(model) for s in slices]
    _check_scores(p, views, scores)
    _check_bit(p, views)
    gen = torch.Generator(device="cpu").manual_seed(p.spec_seed())
    if p.kind == "neurons":
        scores = None if p.selection == "random" else [neuron_norms(model, adapter, p)]
    axes = [input_axis(model, s) for s in slices]  # quantize/prune group and rank along the input axis
    new_values = _new_values(p, slices, views, scores, gen, axes)  # computed before any write
    snapshots = [v.clone() for v in views]
    report = PerturbationReport(p, 0.0, 0.0, sum(v.numel() for v in views), 0, None, 0.0)
    if adapter.tied_embeddings and p.component in ("embedding", "lm_head"):
        report.notes.append("tied embeddings: the embedding and the output head are one tensor, so both are "
                            "perturbed")
    body_raised = False
    try:
        for view, new in zip(views, new_values, strict=True):
            view.copy_(new)  # casts to the stored dtype; rounding is why changed_fraction can be < 1
        del new_values
        _measure(report, views, snapshots, [s.gain_offset for s in slices])
        report.elapsed_s = time.perf_counter() - started
        yield report
    except BaseException:
        body_raised = True
        raise
    finally:
        restore_started = time.perf_counter()
        for view, snapshot in reversed(list(zip(views, snapshots, strict=True))):
            view.copy_(snapshot)
        report.restored = all(_bit_identical(v, s) for v, s in zip(views, snapshots, strict=True))
        report.elapsed_s += time.perf_counter() - restore_started
        if not report.restored and not body_raised:
            raise RestoreError(f"weights of {p} are not bit-identical after restore: discard this model")


def _measure(report: PerturbationReport, views: list[torch.Tensor], snapshots: list[torch.Tensor],
             gain_offsets: list[float]) -> None:
    delta_sq = base_sq = 0.0
    n_changed = 0
    for view, snapshot, offset in zip(views, snapshots, gain_offsets, strict=True):
        before = snapshot.float()
        delta_sq += _norm(view.float() - before) ** 2
        base_sq += _norm(before + offset) ** 2  # relative to the effective gain (1 + w) where offset is 1
        n_changed += _n_changed(view, snapshot)
    if base_sq > 0:
        report.relative_change = math.sqrt(delta_sq / base_sq)
    else:  # an all-zero slice (e.g. a zero-initialized bias): any change is infinitely large
        report.relative_change = 0.0 if delta_sq == 0 else float("inf")
    report.n_changed = n_changed
    report.changed_fraction = n_changed / report.n_elements
    if n_changed == 0:
        report.notes.append(
            f"no stored element changed: the perturbation is below {views[0].dtype}'s resolution"
        )
