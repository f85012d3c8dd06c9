"""Perturb+restore cost of `perturbed` (slice snapshot) vs a full state-dict clone, side by side.

    python benchmarks/bench_perturb.py [--model smollm2-135m] [--layer 15] [--component ffn.down]

Time is the median of N runs. Memory: tracemalloc cannot see torch allocations, so we report the bytes
the approach must hold (snapshot) and the process peak-RSS growth (ru_maxrss is a high-water mark, so the
cheaper approach is measured first).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from esa_pipeline.core.models.adapters import adapter_for  # noqa: E402
from esa_pipeline.core.models.registry import load_model  # noqa: E402
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed, resolve_slices  # noqa: E402

MIB = 2**20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss() -> int:
    return psutil.Process().memory_info().rss


def bench_slice_snapshot(model, adapter, spec: Perturbation, repeats: int) -> dict:
    times, restored = [], True
    peak_before = _peak_rss()
    for _ in range(repeats):
        started = time.perf_counter()
        with perturbed(model, adapter, spec) as report:
            pass
        times.append(time.perf_counter() - started)
        restored &= bool(report.restored)
    held = sum(s.get(model).numel() * s.get(model).element_size() for s in resolve_slices(adapter, spec))
    return {"median_s": statistics.median(times), "held_bytes": held,
            "peak_rss_growth": _peak_rss() - peak_before, "restored": restored}


def bench_full_clone(model, adapter, spec: Perturbation, repeats: int) -> dict:
    """The naive alternative: clone every tensor, perturb, copy everything back."""
    times = []
    peak_before = _peak_rss()
    view = adapter.slices(spec.component, spec.layer)[0].get(model)
    gen = torch.Generator().manual_seed(spec.spec_seed())
    held = 0
    for _ in range(repeats):
        started = time.perf_counter()
        backup = {name: t.clone() for name, t in model.state_dict().items()}
        held = sum(t.numel() * t.element_size() for t in backup.values())
        rms = view.float().pow(2).mean().sqrt()
        view.add_((spec.strength * rms * torch.randn(view.shape, generator=gen)).to(view.dtype))
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.copy_(backup[name])
        del backup
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "held_bytes": held,
            "peak_rss_growth": _peak_rss() - peak_before, "restored": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--component", default="ffn.down")
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clone-repeats", type=int, default=5)
    args = parser.parse_args()

    lm = load_model(args.model, dtype=args.dtype, device="cpu")
    adapter = adapter_for(lm.model)
    spec = Perturbation("gaussian", args.component, args.layer, args.sigma, 0)
    with torch.no_grad():  # fault in the mmap'd weights so RSS growth measures the approach, not the load
        sum(float(p.sum()) for p in lm.model.parameters())
    rss_start = _rss()
    snapshot = bench_slice_snapshot(lm.model, adapter, spec, args.repeats)
    clone = bench_full_clone(lm.model, adapter, spec, args.clone_repeats)

    print(f"model {args.model} ({lm.spec.params_total / 1e6:.1f}M params, {lm.spec.dtype}), "
          f"{spec.kind} {spec.component} layer {spec.layer} sigma={spec.strength}, "
          f"torch threads {torch.get_num_threads()}, RSS at start {rss_start / MIB:.0f} MiB")
    print(f"{'':28}{'slice snapshot':>16}{'full clone':>14}{'ratio':>9}")
    rows = [("perturb+restore median (ms)", snapshot["median_s"] * 1e3, clone["median_s"] * 1e3),
            ("held copy (MiB)", snapshot["held_bytes"] / MIB, clone["held_bytes"] / MIB),
            ("peak RSS growth (MiB)", snapshot["peak_rss_growth"] / MIB, clone["peak_rss_growth"] / MIB)]
    for label, ours, naive in rows:
        ratio = f"{naive / ours:8.1f}x" if ours > 0 else "      n/a"
        print(f"{label:28}{ours:16.2f}{naive:14.2f}{ratio}")
    print(f"repeats: {args.repeats} / {args.clone_repeats}; restore verified bit-identical: {snapshot['restored']}")


if __name__ == "__main__":
    main()
