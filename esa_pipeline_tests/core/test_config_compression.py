"""The `compression:` section is checked like the sweep's own keys: before any run, naming file, key and fix
(and, at the end, an experiment path that is a directory).

Each value below passed `esa validate` and failed only inside the compression step, after the model load, the
baseline and (for spans, empty components, repeated bits) the whole quantize/prune/layer_drop sweep — on
SmolLM2 that sweep is most of an hour.
"""

import pytest

from esa_pipeline.core.config import ConfigError, load_experiment
from esa_pipeline_tests.core.test_config import error_for

BASE = """\
protocol: smoke
datasets: [bundled]
window: 64
token_budget: 256
seeds: [1]
strengths: {gaussian: [0.1]}
components: [ffn.down]
layers: [0]
compression: {models: [tiny-llama], bits: [3, 4], bit_budget: 4, sparsities: [], spans: [1]}
models:
  tiny-llama: {}
  tiny-pythia: {}
"""


def test_the_base_compression_section_is_valid(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(BASE)
    assert load_experiment(path).compression.spans == [1]


@pytest.mark.parametrize(("old", "new", "expected"), [
    # structural: repeats and empty selections (bits [4, 4] failed after the sweep with "average seeds first";
    # components [] with ZeroDivisionError)
    ("models: [tiny-llama]", "models: [tiny-llama, tiny-llama]", "compression.models: Value error, models repeat"),
    ("bits: [3, 4]", "bits: [4, 4]", "compression.bits: Value error, bits repeat ([4, 4]); list each once"),
    ("spans: [1]", "spans: [1, 1]", "compression.spans: Value error, spans repeat"),
    ("sparsities: []", "sparsities: [0.5, 0.5], sparsity_target: 0.5", "compression.sparsities: Value error, "
     "sparsities repeat"),
    ("spans: [1]", "spans: [1], components: []", "compression.components: List should have at least 1 item"),
    ("spans: [1]", "spans: [1], components: [ffn.down, ffn.down]", "compression.components: components repeat"),
    # prune refuses sparsity 1 (nothing left to measure): the section must too
    ("sparsities: []", "sparsities: [0.5, 1.0], sparsity_target: 0.5", "compression.sparsities[1]: Input should "
     "be less than 1"),
    # against the studied model (4 layers): these passed and failed in the compression step
    ("spans: [1]", "spans: [5]", "compression.spans: [5] exceed tiny-llama's 4 layers; use spans in 1..4"),
    ("spans: [1]", "spans: [1], layers: [9]", "compression.layers: [9] do not exist in a model with 4 layers; "
     "use 0..3 (studied model tiny-llama)"),
    ("spans: [1]", "spans: [1], layers: {stride: 2, start: 10}", "compression.layers: {stride: 2, start: 10} "
     "selects no layer of a model with 4 layers"),
    ("models: [tiny-llama]", "models: [tiny-pythia], components: [ffn.gate]", "compression.components: 'ffn.gate' "
     "is not applicable to GPTNeoXForCausalLM (tiny-pythia)"),
])  # fmt: skip
def test_bad_compression_values_are_refused_before_any_run(tmp_path, old, new, expected):
    assert old in BASE
    assert expected in error_for(tmp_path, BASE.replace(old, new, 1))


def test_compression_study_refuses_bad_arguments_before_any_work(tiny):
    from esa_pipeline.core import load_texts, perplexity
    from esa_pipeline.core.compression.study import compression_study

    lm = tiny("tiny-llama")
    base = perplexity(lm, load_texts("bundled", max_docs=1), window=32, max_tokens=32)
    for kwargs, message in [
        ({"spans": (9,)}, "spans must be integers in 1..4"),
        ({"components": []}, "components: no component to study"),
        ({"layers": []}, "layers: no layer to study"),
        ({"layers": [7]}, "layer 7 is out of range"),
        ({"bits": (4, 4)}, "bits repeat"),
        ({"components": ["ffn.dwn"]}, "unknown component 'ffn.dwn'"),
    ]:
        with pytest.raises(ValueError, match=message):
            compression_study(lm, base, sparsities=(), bits=kwargs.pop("bits", (4,)), bit_budget=4, **kwargs)


def test_a_directory_given_as_the_experiment_is_a_clear_error(tmp_path):
    # `esa validate -e data/experiments` ended in a traceback (IsADirectoryError)
    from esa_pipeline.core.config import experiment_path

    (tmp_path / "mine.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"is a directory, not an experiment file: name one of its YAML files, "
                                          r"e\.g\. .*mine\.yaml"):
        experiment_path(tmp_path)


def test_compression_study_without_a_prefix_cache_stops_before_the_sweeps(tiny, monkeypatch):
    # Block Influence reads the cache's captured streams; with the cache disabled (over its memory budget) the
    # study ran every quantize/prune/layer_drop point and then failed in layer_similarity
    import esa_pipeline.core.compression.study as study
    import esa_pipeline.core.evaluation.prefix_cache as prefix_cache
    from esa_pipeline.core import load_texts, perplexity

    lm = tiny("tiny-llama")
    base = perplexity(lm, load_texts("bundled", max_docs=1), window=32, max_tokens=32)
    monkeypatch.setattr(prefix_cache, "default_budget_bytes", lambda device: 1)
    monkeypatch.setattr(study, "run_sweep", lambda *a, **k: pytest.fail("a sweep ran before the check"))
    with pytest.raises(ValueError, match=r"Block Influence needs the prefix cache, which is disabled \(captured "
                                         r"hidden states .* exceed the budget"):
        study.compression_study(lm, base, layers=[0], components=["ffn.down"], bits=(4,), bit_budget=4,
                                sparsities=())  # fmt: skip
