"""Altair chart builders: pure functions from stored relations (docs/CONTRACTS.md) to Vega-Lite charts.

Every builder raises ValueError on an empty or unusable frame (the caller decides to skip the chart),
labels axes with units, names model and strength in the title, and puts "random-weight tiny model —
plumbing only" in a red subtitle when the data come from random-weight models. `render` turns a chart
into PNG / HTML / markdown.
"""

from esa_pipeline.core.reporting.charts._common import DELTA_NLL_TITLE, DEPTH_TITLE, PLUMBING_NOTE
from esa_pipeline.core.reporting.charts.analysis import (
    architecture_chart,
    critical_layers_chart,
    moe_routing_chart,
    scaling_chart,
    seed_consistency_chart,
)
from esa_pipeline.core.reporting.charts.importance import (
    importance_distribution_chart,
    importance_validation_chart,
    prediction_chart,
)
from esa_pipeline.core.reporting.charts.render import (
    png_data_uri,
    png_markdown,
    png_size,
    to_html,
    to_png,
    to_svg,
)
from esa_pipeline.core.reporting.charts.sensitivity import (
    degradation_curves,
    dose_response_chart,
    layer_profile_chart,
    sensitivity_heatmap,
)

__all__ = [
    "DELTA_NLL_TITLE",
    "DEPTH_TITLE",
    "PLUMBING_NOTE",
    "architecture_chart",
    "critical_layers_chart",
    "degradation_curves",
    "dose_response_chart",
    "importance_distribution_chart",
    "importance_validation_chart",
    "layer_profile_chart",
    "moe_routing_chart",
    "png_data_uri",
    "png_markdown",
    "png_size",
    "prediction_chart",
    "scaling_chart",
    "seed_consistency_chart",
    "sensitivity_heatmap",
    "to_html",
    "to_png",
    "to_svg",
]
