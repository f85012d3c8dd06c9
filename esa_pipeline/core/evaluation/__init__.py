"""Evaluation: text sources, token windows, perplexity, paired metrics against a baseline, the prefix activation
cache, layer-ordered sweeps and zero-shot tasks. Import submodules directly."""
