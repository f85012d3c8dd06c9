"""Architecture adapters: canonical component names -> parameter slices.

Fused tensors (GPT-NeoX's interleaved QKV, Phi-3's Q|K|V and gate|up, GPT-2's Conv1D c_attn, the fused 3-D
experts of Mixtral / Qwen-MoE / OLMoE) cannot be addressed by module name, so an adapter answers with
`ParamSlice`s: a parameter name, an optional reshape and a basic index. `ParamSlice.get` returns a writable
view into the parameter's storage, which is what the perturbation engine snapshots, modifies and restores.

Components are named by ROLE, not by HF attribute, because attribute names mean different things across
families (Llama's `post_attention_layernorm` normalises the MLP input; Gemma 2/3's and OLMo 2's normalises the
attention output before the residual add):

  norm.attn_in   the norm applied to the residual stream before attention     (Llama input_layernorm)
  norm.attn_out  the norm applied to attention's output before the residual add (Gemma2/3, OLMo2)
  norm.ffn_in    the norm applied to the residual stream before the MLP        (Llama post_attention_layernorm)
  norm.ffn_out   the norm applied to the MLP's output before the residual add  (Gemma2/3, OLMo2)
  norm.final     the norm after the last decoder layer (global: layer None)
  attention.q_norm / attention.k_norm   per-head (Qwen3, Gemma3) or full-width (OLMo2) query/key norms
  moe.shared_expert  the always-active expert of Qwen2-MoE (its MLP and its sigmoid gate)
  embedding, lm_head  global; with tied embeddings they are ONE tensor (perturbing one perturbs both)

The old names `norm.input` / `norm.post_attention` stay valid as aliases of the HF attributes
`input_layernorm` / `post_attention_layernorm`; each family maps them to its role (`ALIASES`, `role_of`).

Each family file declares its layout and the roles it lacks (with the reason); `register` refuses a family
whose declaration does not cover every role. `adapter_for(model)` picks the adapter by the model's HF class
name, or by family name (`family=`) for an unregistered class after a structural check (`check_layout`).
"""

from __future__ import annotations

import dataclasses
import numbers
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

LAYER_COMPONENTS: tuple[str, ...] = (
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.output",
    "attention.q_norm",
    "attention.k_norm",
    "ffn.gate",
    "ffn.up",
    "ffn.down",
    "norm.attn_in",
    "norm.attn_out",
    "norm.ffn_in",
    "norm.ffn_out",
    "moe.router",
    "moe.shared_expert",
)
# Components addressed with layer=None (not part of any decoder layer).
GLOBAL_COMPONENTS: tuple[str, ...] = ("embedding", "norm.final", "lm_head")
CANONICAL_COMPONENTS: tuple[str, ...] = LAYER_COMPONENTS + GLOBAL_COMPONENTS
FFN_COMPONENTS: tuple[str, ...] = ("ffn.gate", "ffn.up", "ffn.down")
NORM_COMPONENTS: tuple[str, ...] = (
    "norm.attn_in", "norm.attn_out", "norm.ffn_in", "norm.ffn_out", "norm.final", "attention.q_norm",
    "attention.k_norm",
)
# Old (HF-attribute) names, kept so stored results and YAML keep working. Their role depends on the family:
# `Adapter.aliases` maps them; the defaults below hold for every pre-norm family whose second norm feeds the MLP.
ALIASES: dict[str, str] = {"norm.input": "norm.attn_in", "norm.post_attention": "norm.ffn_in"}
COMPONENT_NAMES: tuple[str, ...] = CANONICAL_COMPONENTS + tuple(ALIASES)
EXPERT_COMPONENTS: tuple[str, ...] = FFN_COMPONENTS + ("moe.router",)


class ComponentNotApplicable(ValueError):
    """The architecture has no such component (e.g. `ffn.gate` on GPT-NeoX, `moe.router` on Llama)."""


class UnsupportedArchitecture(ValueError):
    """No adapter is registered for the model's class (or the named family's layout does not match)."""


