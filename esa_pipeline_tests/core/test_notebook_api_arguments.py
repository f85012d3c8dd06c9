"""The notebook API refuses a wrong argument before any work, naming the argument and the fix.

Each input below was accepted and produced a number that means something else: `texts` given as one string
scored each character as a document; `max_tokens=nan` scored the whole corpus; `window=True` scored 1-token
windows recorded as window True; and a baseline of another model (or dtype) was paired with this one, its
exact KL computed from the other model's hidden states through this model's head.
"""

import math

import pytest

from esa_pipeline.core import Perturbation, evaluate_against, load_texts, perplexity
from esa_pipeline.core.evaluation.text import Document

SPEC = Perturbation(kind="gaussian", component="ffn.down", layer=1, strength=0.1, seed=1)


@pytest.fixture(scope="module")
def llama():
    from esa_pipeline.core.models.registry import load_model

    return load_model("tiny-llama", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def texts():
    return load_texts("bundled", max_docs=2)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window": True}, "window must be an int"),
    ({"window": 8.5}, "window must be an int"),
    ({"window": 0}, "window must be >= 1"),
    ({"max_tokens": math.nan}, "max_tokens must be an int"),
    ({"max_tokens": 64.0}, "max_tokens must be an int"),
    ({"max_tokens": True}, "max_tokens must be an int"),
    ({"batch_size": True}, "batch_size must be an int"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"sample_seed": 1.5}, "sample_seed must be an int"),
    ({"kl_topk": 0}, "kl_topk must be >= 1"),
])  # fmt: skip
def test_perplexity_refuses_bad_numbers(llama, texts, kwargs, message):
    args = {"window": 16, "max_tokens": 32} | kwargs
    with pytest.raises(ValueError, match=message):
        perplexity(llama, texts, **args)


@pytest.mark.parametrize("bad", ["one string of text", [1, 2, 3], [b"bytes"], None, ["ok", None]])
def test_perplexity_refuses_texts_that_are_not_a_list_of_strings_or_documents(llama, bad):
    with pytest.raises(TypeError, match=r"texts must be a list of str or Document .*load_texts"):
        perplexity(llama, bad, window=8)


def test_perplexity_still_takes_strings_documents_and_tuples(llama):
    a = perplexity(llama, ["hello there, general"], window=8)
    b = perplexity(llama, (Document("d0", "hello there, general"),), window=8)
    assert a.n_tokens == b.n_tokens == len("hello there, general") and a.nll_sum == b.nll_sum


def test_evaluate_against_refuses_a_baseline_of_another_model_or_dtype(llama, texts):
    from esa_pipeline.core.models.registry import load_model

    base = perplexity(llama, texts, window=16, max_tokens=32)
    other = load_model("tiny-mistral", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="baseline was computed on 'tiny-llama', not on 'tiny-mistral'"):
        evaluate_against(other, base, SPEC)
    bf16 = load_model("tiny-llama", dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match="baseline was computed in float32, the model is bfloat16"):
        evaluate_against(bf16, base, SPEC)
    assert evaluate_against(llama, base, SPEC).restored


@pytest.mark.parametrize(("base", "spec", "message"), [
    (None, SPEC, "base must be a PerplexityResult"),
    ("BASE", SPEC.to_dict(), r"p must be a Perturbation, got dict; .*Perturbation\(\*\*d\)"),
])  # fmt: skip
def test_evaluate_against_names_a_wrong_argument_type(llama, texts, base, spec, message):
    base = perplexity(llama, texts, window=16, max_tokens=32) if base == "BASE" else base
    with pytest.raises(TypeError, match=message):
        evaluate_against(llama, base, spec)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_docs": True}, "max_docs must be an int"),  # was 1 document
    ({"max_docs": 2.5}, "max_docs must be an int"),  # was 3 documents
    ({"max_docs": 0}, "max_docs must be >= 1"),
    ({"seed": 1.5}, "seed must be an int"),
])  # fmt: skip
def test_load_texts_refuses_bad_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_texts("bundled", **kwargs)


def test_zero_shot_refuses_a_bool_as_the_number_of_shots(llama):
    from esa_pipeline.core import zero_shot

    with pytest.raises(ValueError, match="num_fewshot must be an int"):  # True ran 1-shot, recorded as True
        zero_shot(llama, ["esa_knowledge"], limit=2, num_fewshot=True)


def test_adapter_for_takes_the_loaded_model_and_names_a_wrong_argument(llama):
    from esa_pipeline.core import adapter_for

    # adapter_for(lm) raised "unhashable type: 'LoadedModel'"; the README passes lm.model, a user passes lm
    assert adapter_for(llama).components() == adapter_for(llama.model).components()
    with pytest.raises(TypeError, match=r"adapter_for\(\) takes a model .* got NoneType"):
        adapter_for(None)


def test_numpy_integers_from_a_frame_are_indices_like_ints(llama):
    # Indices read from a DataFrame are numpy ints: Perturbation(layer=np.int64(1)) was refused ("must be a
    # non-negative int, got np.int64(1)"), seed=np.int64(1) was accepted and then failed inside perturbed()
    # ("Object of type int64 is not JSON serializable"), and adapter.slices refused np.int64 layers.
    import numpy as np

    from esa_pipeline.core import adapter_for, perturbed

    spec = Perturbation(kind="gaussian", component="ffn.down", layer=np.int64(1), strength=np.float64(0.1),
                        seed=np.int64(1), expert=None)  # fmt: skip
    assert spec == SPEC and type(spec.layer) is int and type(spec.seed) is int
    assert spec.spec_seed() == SPEC.spec_seed()
    adapter = adapter_for(llama)
    assert adapter.slices("ffn.down", np.int64(1)) == adapter.slices("ffn.down", 1)
    with perturbed(llama.model, adapter, spec) as report:
        pass
    assert report.restored
    with pytest.raises(ValueError, match=r"got (np\.)?True"):  # bools stay refused
        adapter.slices("ffn.down", np.bool_(True))


def test_run_sweep_and_the_prefix_cache_name_a_wrong_argument(llama, texts):
    from esa_pipeline.core import PrefixCache, run_sweep

    base = perplexity(llama, texts, window=16, max_tokens=32)
    for specs in (SPEC, [SPEC.to_dict()]):  # was "'Perturbation' object is not iterable" / "'dict' ... no 'layer'"
        with pytest.raises(TypeError, match=r"specs must be a list of Perturbation"):
            run_sweep(llama, base, specs)
    # the adapter is looked up when not given, as everywhere else (was "'NoneType' ... no attribute")
    assert PrefixCache.build(llama, base, None).enabled
