"""Weight-only fake quantization: round-to-nearest (RTN) quantize then dequantize, in fp32 (DESIGN §4).

`fake_quantize(w, bits, group_size, scheme)` returns the dequantized values of `w` (same shape, fp32). The
perturbation engine (`perturb.py`, kind "quantize") writes them back into the weight's stored dtype.

Grouping runs along the INPUT dimension: the last axis of every Linear-style slice the adapters return
(Linear [out, in]; GPT-NeoX's fused QKV viewed [heads, 3, head_dim, in]; Mixtral's experts [E, 2I, H] and
[E, H, I]) and axis 0 of transformers' Conv1D [in, out] (GPT-2; `input_axis=0`): each row of `w.reshape(-1, in)` is cut into groups of `group_size` consecutive inputs, each with
its own scale (and zero point). `group_size=0` means one group per output row ("per-channel"). When `in` is
not a multiple of the group size the last group of each row is shorter (SmolLM2's 576 inputs at group 128:
four groups of 128 and one of 64).

Schemes (the usual integer grids, as in GPTQ's reference quantizer, Frantar et al. 2023, and llm-compressor):
  symmetric   scale = max|w| / qmax with qmax = 2^(b-1) - 1;  q = clamp(round(w / scale), -qmax, qmax);
              w' = q * scale. The grid is symmetric around 0 (2^b - 1 levels; at 2 bits: {-1, 0, 1}·scale).
  asymmetric  lo = min(min w, 0), hi = max(max w, 0) (so 0 is exactly representable, as in GPTQ);
              scale = (hi - lo) / (2^b - 1); zero = round(-lo / scale);
              q = clamp(round(w / scale) + zero, 0, 2^b - 1); w' = (q - zero) * scale.
A group whose values are all 0 keeps scale 1 (so 0 -> 0). torch.round rounds half to even.
"""

from __future__ import annotations

import torch

QUANT_BITS: tuple[int, ...] = (8, 6, 4, 3, 2)
QUANT_GROUP_SIZES: tuple[int, ...] = (0, 32, 64, 128)  # 0 = per-channel (one group per output row)
QUANT_SCHEMES: tuple[str, ...] = ("symmetric", "asymmetric")


def validate_quantize(bits: float, group_size: int | None, scheme: str) -> None:
    """Raises ValueError naming the accepted values for a bad bit width, group size or scheme."""
    if bits not in QUANT_BITS or float(bits) != int(bits):
        raise ValueError(f"quantize strength is the bit width: use one of {QUANT_BITS}, got {bits}")
    if group_size is None or group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"quantize group_size must be one of {QUANT_GROUP_SIZES} (0 = per-channel), "
                         f"got {group_size!r}")
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"quantize mode is the scheme: use one of {QUANT_SCHEMES}, got {scheme!r}")


def _quantize_groups(g: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    """g: [n_groups, size] fp32 -> dequantized [n_groups, size]."""
    if scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = g.abs().amax(dim=1, keepdim=True) / qmax  # [n_groups, 1]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(torch.round(g / scale), -qmax, qmax) * scale
    qmax = 2**bits - 1
    lo = g.amin(dim=1, keepdim=True).clamp(max=0.0)  # [n_groups, 1]
    hi = g.amax(dim=1, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    return (q - zero) * scale


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, scheme: str, input_axis: int = -1) -> torch.Tensor:
    """RTN quantize-dequantize of `w` along its input axis (default last: [..., in]; 0 for GPT-2's Conv1D
    [in, out]); returns fp32, same shape.

    Raises ValueError for bits/group_size/scheme outside QUANT_BITS/QUANT_GROUP_SIZES/QUANT_SCHEMES and for a
    tensor with fewer than 2 dimensions (norm gains and biases are not quantized: weight-only quantization).
    """
    validate_quantize(bits, group_size, scheme)
    if w.dim() < 2:
        raise ValueError(f"quantize needs a weight matrix [..., in], got shape {tuple(w.shape)}")
    if input_axis not in (-1, w.dim() - 1):
        moved = fake_quantize(w.movedim(input_axis, -1), bits, group_size, scheme)
        return moved.movedim(-1, input_axis)
    bits = int(bits)
    n_in = w.shape[-1]
    rows = w.detach().float().reshape(-1, n_in)  # [R, in]
    size = n_in if group_size == 0 else min(group_size, n_in)
    out = torch.empty_like(rows)
    full = (n_in // size) * size
    if full:
        out[:, :full] = _quantize_groups(rows[:, :full].reshape(-1, size), bits, scheme).reshape(rows.shape[0], full)
    if full < n_in:  # the shorter last group of each row
        out[:, full:] = _quantize_groups(rows[:, full:], bits, scheme)
    return out.reshape(w.shape)
