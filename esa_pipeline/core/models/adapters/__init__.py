"""Architecture adapters, registered by HF class name. Importing this package registers every family."""

from . import gpt_neox, llama, mixtral, phi3  # noqa: F401  (registration side effect)
from .base import (
    CANONICAL_COMPONENTS,
    FFN_COMPONENTS,
    GLOBAL_COMPONENTS,
    LAYER_COMPONENTS,
    Adapter,
    ComponentNotApplicable,
    ParamSlice,
    UnsupportedArchitecture,
    adapter_for,
    supported_architectures,
)

__all__ = [
    "CANONICAL_COMPONENTS",
    "FFN_COMPONENTS",
    "GLOBAL_COMPONENTS",
    "LAYER_COMPONENTS",
    "Adapter",
    "ComponentNotApplicable",
    "ParamSlice",
    "UnsupportedArchitecture",
    "adapter_for",
    "supported_architectures",
]
