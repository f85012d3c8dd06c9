"""Prefix activation cache: a perturbation in decoder layer L cannot change layers < L, so a sweep records the
inputs of every decoder layer once and replays only layers L..N, the final norm and the head.

Architecture-neutral: forward pre-hooks (`with_kwargs=True`) capture each decoder layer's exact call
(hidden states, position embeddings, mask, position ids, ...) during one baseline forward with
`use_cache=False`. Any KV-cache object is dropped from the captured kwargs: replaying with one attends to
stale keys (measured 2e-4 relative NLL error on SmolLM2). Only the adapter's `decoder_layers`, `final_norm`
and `head_logits` are used. A replay returns final normalised hidden states [B, T, H]; logits are made from
them in token chunks (`scoring.score_hidden`), never as a [B, T, V] tensor.

`hidden_from(layer, batch, bypass=...)` can skip decoder layers (identity), for layer-drop style perturbations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from esa_pipeline.core.evaluation.perplexity import PerplexityResult, unwrap
from esa_pipeline.core.evaluation.scoring import (
    DEFAULT_BASELINE_LOGITS_BYTES,
    BaselineLogits,
    adapter_or_default,
    final_hidden_states,
    gather_scored,
    model_device,
    score_hidden,
    scored_targets,
)
from esa_pipeline.core.evaluation.windows import WindowBatch
from esa_pipeline.core.perturbation.perturb import resolve_slices

# Without an explicit budget the cache may use this share of free memory (GPU if on CUDA, else RAM).
DEFAULT_BUDGET_SHARE = 0.25
# The build forward must reproduce the baseline's per-token NLL to this relative tolerance.
BASELINE_RTOL = 1e-4


class BaselineMismatch(RuntimeError):
    """The model no longer reproduces its stored baseline (left perturbed, or different dtype/device)."""


@dataclass
class _LayerCall:
    args: tuple
    kwargs: dict[str, Any]


def _drop_kv_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    from transformers.cache_utils import Cache

    clean = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}
    if "use_cache" in clean:
        clean["use_cache"] = False
    return clean


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from obj (shared masks/rotary tables count once)."""
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    return 0


def default_budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_BUDGET_SHARE)
    return int(psutil.virtual_memory().available * DEFAULT_BUDGET_SHARE)


