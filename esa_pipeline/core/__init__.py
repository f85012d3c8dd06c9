"""ESA core: pure Python/torch/pandas; never imports dagster (enforced by a test).

Notebook API::

    from esa_pipeline.core import load_model, adapter_for, Perturbation, perturbed, perplexity, evaluate_against

Names are resolved lazily so that `import esa_pipeline.core.stats_module` does not pay for torch/transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "load_model": "esa_pipeline.core.models.registry",
    "registered_models": "esa_pipeline.core.models.registry",
    "ModelSpec": "esa_pipeline.core.models.registry",
    "LoadedModel": "esa_pipeline.core.models.registry",
    "adapter_for": "esa_pipeline.core.models.adapters",
    "Perturbation": "esa_pipeline.core.perturbation.perturb",
    "PerturbationReport": "esa_pipeline.core.perturbation.perturb",
    "perturbed": "esa_pipeline.core.perturbation.perturb",
    "load_texts": "esa_pipeline.core.evaluation.text",
    "perplexity": "esa_pipeline.core.evaluation.perplexity",
    "PerplexityResult": "esa_pipeline.core.evaluation.perplexity",
    "evaluate_against": "esa_pipeline.core.evaluation.paired",
    "PairedResult": "esa_pipeline.core.evaluation.paired",
    "PrefixCache": "esa_pipeline.core.evaluation.prefix_cache",
    "run_sweep": "esa_pipeline.core.evaluation.sweep",
    "zero_shot": "esa_pipeline.core.evaluation.zeroshot",
    "PROTOCOLS": "esa_pipeline.core.protocols",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'esa_pipeline.core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
