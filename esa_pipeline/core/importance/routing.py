"""MoE routing under router perturbations: which experts tokens are sent to, baseline vs perturbed.

Mixtral's router (transformers 5 `MixtralTopKRouter`) returns (logits, top-k weights, top-k indices): the
experts are the top-k of softmax(logits), i.e. the top-k logits, ties broken by `torch.topk`. The hook reads the
indices the model actually used; a router returning bare logits (older layouts) is routed with the same rule.

Per perturbed layer and (strength, seed):
- expert_change_rate: fraction of scored tokens whose top-k expert SET at that layer differs from baseline
  (order within the top-k is ignored: the mixture weights renormalise over the set);
- load entropy: -Σ_e p_e ln p_e (nats; maximum ln E) of the expert-assignment distribution over all top-k
  slots of the scored tokens, baseline and perturbed;
- delta_nll: `evaluate_against` on the baseline windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from esa_pipeline.core.importance.metrics import unwrap_model

MOE_ROUTING_COLUMNS = ["model", "layer", "strength", "seed", "expert_change_rate", "load_entropy_baseline",
                       "load_entropy_perturbed", "delta_nll"]


class _StopForward(Exception):
    """Raised by the last router hook: layers after it cannot change the routing already recorded."""


def _top_k_experts(output, top_k: int) -> torch.Tensor:
    if isinstance(output, tuple) and len(output) >= 3:
        return output[2]  # [tokens, k] the indices the MoE block dispatches on
    logits = output[0] if isinstance(output, tuple) else output  # [tokens, E]
    return torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices


def expert_assignments(model: torch.nn.Module, adapter, batches, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Sorted top-k expert indices [n_scored, k] per layer over the scored positions of `batches`.

    batches: `PerplexityResult.batches()`; the forward stops after the last requested router.
    """
    top_k = int(getattr(model.config, "num_experts_per_tok", 0))
    if top_k < 1 or adapter.router(model, layers[0]) is None:
        raise ValueError(f"{adapter.architecture} has no MoE router: routing applies to MoE models only")
    last = max(layers)
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    current_mask: list[torch.Tensor] = []

    def hook_for(layer: int):
        def hook(module, args, output):
            idx = _top_k_experts(output, top_k)  # [B*T, k]
            captured[layer].append(idx[current_mask[0].reshape(-1).to(idx.device)].sort(dim=-1).values.cpu())
            if layer == last:
                raise _StopForward
        return hook

    handles = [adapter.router(model, layer).register_forward_hook(hook_for(layer)) for layer in layers]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for batch in batches:
                current_mask[:] = [batch.score_mask]  # [B, T] bool
                try:
                    model(input_ids=batch.input_ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(parts) for layer, parts in captured.items()}


def expert_change_rate(baseline: torch.Tensor, perturbed: torch.Tensor) -> float:
    """Fraction of tokens whose sorted top-k expert set differs ([n, k] each)."""
    if baseline.shape != perturbed.shape:
        raise ValueError(f"assignments cover different tokens: {tuple(baseline.shape)} vs {tuple(perturbed.shape)}")
    return float((baseline != perturbed).any(dim=-1).double().mean())


def load_entropy(assignments: torch.Tensor, n_experts: int) -> float:
    """Entropy (nats) of how often each expert is chosen over all top-k slots."""
    counts = torch.bincount(assignments.reshape(-1), minlength=n_experts).double()  # [E]
    p = counts / counts.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def routing_sweep(lm, base, strengths: Sequence[float], seeds: Sequence[int] = (0,), *,
                  layers: Sequence[int] | None = None, adapter=None, cache=None) -> pd.DataFrame:
    """`moe_routing` rows for `router` perturbations of each layer × strength × seed on `base`'s windows."""
    from esa_pipeline.core.evaluation.paired import evaluate_against
    from esa_pipeline.core.models.adapters import adapter_for
    from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed

    model = unwrap_model(lm)
    adapter = adapter or adapter_for(model)
    if adapter.n_experts is None:
        raise ValueError(f"{adapter.architecture} is not a mixture of experts: moe_routing needs an MoE model "
                         "(e.g. tiny-mixtral, mixtral-8x7b)")
    layer_list = list(layers) if layers is not None else list(range(adapter.num_layers))
    batches = base.batches()
    baseline = expert_assignments(model, adapter, batches, layer_list)
    name = getattr(getattr(lm, "spec", None), "name", None) or base.model
    rows = []
    for layer in layer_list:
        base_entropy = load_entropy(baseline[layer], adapter.n_experts)
        for strength in strengths:
            for seed in seeds:
                p = Perturbation("router", "moe.router", layer, strength, seed)
                paired = evaluate_against(lm, base, p, adapter=adapter, cache=cache)
                with perturbed(model, adapter, p):
                    after = expert_assignments(model, adapter, batches, [layer])[layer]
                rows.append({"model": name, "layer": layer, "strength": float(strength), "seed": seed,
                             "expert_change_rate": expert_change_rate(baseline[layer], after),
                             "load_entropy_baseline": base_entropy,
                             "load_entropy_perturbed": load_entropy(after, adapter.n_experts),
                             "delta_nll": paired.delta_nll})
    df = pd.DataFrame(rows, columns=MOE_ROUTING_COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    return df
