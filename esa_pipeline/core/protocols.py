"""Named evaluation presets: token budget, window length, layers, strengths, seeds.

`smoke` keeps the whole demo to minutes on 2 CPU cores (SmolLM2-135M evaluates ~500 tokens/s there, and a
prefix-cached sweep point costs ~0.6 of a full forward); `standard` is a real study on a GPU; `extended` is
the full grid of every kind the seed system measured.
"""

from __future__ import annotations

from dataclasses import dataclass

GAUSSIAN_STRENGTHS = (0.001, 0.01, 0.05, 0.1, 0.2)
NEURON_FRACTIONS = (0.1, 0.25, 0.5, 0.75)
NORM_SCALES = (0.9, 0.95, 1.05, 1.1)
ROUTER_STRENGTHS = (0.01, 0.05, 0.1, 0.2)
WEIGHT_LEVEL_FRACTIONS = (0.0001, 0.001, 0.01)
SEEDS = (1337, 123, 999)


@dataclass(frozen=True)
class Protocol:
    name: str
    max_tokens: int  # evaluation token budget (whole windows, documents in order)
    window: int  # tokens per window (pinned and recorded with every result)
    batch_size: int
    layers: str | int  # "all", or a stride k: layers 0, k, 2k, ... plus the last layer
    strengths: tuple[tuple[str, tuple[float, ...]], ...]  # (kind, strengths) for each kind swept
    seeds: tuple[int, ...]
    zero_shot_limit: int | None  # items per zero-shot task (None = all)
    adaptive: bool = False  # adaptive token budgets (the token budget is the cap); see core/evaluation/sequential.py

    def __post_init__(self) -> None:
        if not (self.layers == "all" or (isinstance(self.layers, int) and self.layers >= 1)):
            raise ValueError(f"layers must be 'all' or a stride >= 1, got {self.layers!r}")
        if self.max_tokens < self.window:
            raise ValueError(f"max_tokens ({self.max_tokens}) must hold at least one window ({self.window})")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, _ in self.strengths)

    def strengths_for(self, kind: str) -> tuple[float, ...]:
        for name, values in self.strengths:
            if name == kind:
                return values
        raise KeyError(f"protocol {self.name!r} sweeps no {kind!r}: it sweeps {', '.join(self.kinds)}")

    def layer_indices(self, n_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layers))
        return sorted(set(range(0, n_layers, int(self.layers))) | {n_layers - 1})


PROTOCOLS: dict[str, Protocol] = {
    "smoke": Protocol(
        name="smoke",
        max_tokens=1024,
        window=256,
        batch_size=4,
        layers=6,
        strengths=(("gaussian", (0.01, 0.1)), ("neurons", (0.25,)), ("scale", (0.9, 1.1)), ("router", (0.1,))),
        seeds=SEEDS[:2],
        zero_shot_limit=20,
    ),
    "standard": Protocol(
        name="standard",
        max_tokens=32768,
        window=512,
        batch_size=8,
        layers="all",
        strengths=(("gaussian", GAUSSIAN_STRENGTHS), ("neurons", NEURON_FRACTIONS), ("scale", NORM_SCALES),
                   ("router", ROUTER_STRENGTHS)),  # fmt: skip
        seeds=SEEDS,
        zero_shot_limit=500,
        adaptive=True,
    ),
    "extended": Protocol(
        name="extended",
        max_tokens=131072,
        window=1024,
        batch_size=8,
        layers="all",
        strengths=(("gaussian", GAUSSIAN_STRENGTHS), ("neurons", NEURON_FRACTIONS), ("scale", NORM_SCALES),
                   ("router", ROUTER_STRENGTHS), ("zero", WEIGHT_LEVEL_FRACTIONS),
                   ("sign_flip", WEIGHT_LEVEL_FRACTIONS), ("bit_flip", WEIGHT_LEVEL_FRACTIONS)),  # fmt: skip
        seeds=SEEDS,
        zero_shot_limit=None,
        adaptive=True,
    ),
}


def protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise KeyError(f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}") from None
