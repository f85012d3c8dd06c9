"""ESA core: pure Python/torch/pandas; never imports dagster (enforced by a test).

Notebook API::

    from esa_pipeline.core import load_model, adapter_for, Perturbation, perturbed, perplexity, evaluate_against

Names are resolved lazily so that `import esa_pipeline.core.stats_module` does not pay for torch/transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "load_model": "esa_pipeline.core.models",
    "registered_models": "esa_pipeline.core.models",
    "ModelSpec": "esa_pipeline.core.models",
    "LoadedModel": "esa_pipeline.core.models",
    "adapter_for": "esa_pipeline.core.adapters",
    "Perturbation": "esa_pipeline.core.perturb",
    "PerturbationReport": "esa_pipeline.core.perturb",
    "perturbed": "esa_pipeline.core.perturb",
    "load_texts": "esa_pipeline.core.text",
    "perplexity": "esa_pipeline.core.perplexity",
    "PerplexityResult": "esa_pipeline.core.perplexity",
    "evaluate_against": "esa_pipeline.core.paired",
    "PairedResult": "esa_pipeline.core.paired",
    "PrefixCache": "esa_pipeline.core.prefix_cache",
    "run_sweep": "esa_pipeline.core.sweep",
    "zero_shot": "esa_pipeline.core.zeroshot",
    "PROTOCOLS": "esa_pipeline.core.protocols",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'esa_pipeline.core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