class PrefixCache:
    """Captured decoder-layer calls for every batch of a baseline's windows.

    `enabled` is False when the capture would exceed the memory budget (then every point uses full forwards
    and records `used_prefix_cache=False`); `reason` says why. `baseline_logits` keeps the baseline's head
    logits per batch for the points' exact KL (its own budget; kept whether or not the capture is enabled).
    """

    def __init__(self, model: torch.nn.Module, adapter: Any, base: PerplexityResult,
                 batches: list[WindowBatch], calls: list[list[_LayerCall]] | None, reason: str,
                 captured_bytes: int, build_s: float,
                 baseline_logits_bytes: int = DEFAULT_BASELINE_LOGITS_BYTES) -> None:  # fmt: skip
        self.model, self.adapter, self.base, self.batches = model, adapter, base, batches
        self.baseline_logits = BaselineLogits(baseline_logits_bytes)
        self._calls = calls
        self.reason = reason
        self.captured_bytes = captured_bytes
        self.build_s = build_s
        self._layers = adapter.decoder_layers(model)
        self._param_layer = {id(p): i for i, layer in enumerate(self._layers) for p in layer.parameters()}

    @property
    def enabled(self) -> bool:
        return self._calls is not None

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @classmethod
    def build(cls, lm: Any, base: PerplexityResult, adapter: Any = None, *,
              memory_budget_bytes: int | None = None,
              baseline_logits_bytes: int = DEFAULT_BASELINE_LOGITS_BYTES) -> PrefixCache:  # fmt: skip
        """One baseline forward per batch with capture hooks; checks it reproduces `base`'s NLL.
        baseline_logits_bytes: budget of the kept baseline logits (`scoring.BaselineLogits`; 0 keeps none).
        adapter: default adapter_for(the model)."""
        model, _, _ = unwrap(lm)
        adapter = adapter_or_default(model, adapter)
        start = time.perf_counter()
        batches = base.batches()

        def made(calls: list[list[_LayerCall]] | None, reason: str, captured: int) -> PrefixCache:
            return cls(model, adapter, base, batches, calls, reason, captured, time.perf_counter() - start,
                       baseline_logits_bytes)  # fmt: skip

        layers = adapter.decoder_layers(model)
        budget = memory_budget_bytes if memory_budget_bytes is not None else default_budget_bytes(
            model_device(model))
        hidden = model.get_input_embeddings().embedding_dim
        itemsize = next(model.parameters()).element_size()
        estimate = sum(b.input_ids.numel() for b in batches) * hidden * itemsize * len(layers)
        if estimate > budget:
            reason = f"captured hidden states ({estimate / 2**20:.0f} MiB) exceed the budget ({budget / 2**20:.0f} MiB)"
            return made(None, reason, 0)

        all_calls: list[list[_LayerCall]] = []
        for batch_index, batch in enumerate(batches):
            calls, hidden = _capture_calls(model, adapter, layers, batch)  # hidden [B, T, H]
            nll = _check_reproduces_baseline(model, adapter, base, batch, batch_index, batches, hidden)  # [n]
            if batch_index == 0 and not _replay_matches(model, adapter, layers, calls, batch, nll):
                reason = "replaying the last layer did not reproduce the model's logits"
                return made(None, reason, 0)
            all_calls.append(calls)  # type: ignore[arg-type]

        seen: set[int] = set()
        captured = sum(_tensor_bytes((c.args, c.kwargs), seen) for calls in all_calls for c in calls)
        return made(all_calls, "", captured)

    def start_layer(self, p: Any) -> int | None:
        """First decoder layer whose parameters perturbation `p` touches; None when it touches anything
        outside the decoder layers (embedding, final norm, head), which needs a full forward."""
        touched = [self._param_layer.get(id(self.model.get_parameter(s.param_name)))
                   for s in resolve_slices(self.adapter, p)]  # fmt: skip
        if not touched or any(layer is None for layer in touched):
            return None
        return min(touched)  # type: ignore[type-var]

    def hidden_from(self, layer: int, batch_index: int, *, bypass: frozenset[int] = frozenset()) -> torch.Tensor:
        """Final normalised hidden states [B, T, H] of batch `batch_index`, recomputing decoder layers
        `layer`..N from the captured input of `layer` (layers in `bypass` pass their input through), then the
        final norm. Feed them to `scoring.score_hidden` (chunked head)."""
        if self._calls is None:
            raise RuntimeError(f"prefix cache disabled ({self.reason}): use full forwards")
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} decoder layers")
        return _replay(self.model, self.adapter, self._layers, self._calls[batch_index], layer, bypass)

    def forward_from(self, layer: int, batch_index: int) -> torch.Tensor:
        """Logits [B, T, V] of `hidden_from(layer, batch_index)` in one piece (tests and small vocabularies
        only: scoring uses the chunked path)."""
        with torch.inference_mode():
            return self.adapter.head_logits(self.model, self.hidden_from(layer, batch_index))

    def layer_hidden(self, layer: int, batch_index: int) -> torch.Tensor:
        """The residual stream [B, T, H] entering decoder layer `layer` of batch `batch_index`, as captured;
        `layer == n_layers` gives the stream leaving the last layer BEFORE the final norm (the model's own last
        hidden state is after it), computed by running that one layer from its captured input."""
        if self._calls is None:
            raise RuntimeError(f"prefix cache disabled ({self.reason}): no captured hidden states")
        if not 0 <= layer <= self.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.n_layers} (n_layers = after the last layer)")
        if layer < self.n_layers:
            call = self._calls[batch_index][layer]
            return call.args[0] if call.args else call.kwargs["hidden_states"]
        last = self.n_layers - 1
        call = self._calls[batch_index][last]
        with torch.inference_mode():
            if call.args:
                out = self._layers[last](*call.args, **call.kwargs)
            else:
                out = self._layers[last](**call.kwargs)
        return out[0] if isinstance(out, tuple) else out


