"""The README is a contract: every ```python block runs, every ```sql block runs against a real store.

Blocks are collected from README.md at test time, so a block added later is covered without touching this file.
A block that genuinely cannot run offline is skipped only behind a visible marker on the line right before its
fence, `<!-- not-run: <reason> -->`; the reason shows in the test report.

- Python: each block runs alone in a fresh interpreter, cwd = the repository, offline, with `ESA_STORE_DIR` /
  `ESA_DB_PATH` pointing at the fixture store below. Blocks may load SmolLM2 (`make test` builds its cache).
- SQL: each block runs in DuckDB against the views of a store that `esa materialize` filled for two random-weight
  tiny models (tiny-llama, and tiny-mixtral for the MoE relations; every asset, zero-shot and three gaussian
  strengths included), so relation and column names are checked against real rows.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->\s*$")
RUN_LANGUAGES = ("python", "sql")
PYTHON_TIMEOUT_S = 600

FIXTURE_EXPERIMENT = """\
protocol: smoke
datasets: [bundled]
window: 32
token_budget: 96
batch_size: 2
zero_shot: {tasks: [esa_mc], limit: 4}
seeds: [1, 2]
strengths: {gaussian: [0.05, 0.1, 0.2], neurons: [0.25], scale: [1.1], router: [0.1]}
components: [attention.query, ffn.down]
layers: [0, 1]
importance: {metrics: [magnitude, grad_sq], top_k: 2, token_budget: 32}
models:
  tiny-llama: {}
  tiny-mixtral: {components: [moe.router], seeds: [1]}
"""


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the marker's reason, if any

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """Fenced code blocks in order; raises ValueError on a fence left open (a broken README renders wrong)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match["lang"].lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{start + 1}: code fence is never closed")
        marker = NOT_RUN.match(lines[start - 1]) if start > 0 else None
        code = textwrap.dedent("\n".join(lines[start + 1 : end]))
        blocks.append(Block(lang, start + 1, code, marker["reason"] if marker else None))
        i = end + 1
    return blocks


BLOCKS = [b for b in readme_blocks(README.read_text()) if b.lang in RUN_LANGUAGES]


def _params(lang: str) -> list:
    return [
        pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=f"not-run marker: {b.not_run}")] if b.not_run else [])
        for b in BLOCKS
        if b.lang == lang
    ]


def test_the_readme_has_runnable_blocks_and_markers_give_reasons():
    assert [b for b in BLOCKS if b.lang == "python" and not b.not_run], "the notebook API block must run"
    assert len([b for b in BLOCKS if b.lang == "sql" and not b.not_run]) >= 4
    # a marker must sit right before a fence: anywhere else it silently marks nothing
    lines = README.read_text().splitlines()
    stray = [n + 1 for n, line in enumerate(lines) if NOT_RUN.match(line)
             and not (n + 1 < len(lines) and FENCE.match(lines[n + 1]))]  # fmt: skip
    assert not stray, f"README.md lines {stray}: a not-run marker must be the line right before a code fence"


def test_collector_finds_blocks_markers_and_open_fences():
    text = "intro\n```python\nx = 1\n```\n<!-- not-run: needs a GPU -->\n```sql\nselect 1\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.line, b.code, b.not_run) for b in blocks] == [
        ("python", 2, "x = 1", None), ("sql", 6, "select 1", "needs a GPU")]  # fmt: skip
    with pytest.raises(ValueError, match="never closed"):
        readme_blocks("```python\nx = 1\n")


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> dict[str, str]:
    """A store and views database filled by `esa materialize` (every asset of the fixture experiment)."""
    root = tmp_path_factory.mktemp("readme")
    experiment = root / "readme.yaml"
    experiment.write_text(FIXTURE_EXPERIMENT)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ESA_EXPERIMENT": str(experiment),
        "ESA_STORE_DIR": str(root / "store"),
        "ESA_DB_PATH": str(root / "esa.duckdb"),
        "DAGSTER_HOME": str(root / "dagster_home"),
    }
    (root / "dagster_home").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "esa_pipeline.cli", "materialize", "--executor", "in_process"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return env


@pytest.mark.parametrize("block", _params("sql"))
def test_readme_sql_runs_against_a_materialized_store(block, demo_store):
    import duckdb

    with duckdb.connect(demo_store["ESA_DB_PATH"], read_only=True) as con:
        con.execute(block.code)  # binds every relation and column it names: a typo or a renamed column fails
        con.fetchall()


@pytest.mark.parametrize("block", _params("python"))
def test_readme_python_runs(block, demo_store):
    from esa_pipeline.core.models import smollm2

    if "smollm2" in block.code:
        try:  # what `make test` builds (the conftest's smollm2 fixture policy); the block must not download
            smollm2.ensure_cache()
        except smollm2.SmolLM2Unavailable as exc:
            pytest.skip(f"SmolLM2 unavailable: {exc}")
    # the block sees the same environment (ESA_CACHE_DIR included) as this process, plus the fixture store
    done = subprocess.run([sys.executable, "-c", block.code], cwd=REPO, env=demo_store, capture_output=True, text=True,
                          timeout=PYTHON_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


PROVENANCE = {"config_hash", "code_version", "created_at"}


def test_every_stored_relation_and_column_is_documented_in_the_readme(demo_store):
    """The README's Relations table names every relation the pipeline stores and every column of it."""
    import duckdb

    rows = {}
    for line in README.read_text().splitlines():
        if match := re.match(r"^\| `([a-z_][a-z0-9_]*)` \|(.*)$", line):
            rows.setdefault(match[1], match[2])
    undocumented = {}
    with duckdb.connect(demo_store["ESA_DB_PATH"], read_only=True) as con:
        views = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
        assert {"baselines", "sensitivity", "significance", "models", "zero_shot", "moe_routing"} <= set(views)
        for view in views:
            columns = [d[0] for d in con.sql(f'FROM "{view}" LIMIT 0').description]
            named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rows.get(view, "")))
            missing = [c for c in columns if c not in named | PROVENANCE]
            if view not in rows or missing:
                undocumented[view] = "relation not in the Relations table" if view not in rows else missing
    assert not undocumented, f"document these in README.md (Relations) and docs/CONTRACTS.md: {undocumented}"
