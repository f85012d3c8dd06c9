"""Architecture adapters: canonical component names -> parameter slices.

Fused tensors (GPT-NeoX's interleaved QKV, Phi-3's Q|K|V and gate|up, Mixtral's 3-D experts) cannot be
addressed by module name, so an adapter answers with `ParamSlice`s: a parameter name, an optional reshape
and a basic index. `ParamSlice.get` returns a writable view into the parameter's storage, which is what the
perturbation engine snapshots, modifies and restores.

Each family file declares its layout; `adapter_for(model)` picks the adapter by the model's HF class name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LAYER_COMPONENTS: tuple[str, ...] = (
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.output",
    "ffn.gate",
    "ffn.up",
    "ffn.down",
    "norm.input",
    "norm.post_attention",
    "moe.router",
)
# Components addressed with layer=None (not part of any decoder layer).
GLOBAL_COMPONENTS: tuple[str, ...] = ("embedding",)
CANONICAL_COMPONENTS: tuple[str, ...] = LAYER_COMPONENTS + GLOBAL_COMPONENTS
FFN_COMPONENTS: tuple[str, ...] = ("ffn.gate", "ffn.up", "ffn.down")


class ComponentNotApplicable(ValueError):
    """The architecture has no such component (e.g. `ffn.gate` on GPT-NeoX, `moe.router` on Llama)."""


class UnsupportedArchitecture(ValueError):
    """No adapter is registered for the model's class."""


@dataclass(frozen=True)
class ParamSlice:
    """A region of one parameter: `param.view(view_shape)[index]` (basic indexing only, so it is a view)."""

    param_name: str  # name in model.named_parameters()
    view_shape: tuple[int, ...] | None  # reshape before indexing (GPT-NeoX fused QKV)
    index: tuple  # ints and slices applied after the view; () = whole parameter
    neuron_axis: int | None  # FFN intermediate-neuron axis within the sliced view (kind "neurons")

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


class Adapter:
    """Base class; a family subclass declares module paths and a `_components` table of slice builders.

    Subclasses set:
      layers_path, final_norm_path, embedding_path, lm_head_path: dotted submodule paths
      _components: canonical component -> builder(adapter, layer, expert) -> list[ParamSlice]
    """

    layers_path: str = "model.layers"
    final_norm_path: str = "model.norm"
    embedding_path: str = "model.embed_tokens"
    lm_head_path: str = "lm_head"
    router_suffix: str | None = None  # submodule of a decoder layer holding the MoE router
    _components: dict[str, SliceBuilder] = {}

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.architecture: str = type(model).__name__
        self.config = config
        self.num_layers: int = int(config.num_hidden_layers)
        self.n_experts: int | None = getattr(config, "num_local_experts", None)
        self.hidden_size: int = int(config.hidden_size)
        self.n_heads: int = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None)
        self.n_kv_heads: int = int(kv_heads) if kv_heads else self.n_heads
        head_dim = getattr(config, "head_dim", None)
        self.head_dim: int = int(head_dim) if head_dim else self.hidden_size // self.n_heads
        self.intermediate_size: int = int(config.intermediate_size)
        self._param_names: frozenset[str] = frozenset(name for name, _ in model.named_parameters())
        input_emb, output_emb = model.get_input_embeddings(), model.get_output_embeddings()
        # Tied only when the head really shares storage with the embedding (the config flag alone can lie).
        self.tied_embeddings: bool = (
            output_emb is not None and output_emb.weight.data_ptr() == input_emb.weight.data_ptr()
        )

    # ---- component -> slices -------------------------------------------------------------------------
    def components(self) -> list[str]:
        """Per-layer canonical components this architecture has (global ones: see GLOBAL_COMPONENTS)."""
        return [c for c in LAYER_COMPONENTS if c in self._components]

    def slices(self, component: str, layer: int | None, expert: int | None = None) -> list[ParamSlice]:
        """Parameter slices of `component` in decoder layer `layer` (expert None = all experts)."""
        if component in GLOBAL_COMPONENTS:
            if layer is not None:
                raise ValueError(f"component {component!r} is not inside a decoder layer: pass layer=None")
            if expert is not None:
                raise ValueError(f"component {component!r} has no experts: pass expert=None")
            return self._global_slices(component)
        if component not in LAYER_COMPONENTS:
            raise ValueError(
                f"unknown component {component!r}: use one of {', '.join(CANONICAL_COMPONENTS)}"
            )
        builder = self._components.get(component)
        if builder is None:
            raise ComponentNotApplicable(
                f"{component} is not applicable to {self.architecture} "
                f"(components: {', '.join(self.components())})"
            )
        self._check_layer(component, layer)
        self._check_expert(component, expert)
        assert layer is not None  # narrowed by _check_layer
        return builder(self, layer, expert)

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
        if component not in FFN_COMPONENTS + ("moe.router",):
            raise ValueError(f"{component} is shared by all experts: pass expert=None")
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert {expert} is out of range: use 0..{self.n_experts - 1} or None for all")

    def _global_slices(self, component: str) -> list[ParamSlice]:
        assert component == "embedding"
        return [ParamSlice(f"{self.embedding_path}.weight", None, (), None)]

    # ---- helpers for family files ----------------------------------------------------------------------
    def layer_param(self, layer: int, suffix: str) -> str:
        return f"{self.layers_path}.{layer}.{suffix}"

    def has_param(self, name: str) -> bool:
        return name in self._param_names

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.architecture}, layers={self.num_layers}, experts={self.n_experts})"


_REGISTRY: dict[str, type[Adapter]] = {}


def register(*architectures: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: serve the given HF class names (e.g. "LlamaForCausalLM") with this adapter."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        for name in architectures:
            _REGISTRY[name] = cls
        return cls

    return decorate


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for `model`, chosen by its class name; unknown classes raise UnsupportedArchitecture."""
    name = type(model).__name__
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnsupportedArchitecture(
            f"no adapter for {name}: supported architectures are {', '.join(supported_architectures())}. "
            "Add one in esa_pipeline/core/models/adapters/ (one declarative file per family)."
        )
    return cls(model)
