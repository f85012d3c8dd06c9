"""The HTML report: self-contained (embedded PNGs), every section present, provenance stated, empty
relations called out, random-weight models marked, files written next to it."""

from __future__ import annotations

import base64
import json
import re

import pytest

from esa_pipeline.core.reporting import charts
from esa_pipeline.core.reporting.report import REPORT_RELATIONS, build_report
from esa_pipeline_tests.core.test_charts import fixture_relations

EXPERIMENT = {
    "name": "chart-fixture", "description": "two models, four layers", "protocol": "smoke", "datasets": ["bundled"],
    "window": 128, "token_budget": 768, "batch_size": 4,
    "zero_shot": {"tasks": ["esa_mc", "piqa"], "limit": 20, "num_fewshot": 0}, "seeds": [0, 1],
    "strengths": {"gaussian": [0.01, 0.1], "neurons": [], "scale": [], "router": []},
    "components": ["attention.query", "ffn.down", "norm.input"], "layers": "all",
    "models": {"smollm2-135m": None, "tiny-mixtral": {"seeds": [0, 1], "revision": None}},
}  # fmt: skip
SECTIONS = ["setup", "random-weights", "baselines", "zero-shot", "heatmap", "degradation", "dose_response",
            "critical_layers",
            "seed_consistency", "architecture", "moe_routing", "scaling", "importance", "validation", "prediction",
            "zero_shot", "scaling-table", "group-comparison", "super-weights"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    index = build_report(fixture_relations(), out, experiment=EXPERIMENT)
    return index, index.read_text(encoding="utf-8")


def test_report_has_every_section_with_embedded_charts(report):
    index, page = report
    assert index.name == "index.html"
    for section in SECTIONS:
        assert f'<section id="{section}"' in page, section
    headline, appendix = page.split('<section id="plumbing-appendix"', 1)
    images = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)' width='\d+'", headline)
    # random-weight models never enter a headline chart: tiny-mixtral's charts are in the appendix only
    assert "tiny-mixtral" not in "".join(re.findall(r"<figure>.*?</figure>", headline)).replace("plumbing", "")
    appendix_images = re.findall(r"<img src='data:image/png;base64,", appendix)
    # heatmap, degradation, dose-response, seed consistency, MoE routing, importance, 2 validation kinds,
    # prediction; no critical layers or architecture comparison for a random-weight model
    assert len(appendix_images) == 9
    # one per kind-specific chart (one sweep kind, two validation kinds here) and per single chart; no scaling
    # chart (one pretrained model is not enough for a fit) and no MoE routing (only the tiny MoE has rows);
    # two zero-shot charts
    assert len(images) == 12
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG") and len(png) > 8_000
    assert "<script src=" not in page and "http://" not in page and "https://" not in page


def test_report_states_setup_and_provenance(report):
    _, page = report
    for fact in ["smoke", "bundled", "window length (tokens)</th><td>128", "768", "esa_mc, piqa",
                 "zero-shot shots (num_fewshot)</th><td>0", "seeds</th><td>0, 1", "gaussian: 0.01, 0.1",
                 "rev-smollm2-135m", "random-seed-0"]:  # fmt: skip
        assert fact in page, fact


def test_report_marks_random_weight_models_and_baseline_flags(report):
    _, page = report
    assert "Random-weight models — plumbing only" in page
    assert "<code>tiny-mixtral</code> has random weights" in page
    assert "tiny-mixtral <span class='badge'>random weights</span>" in page
    assert "Sanity flags raised" in page and "random_weights" in page
    for header in ["token PPL", "word PPL", "byte PPL", "token top-1 accuracy", "tokens/s", "peak memory"]:
        assert f"<th>{header}</th>" in page
    assert "1.12 GiB" in page  # 1.2e9 bytes
    assert "0.5500 ± 0.0500" in page  # zero-shot score with stderr


