"""Experiment config: every mistake gives one message naming the file, the key path and the fix."""

import pathlib

import pytest

from esa_pipeline.core.config import (
    IMPORTANCE_METRICS,
    ConfigError,
    LayerStride,
    experiment_path,
    load_experiment,
    model_plan,
    model_section_hash,
    select_layers,
)

BASE = """\
protocol: smoke
datasets: [bundled]
window: 64
token_budget: 256
seeds: [1, 2]
strengths: {gaussian: [0.1], neurons: [0.25], scale: [1.1]}
components: [attention.query, ffn.gate, norm.input]
layers: {stride: 2}
models:
  tiny-llama: {}
  tiny-pythia: {}
"""


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def error_for(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert str(path) in message, "the message names the file"
    return message


def cache_hub_datasets(cache) -> None:
    """Every hub dataset an experiment can name (text sources, seed tasks) into the test's offline cache."""
    from esa_pipeline.core.evaluation.text import HUB_SOURCES
    from esa_pipeline.core.evaluation.zeroshot import SEED_TASKS

    for dataset in (*HUB_SOURCES, *SEED_TASKS):
        cache(dataset)


@pytest.mark.parametrize("name", ["smoke", "standard", "extended"])
def test_bundled_experiments_are_valid(name, hf_datasets_cache):
    # standard/extended read hub text sources and score the seed tasks: valid offline once their datasets are
    # cached (refused otherwise, test_standard_is_refused_offline_until_its_hub_datasets_are_cached)
    cache_hub_datasets(hf_datasets_cache)
    cfg = load_experiment(name)
    assert cfg.name == name and cfg.models


def test_smoke_covers_every_architecture_and_the_seed_portfolio_is_in_standard(hf_datasets_cache):
    cache_hub_datasets(hf_datasets_cache)
    smoke, standard = load_experiment("smoke"), load_experiment("standard")
    assert set(smoke.models) == {"smollm2-135m", "gemma3-270m", "tiny-llama", "tiny-mistral", "tiny-phi3",
                                 "tiny-pythia", "tiny-mixtral"}  # fmt: skip
    gemma = model_plan(smoke, "gemma3-270m")  # the second real family, kept cheap (README, smoke.yaml)
    assert "hutchinson" not in gemma.importance.metrics and "grad_sq" in gemma.importance.metrics
    assert gemma.zero_shot.tasks == smoke.zero_shot.tasks and gemma.seeds == [1337] and gemma.zero_shot.limit == 3
    # Gemma is scored under perturbation too (issue 12): its top-ΔNLL point and one random control
    assert (gemma.zero_shot.at.top_delta_nll, gemma.zero_shot.at.random_controls) == (1, 1)
    assert set(standard.models) == {"llama-3.1-8b", "mistral-7b-v0.3", "phi-3-mini-4k-instruct", "pythia-1.4b",
                                    "mixtral-8x7b"}  # fmt: skip
    assert standard.seeds == [1337, 123, 999]
    assert standard.strengths.gaussian == [0.001, 0.01, 0.05, 0.1, 0.2]
    assert standard.strengths.neurons == [0.1, 0.25, 0.5, 0.75]
    assert standard.strengths.scale == [0.9, 0.95, 1.05, 1.1]


def test_typo_key_suggests_the_right_one(tmp_path):
    message = error_for(tmp_path, BASE.replace("window:", "windw:"))
    assert "windw: unknown key 'windw'; did you mean 'window'?" in message
    assert "missing" not in message  # the typo explains the missing key; no second, confusing line


def test_typo_inside_a_model_section_names_the_path(tmp_path):
    message = error_for(tmp_path, BASE.replace("  tiny-llama: {}", "  tiny-llama: {dtpye: float32}"))
    assert "models.tiny-llama.dtpye: unknown key 'dtpye'; did you mean 'dtype'?" in message


def test_typo_inside_a_union_reports_only_the_branch_meant(tmp_path):
    message = error_for(tmp_path, BASE.replace("layers: {stride: 2}", "layers: {strid: 2}"))
    assert "layers.strid: unknown key 'strid'; did you mean 'stride'?" in message
    assert "valid list" not in message


def test_unknown_model_lists_registered_names(tmp_path):
    message = error_for(tmp_path, BASE.replace("  tiny-llama: {}", "  tiny-lama: {}"))
    assert "models.tiny-lama: unknown model 'tiny-lama'" in message
    assert "tiny-llama" in message and "smollm2-135m" in message and "source:" in message


@pytest.mark.parametrize("strength", ["0", "-0.1"])
def test_strength_must_be_positive(tmp_path, strength):
    message = error_for(tmp_path, BASE.replace("gaussian: [0.1]", f"gaussian: [{strength}]"))
    assert "strengths.gaussian[0]" in message and "greater than 0" in message


def test_neuron_fraction_above_one_is_refused(tmp_path):
    message = error_for(tmp_path, BASE.replace("neurons: [0.25]", "neurons: [25]"))
    assert "strengths.neurons[0]" in message and "less than or equal to 1" in message


def test_component_a_model_lacks_in_its_own_list_is_an_error(tmp_path):
    text = BASE.replace("  tiny-pythia: {}", "  tiny-pythia: {components: [attention.query, ffn.gate]}")
    message = error_for(tmp_path, text)
    assert "models.tiny-pythia.components: 'ffn.gate' is not applicable to GPTNeoXForCausalLM" in message
    assert "Fix: remove it from models.tiny-pythia.components" in message


def test_global_component_a_model_lacks_is_recorded_not_an_error(tmp_path):
    cfg = load_experiment(write(tmp_path, BASE))  # ffn.gate is global; Pythia has no gate
    assert "ffn.gate" in model_plan(cfg, "tiny-pythia").components


def test_unknown_component_suggests_the_canonical_name(tmp_path):
    message = error_for(tmp_path, BASE.replace("ffn.gate,", "ffn.gat,"))
    assert "components[1]: unknown component 'ffn.gat'; did you mean 'ffn.gate'?" in message


def test_explicit_layer_beyond_the_model_is_an_error(tmp_path):
    message = error_for(tmp_path, BASE.replace("  tiny-llama: {}", "  tiny-llama: {layers: [0, 9]}"))
    assert "models.tiny-llama.layers: [9] do not exist in a model with 4 layers; use 0..3" in message


def test_malformed_yaml_names_line_and_column(tmp_path):
    message = error_for(tmp_path, BASE.replace("window: 64", "window: [64"))
    assert "malformed YAML at line 4, column" in message


def test_missing_setting_is_named(tmp_path):
    message = error_for(tmp_path, BASE.replace("datasets: [bundled]\n", ""))
    assert "datasets: required setting is missing; add it" in message


def test_settings_left_out_come_from_the_protocol_preset(tmp_path):
    from esa_pipeline.core.protocols import PROTOCOLS

    text = "\n".join(line for line in BASE.splitlines()
                     if not line.startswith(("window", "token_budget", "seeds", "strengths", "layers")))
    cfg = load_experiment(write(tmp_path, text))
    smoke = PROTOCOLS["smoke"]
    assert (cfg.window, cfg.token_budget, cfg.seeds) == (smoke.window, smoke.max_tokens, list(smoke.seeds))
    assert cfg.strengths.gaussian == list(smoke.strengths_for("gaussian"))
    assert cfg.layers.stride == smoke.layers


def test_sweep_dataset_must_be_one_of_the_datasets(tmp_path):
    message = error_for(tmp_path, BASE.replace("datasets: [bundled]", "datasets: [bundled]\nsweep_dataset: c4"))
    assert "sweep_dataset 'c4' must be one of datasets" in message


def test_active_experiment_from_env_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ESA_EXPERIMENT", "standard")
    assert experiment_path().name == "standard.yaml"
    path = write(tmp_path, BASE)
    monkeypatch.setenv("ESA_EXPERIMENT", str(path))
    assert experiment_path() == path.resolve()
    monkeypatch.delenv("ESA_EXPERIMENT")
    assert experiment_path().name == "smoke.yaml"
    with pytest.raises(ConfigError, match=r"no experiment named 'nope': use one of \[.*'smoke'"):
        experiment_path("nope")


def test_editing_one_model_changes_only_its_hash(tmp_path):
    before = load_experiment(write(tmp_path, BASE))
    after = load_experiment(write(tmp_path, BASE.replace("  tiny-pythia: {}", "  tiny-pythia: {seeds: [7]}")))
    assert model_section_hash(before, "tiny-llama") == model_section_hash(after, "tiny-llama")
    assert model_section_hash(before, "tiny-pythia") != model_section_hash(after, "tiny-pythia")


def test_global_settings_change_every_model_hash_but_device_does_not(tmp_path):
    before = load_experiment(write(tmp_path, BASE))
    wider = load_experiment(write(tmp_path, BASE.replace("window: 64", "window: 128")))
    moved = load_experiment(write(tmp_path, BASE.replace("  tiny-llama: {}", "  tiny-llama: {device: cpu}")))
    for model in before.models:
        assert model_section_hash(before, model) != model_section_hash(wider, model)
    assert model_section_hash(before, "tiny-llama") == model_section_hash(moved, "tiny-llama")


def test_plan_merges_overrides_over_globals(tmp_path):
    text = BASE.replace("  tiny-llama: {}", "  tiny-llama: {strengths: {gaussian: [0.5]}, token_budget: 128}")
    plan = model_plan(load_experiment(write(tmp_path, text)), "tiny-llama")
    assert plan.strengths.gaussian == [0.5] and plan.strengths.neurons == [0.25]  # per-kind replacement
    assert plan.token_budget == 128 and plan.window == 64
    assert plan.kinds_for("ffn.gate") == ["gaussian", "neurons"]
    assert plan.kinds_for("norm.input") == ["gaussian", "scale"]
    assert plan.kinds_for("moe.router") == ["gaussian"]  # no router strengths configured here
    # norm scale does not depend on the seed: measured once, in norm.input__fixed; gaussian once per seed
    assert plan.variants(["attention.query", "norm.input"]) == [
        "attention.query__1", "attention.query__2", "norm.input__fixed", "norm.input__1", "norm.input__2"]  # fmt: skip
    assert plan.kinds_of_variant("norm.input", None) == ["scale"]
    assert plan.kinds_of_variant("norm.input", 1) == ["gaussian"]



def test_a_model_section_overrides_only_the_importance_and_zero_shot_keys_it_names(tmp_path):
    text = BASE.replace("models:\n", "importance: {metrics: [grad_sq, hutchinson], top_k: 8}\n"
                                      "zero_shot: {tasks: [esa_mc], limit: 20}\nmodels:\n")
    text = text.replace("  tiny-llama: {}", "  tiny-llama: {importance: {metrics: [grad_sq]}, zero_shot: {limit: 5}}")
    cfg = load_experiment(write(tmp_path, text))
    llama, pythia = model_plan(cfg, "tiny-llama"), model_plan(cfg, "tiny-pythia")
    assert (llama.importance.metrics, llama.importance.top_k) == (["grad_sq"], 8)  # top_k inherited
    assert (llama.zero_shot.tasks, llama.zero_shot.limit) == (["esa_mc"], 5)
    assert (pythia.importance.metrics, pythia.zero_shot.limit) == (["grad_sq", "hutchinson"], 20)
    assert model_section_hash(cfg, "tiny-llama") != model_section_hash(
        load_experiment(write(tmp_path, BASE)), "tiny-llama")


def test_a_model_importance_budget_below_one_window_is_refused(tmp_path):
    message = error_for(tmp_path, BASE.replace("  tiny-llama: {}", "  tiny-llama: {importance: {token_budget: 32}}"))
    assert "models.tiny-llama.importance.token_budget: 32 tokens is less than one window (window: 64)" in message

def test_layer_stride_always_measures_the_last_layer():
    assert select_layers(LayerStride(stride=6), 30) == [0, 6, 12, 18, 24, 29]
    assert select_layers(LayerStride(stride=2, include_last=False), 5) == [0, 2, 4]
    assert select_layers("all", 3) == [0, 1, 2]


def test_importance_metric_names_match_the_engine():
    from esa_pipeline.core.importance.metrics import METRICS

    assert set(IMPORTANCE_METRICS) == set(METRICS)


# ---- issue 15 item 7: non-finite numbers, empty selections, bools as ints — each refused by `esa validate` ----
@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [("gaussian: [0.1]", "gaussian: [.inf]", "strengths.gaussian[0]: Input should be a finite number (got inf); "
      "write a finite number"),
     ("gaussian: [0.1]", "gaussian: [.nan]", "strengths.gaussian[0]: Input should be a finite number"),
     ("scale: [1.1]", "scale: [true]", "strengths.scale[0]: Input should be a valid number (got True); "
      "true/false is not a number here"),
     ("gaussian: [0.1]", "gaussian: [0.1, 0.1]", "strengths.gaussian: Value error, strengths repeat"),
     ("window: 64", "window: true", "window: Input should be a valid integer (got True); true/false"),
     ("window: 64", "window: 64.5", "window: Input should be a valid integer (got 64.5); write a whole number"),
     ("token_budget: 256", "token_budget: 0", "token_budget: Input should be greater than or equal to 1"),
     ("seeds: [1, 2]", "seeds: [1, true]", "seeds[1]: Input should be a valid integer (got True)"),
     ("layers: {stride: 2}", "layers: {stride: true}", "layers.stride: Input should be a valid integer (got True)"),
     ("layers: {stride: 2}", "layers: {stride: 0}", "layers.stride: Input should be greater than or equal to 1"),
     ("layers: {stride: 2}", "layers: []", "layers: List should have at least 1 item"),
     ("layers: {stride: 2}", "layers: [0, true]", "layers[1]: Input should be a valid integer (got True)"),
     ("layers: {stride: 2}", "layers: [-1]", "layers[0]: Input should be greater than or equal to 0"),
     ("models:", "zero_shot: {tasks: [esa_mc], limit: true}\nmodels:", "zero_shot.limit: Input should be a valid "
      "integer (got True)"),
     ("models:", "importance: {top_k: 0}\nmodels:", "importance.top_k: Input should be greater than or equal to 1"),
     ("models:", "importance: {validation_fraction: .nan}\nmodels:", "importance.validation_fraction: Input should "
      "be a finite number"),
     ("  tiny-llama: {}", "  tiny-llama: {batch_size: true}", "models.tiny-llama.batch_size: Input should be a "
      "valid integer (got True)"),
     ("  tiny-llama: {}", "  tiny-llama: {seeds: []}", "models.tiny-llama.seeds: List should have at least 1 item"),
     ("  tiny-llama: {}", "  tiny-llama: {experts: [0, true]}", "models.tiny-llama.experts[1]: Input should be a "
      "valid integer (got True)"),
     ("  tiny-llama: {}", "  tiny-llama: {experts: [-1]}", "models.tiny-llama.experts[0]: Input should be greater "
      "than or equal to 0"),
     ("token_budget: 256", "token_budget: 32", "token_budget: 32 tokens is less than one window (window: 64)"),
     ("  tiny-llama: {}", "  tiny-llama: {token_budget: 16}", "models.tiny-llama.token_budget: 16 tokens is less "
      "than one window"),
     ("models:", "importance: {token_budget: 63}\nmodels:", "importance.token_budget: 63 tokens is less than one "
      "window"),
     ("  tiny-llama: {}", "  tiny-llama: {strengths: {gaussian: [.inf]}}", "models.tiny-llama.strengths.gaussian[0]: "
      "Input should be a finite number"),
     # alpha = 1 passed validation and was refused by SequentialRule only when the sweep step started
     ("models:", "adaptive: {enabled: true, alpha: 1}\nmodels:", "adaptive.alpha: Input should be less than 1 "
      "(got 1)"),
     ("models:", "adaptive: {enabled: true, alpha: 0}\nmodels:", "adaptive.alpha: Input should be greater than 0")],
)  # fmt: skip
def test_non_finite_bool_and_empty_values_are_refused(tmp_path, old, new, expected):
    assert old in BASE
    message = error_for(tmp_path, BASE.replace(old, new))
    assert expected in message


