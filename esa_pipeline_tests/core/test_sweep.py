import dataclasses

import pytest

from esa_pipeline.core.evaluation.paired import evaluate_against
from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.sweep import SENSITIVITY_COLUMNS, SENSITIVITY_WINDOW_COLUMNS, run_sweep
from esa_pipeline.core.evaluation.text import load_texts
from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.perturbation.perturb import Perturbation
from esa_pipeline.core.protocols import PROTOCOLS, protocol


def test_sweep_rows_are_layer_ordered_and_match_single_evaluations(tiny):
    lm = tiny("tiny-mixtral")
    base = perplexity(lm, load_texts("bundled", max_docs=1), window=64, max_tokens=192, batch_size=2)
    specs = [
        Perturbation("gaussian", "ffn.down", 3, 0.3, 1337, expert=1),
        Perturbation("router", "moe.router", 0, 0.2, 123),
        Perturbation("gaussian", "embedding", None, 0.05, 1337),
        Perturbation("scale", "norm.post_attention", 1, 1.1, 1337),
        Perturbation("gaussian", "attention.query", 0, 0.3, 999),
    ]
    lines: list[str] = []
    sensitivity, windows = run_sweep(lm, base, specs, log=lines.append)

    assert list(sensitivity.columns) == SENSITIVITY_COLUMNS
    assert list(windows.columns) == SENSITIVITY_WINDOW_COLUMNS
    assert sensitivity.layer.isna().tolist() == [True, False, False, False, False]  # embedding first
    assert sensitivity.layer.dropna().tolist() == [0, 0, 1, 3]
    assert str(sensitivity.layer.dtype) == "Int64" and str(windows.expert.dtype) == "Int64"
    assert sensitivity.component.tolist()[1:3] == ["moe.router", "attention.query"]  # stable within a layer
    assert sensitivity.used_prefix_cache.tolist() == [False, True, True, True, True]
    assert sensitivity.restored.all() and (sensitivity.model == "tiny-mixtral").all()
    assert sensitivity.random_weights.all() and (sensitivity.window_tokens == 64).all()
    assert len(windows) == len(specs) * base.n_windows
    assert any("prefix cache built" in line for line in lines)
    assert sum(line.startswith("layer ") for line in lines) == 3  # one progress line per layer

    cache = PrefixCache.build(lm, base, adapter_for(lm.model))
    alone = evaluate_against(lm, base, specs[0], cache=cache)
    row = sensitivity[(sensitivity.layer == 3)].iloc[0]
    assert row.delta_nll == pytest.approx(alone.delta_nll, rel=1e-6) and row.expert == 1
    per_window = windows[(windows.layer == 3)].delta_nll_sum.tolist()
    assert per_window == pytest.approx(alone.windows.delta_nll_sum.tolist(), rel=1e-6)


def test_protocol_presets():
    assert set(PROTOCOLS) == {"smoke", "standard", "extended"}
    standard = PROTOCOLS["standard"]
    assert standard.strengths_for("gaussian") == (0.001, 0.01, 0.05, 0.1, 0.2)
    assert standard.strengths_for("neurons") == (0.1, 0.25, 0.5, 0.75)
    assert standard.strengths_for("scale") == (0.9, 0.95, 1.05, 1.1)
    assert standard.seeds == (1337, 123, 999) and standard.layer_indices(4) == [0, 1, 2, 3]
    smoke = PROTOCOLS["smoke"]
    assert smoke.max_tokens <= 2048 and len(smoke.strengths_for("gaussian")) == 2 and len(smoke.seeds) <= 2
    assert smoke.layer_indices(30) == [0, 6, 12, 18, 24, 29]  # stride, plus the last layer
    with pytest.raises(dataclasses.FrozenInstanceError):
        smoke.window = 1024  # type: ignore[misc]
    with pytest.raises(KeyError, match="smoke, standard, extended"):
        protocol("quick")
    with pytest.raises(KeyError, match="sweeps no 'bit_flip'"):
        standard.strengths_for("bit_flip")
