"""`esa materialize` resumes: a re-run computes only missing or stale partitions (issue 15 items 2, 3, 8;
issue 10 item 13). Runs go through the CLI, in a subprocess where a kill is part of the test."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from esa_pipeline import cli
from esa_pipeline.core.config import load_experiment, partition_hash
from esa_pipeline.defs.runner import materialize

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Enough points per partition (~1 s each here) that a kill lands between two partitions of one run.
RESUME_EXPERIMENT = """\
protocol: smoke
datasets: [bundled]
window: 32
token_budget: 128
batch_size: 2
seeds: [1, 2, 3]
strengths: {gaussian: [0.01, 0.05, 0.1, 0.2, 0.3]}
components: [attention.query, attention.output]
layers: [0, 1]
models:
  tiny-llama: {}
"""
SWEEP_PARTITIONS = {f"tiny-llama|{c}__{s}" for c in ("attention.query", "attention.output") for s in (1, 2, 3)}


@pytest.fixture
def resume_env(esa_env, tmp_path, monkeypatch):
    esa_env.experiment.write_text(RESUME_EXPERIMENT)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return esa_env


def stored(env) -> dict[str, float]:
    """Sweep partition -> its file's mtime."""
    return {p: env.store.partition_path("sensitivity", p).stat().st_mtime_ns for p in env.store.partitions("sensitivity")
            if env.store.has("sensitivity")} if env.store.relation_dir("sensitivity").exists() else {}  # fmt: skip


def sweep_runs(summary) -> list[str]:
    return [o.partition for o in summary.outcomes if o.job == "esa_sweep"]