def test_report_writes_png_and_spec_files(report):
    index, _ = report
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert "heatmap__gaussian.png" in pngs and "prediction.png" in pngs and len(pngs) == 21
    assert "plumbing-heatmap__gaussian.png" in pngs  # the appendix's copy for the random-weight model
    assert {"zero_shot__accuracy.png", "zero_shot__disagreement.png"} <= set(pngs)
    assert {"validation__zero.png", "validation__sign_flip.png"} <= set(pngs)  # one figure per kind
    spec = json.loads((index.parent / "heatmap__gaussian.vl.json").read_text())
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
    assert not list(index.parent.glob(".*.tmp")), "temporary files left behind"


def test_scaling_section_draws_points_and_the_table_says_why_there_is_no_fit(report):
    _, page = report
    scaling = page.split('<section id="scaling"', 1)[1].split("</section>", 1)[0]
    assert "<img" not in scaling and "No scaling fit: not enough models" in scaling  # no line, the reason
    table = page.split('<section id="scaling-table"', 1)[1].split("</section>", 1)[0]
    assert "not enough models: 1 pretrained model(s) of family llama" in table


def test_every_relation_the_report_draws_is_one_the_report_asset_loads(report):
    _, page = report
    # the fixture fills every relation the report uses (sensitivity_windows only feeds significance)
    assert set(fixture_relations()) - {"sensitivity_windows"} <= set(REPORT_RELATIONS)
    for relation in set(REPORT_RELATIONS) - {"moe_routing"}:  # only the tiny MoE has routing rows: appendix
        assert f"The `{relation}` relation is empty" not in page, relation


def test_group_comparison_table_says_when_a_group_is_too_small_to_test(report):
    _, page = report
    table = page.split('<section id="group-comparison"', 1)[1].split("</section>", 1)[0]
    # the fixture has one dense (smollm2-135m) and one MoE model (tiny-mixtral): descriptive difference only
    assert "dense_vs_moe" in table and "instruct_vs_base" in table
    assert "tiny-mixtral" in table and "fewer than 2 models in a group" in table


def test_empty_relations_are_called_out_and_pretrained_data_carry_no_warning(tmp_path):
    # one build for both checks: rendering charts is the slow part of these tests
    tables = {k: v.loc[v["model"] == "smollm2-135m"] if "model" in v.columns else v
              for k, v in fixture_relations().items()}  # fmt: skip
    for name in ("prediction_check", "zero_shot", "weight_importance"):
        tables[name] = tables[name].iloc[0:0]
    del tables["importance_validation"]
    page = build_report(tables, tmp_path, experiment=EXPERIMENT).read_text(encoding="utf-8")
    # moe_routing holds only the tiny MoE model, so it is empty once filtered to the pretrained one
    for relation in ("moe_routing", "prediction_check", "zero_shot", "weight_importance", "importance_validation"):
        assert f"The `{relation}` relation is empty" in page, relation
    assert page.count("<img") == 8  # no scaling chart: one pretrained model is not enough for a fit
    assert "every model in this report has pretrained weights" in page
    assert charts.PLUMBING_NOTE not in page and "badge'>random weights" not in page


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(TypeError, match="experiment config as a dict"):
        build_report({}, tmp_path, experiment="smoke.yaml")
    with pytest.raises(TypeError, match="pandas DataFrame"):
        build_report({"sensitivity": [1, 2]}, tmp_path, experiment={})


def test_super_weights_section_shows_confirmed_and_unconfirmed_candidates(report):
    _, page = report
    section = page.split('<section id="super-weights"', 1)[1].split("</section>", 1)[0]
    assert "<th>status</th>" in section and "<th>zero_delta_nll</th>" in section and "<th>control_p</th>" in section
    assert "<td>confirmed</td>" in section and "<td>candidate</td>" in section
    assert section.index("<td>confirmed</td>") < section.index("<td>candidate</td>")  # confirmed listed first


