"""Super-weight detection (Yu et al. 2024, "The Super Weight in Large Language Models").

A super weight is a single down-projection entry W[r, c] that, in one early layer, turns a massive input
activation on intermediate channel c into a massive output ("super activation") on hidden channel r, which
the residual stream then carries through the rest of the network. Removing it alone can wreck the model.

Detection, as in the paper: forward hooks on every layer's `ffn.down` linear record, over the windows,
max_t |x_t,c| per input channel and max_t |y_t,r| per output channel. Per layer the peaks are
in_peak = max_c, out_peak = max_r. A layer whose both peaks spike far above the median peak of all layers
(spike_ratio = min(in_peak / median in_peak, out_peak / median out_peak) >= threshold) yields the candidate
W[row = argmax output channel, col = argmax input channel].
"""

from __future__ import annotations

import statistics

import pandas as pd
import torch

from esa_pipeline.core.importance.metrics import as_scored_windows, unwrap_model

SUPER_WEIGHT_COLUMNS = ["model", "layer", "param_name", "row", "col", "weight_value", "activation_in",
                        "activation_out", "spike_ratio"]


def down_proj_maxima(lm, adapter, token_batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (max |input| per intermediate channel [I], max |output| per hidden channel [H])."""
    model = unwrap_model(lm)
    modules = {}
    for layer in range(adapter.num_layers):
        weight_name = adapter.slices("ffn.down", layer)[0].param_name
        module = model.get_submodule(weight_name.rpartition(".")[0])
        if getattr(module, "weight", None) is None or module.weight.dim() != 2:
            raise ValueError(f"super-weight detection hooks a 2-D ffn.down linear; {weight_name} is "
                             f"{type(module).__name__} (fused MoE experts are not supported)")
        modules[layer] = module
    maxima: dict[int, list[torch.Tensor | None]] = {layer: [None, None] for layer in modules}

    def hook_for(layer: int):
        def hook(module, args, output):
            x_max = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).amax(0).cpu()  # [I]
            y_max = output.detach().abs().float().reshape(-1, output.shape[-1]).amax(0).cpu()  # [H]
            old_x, old_y = maxima[layer]
            maxima[layer] = [x_max if old_x is None else torch.maximum(old_x, x_max),
                             y_max if old_y is None else torch.maximum(old_y, y_max)]
        return hook

    handles = [m.register_forward_hook(hook_for(layer)) for layer, m in modules.items()]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for window in as_scored_windows(token_batches):
                model(input_ids=window.input_ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {layer: (x, y) for layer, (x, y) in maxima.items()}


def find_super_weights(lm, token_batches, *, adapter=None, threshold: float = 10.0,
                       all_layers: bool = False) -> pd.DataFrame:
    """`super_weights` rows for layers whose down_proj input and output peaks both spike >= threshold×median.

    all_layers=True returns every layer's candidate (with its spike_ratio) for inspection, spike or not.
    """
    from esa_pipeline.core.models.adapters import adapter_for

    model = unwrap_model(lm)
    adapter = adapter or adapter_for(model)
    if adapter.num_layers < 3:
        raise ValueError(f"spike detection compares a layer to the median of all layers: {adapter.num_layers} "
                         "layers are too few")
    maxima = down_proj_maxima(lm, adapter, token_batches)
    in_peaks = {layer: float(x.max()) for layer, (x, _) in maxima.items()}
    out_peaks = {layer: float(y.max()) for layer, (_, y) in maxima.items()}
    in_median, out_median = statistics.median(in_peaks.values()), statistics.median(out_peaks.values())
    name = getattr(getattr(lm, "spec", None), "name", type(model).__name__)
    rows = []
    for layer, (x, y) in maxima.items():
        ratio = min(in_peaks[layer] / in_median, out_peaks[layer] / out_median)
        if ratio < threshold and not all_layers:
            continue
        weight_name = adapter.slices("ffn.down", layer)[0].param_name
        row, col = int(y.argmax()), int(x.argmax())
        rows.append({"model": name, "layer": layer, "param_name": weight_name, "row": row, "col": col,
                     "weight_value": float(model.get_parameter(weight_name)[row, col]),
                     "activation_in": in_peaks[layer], "activation_out": out_peaks[layer],
                     "spike_ratio": ratio})
    df = pd.DataFrame(rows, columns=SUPER_WEIGHT_COLUMNS)
    df["layer"] = df["layer"].astype("int64")
    return df.sort_values("spike_ratio", ascending=False, ignore_index=True)
