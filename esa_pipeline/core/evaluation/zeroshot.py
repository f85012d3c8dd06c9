"""Zero-shot (and few-shot) multiple-choice evaluation of an in-memory model through lm-eval.

`zero_shot(lm, ["esa_mc"])` scores the model that is in memory right now, e.g. inside a `perturbed(...)`
block, with lm-eval's HFLM wrapper and its own evaluation loop, and returns one row per (task, metric) in the
shape of the `zero_shot` relation.

What lm-eval does to a model and tokenizer handed to it (lm-eval 0.4.13, read from its source):
- `HFLM(pretrained=<module>)` calls `model.eval()` and `model.tie_weights()`; it never moves the model
  (`.to(device)` only happens when it loads the model itself) and never switches to train mode.
  `zero_shot` puts the caller's train/eval flag back afterwards, and checks that every parameter is still the
  same tensor: `tie_weights()` re-ties the head to the embedding when the config says "tied" but the two were
  separate tensors, which would silently change the model, so that case raises instead of passing unnoticed.
- It sets a pad token on a tokenizer that has none (mutating it). `zero_shot` hands it a copy in that case.
- The request cache (`use_cache`, `cache_requests`) is keyed by request text, not by weights: it would
  return the baseline's answers for a perturbed model. It is never used here.
- `simple_evaluate` wraps `evaluate` and adds, on every call, ~1.5 s of `torch.utils.collect_env`
  subprocesses (environment report) and a reseed of the global `random`/numpy/torch RNGs. `zero_shot`
  therefore calls lm-eval's `evaluate` itself with the same task preparation (num_fewshot rule, few-shot
  seed 1234) and the same defaults, so the numbers are lm-eval's (a test compares against `simple_evaluate`)
  and the caller's RNG state is left alone.

Tasks: the bundled tasks under `data/tasks/` (written for this project, always available offline), the seed
lm-eval tasks hellaswag / piqa / boolq / arc_easy (need their Hugging Face datasets in the local cache when
offline) and any other lm-eval task name.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from esa_pipeline.core.checks import check_int

if TYPE_CHECKING:
    import torch
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerBase

    from esa_pipeline.core.models.registry import LoadedModel

RESULT_COLUMNS = ["model", "task", "metric", "value", "stderr", "n_items", "num_fewshot", "random_weights"]

# The seed portfolio's lm-eval tasks and the folder of lm-eval's task tree that defines each. Indexing only
# these folders takes milliseconds; indexing all of lm-eval's ~15k task configs takes 7-20 s.
SEED_TASK_DIRS = {
    "hellaswag": "hellaswag",
    "piqa": "piqa",
    "boolq": "super_glue/boolq",
    "arc_easy": "arc",
}
SEED_TASKS = tuple(SEED_TASK_DIRS)

# lm-eval's own defaults in simple_evaluate, kept so that numbers match it.
FEWSHOT_SEED = 1234
BOOTSTRAP_ITERS = 100000


class UnknownZeroShotTask(ValueError):
    """A task name that is neither bundled, a seed task, nor known to lm-eval."""


class ZeroShotTaskUnavailable(RuntimeError):
    """A known task whose dataset cannot be loaded here (typically: offline, not in the HF datasets cache)."""


def bundled_tasks_dir() -> Path:
    """`data/tasks/` of this checkout: one folder per bundled task (lm-eval YAML + JSONL)."""
    return Path(__file__).resolve().parents[3] / "data" / "tasks"


def _repo_root() -> Path:
    return bundled_tasks_dir().parents[1]


def _bundled_task_yamls() -> dict[str, Path]:
    """Task name (the YAML's `task:` key) -> YAML path, for every bundled task."""
    found: dict[str, Path] = {}
    for path in sorted(bundled_tasks_dir().glob("*/*.yaml")):
        name = yaml.safe_load(path.read_text())["task"]
        if name in found:
            raise ValueError(f"bundled task {name!r} is defined twice: {found[name]} and {path}")
        found[name] = path
    return found


BUNDLED_TASKS: tuple[str, ...] = tuple(_bundled_task_yamls())


def bundled_task_config(name: str) -> dict[str, Any]:
    """The lm-eval config of a bundled task with its data files made absolute.

    The YAML names its JSONL relative to the repository root (so the lm_eval CLI works from there);
    resolving it here makes the pipeline independent of the current working directory.
    """
    yamls = _bundled_task_yamls()
    if name not in yamls:
        raise UnknownZeroShotTask(f"{name!r} is not a bundled task; bundled tasks: {', '.join(sorted(yamls))}")
    config = yaml.safe_load(yamls[name].read_text())
    data_files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, relative in data_files.items():
        absolute = (_repo_root() / relative).resolve()
        if not absolute.is_file():
            raise FileNotFoundError(
                f"bundled task {name!r}: data file {absolute} (split {split!r}, from {yamls[name]}) is missing; "
                "restore it from the repository (git checkout -- data/tasks)"
            )
        data_files[split] = str(absolute)
    return config


def bundled_task_items(name: str) -> int:
    """Items in a bundled task's few-shot split (every bundled task draws its examples from its test items)."""
    config = bundled_task_config(name)
    split = config.get("fewshot_split") or config["test_split"]
    path = Path(config["dataset_kwargs"]["data_files"][split])
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@functools.cache
def _task_manager(scope: str) -> TaskManager:
    """A task index, built once per process: "bundled", "seed" (bundled + seed folders) or "all"."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if scope == "bundled":
        return TaskManager(include_path=str(bundled_tasks_dir()), include_defaults=False)
    if scope == "seed":
        lm_eval_tasks = Path(lm_eval.tasks.__file__).parent
        paths = [str(bundled_tasks_dir())] + [str(lm_eval_tasks / d) for d in SEED_TASK_DIRS.values()]
        return TaskManager(include_path=paths, include_defaults=False)
    if scope == "all":
        return TaskManager(include_path=str(bundled_tasks_dir()), include_defaults=True)
    raise ValueError(f"unknown task-index scope {scope!r}")


def _scope_for(tasks: list[str]) -> str:
    if all(t in BUNDLED_TASKS for t in tasks):
        return "bundled"
    if all(t in BUNDLED_TASKS or t in SEED_TASKS for t in tasks):
        return "seed"
    return "all"


@functools.cache  # lm-eval's task files do not change within a process; validation may ask many times
def _named_in_lm_eval_configs(name: str) -> bool:
    """Cheap pre-check (2-3 s) before the full lm-eval index (7-60 s on a busy machine): every lm-eval task,
    group and tag name is written literally in one of its YAML files, so a name found in none is unknown."""
    import lm_eval.tasks

    pattern = re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])")
    root = Path(lm_eval.tasks.__file__).parent
    return any(pattern.search(path.read_text(errors="replace")) for path in root.rglob("*.yaml"))


def _unavailable_message(name: str, dataset: str, error: Exception) -> str:
    return (
        f"zero-shot task {name!r} cannot load its dataset {dataset!r} ({type(error).__name__}: {error}). "
        "Offline (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1, or no network) only datasets already in the local Hugging Face datasets "
        "cache can be used. Fix: run once with network access and with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to "
        "populate the cache (e.g. `HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 .venv/bin/python -c \"from "
        f"esa_pipeline.core.evaluation.zeroshot import load_tasks; load_tasks(['{name}'])\"`), "
        f"or remove {name!r} from the zero-shot tasks of the experiment YAML. "
        f"Bundled tasks that always work offline: {', '.join(BUNDLED_TASKS)}."
    )


def _unknown_error(unknown: list[str]) -> UnknownZeroShotTask:
    return UnknownZeroShotTask(
        f"unknown zero-shot task(s) {unknown}. Bundled tasks (offline): {', '.join(BUNDLED_TASKS)}; "
        f"seed lm-eval tasks (need their HF dataset): {', '.join(SEED_TASKS)}; "
        "or any task listed by `lm_eval ls tasks`."
    )


def unknown_task_names(tasks: list[str]) -> list[str]:
    """The names in `tasks` that are neither bundled, seed tasks, nor written in any lm-eval task YAML.

    Cheap enough for config validation (no task index is built; a non-bundled, non-seed name costs one scan of
    lm-eval's YAML files, 2-3 s), so `esa validate` refuses a typo'd task before any model loads. A name that
    passes can still be refused later by the full index (`load_tasks`), e.g. a word that only appears inside
    another task's YAML."""
    return [t for t in tasks if t not in BUNDLED_TASKS and t not in SEED_TASKS and not _named_in_lm_eval_configs(t)]


def seed_task_dataset(task: str) -> tuple[str, str | None, dict[str, Any]]:
    """(dataset_path, dataset_name, dataset_kwargs) of a seed task: what lm-eval passes to
    `datasets.load_dataset`, read from lm-eval's own YAML (the seed folders' index: ~10 ms)."""
    if task not in SEED_TASKS:
        raise UnknownZeroShotTask(f"{task!r} is not a seed task; seed tasks: {', '.join(SEED_TASKS)}")
    config = _task_manager("seed").task_index[task].cfg
    return config["dataset_path"], config.get("dataset_name"), dict(config.get("dataset_kwargs") or {})


def uncached_seed_task_datasets(tasks: list[str]) -> dict[str, str]:
    """Seed tasks in `tasks` whose Hugging Face dataset cannot be loaded here: task -> `_unavailable_message`.

    Offline only (`dataset_cache.offline_load_error`: a dataset not in the local cache; with network access
    nothing is checked or fetched). Cheap enough for config validation: ~0.5 s to import lm-eval's task module
    and index the four seed folders, under 5 ms per dataset, no data read; so `esa validate` refuses such a task
    before any model loads instead of the model stage failing after one did. Bundled tasks need no check (their
    data is in the repository); other lm-eval tasks are left to `load_tasks`, since finding their dataset needs
    lm-eval's full task index (7-60 s).
    """
    from esa_pipeline.core.evaluation.dataset_cache import describe, offline_load_error

    missing: dict[str, str] = {}
    for task in (t for t in dict.fromkeys(tasks) if t in SEED_TASKS):  # bundled-only (the demo): nothing runs
        path, name, kwargs = seed_task_dataset(task)
        if (error := offline_load_error(path, name, **kwargs)) is not None:
            missing[task] = _unavailable_message(task, describe(path, name), error)
    return missing


def _known_tasks_manager(tasks: list[str]) -> TaskManager:
    """The task index that knows every requested name; raises UnknownZeroShotTask naming the others."""
    unindexed = [t for t in tasks if t not in BUNDLED_TASKS and t not in SEED_TASKS]
    if unknown := [t for t in unindexed if not _named_in_lm_eval_configs(t)]:
        raise _unknown_error(unknown)
    manager = _task_manager(_scope_for(tasks))
    if unknown := [t for t in unindexed if t not in manager.all_tasks]:
        raise _unknown_error(unknown)
    return manager


def load_tasks(tasks: list[str]) -> dict[str, Task]:
    """Build lm-eval Task objects (this loads their datasets), failing early with a clear error.

    Returns the leaf tasks by name (a group or tag name expands to its member tasks).
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, e.g. ['esa_mc'], got {tasks!r}")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"task names given more than once: {duplicates}")
    manager = _known_tasks_manager(tasks)
    loaded: dict[str, Task] = {}
    for name in tasks:
        spec: str | dict[str, Any] = bundled_task_config(name) if name in BUNDLED_TASKS else name
        index_config = manager.task_index[name].cfg if name in manager.task_index else None
        dataset = (index_config or {}).get("dataset_path", "its dataset")
        try:
            built = manager.load([spec])["tasks"]
        except (ConnectionError, FileNotFoundError) as error:
            # ConnectionError covers huggingface_hub's OfflineModeIsEnabled; FileNotFoundError covers
            # datasets' DatasetNotFoundError (dataset neither cached nor reachable).
            raise ZeroShotTaskUnavailable(_unavailable_message(name, dataset, error)) from error
        loaded.update(built)
    return loaded


@contextmanager
def _caller_model_preserved(model: torch.nn.Module) -> Iterator[None]:
    """Give the model back as it came: same train/eval flag, same parameter tensors."""
    was_training = model.training
    before = {name: (id(p), p.data_ptr()) for name, p in model.named_parameters(remove_duplicate=False)}
    try:
        yield
    finally:
        model.train(was_training)
    after = {name: (id(p), p.data_ptr()) for name, p in model.named_parameters(remove_duplicate=False)}
    changed = sorted(name for name in before if after.get(name) != before[name])
    if changed or set(after) != set(before):
        raise RuntimeError(
            f"lm-eval replaced parameter tensors of the model ({changed[:5]}...), most likely by "
            "`model.tie_weights()` re-tying the output head to the input embedding because the config says "
            "tie_word_embeddings=True while the weights were separate tensors. Fix the model loader so that "
            "config.tie_word_embeddings matches the weights."
        )


def _tokenizer_for_lm_eval(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # lm-eval assigns a pad token in place when there is none; a copy keeps the caller's tokenizer unchanged.
    if tokenizer.pad_token is None:
        return copy.deepcopy(tokenizer)
    return tokenizer


def _as_float(value: Any) -> float:
    # lm-eval writes "N/A" where a stderr cannot be computed (e.g. a single item).
    return float(value) if isinstance(value, (int, float)) else math.nan


def _result_rows(lm: LoadedModel, results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, n_samples in sorted(results["n-samples"].items()):
        task_results = results["results"][task]
        for key, value in task_results.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            rows.append(
                {
                    "model": lm.spec.name,
                    "task": task,
                    "metric": metric if filter_name == "none" else f"{metric},{filter_name}",
                    "value": _as_float(value),
                    "stderr": _as_float(task_results.get(f"{metric}_stderr,{filter_name}")),
                    "n_items": int(n_samples["effective"]),
                    "num_fewshot": int(results["n-shot"][task]),
                    "random_weights": bool(lm.spec.random_weights),
                }
            )
    return rows


def zero_shot(
    lm: LoadedModel,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Score the in-memory model on lm-eval tasks; one row per (task, metric), columns RESULT_COLUMNS.

    limit: first N items of each task (None = all). num_fewshot: examples in the context (a task whose
    config pins num_fewshot: 0 keeps 0, as in lm-eval; the row records what was used).
    Raises UnknownZeroShotTask / ZeroShotTaskUnavailable before any model work.
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, e.g. ['esa_mc'], got {tasks!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    check_int("num_fewshot", num_fewshot, minimum=0)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    loaded = load_tasks(list(tasks))

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    for task in loaded.values():
        # The rule simple_evaluate applies: a config that pins 0 shots keeps it.
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)

    with _caller_model_preserved(lm.model):
        wrapped = HFLM(pretrained=lm.model, tokenizer=_tokenizer_for_lm_eval(lm.tokenizer), batch_size=batch_size)
        results = evaluate(
            lm=wrapped,
            task_dict={"tasks": loaded, "groups": {}, "group_map": {}},
            limit=limit,
            cache_requests=False,  # never: keyed by request, not by weights
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
        )
    return pd.DataFrame(_result_rows(lm, results), columns=RESULT_COLUMNS)

