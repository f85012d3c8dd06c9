"""Weight importance (grad x weight, grad^2, Hutchinson, magnitude, activation), causal validation of the
rankings, super-weight detection, MoE routing under router perturbations and the small-sigma prediction check.

Submodules import torch; import them directly (`from esa_pipeline.core.importance.metrics import ...`).
"""
