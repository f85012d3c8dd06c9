"""From measured per-(layer, component) sensitivities to a mixed-precision / sparsity recipe, applied whole."""

from esa_pipeline.core.compression.recipe import (
    RECIPE_COLUMNS,
    additivity,
    apply_all,
    choose_allocation,
    recipe_json,
    recipe_specs,
    uniform_allocation,
)

__all__ = ["RECIPE_COLUMNS", "additivity", "apply_all", "choose_allocation", "recipe_json", "recipe_specs",
           "uniform_allocation"]
