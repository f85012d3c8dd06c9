"""Perturbation specs and exact in-place apply/restore (`perturb`). Import submodules directly."""
