"""Statistics over the stored relations: DataFrame in, DataFrame out (columns as in docs/CONTRACTS.md).

    significance(sensitivity_windows, sensitivity=None, *, alpha=0.05)   -> `significance`
    seed_consistency(sensitivity)                                         -> `seed_consistency`
    critical_layers(sensitivity_or_significance, models, *, top_fraction) -> `critical_layers`
    architecture_comparison(sensitivity, models, *, n_bins=10)            -> `architecture_comparison`
    dense_vs_moe(comparison, models=None), instruct_vs_base(...)          -> group contrasts
    scaling_fit(sensitivity, models, *, min_models=3, alpha=0.05)         -> `scaling_fit`
    dose_response(sensitivity, *, alpha=0.05)                             -> `dose_response`
    jaccard(a, b)                                                         -> top-k set overlap

Provenance columns are added by the storage layer, not here.
"""

from esa_pipeline.core.analysis.architecture import (
    ARCHITECTURE_COLUMNS,
    GROUP_COMPARISON_COLUMNS,
    architecture_comparison,
    dense_vs_moe,
    depth_bins,
    instruct_vs_base,
)
from esa_pipeline.core.analysis.consistency import (
    CRITICAL_LAYERS_COLUMNS,
    SEED_CONSISTENCY_COLUMNS,
    critical_layers,
    jaccard,
    layer_profiles,
    seed_consistency,
)
from esa_pipeline.core.analysis.dose_response import DOSE_RESPONSE_COLUMNS, dose_response
from esa_pipeline.core.analysis.scaling import SCALING_COLUMNS, r2_required, scaling_fit
from esa_pipeline.core.analysis.significance import SIGNIFICANCE_COLUMNS, significance

__all__ = [
    "ARCHITECTURE_COLUMNS",
    "CRITICAL_LAYERS_COLUMNS",
    "DOSE_RESPONSE_COLUMNS",
    "GROUP_COMPARISON_COLUMNS",
    "SCALING_COLUMNS",
    "SEED_CONSISTENCY_COLUMNS",
    "SIGNIFICANCE_COLUMNS",
    "architecture_comparison",
    "critical_layers",
    "dense_vs_moe",
    "dose_response",
    "depth_bins",
    "instruct_vs_base",
    "jaccard",
    "layer_profiles",
    "r2_required",
    "scaling_fit",
    "seed_consistency",
    "significance",
]