def _capture_calls(model: torch.nn.Module, adapter: Any, layers: torch.nn.ModuleList,
                   batch: WindowBatch) -> tuple[list[_LayerCall], torch.Tensor]:  # fmt: skip
    """Runs one body forward, recording every decoder layer's call; returns (calls, final hidden [B, T, H])."""
    calls: list[_LayerCall | None] = [None] * len(layers)

    def recorder(index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if calls[index] is not None:
                raise RuntimeError(f"decoder layer {index} was called twice in one forward")
            calls[index] = _LayerCall(tuple(args), _drop_kv_cache(kwargs))

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        hidden = final_hidden_states(model, adapter, batch)  # [B, T, H]
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were not called by the model's forward")
    return calls, hidden  # type: ignore[return-value]


def _replay(model: torch.nn.Module, adapter: Any, layers: torch.nn.ModuleList, calls: list[_LayerCall],
            layer: int, bypass: frozenset[int] = frozenset()) -> torch.Tensor:  # fmt: skip
    """Final normalised hidden states [B, T, H] after replaying layers `layer`..N (skipping `bypass`)."""
    first = calls[layer]
    hidden = first.args[0] if first.args else first.kwargs["hidden_states"]  # [B, T, H]
    with torch.inference_mode():
        for index in range(layer, len(layers)):
            if index in bypass:
                continue
            call = calls[index]
            if call.args:
                out = layers[index](hidden, *call.args[1:], **call.kwargs)
            else:
                out = layers[index](**{**call.kwargs, "hidden_states": hidden})
            hidden = out[0] if isinstance(out, tuple) else out  # [B, T, H]
        return adapter.final_norm(model)(hidden)  # [B, T, H]


def _replay_matches(model: torch.nn.Module, adapter: Any, layers: torch.nn.ModuleList, calls: list[_LayerCall],
                    batch: WindowBatch, nll: torch.Tensor) -> bool:  # fmt: skip
    """Replays the last layer: if norm + head do not reproduce the model's own per-token NLL (an architecture
    that scales or caps logits outside `lm_head`), the cache must not be trusted."""
    hidden = gather_scored(_replay(model, adapter, layers, calls, len(layers) - 1), batch)  # [n, H]
    replayed = score_hidden(model, adapter, hidden, scored_targets(batch)).nll.double()  # [n]
    return bool(torch.isfinite(replayed).all()) and torch.allclose(replayed, nll, rtol=1e-5, atol=1e-6)


def _check_reproduces_baseline(model: torch.nn.Module, adapter: Any, base: PerplexityResult, batch: WindowBatch,
                               batch_index: int, batches: list[WindowBatch], hidden: torch.Tensor,
                               ) -> torch.Tensor:  # fmt: skip
    offset = sum(b.n_scored for b in batches[:batch_index])
    expected = base.scores.nll[offset : offset + batch.n_scored].double()  # [n]
    got = score_hidden(model, adapter, gather_scored(hidden, batch), scored_targets(batch)).nll.double()  # [n]
    if not torch.allclose(got.sum(), expected.sum(), rtol=BASELINE_RTOL, atol=0.0):
        raise BaselineMismatch(
            f"the model's NLL on batch {batch_index} ({float(got.sum()):.6f}) differs from its stored baseline "
            f"({float(expected.sum()):.6f}): the weights changed since the baseline (a perturbation left "
            "applied?) or the model was reloaded with another dtype/device. Re-run perplexity() first."
        )
    return got
