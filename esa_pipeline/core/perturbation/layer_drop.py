"""Kind "layer_drop": bypass a whole decoder layer, or only its attention or only its MLP sub-block.

Every supported decoder layer adds its sub-blocks to the residual stream: h + attn(·) + mlp(·) (sequential as
in Llama, parallel as in GPT-NeoX, with a norm on the branch output as in Gemma 2/3, whose RMSNorm maps 0 to 0).
A sub-block whose output projection is all zero (weight and bias) contributes exactly 0, so the layer's output
equals its input with that sub-block bypassed — bit for bit (h + 0 == h). layer_drop is therefore applied as
zeroing the sub-block's output projection(s) through the ordinary engine (`perturb.perturbed`): the touched
slices are snapshotted, restored and verified like every other kind, and since they live in layer L the prefix
cache replays from layer L with L bypassed (no extra forward over layers < L). The recorded relative_change
is 1.0 (‖ΔW‖/‖W‖ of the zeroed projections); the row's `component` says which sub-block was dropped.

Output projections: attention -> `attention.output` (o_proj / dense, with its bias); MLP -> `ffn.down`
(down_proj / dense_4h_to_h, with its bias; on MoE models every expert's down projection) and, where the
adapter has one, the shared expert (`moe.shared_expert`).
Sources: ShortGPT (Men et al. 2024) drops whole layers; "What Matters in Transformers? Not All Attention is
Needed" (He et al. 2024, LLM-Drop) drops attention or MLP sub-blocks.
"""

from __future__ import annotations

from esa_pipeline.core.models.adapters import Adapter, ComponentNotApplicable, ParamSlice

# component -> the canonical components whose output projections are zeroed
LAYER_DROP_COMPONENTS: dict[str, tuple[str, ...]] = {
    "block": ("attention.output", "ffn.down", "moe.shared_expert"),
    "block.attention": ("attention.output",),
    "block.mlp": ("ffn.down", "moe.shared_expert"),
}
_OPTIONAL = ("moe.shared_expert",)


def layer_drop_slices(adapter: Adapter, component: str, layer: int | None) -> list[ParamSlice]:
    """Slices to zero so that `component` ("block", "block.attention", "block.mlp") of `layer` is bypassed.

    Raises ValueError for another component or a layer out of range."""
    if component not in LAYER_DROP_COMPONENTS:
        raise ValueError(f"layer_drop component must be one of {', '.join(LAYER_DROP_COMPONENTS)}, got {component!r}")
    slices: list[ParamSlice] = []
    for part in LAYER_DROP_COMPONENTS[component]:
        if part in _OPTIONAL and part not in adapter.components():
            continue
        try:
            slices += adapter.slices(part, layer, None)
        except ComponentNotApplicable as exc:  # every supported layer has both projections
            raise ValueError(f"layer_drop {component} needs {part}, which {adapter.architecture} lacks") from exc
    return slices
