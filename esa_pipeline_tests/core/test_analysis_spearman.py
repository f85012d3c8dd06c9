"""Spearman p-values on few points come from the exact permutation distribution, not scipy's t approximation.

scipy.stats.spearmanr's p uses Student's t with n - 2 degrees of freedom, which gives p = 0 for |rho| = 1 at
any n: the demo's task_vs_perplexity (SmolLM2: 4 points) and layer_drop_agreement on short models stored
p = 0.0 where the exact two-sided p is 2/4! = 0.083 (4 points) or 2/3! = 0.33 (3 layers).
"""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from esa_pipeline.core.analysis._common import EXACT_SPEARMAN_MAX_N, spearman_test


def brute_force_p(x, y) -> float:
    """Two-sided exact p: the share of the n! pairings whose |rho| is at least the observed one."""
    observed = abs(stats.spearmanr(x, y).statistic)
    rhos = [abs(stats.spearmanr(x, [y[i] for i in perm]).statistic) for perm in itertools.permutations(range(len(y)))]
    return float(np.mean([r >= observed - 1e-12 for r in rhos]))


@pytest.mark.parametrize(("x", "y"), [
    ([1, 2, 3, 4], [4, 3, 2, 1]),
    ([1, 2, 3], [1, 2, 3]),
    ([0.1, 0.5, 0.2, 0.9, 0.4], [0.0, -0.1, -0.3, -0.2, -0.25]),
    ([0.1, 0.2, 0.2, 0.4, 0.5, 0.3], [1, 0, 0, 1, 0, 1]),  # ties
])  # fmt: skip
def test_few_points_get_the_exact_permutation_p(x, y):
    rho, p = spearman_test(x, y)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert p == pytest.approx(brute_force_p(x, y))


def test_the_reported_inputs_are_no_longer_p_zero():
    assert spearman_test([1, 2, 3, 4], [4, 3, 2, 1])[1] == pytest.approx(1 / 12)
    assert spearman_test([1, 2, 3], [3, 2, 1])[1] == pytest.approx(1 / 3)


def test_many_points_keep_scipys_p_and_non_finite_input_gives_nan():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=EXACT_SPEARMAN_MAX_N + 5), rng.normal(size=EXACT_SPEARMAN_MAX_N + 5)
    assert spearman_test(x, y) == pytest.approx(tuple(stats.spearmanr(x, y)))
    assert all(math.isnan(v) for v in spearman_test([1, 2, np.nan, 4], [1, 2, 3, 4]))


def test_layer_drop_agreement_and_task_vs_perplexity_use_it():
    from esa_pipeline.core.analysis.block_influence import layer_drop_agreement

    similarity = pd.DataFrame({"model": "m", "layer": [0, 1, 2], "span": 1, "block_influence": [0.1, 0.2, 0.3],
                               "angular_distance": [0.3, 0.2, 0.1]})
    drops = pd.DataFrame({"model": "m", "kind": "layer_drop", "component": "block", "layer": [0, 1, 2],
                          "delta_nll": [0.5, 1.0, 2.0]})
    out = layer_drop_agreement(similarity, drops).set_index("measure")
    assert out.loc["block_influence", "spearman_rho"] == 1.0 and out.loc["block_influence", "p_value"] == 1 / 3
