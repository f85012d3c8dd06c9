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


CAUSAL_COLUMNS = [*SUPER_WEIGHT_COLUMNS, "zero_delta_nll", "n_controls", "control_mean", "control_sd",
                  "control_max", "control_delta_nlls", "control_p", "confirmed", "status"]  # fmt: skip
MIN_CONTROLS = 10


def confirm_super_weights(lm, base, candidates: pd.DataFrame, *, adapter=None, cache=None,
                          n_controls: int = MIN_CONTROLS, seed: int = 0) -> pd.DataFrame:
    """The causal test of every candidate: zero it alone, and zero each of `n_controls` matched controls alone.

    Controls are drawn (seeded) from the same matrix among the 2·n_controls elements nearest the candidate in
    |W| rank (the candidate excluded), so a control is as large as the candidate, not a random small weight.
    Each zeroing is one paired evaluation on `base`'s windows (prefix cache from the candidate's layer).
    A candidate is `confirmed` when zeroing it hurts (ΔNLL > 0) and raises ΔNLL above every control, i.e. the one-sided
    permutation p-value control_p = (1 + #{controls >= effect}) / (n_controls + 1) is its minimum,
    1 / (n_controls + 1) (Yu et al. 2024 state the super weight as "zeroing it destroys quality"; the matched
    controls make that a comparison, not an anecdote). Unconfirmed candidates keep status "candidate".

    candidates: `super_weights` rows (find_super_weights). Returns CAUSAL_COLUMNS: the candidate's columns,
    zero_delta_nll (nats/token), the control distribution (mean, sd, max, every value ";"-joined), control_p,
    confirmed and status ("confirmed"/"candidate"). Raises ValueError for n_controls < 10 or a candidate
    whose ffn.down is not one whole 2-D weight (fused MoE experts).
    """
    from esa_pipeline.core.evaluation.paired import evaluate_against
    from esa_pipeline.core.models.adapters import adapter_for
    from esa_pipeline.core.perturbation.perturb import Perturbation

    if n_controls < MIN_CONTROLS:
        raise ValueError(f"confirm_super_weights(): n_controls must be >= {MIN_CONTROLS} (a permutation p-value "
                         f"of 1/(n + 1) needs them), got {n_controls}")
    model = unwrap_model(lm)
    adapter = adapter or adapter_for(model)
    rows = []
    for candidate in candidates.to_dict("records"):
        layer = int(candidate["layer"])
        slices = adapter.slices("ffn.down", layer)
        view = slices[0].get(model)  # [H, I]
        if len(slices) != 1 or view.dim() != 2 or slices[0].param_name != candidate["param_name"]:
            raise ValueError(f"confirm_super_weights(): layer {layer}'s ffn.down is not the single 2-D weight "
                             f"{candidate['param_name']} (got {[s.param_name for s in slices]})")
        target = int(candidate["row"]) * view.shape[1] + int(candidate["col"])
        controls = matched_controls(view, target, n_controls, seed=seed + layer)

        def zeroed(flat_index: int, layer=layer, view=view) -> float:
            one_hot = torch.zeros(view.numel(), dtype=torch.float32)
            one_hot[flat_index] = 1.0
            p = Perturbation("zero", "ffn.down", layer, 1.0 / view.numel(), seed, selection="top")
            return float(evaluate_against(lm, base, p, adapter=adapter, cache=cache,
                                          scores=[one_hot.reshape(view.shape)]).delta_nll)

        effect = zeroed(target)
        control_values = torch.tensor([zeroed(int(i)) for i in controls], dtype=torch.float64)
        is_nan = effect != effect  # a NaN loss proves nothing about this weight: never confirmed
        exceeded = n_controls if is_nan else int((control_values >= effect).sum())
        # above every control is not enough: controls that improve the loss more would "confirm" a weight whose
        # removal improves it too; a super weight's removal hurts
        confirmed = not is_nan and exceeded == 0 and effect > 0
        rows.append({**candidate, "zero_delta_nll": effect, "n_controls": n_controls,
                     "control_mean": float(control_values.mean()), "control_sd": float(control_values.std()),
                     "control_max": float(control_values.max()),
                     "control_delta_nlls": ";".join(f"{v:.6g}" for v in control_values.tolist()),
                     "control_p": (1 + exceeded) / (n_controls + 1), "confirmed": confirmed,
                     "status": "confirmed" if confirmed else "candidate"})  # fmt: skip
    df = pd.DataFrame(rows, columns=CAUSAL_COLUMNS)
    df["layer"] = df["layer"].astype("int64")
    df["confirmed"] = df["confirmed"].astype(bool)
    return df


def matched_controls(weight: torch.Tensor, target: int, n_controls: int, *, seed: int) -> list[int]:
    """n_controls flat indices of `weight` (seeded) among the 2·n_controls nearest the target in |W| rank."""
    order = torch.argsort(weight.detach().float().abs().reshape(-1), descending=True, stable=True)
    rank = int((order == target).nonzero()[0, 0])
    lo = max(0, rank - n_controls)
    hi = min(order.numel(), lo + 2 * n_controls + 1)
    lo = max(0, hi - 2 * n_controls - 1)
    pool = [int(i) for i in order[lo:hi].tolist() if int(i) != target]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(pool), generator=gen)[:n_controls]
    return [pool[int(i)] for i in picks]