def test_stride_starting_beyond_the_model_selects_nothing_and_is_refused(tmp_path):
    # issue 15: {stride: 2, start: 10} on 4-layer models was accepted and swept 0 layers
    message = error_for(tmp_path, BASE.replace("layers: {stride: 2}", "layers: {stride: 2, start: 10}"))
    assert "layers: {stride: 2, start: 10} selects no layer of a model with 4 layers; use a start in 0..3 " \
           "(inherited by tiny-llama)" in message
    own = BASE.replace("  tiny-llama: {}", "  tiny-llama: {layers: {stride: 1, start: 4}}")
    assert "models.tiny-llama.layers: {stride: 1, start: 4} selects no layer of a model with 4 layers" in error_for(
        tmp_path, own
    )
    with pytest.raises(ConfigError, match="selects no layer"):
        select_layers(LayerStride(stride=2, start=10), 4)
    assert select_layers(LayerStride(stride=2, start=3), 4) == [3]


def test_esa_validate_reports_the_file_key_and_fix_before_any_run(tmp_path, capsys):
    from esa_pipeline.cli import main

    path = write(tmp_path, BASE.replace("gaussian: [0.1]", "gaussian: [.inf]"))
    assert main(["validate", "--experiment", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "strengths.gaussian[0]" in err and "write a finite number" in err


def test_neuron_sigma_and_selection_come_from_yaml_and_version_only_neuron_partitions(tmp_path):
    from esa_pipeline.core.config import partition_hash
    from esa_pipeline.defs.sweep_assets import sweep_specs

    before = load_experiment(write(tmp_path, BASE))
    after = load_experiment(write(tmp_path, BASE + "neuron_sigma: 0.5\nneuron_selection: top\n"))
    plan = model_plan(after, "tiny-llama")
    assert (plan.neuron_sigma, plan.neuron_selection) == (0.5, "top")
    neuron_specs = [p for p in sweep_specs(plan, "ffn.gate", 1, [0]) if p.kind == "neurons"]
    assert neuron_specs and all((p.noise_sigma, p.selection) == (0.5, "top") for p in neuron_specs)
    assert all(p.selection == "random" for p in sweep_specs(plan, "ffn.gate", 1, [0]) if p.kind == "gaussian")
    for variant, changes in (("ffn.gate__1", True), ("attention.query__1", False)):
        same = partition_hash(before, "tiny-llama", "sensitivity", variant) == partition_hash(
            after, "tiny-llama", "sensitivity", variant)
        assert same is not changes, variant
    with pytest.raises(ConfigError, match="neuron_selection"):
        load_experiment(write(tmp_path, BASE + "neuron_selection: largest\n"))


@pytest.mark.parametrize(("key", "value"), [("group_size", "false"), ("bits", "[4, true]")])
def test_numeric_choices_refuse_bools(tmp_path, key, value):
    # pydantic accepts false for Literal[0, ...]; compression's numeric choices must not
    text = BASE.replace("models:", f"compression: {{models: [tiny-llama], bits: [4], {key}: {value}}}\nmodels:")
    text = text.replace("bits: [4], bits:", "bits:")
    message = error_for(tmp_path, text)
    assert f"compression.{key}" in message and "true/false is not a number here" in message


def test_optional_assets_say_why_they_do_not_apply():
    """The smoke profile has no compression section: the CLI skips the compression asset instead of running a
    step that stores nothing (and so would never count as up to date on the next `make demo`)."""
    from esa_pipeline.core.config import not_configured

    cfg = load_experiment("smoke", check_models=False)
    assert "compression.models" in not_configured(cfg, "tiny-llama", "compression")
    assert not_configured(cfg, "tiny-llama", "sensitivity") is None
    compression = load_experiment("compression", check_models=False)
    model = next(iter(compression.compression.models))
    assert not_configured(compression, model, "compression") is None


# ---- zero-shot settings are checked by `esa validate`, not when the zero-shot step runs after the sweep ----
ZS = "zero_shot: {tasks: [esa_mc], limit: 2, at: {top_delta_nll: 1}}\nmodels:"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [("models:", "zero_shot: {tasks: [esa_mc, esa_knowlege]}\nmodels:", "zero_shot.tasks: unknown zero-shot task "
      "'esa_knowlege'; did you mean 'esa_knowledge'?"),
     ("models:", "zero_shot: {tasks: [esa_mc, esa_mc]}\nmodels:", "zero_shot.tasks: tasks repeat; list each task once"),
     ("  tiny-llama: {}", "  tiny-llama: {zero_shot: {tasks: [hellaswagg]}}", "models.tiny-llama.zero_shot.tasks: "
      "unknown zero-shot task 'hellaswagg'; did you mean 'hellaswag'?"),
     ("  tiny-llama: {}", "  tiny-llama: {zero_shot: {at: {}}}", "models.tiny-llama.zero_shot.at: no points"),
     ("datasets: [bundled]", "datasets: [bundled, wikitex-103]", "datasets[1]: unknown text source 'wikitex-103'; "
      "did you mean 'wikitext-103'?"),
     ("datasets: [bundled]", "datasets: [bundled, bundled]", "datasets: datasets repeat; list each once"),
     ("models:", "zero_shot: {tasks: [esa_knowledge], num_fewshot: 101}\nmodels:", "zero_shot.num_fewshot: 101 "
      "examples, but esa_knowledge has 101 items and draws its examples from them, leaving out the scored one; use "
      "at most 100"),
     ("  tiny-llama: {}", "  tiny-llama: {zero_shot: {tasks: [esa_knowledge], num_fewshot: 500}}",
      "models.tiny-llama.zero_shot.num_fewshot: 500 examples, but esa_knowledge has 101 items"),
     ("models:", "zero_shot: {tasks: [esa_mc], at: {grid: {kind: scale, components: [ffn.down], strengths: [0.9]}}}"
      "\nmodels:", "zero_shot.at.grid: kind 'scale', component 'ffn.down', strength 0.9: kind 'scale' multiplies "
      "norm gains"),
     ("models:", "zero_shot: {tasks: [esa_mc], at: {grid: {kind: zero, components: [ffn.down], strengths: [2]}}}"
      "\nmodels:", "zero_shot.at.grid: kind 'zero', component 'ffn.down', strength 2.0: zero strength is a fraction"),
     ("models:", "zero_shot: {tasks: [esa_mc], at: {grid: {components: [ffn.down], layers: [7], strengths: [0.1]}}}"
      "\nmodels:", "zero_shot.at.grid.layers: [7] do not exist in a model with 4 layers; use 0..3 (inherited by "
      "tiny-llama; give models.tiny-llama its own zero_shot.at)"),
     ("models:", "zero_shot: {tasks: [esa_mc], at: {grid: {components: [moe.router], strengths: [0.1]}}}\nmodels:",
      "zero_shot.at.grid.components: 'moe.router' is not applicable to LlamaForCausalLM (tiny-llama)"),
     ("  tiny-llama: {}", "  tiny-llama: {zero_shot: {at: {grid: {components: [ffn.gate], strengths: [0.1]}}}}",
      "models.tiny-llama.zero_shot.at: no tasks to score")],
)  # fmt: skip
def test_zero_shot_tasks_datasets_and_grid_points_are_refused_before_any_run(tmp_path, old, new, expected):
    assert old in BASE
    assert expected in error_for(tmp_path, BASE.replace(old, new))


def test_a_model_section_fixes_an_inherited_zero_shot_grid_and_known_tasks_pass(tmp_path, hf_datasets_cache):
    hf_datasets_cache("hellaswag")  # a seed task passes offline where its dataset is cached (see below)
    grid = "zero_shot: {tasks: [esa_mc, hellaswag], at: {grid: {components: [ffn.gate], strengths: [0.1]}}}\nmodels:"
    message = error_for(tmp_path, BASE.replace("models:", grid))  # tiny-pythia has no gate
    assert "zero_shot.at.grid.components: 'ffn.gate' is not applicable to GPTNeoXForCausalLM (tiny-pythia)" in message
    assert "tiny-llama" not in message and "unknown zero-shot task" not in message
    fixed = BASE.replace("models:", grid).replace(
        "  tiny-pythia: {}", "  tiny-pythia: {zero_shot: {at: {grid: {components: [ffn.up, embedding], strengths: "
        "[0.1]}}}}")  # fmt: skip
    cfg = load_experiment(write(tmp_path, fixed))
    assert model_plan(cfg, "tiny-pythia").zero_shot.at.grid.components == ["ffn.up", "embedding"]
    # a model that scores no tasks scores no grid either: nothing to refuse
    off = BASE.replace("models:", grid).replace("  tiny-pythia: {}", "  tiny-pythia: {zero_shot: {tasks: []}}")
    assert model_plan(load_experiment(write(tmp_path, off)), "tiny-pythia").zero_shot.tasks == []


# ---- issue 12: a seed task whose dataset is not cached is refused offline by `esa validate`, not by the model stage
SEEDED = BASE.replace("models:", "zero_shot: {tasks: [esa_mc, hellaswag]}\nmodels:").replace(
    "  tiny-pythia: {}", "  tiny-pythia: {zero_shot: {tasks: [esa_mc, boolq]}}")  # fmt: skip


def test_a_seed_task_without_its_cached_dataset_is_refused_offline_before_any_run(tmp_path, hf_datasets_cache,
                                                                                  capsys):  # fmt: skip
    from esa_pipeline.cli import main

    path = write(tmp_path, SEEDED)
    assert main(["validate", "--experiment", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert ("zero_shot.tasks: zero-shot task 'hellaswag' cannot load its dataset 'Rowan/hellaswag' (ConnectionError: "
            "Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled))") in err  # fmt: skip
    assert ("models.tiny-pythia.zero_shot.tasks: zero-shot task 'boolq' cannot load its dataset 'aps/super_glue "
            "(config boolq)'") in err  # fmt: skip
    for fix in ("run once with network access and with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0",
                "load_tasks(['hellaswag'])", "or remove 'hellaswag' from the zero-shot tasks of the experiment YAML",
                "load_tasks(['boolq'])", "Bundled tasks that always work offline: esa_commonsense"):
        assert fix in err
    assert "'esa_mc' cannot" not in err  # bundled tasks are never refused
    # one of the two cached: only the other is refused; both cached: valid
    hf_datasets_cache("hellaswag")
    message = error_for(tmp_path, SEEDED)
    assert "'hellaswag'" not in message and "models.tiny-pythia.zero_shot.tasks: zero-shot task 'boolq'" in message
    hf_datasets_cache("boolq")
    assert main(["validate", "--experiment", str(path)]) == 0
    assert f"{path}: valid" in capsys.readouterr().out


def test_a_cached_seed_dataset_with_another_config_is_refused(tmp_path, hf_datasets_cache):
    # datasets finds ai2_arc in the cache but not its ARC-Easy config: lm-eval would fail to load arc_easy
    hf_datasets_cache("arc_easy", config_name="ARC-Challenge")
    message = error_for(tmp_path, BASE.replace("models:", "zero_shot: {tasks: [arc_easy]}\nmodels:"))
    assert ("zero_shot.tasks: zero-shot task 'arc_easy' cannot load its dataset 'allenai/ai2_arc (config ARC-Easy)' "
            "(ValueError: Couldn't find cache for allenai/ai2_arc for config 'ARC-Easy'") in message  # fmt: skip


def test_a_dataset_that_passes_validation_is_the_one_lm_eval_loads(hf_datasets_cache):
    from esa_pipeline.core.evaluation.zeroshot import load_tasks, uncached_seed_task_datasets

    item = {"id": "q1", "question": "What do bees make?", "choices": {"text": ["honey", "milk"], "label": ["A", "B"]},
            "answerKey": "A"}  # fmt: skip
    assert set(uncached_seed_task_datasets(["arc_easy", "esa_mc"])) == {"arc_easy"}
    hf_datasets_cache("arc_easy", [item])
    assert uncached_seed_task_datasets(["arc_easy", "esa_mc"]) == {}
    assert list(load_tasks(["arc_easy"])["arc_easy"].test_docs()) == [item]


def test_with_network_or_without_model_checks_nothing_is_fetched_or_refused(tmp_path, hf_datasets_cache,
                                                                            monkeypatch):  # fmt: skip
    import datasets

    def no_download(*args, **kwargs):
        raise AssertionError(f"validation must not fetch datasets: load_dataset_builder{args}")

    monkeypatch.setattr(datasets, "load_dataset_builder", no_download)
    path = write(tmp_path, SEEDED.replace("datasets: [bundled]", "datasets: [bundled, openwebtext]"))
    load_experiment(path, check_models=False)  # like the model checks: what this machine holds is not asked
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # network allowed: the model stage downloads
    assert model_plan(load_experiment(path), "tiny-pythia").zero_shot.tasks == ["esa_mc", "boolq"]


def test_standard_is_refused_offline_until_its_hub_datasets_are_cached(hf_datasets_cache):
    from esa_pipeline.core.evaluation.zeroshot import SEED_TASKS

    with pytest.raises(ConfigError) as info:
        load_experiment("standard")
    lines = str(info.value).splitlines()
    assert lines[0].endswith("standard.yaml: invalid experiment config:")
    assert [line.split("'")[1] for line in lines[1:]] == ["wikitext-103", "openwebtext", "c4", *SEED_TASKS]
    assert [line.split(":")[0] for line in lines[1:]] == ["  - datasets[0]", "  - datasets[1]", "  - datasets[2]",
                                                          *["  - zero_shot.tasks"] * len(SEED_TASKS)]  # fmt: skip
    assert all("cannot load its dataset" in line and "Fix: " in line for line in lines[1:])


def test_a_hub_text_source_without_its_cached_dataset_is_refused_offline(tmp_path, hf_datasets_cache):
    from esa_pipeline.core.evaluation.text import load_texts

    text = BASE.replace("datasets: [bundled]", "datasets: [bundled, wikitext-103, c4]")
    message = error_for(tmp_path, text)
    assert ("datasets[1]: text source 'wikitext-103' cannot load its dataset 'Salesforce/wikitext (config "
            "wikitext-103-raw-v1)' (ConnectionError: Couldn't reach 'Salesforce/wikitext' on the Hub "
            "(OfflineModeIsEnabled)); offline (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1) only the local Hugging Face "
            "datasets cache is used. Fix: run once online to fill the Hugging Face cache (datasets.load_dataset("
            "'Salesforce/wikitext', 'wikitext-103-raw-v1', split='test')), or point the experiment's dataset at a "
            "local .txt/.jsonl/.parquet file (online: HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0)") in message
    assert "datasets[2]: text source 'c4' cannot load its dataset 'allenai/c4 (config en)'" in message
    assert "datasets[0]" not in message
    # cached: valid, and the model stage loads what validation found (c4 streams from the cached copy)
    hf_datasets_cache("wikitext-103", [{"text": " = Bees = \n"}, {"text": " Bees make honey . \n"}])
    hf_datasets_cache("c4", [{"text": "A c4 page.", "url": "https://example.org/1"}])
    assert load_experiment(write(tmp_path, text)).datasets == ["bundled", "wikitext-103", "c4"]
    assert [(d.doc_id, d.text) for d in load_texts("wikitext-103")] == [("wikitext-103:Bees",
                                                                         " = Bees = \n Bees make honey . \n")]
    assert [(d.doc_id, d.text) for d in load_texts("c4", max_docs=5)] == [("https://example.org/1", "A c4 page.")]


def test_each_gguf_wheel_model_is_checked_against_its_own_layout(tmp_path, monkeypatch):
    # `gemma3-270m: {adapter: gemma3}` was refused ("LlamaForCausalLM does not have the gemma3 layout"): the
    # layout check built every GGUF-wheel model from SmolLM2's cached config
    from esa_pipeline.core.config import describe_source, skeleton_model
    from esa_pipeline.core.models import gguf_wheel
    from esa_pipeline.core.models.registry import MODEL_REGISTRY

    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path / "cache"))
    for name, tiny in (("smollm2-135m", "tiny-llama"), ("gemma3-270m", "tiny-gemma3")):
        directory = gguf_wheel.cache_dir(MODEL_REGISTRY[name].gguf)
        directory.mkdir(parents=True)
        MODEL_REGISTRY[tiny].build_tiny().config.to_json_file(directory / "config.json")
    assert type(skeleton_model("gemma3-270m")).__name__ == "Gemma3ForCausalLM"
    assert type(skeleton_model("smollm2-135m")).__name__ == "LlamaForCausalLM"
    text = BASE.replace("  tiny-llama: {}\n  tiny-pythia: {}", "  gemma3-270m: {adapter: gemma3, components: "
                        "[attention.query]}")  # fmt: skip
    describe_source.cache_clear()  # the facts of the fake cache must not outlive this test
    try:
        assert model_plan(load_experiment(write(tmp_path, text)), "gemma3-270m").adapter == "gemma3"
    finally:
        describe_source.cache_clear()


def test_the_readme_says_which_settings_re_version_which_assets(tmp_path):
    from esa_pipeline.core.config import HASHED_ASSETS, partition_hash

    def hashes(text: str) -> dict:
        cfg = load_experiment(write(tmp_path, text))
        plan = model_plan(cfg, "tiny-llama")
        out = {(asset, None): partition_hash(cfg, "tiny-llama", asset) for asset in HASHED_ASSETS}
        out.update({("sensitivity", v): partition_hash(cfg, "tiny-llama", "sensitivity", v) for v in plan.variants()})
        return out

    def changed(old: str, new: str) -> set:
        before, after = hashes(base_zs), hashes(base_zs.replace(old, new))
        return {key for key in before if key in after and before[key] != after[key]}

    base_zs = BASE.replace("models:", "zero_shot: {tasks: [esa_mc], limit: 2, at: {top_delta_nll: 1}}\nmodels:")
    # a seed: no stored sweep partition changes; importance and routing (they take every seed) and the analyses do
    assert {a for a, _ in changed("seeds: [1, 2]", "seeds: [1, 2, 3]")} == {
        "weight_importance", "moe_routing", "significance", "critical_layers", "zero_shot_sensitivity"}
    assert changed("at: {top_delta_nll: 1}", "at: {top_delta_nll: 2}") == {("zero_shot_sensitivity", None)}
    assert changed("limit: 2", "limit: 3") == {("baseline", None), ("zero_shot_sensitivity", None)}
    assert {a for a, _ in changed("models:", "importance: {top_k: 8}\nmodels:")} == {"weight_importance"}
