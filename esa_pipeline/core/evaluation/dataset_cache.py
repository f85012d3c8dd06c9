"""Can a Hugging Face dataset be loaded here? Asked at config validation, so that an experiment naming a hub
dataset this machine cannot load is refused before any run, not in the model stage after a model loaded.

Offline (`datasets.config.HF_HUB_OFFLINE`, switched on by HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1, read by
`datasets` at import) `datasets.load_dataset` can only use its local cache (HF_DATASETS_CACHE, default
~/.cache/huggingface/datasets), and `datasets.load_dataset_builder(path, name)`, the first step of every
`load_dataset`, answers from that cache alone in milliseconds: ConnectionError when the dataset is not cached,
ValueError when it is but not that config (datasets 5.x, `load.dataset_module_factory` and
`packaged_modules/cache`). With network access nothing is asked: validation must not download, and the step
that loads the dataset fetches it into the cache on first use.
"""

from __future__ import annotations

from typing import Any


def offline_load_error(path: str, name: str | None = None, **kwargs: Any) -> Exception | None:
    """Why `datasets.load_dataset(path, name, **kwargs)` cannot start here, offline; None when it can, and
    always None with network access (then nothing is checked or fetched). No data is read."""
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        return None
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # a cached hit logs "Using the latest cached version ..." each time
    try:
        datasets.load_dataset_builder(path, name, **kwargs)
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        return error
    finally:
        datasets.logging.set_verbosity(verbosity)
    return None


def describe(path: str, name: str | None) -> str:
    """"allenai/ai2_arc (config ARC-Easy)": a dataset as messages name it."""
    return path if name is None else f"{path} (config {name})"