def test_report_names_blocked_models_and_why(tmp_path):
    # issue 10 item 13: the same rule as `esa materialize`'s BLOCKED lines — a flagged baseline blocks a model,
    # an implausible PPL blocks a pretrained one, a configured model without a stored baseline is named too
    from esa_pipeline.core.reporting.report import blocked_models

    tables = fixture_relations()
    experiment = {**EXPERIMENT, "models": {**EXPERIMENT["models"], "ghost-7b": None}}
    blocked = blocked_models(tables, experiment)
    assert blocked == {
        "tiny-mixtral": "blocking check baseline_sanity failed: bundled: flags random_weights",
        "ghost-7b": "no baseline stored under the current settings: its model stage failed or has not run "
                    "(`esa materialize` prints the error)",
    }  # fmt: skip
    baselines = tables["baselines"].copy()
    baselines.loc[baselines["model"] == "smollm2-135m", "token_ppl"] = 1.5  # pretrained: below the plausible range
    assert blocked_models({**tables, "baselines": baselines}, experiment)["smollm2-135m"] == (
        "blocking check baseline_sanity failed: bundled: token PPL 1.500 outside plausible [2.0, 1000.0]")
    page = build_report(tables, tmp_path, experiment=experiment).read_text(encoding="utf-8")
    section = page[page.index('<section id="blocked"'):]
    section = section[: section.index("</section>")]
    assert "<code>ghost-7b</code>" in section and "<code>tiny-mixtral</code>" in section
    assert "smollm2-135m" not in section


def test_zero_shot_charts_leave_random_weight_models_out_of_the_headline(tmp_path):
    import pandas as pd

    tables = fixture_relations()
    for name in ("zero_shot_significance", "task_vs_perplexity", "task_vs_perplexity_points"):
        frame = tables[name]
        tables[name] = pd.concat([frame, frame.assign(model="tiny-mixtral")], ignore_index=True)
    page = build_report(tables, tmp_path, experiment=EXPERIMENT).read_text(encoding="utf-8")
    section = page.split('<section id="zero_shot"', 1)[1].split("</section>", 1)[0]
    assert "smollm2-135m" in section and "tiny-mixtral" not in section
    spec = json.loads((tmp_path / "zero_shot__disagreement.vl.json").read_text())
    assert "tiny-mixtral" not in json.dumps(spec)


def test_zero_shot_charts_draw_a_second_pretrained_model_with_too_few_points_for_rho(tmp_path):
    # The demo scores Gemma-3 at 2 points (1 top-ΔNLL + 1 control, smoke.yaml): both pretrained models are drawn,
    # and Gemma's panel states why it has no Spearman ρ instead of dropping the model.
    import pandas as pd

    from esa_pipeline.core.analysis.zero_shot_stats import task_vs_perplexity

    tables = fixture_relations()
    point = ["kind", "component", "layer", "strength", "seed"]
    smol = tables["zero_shot_significance"].loc[lambda f: f["model"] == "smollm2-135m"]
    gemma = smol.loc[smol.set_index(point).index.isin(smol[point].drop_duplicates().head(2).set_index(point).index)]
    gemma = gemma.assign(model="gemma3-270m")
    sens = tables["sensitivity"].loc[lambda f: f["model"] == "smollm2-135m"].assign(model="gemma3-270m")
    corr, points = task_vs_perplexity(gemma, sens)
    assert corr["spearman_rho"].isna().all() and len(points.loc[points["task"] == "all"]) == 2
    for name, extra in (("zero_shot_significance", gemma), ("task_vs_perplexity", corr),
                        ("task_vs_perplexity_points", points)):  # fmt: skip
        tables[name] = pd.concat([tables[name], extra], ignore_index=True)
    page = build_report(tables, tmp_path, experiment=EXPERIMENT).read_text(encoding="utf-8")
    section = page.split('<section id="zero_shot"', 1)[1].split("</section>", 1)[0]
    assert "smollm2-135m" in section and "gemma3-270m" in section
    accuracy = json.dumps(json.loads((tmp_path / "zero_shot__accuracy.vl.json").read_text()))
    disagreement = json.dumps(json.loads((tmp_path / "zero_shot__disagreement.vl.json").read_text()))
    assert "gemma3-270m" in accuracy and "gemma3-270m" in disagreement and "not computed" in disagreement
    assert (tmp_path / "zero_shot__accuracy.png").is_file() and (tmp_path / "zero_shot__disagreement.png").is_file()