@dataclass(frozen=True)
class ParamSlice:
    """A region of one parameter: `param.view(view_shape)[index]` (basic indexing only, so it is a view)."""

    param_name: str  # name in model.named_parameters()
    view_shape: tuple[int, ...] | None  # reshape before indexing (GPT-NeoX fused QKV)
    index: tuple  # ints and slices applied after the view; () = whole parameter
    neuron_axis: int | None  # FFN intermediate-neuron axis within the sliced view (kind "neurons")
    # The norm computes with (stored + gain_offset): 1.0 for Gemma-family RMSNorms, whose forward is
    # x_normed * (1 + w). Gain scaling and noise act on that effective gain, not on the stored w.
    gain_offset: float = 0.0
    # Axis of the sliced view along which the module reads its inputs (quantize groups and prune ranks along it);
    # None = the last axis, as in nn.Linear's [out, in] and the usual fused 3-D experts [E, out, in].
    input_axis: int | None = None

    def __post_init__(self) -> None:
        for item in self.index:
            if not isinstance(item, int | slice):
                raise TypeError(
                    f"ParamSlice index items must be int or slice (views only), got {type(item).__name__} "
                    f"for {self.param_name}"
                )

    def get(self, model: torch.nn.Module) -> torch.Tensor:
        """A writable view into the parameter's data (no autograd); writes change the model in place."""
        data = model.get_parameter(self.param_name).data
        if self.view_shape is not None:
            data = data.view(self.view_shape)
        view = data[self.index]
        if view.data_ptr() == 0 and view.numel() > 0:
            raise RuntimeError(
                f"{self.param_name} has no materialized storage (meta/offloaded): load the model without disk "
                "offload (device_map onto GPUs/CPU) to perturb it"
            )
        return view


SliceBuilder = Callable[["Adapter", int, int | None], list[ParamSlice]]


def _whole_module(path: str) -> Callable[[Adapter], list[ParamSlice]]:
    def build(a: Adapter) -> list[ParamSlice]:
        out = [ParamSlice(f"{path}.weight", None, (), None)] if a.has_param(f"{path}.weight") else []
        if a.has_param(f"{path}.bias"):
            out.append(ParamSlice(f"{path}.bias", None, (), None))
        return out

    return build