def test_a_killed_sweep_resumes_with_exactly_the_missing_partitions(resume_env):
    env = resume_env
    # the child imports this worktree's package (the venv's editable install may point elsewhere)
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "esa_pipeline.cli", "materialize", "--select", "sensitivity"],
                            cwd=ROOT, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(stored(env)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 mid-sweep, as an OOM kill or a lost node would
        proc.wait()
    before = stored(env)
    assert 2 <= len(before) < len(SWEEP_PARTITIONS), f"the kill missed the sweep: {sorted(before)}"

    summary = materialize(select=["sensitivity"], log=lambda _: None)
    assert not summary.failed
    # model stage stored before the kill: skipped; the sweep computes exactly the missing partitions
    assert [o.job for o in summary.outcomes] == ["esa_sweep"] * len(summary.outcomes)
    after = stored(env)
    assert set(after) == SWEEP_PARTITIONS
    assert {p for p in after if after[p] != before.get(p)} == SWEEP_PARTITIONS - set(before)
    assert summary.skipped == {"up to date (stored partition hash is current)": 2 + len(before)}
    with env.store.connect() as con:
        duplicates = con.execute("SELECT variant, layer, kind, strength, count(*) FROM sensitivity "
                                 "GROUP BY ALL HAVING count(*) > 1").fetchall()  # fmt: skip
        assert duplicates == []
        assert con.execute("SELECT count(*) FROM sensitivity").fetchone()[0] == 6 * 2 * 5

    again = materialize(select=["sensitivity"], log=lambda _: None)
    assert again.outcomes == [] and again.skipped_up_to_date == 2 + 6


def test_adding_a_seed_runs_only_its_partitions_and_force_recomputes(resume_env, capsys):
    env = resume_env
    env.edit("seeds: [1, 2, 3]", "seeds: [1]")
    summary = materialize(select=["sensitivity"], log=lambda _: None)
    # one multi-partition run for the model's two sweep partitions: one load, one baseline, one prefix cache
    assert sweep_runs(summary) == ["tiny-llama|attention.output__1 ... attention.query__1"]
    assert summary.model_loads <= 1  # 0 when an earlier test of this process left tiny-llama cached
    first = stored(env)
    assert set(first) == {"tiny-llama|attention.query__1", "tiny-llama|attention.output__1"}

    env.edit("seeds: [1]", "seeds: [1, 999]")
    summary = materialize(select=["sensitivity"], log=lambda _: None)
    assert sweep_runs(summary) == ["tiny-llama|attention.output__999 ... attention.query__999"]
    after = stored(env)
    assert {p for p in after if after[p] != first.get(p)} == {"tiny-llama|attention.query__999",
                                                               "tiny-llama|attention.output__999"}  # fmt: skip

    assert cli.main(["materialize", "--select", "sensitivity"]) == 0
    out = capsys.readouterr().out
    assert "0 runs (0 failed)" in out and "skipped 6: up to date (stored partition hash is current)" in out

    assert cli.main(["materialize", "--select", "sensitivity", "--force"]) == 0
    forced = stored(env)
    assert all(forced[p] != after[p] for p in after)
    cfg = load_experiment(env.experiment)
    rows = env.store.read("sensitivity", "tiny-llama|attention.query__999")
    assert set(rows["config_hash"]) == {partition_hash(cfg, "tiny-llama", "sensitivity", "attention.query__999")}


def random_llama_dir(path: pathlib.Path) -> pathlib.Path:
    """A local Llama checkpoint with random weights and a 4k-token BPE tokenizer: loads like a real model,
    but its baseline PPL is in the thousands (the blocking baseline_sanity check fails)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from esa_pipeline.core.evaluation.text import load_texts

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator([d.text for d in load_texts("bundled")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_blocked_models_get_no_downstream_runs_and_one_root_cause_line(resume_env, tmp_path, capsys):
    env = resume_env
    broken = random_llama_dir(tmp_path / "broken-llama")
    env.experiment.write_text(RESUME_EXPERIMENT.replace("seeds: [1, 2, 3]", "seeds: [1]").replace(
        "models:\n", f"models:\n  pythia-1.4b: {{}}\n  broken-llama: {{source: {broken}}}\n"))  # fmt: skip
    code = cli.main(["materialize", "--select", "sensitivity"])
    out, err = capsys.readouterr()
    assert code == 1
    blocked = [line for line in err.splitlines() if line.startswith("BLOCKED")]
    assert len(blocked) == 2, err
    # the hub model without weights: the loader's own message, which names the fix, once
    assert blocked[0].startswith("BLOCKED pythia-1.4b: model stage failed: ModelUnavailable: ")
    assert "Fix: " in blocked[0]
    assert not [line for line in err.splitlines() if line.startswith("FAILED")], "the root cause is printed once"
    # the random-weight local checkpoint: its implausible baseline, not a wrapper error
    assert blocked[1].startswith("BLOCKED broken-llama: blocking check baseline_sanity failed: bundled: token PPL ")
    assert "outside plausible [2.0, 1000.0]" in blocked[1]
    # no sweep partitions of either were attempted; tiny-llama's ran
    assert {p.split("|")[0] for p in env.store.partitions("sensitivity")} == {"tiny-llama"}
    assert "[tiny-llama|" in out and "[pythia-1.4b|" not in out and "[broken-llama|" not in out


def test_seed_independent_points_are_stored_once_and_adding_a_seed_leaves_them(resume_env):
    """Norm `scale` draws nothing from the seed (issue 10 item 5): with 2 seeds each scale point is stored once,
    seed NULL, in norm.input__fixed; seed consistency leaves it out and significance tests it as deterministic."""
    env = resume_env
    env.edit("seeds: [1, 2, 3]", "seeds: [1, 2]")
    env.edit("strengths: {gaussian: [0.01, 0.05, 0.1, 0.2, 0.3]}", "strengths: {gaussian: [0.1], scale: [0.9, 1.1]}")
    env.edit("components: [attention.query, attention.output]", "components: [norm.input]")
    assert not materialize(select=["significance"], log=lambda _: None).failed
    with env.store.connect() as con:
        points = con.execute("SELECT kind, variant, seed, layer, strength FROM sensitivity ORDER BY ALL").fetchall()
        consistency_kinds = {k for (k,) in con.execute("SELECT DISTINCT kind FROM seed_consistency").fetchall()}
        tests = dict(con.execute("SELECT kind, list(DISTINCT test_used) FROM significance GROUP BY kind").fetchall())
    scale = [p for p in points if p[0] == "scale"]
    assert scale == [("scale", "norm.input__fixed", None, layer, s) for layer in (0, 1) for s in (0.9, 1.1)]
    assert sorted((p[1], p[2]) for p in points if p[0] == "gaussian") == [
        ("norm.input__1", 1), ("norm.input__1", 1), ("norm.input__2", 2), ("norm.input__2", 2)]  # fmt: skip
    assert "scale" not in consistency_kinds
    assert tests["scale"] == ["clustered_deterministic"]

    fixed = stored(env)["tiny-llama|norm.input__fixed"]
    env.edit("seeds: [1, 2]", "seeds: [1, 2, 3]")
    summary = materialize(select=["sensitivity"], log=lambda _: None)
    assert sweep_runs(summary) == ["tiny-llama|norm.input__3"]
    assert stored(env)["tiny-llama|norm.input__fixed"] == fixed