class Adapter:
    """Base class; a family subclass declares module paths, a `_components` table and the roles it `lacks`.

    Subclasses set:
      family: the name a YAML `adapter: <family>` uses for an unregistered class with this layout
      layers_path, final_norm_path, embedding_path, lm_head_path: dotted submodule paths
      _components: per-layer role -> builder(adapter, layer, expert) -> list[ParamSlice]
      lacks: role -> why this family has no such component (per-layer and global roles alike)
      aliases: old component name -> this family's role (None: the family has no such HF attribute)
      norm_gain_offset: 1.0 where RMSNorm computes x̂ · (1 + w) (Gemma family), else 0.0
    """

    family: str = ""
    layers_path: str = "model.layers"
    final_norm_path: str = "model.norm"
    embedding_path: str = "model.embed_tokens"
    lm_head_path: str = "lm_head"
    router_suffix: str | None = None  # submodule of a decoder layer holding the MoE router
    norm_gain_offset: float = 0.0
    aliases: dict[str, str | None] = ALIASES
    _components: dict[str, SliceBuilder] = {}
    lacks: dict[str, str] = {}
    unmapped: tuple[str, ...] = ()  # name suffixes of parameters no role covers, on purpose (GPT-2's wpe)

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.architecture: str = type(model).__name__
        self.config = config
        self.num_layers: int = int(config.num_hidden_layers)
        n_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        self.n_experts: int | None = int(n_experts) if n_experts else None
        self.hidden_size: int = int(config.hidden_size)
        self.n_heads: int = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None)
        self.n_kv_heads: int = int(kv_heads) if kv_heads else self.n_heads
        head_dim = getattr(config, "head_dim", None)
        self.head_dim: int = int(head_dim) if head_dim else self.hidden_size // self.n_heads
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        self.intermediate_size: int = int(intermediate) if intermediate else 4 * self.hidden_size
        self._param_shapes: dict[str, tuple[int, ...]] = {
            name: tuple(p.shape) for name, p in model.named_parameters()}
        self._param_names: frozenset[str] = frozenset(self._param_shapes)
        input_emb, output_emb = model.get_input_embeddings(), model.get_output_embeddings()
        # Tied only when the head really shares storage with the embedding (the config flag alone can lie).
        self.tied_embeddings: bool = (
            output_emb is not None and output_emb.weight.data_ptr() == input_emb.weight.data_ptr()
        )

    # ---- roles -----------------------------------------------------------------------------------------
    @classmethod
    def role_of(cls, component: str) -> str:
        """The canonical role a component name (role or old alias) means in this family.

        Raises ValueError for an unknown name, ComponentNotApplicable for an alias of an HF attribute this
        family does not have (OLMo2 has no `input_layernorm`)."""
        if component in CANONICAL_COMPONENTS:
            return component
        if component in cls.aliases:
            role = cls.aliases[component]
            if role is None:
                raise ComponentNotApplicable(
                    f"{component} is not applicable to the {cls.family} family: it has no such module")
            return role
        raise ValueError(f"unknown component {component!r}: use one of {', '.join(COMPONENT_NAMES)}")

    @classmethod
    def layer_roles(cls) -> list[str]:
        """Per-layer roles this family has, in canonical order."""
        return [c for c in LAYER_COMPONENTS if c in cls._components]

    @classmethod
    def global_roles(cls) -> list[str]:
        """Global roles (layer None) this family has, in canonical order."""
        return [c for c in GLOBAL_COMPONENTS if c not in cls.lacks]

    @classmethod
    def not_applicable(cls) -> dict[str, str]:
        """Every role the family lacks -> why (recorded, never silently skipped)."""
        return {c: cls.lacks[c] for c in CANONICAL_COMPONENTS if c in cls.lacks}

    @classmethod
    def accepts(cls, component: str) -> bool:
        """Whether `component` (a role or an old alias) names something this family has."""
        try:
            return cls.role_of(component) not in cls.lacks
        except ValueError:  # unknown name, or an alias of an attribute the family lacks
            return False

    @classmethod
    def component_names(cls) -> list[str]:
        """Every name this family accepts: its per-layer roles, its global roles, then the old aliases."""
        return [c for c in COMPONENT_NAMES if cls.accepts(c)]

    def also_perturbed(self, component: str) -> str | None:
        """The other component a perturbation of `component` changes too (tied embedding/head), else None."""
        role = self.role_of(component)
        if self.tied_embeddings and role in ("embedding", "lm_head"):
            return "lm_head" if role == "embedding" else "embedding"
        return None

    def components(self) -> list[str]:
        """Per-layer canonical components this architecture has (global ones: `global_roles()`)."""
        return self.layer_roles()

    # ---- component -> slices -------------------------------------------------------------------------
    def slices(self, component: str, layer: int | None, expert: int | None = None) -> list[ParamSlice]:
        """Parameter slices of `component` (a role or an old alias) in decoder layer `layer`.

        expert None = all experts. Global roles (embedding, norm.final, lm_head) take layer None.
        Raises ValueError for a bad name/layer/expert, ComponentNotApplicable for a role the family lacks."""
        role = self.role_of(component)
        # numpy ints (indices read from a frame) are indices; bools are not (True would silently mean 1)
        layer, expert = (int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
                         for v in (layer, expert))  # fmt: skip
        if role in self.lacks:
            raise ComponentNotApplicable(
                f"{role} is not applicable to {self.architecture}: {self.lacks[role]} "
                f"(components: {', '.join(self.components() + self.global_roles())})"
            )
        if role in GLOBAL_COMPONENTS:
            if layer is not None:
                raise ValueError(f"component {role!r} is not inside a decoder layer: pass layer=None")
            if expert is not None:
                raise ValueError(f"component {role!r} has no experts: pass expert=None")
            out = self._global_slices(role)
        else:
            builder = self._components[role]
            self._check_layer(role, layer)
            self._check_expert(role, expert)
            assert layer is not None  # narrowed by _check_layer
            out = builder(self, layer, expert)
        if self.norm_gain_offset and role in NORM_COMPONENTS:
            out = [dataclasses.replace(s, gain_offset=self.norm_gain_offset) if s.param_name.endswith(".weight")
                   else s for s in out]
        return out

    def _check_layer(self, component: str, layer: int | None) -> None:
        if layer is None or isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{component} needs an integer layer in 0..{self.num_layers - 1}, got {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(
                f"layer {layer} is out of range for {self.architecture} with {self.num_layers} layers: "
                f"use 0..{self.num_layers - 1}"
            )

    def _check_expert(self, component: str, expert: int | None) -> None:
        if expert is None:
            return
        if isinstance(expert, bool) or not isinstance(expert, int):  # True would silently mean expert 1
            raise ValueError(f"expert must be an int index or None for all experts, got {expert!r}")
        if self.n_experts is None:
            raise ValueError(f"{self.architecture} is not a mixture of experts: pass expert=None")
        if component not in EXPERT_COMPONENTS:
            raise ValueError(f"{component} is shared by all experts: pass expert=None")
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert {expert} is out of range: use 0..{self.n_experts - 1} or None for all")

    def _global_slices(self, component: str) -> list[ParamSlice]:
        path = {"embedding": self.embedding_path, "norm.final": self.final_norm_path,
                "lm_head": self.lm_head_path}[component]
        if component == "embedding":
            return [ParamSlice(f"{path}.weight", None, (), None)]
        out = _whole_module(path)(self)
        if component == "lm_head" and self.tied_embeddings:
            # named_parameters lists a tied tensor once, under the embedding: the head IS that tensor.
            out = [ParamSlice(f"{self.embedding_path}.weight", None, (), None)] + out
        return out

    # ---- helpers for family files ----------------------------------------------------------------------
    def layer_param(self, layer: int, suffix: str) -> str:
        return f"{self.layers_path}.{layer}.{suffix}"

    def has_param(self, name: str) -> bool:
        return name in self._param_names

    def param_shape(self, name: str) -> tuple[int, ...]:
        return self._param_shapes[name]

    def whole(self, layer: int, module: str, *, weight_axis: int | None = None, bias_axis: int | None = None,
              ) -> list[ParamSlice]:
        """The weight (and bias if the module has one) of a plain module in `layer`."""
        out = [ParamSlice(self.layer_param(layer, f"{module}.weight"), None, (), weight_axis)]
        bias = self.layer_param(layer, f"{module}.bias")
        if self.has_param(bias):
            out.append(ParamSlice(bias, None, (), bias_axis))
        return out

    # ---- module accessors (prefix cache, hooks) -------------------------------------------------------
    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.get_submodule(self.final_norm_path)

    def lm_head(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.get_submodule(self.lm_head_path)

    def head_logits(self, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own next-token logits from final hidden states.

        hidden: [..., H], already passed through `final_norm(model)`; returns [..., V] in the head's dtype.
        The default applies the LM head only; families whose `forward` transforms the head's output
        (Gemma2 final-logit soft-capping, Granite `logits_scaling`) override this so that every evaluator
        path (full forward in token chunks, prefix-cache replay, KL) reproduces `model(...).logits`.
        """
        return self.lm_head(model)(hidden)

    def embedding(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.get_submodule(self.embedding_path)

    def router(self, model: torch.nn.Module, layer: int) -> torch.nn.Module | None:
        """The MoE gate module of `layer` (its forward returns router logits first), None for dense models."""
        if self.router_suffix is None:
            return None
        self._check_layer("moe.router", layer)
        return model.get_submodule(f"{self.layers_path}.{layer}.{self.router_suffix}")

    # ---- structural check (YAML `adapter: <family>` for an unregistered class) ---------------------------
    def layout_problems(self) -> list[str]:
        """What in the model does not match this family's declared layout ([] = every slice resolves).

        Every role's slices, in every layer, must name an existing parameter whose shape admits the slice's
        view and index; attention projections (and dense FFN matrices) must hold the element counts the
        config implies (e.g. query: heads × head_dim × hidden)."""
        problems: list[str] = []
        roles = [(r, layer) for r in self.layer_roles() for layer in range(self.num_layers)]
        roles += [(r, None) for r in self.global_roles()]
        covered = set(self.unmapped)
        for role, layer in roles:
            try:
                slices = self.slices(role, layer)
            except (KeyError, AttributeError, ValueError) as exc:
                problems.append(f"{role} (layer {layer}): {exc}")
                continue
            if not slices:
                problems.append(f"{role} (layer {layer}): no parameter found")
            for s in slices:
                covered.add(s.param_name)
                problem = self._slice_problem(role, s)
                if problem:
                    problems.append(problem)
        # A parameter no role maps means the model has modules this family does not know (e.g. norm gains
        # where the family's norms are parameter-free): the forward would differ from the family's.
        problems += [f"parameter {name} is mapped by no role of the {self.family} family"
                     for name in self._param_shapes if name not in covered and not name.endswith(self.unmapped)]
        return problems

    def _slice_problem(self, role: str, s: ParamSlice) -> str | None:
        if s.param_name not in self._param_shapes:
            return f"{role}: missing parameter {s.param_name}"
        shape = self._param_shapes[s.param_name]
        try:
            probe = torch.empty(shape, device="meta")
            view = (probe.view(s.view_shape) if s.view_shape else probe)[s.index]
        except (RuntimeError, IndexError) as exc:
            return f"{role}: {s.param_name} has shape {list(shape)}, which does not admit the slice ({exc})"
        expected = self._expected_numel(role)
        if expected is not None and s.param_name.endswith("weight") and view.numel() != expected:
            return (f"{role}: {s.param_name} slice holds {view.numel()} elements, the config implies "
                    f"{expected}")
        return None

    def _expected_numel(self, role: str) -> int | None:
        q, kv, h = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden_size
        expected = {"attention.query": q * h, "attention.key": kv * h, "attention.value": kv * h,
                    "attention.output": h * q}
        if self.n_experts is None:
            expected.update({c: self.intermediate_size * h for c in FFN_COMPONENTS})
        return expected.get(role)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.architecture}, layers={self.num_layers}, experts={self.n_experts})"


_REGISTRY: dict[str, type[Adapter]] = {}  # HF class name -> adapter
_FAMILIES: dict[str, type[Adapter]] = {}  # family name (YAML `adapter:`) -> adapter
# Models loaded with an explicit family (YAML `adapter:`), so that every later adapter_for(model) agrees.
_BOUND: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def _check_declaration(cls: type[Adapter]) -> None:
    """Every role is either built or declared lacking (with a reason), never both, never neither."""
    unknown = (set(cls._components) - set(LAYER_COMPONENTS)) | (set(cls.lacks) - set(CANONICAL_COMPONENTS))
    both = set(cls._components) & set(cls.lacks)
    neither = [c for c in LAYER_COMPONENTS if c not in cls._components and c not in cls.lacks]
    bad_alias = {k: v for k, v in cls.aliases.items() if k not in ALIASES or (v is not None and
                                                                            v not in CANONICAL_COMPONENTS)}
    if unknown or both or neither or bad_alias or not cls.family:
        raise TypeError(
            f"{cls.__name__} declares its roles wrongly: unknown {sorted(unknown)}, both built and lacking "
            f"{sorted(both)}, neither built nor lacking {neither}, bad aliases {bad_alias}, family "
            f"{cls.family!r}"
        )


def register(*architectures: str, families: tuple[str, ...] = ()) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: serve the given HF class names (e.g. "LlamaForCausalLM") with this adapter.

    The adapter's `family` (plus `families`) become names a YAML `adapter:` can give."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        _check_declaration(cls)
        for name in architectures:
            _REGISTRY[name] = cls
        for family in (cls.family, *families):
            _FAMILIES[family] = cls
        return cls

    return decorate


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def supported_families() -> list[str]:
    return sorted(_FAMILIES)


def adapter_class(architecture: str | None = None, family: str | None = None) -> type[Adapter] | None:
    """The adapter class serving an HF class name or a family name; None when there is none."""
    if family is not None:
        return _FAMILIES.get(family)
    return _REGISTRY.get(architecture or "")


def role_of(component: str, family: str | None) -> str:
    """The role a stored component name means for a model of `family` (ModelSpec.family).

    Old aliases map per family (Llama's `norm.post_attention` is `norm.ffn_in`, Gemma2's is
    `norm.attn_out`); unknown families use the defaults of `ALIASES`; unknown names come back unchanged."""
    cls = _FAMILIES.get(family or "")
    aliases = cls.aliases if cls is not None else ALIASES
    return (aliases.get(component) or component) if component in ALIASES else component


def matching_families(model: torch.nn.Module) -> list[str]:
    """Families whose declared layout the model's parameters satisfy."""
    out = []
    for family, cls in sorted(_FAMILIES.items()):
        try:
            if not cls(model).layout_problems():
                out.append(family)
        except (AttributeError, TypeError, ValueError):
            continue
    return out


def bind_family(model: torch.nn.Module, family: str) -> Adapter:
    """Check `model` against `family`'s layout and serve it with that family from now on (YAML `adapter:`)."""
    adapter = adapter_for(model, family)
    _BOUND[model] = family
    return adapter


def family_of(model: torch.nn.Module) -> str | None:
    """The family serving `model` (bound explicitly, else by class name); None when no adapter serves it."""
    bound = _BOUND.get(model)
    if bound is not None:
        return bound
    cls = _REGISTRY.get(type(model).__name__)
    return None if cls is None else cls.family


def adapter_for(model: torch.nn.Module, family: str | None = None) -> Adapter:
    """The adapter for `model`: by its HF class name, or by `family` (YAML `adapter:`) after a structural check.

    A model bound with `bind_family` keeps its family. Raises UnsupportedArchitecture for an unknown class,
    an unknown family, or a family whose layout the model's parameters do not match (the message lists what
    is missing and the families that do match). `model` may be the LoadedModel itself (its `.model` is used);
    anything but a torch module raises TypeError."""
    if all(hasattr(model, a) for a in ("model", "tokenizer", "spec")):  # a LoadedModel (registry imports us)
        model = model.model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"adapter_for() takes a model (a LoadedModel or its .model, a torch module), got "
                        f"{type(model).__name__}")
    name = type(model).__name__
    family = family or _BOUND.get(model)
    if family is not None:
        cls = _FAMILIES.get(family)
        if cls is None:
            raise UnsupportedArchitecture(
                f"unknown adapter family {family!r}: use one of {', '.join(supported_families())}")
        adapter = cls(model)
        problems = adapter.layout_problems()
        if problems:
            shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
            matching = [f for f in matching_families(model) if f != family]
            raise UnsupportedArchitecture(
                f"{name} does not have the {family} layout: {shown}. Families tried: "
                f"{', '.join(supported_families())}; matching: {', '.join(matching) or 'none'}"
            )
        return adapter
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnsupportedArchitecture(
            f"no adapter for {name}: supported architectures are {', '.join(supported_architectures())}. "
            f"If its layout matches a family ({', '.join(supported_families())}), set `adapter: <family>` in "
            "the model's YAML section; otherwise add a family file in esa_pipeline/core/models/adapters/."
        )
    return cls(model)
