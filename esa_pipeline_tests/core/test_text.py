import json

import pandas as pd
import pytest

from esa_pipeline.core.evaluation.text import (
    BUNDLED_CORPUS_DIR,
    DatasetUnavailable,
    Document,
    _wikitext_articles,
    load_texts,
)


def test_bundled_corpus_is_sorted_files_with_stem_ids():
    docs = load_texts("bundled")
    stems = sorted(p.stem for p in BUNDLED_CORPUS_DIR.glob("*.txt"))
    assert [d.doc_id for d in docs] == stems
    assert all(d.text.strip() for d in docs)
    assert load_texts("bundled", max_docs=2) == docs[:2]


def test_local_txt_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second document", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_texts(str(tmp_path / "a.txt")) == [Document("a", "first document")]
    # sorted, empty documents skipped (lm-eval scores no window for them), other suffixes ignored
    assert load_texts(str(tmp_path)) == [Document("a", "first document"), Document("b", "second document")]


def test_jsonl_uses_text_field_and_optional_id(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one", "id": "x1"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_texts(str(path)) == [Document("x1", "one"), Document("docs:3", "two")]
    path.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ValueError, match="'text' field"):
        load_texts(str(path))


def test_parquet_needs_text_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"text": ["alpha beta", "gamma"]}).to_parquet(path)
    assert load_texts(str(path), max_docs=1) == [Document("docs:0", "alpha beta")]
    pd.DataFrame({"content": ["alpha"]}).to_parquet(path)
    with pytest.raises(ValueError, match="'text' column; found \\['content'\\]"):
        load_texts(str(path))


def test_unknown_source_names_the_options(tmp_path):
    with pytest.raises(ValueError, match="bundled.*wikitext-103"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="max_docs"):
        load_texts("bundled", max_docs=0)


@pytest.mark.parametrize("name", ["wikitext-103", "c4", "openwebtext"])
def test_hub_datasets_offline_raise_with_the_fix(name, monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # an empty cache, so the test means the same on a machine that has these datasets cached
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DatasetUnavailable, match="run once online.*local .txt/.jsonl/.parquet"):
        load_texts(name)


def test_wikitext_lines_are_joined_into_articles():
    lines = [" = Alpha = \n", " text a1 \n", " = = Section = = \n", " text a2 \n", " = Beta = \n", " text b \n"]
    docs = list(_wikitext_articles(lines))
    assert [d.doc_id for d in docs] == ["wikitext-103:Alpha", "wikitext-103:Beta"]
    assert docs[0].text == "".join(lines[:4])
    assert docs[1].text == "".join(lines[4:])


def test_hub_document_sample_is_seeded_order_preserving_and_stable():
    from esa_pipeline.core.evaluation.text import sample_documents

    docs = [Document(f"wikitext-103:article {i}", f"text {i}") for i in range(50)]
    chosen = sample_documents(docs, 10, seed=0)
    assert len(chosen) == 10 and chosen == sample_documents(docs, 10, seed=0)
    assert chosen != docs[:10]  # never simply the first articles
    assert [docs.index(d) for d in chosen] == sorted(docs.index(d) for d in chosen)  # corpus order kept
    assert sample_documents(docs, 10, seed=1) != chosen
    # a document's rank depends only on (seed, its id): a corpus with more documents samples a superset's
    # top ranks, so every document of the larger sample that was in the smaller corpus is also in its sample
    more = docs + [Document(f"wikitext-103:article {i}", "x") for i in range(50, 60)]
    bigger = {d.doc_id for d in sample_documents(more, 10, 0)}
    assert {d.doc_id for d in docs if d.doc_id in bigger} <= {d.doc_id for d in chosen}
    assert [d.doc_id for d in sample_documents(docs, None, 0)] == [d.doc_id for d in docs]


@pytest.mark.parametrize(("line", "message"), [
    ("not json", r"bad\.jsonl:2: not valid JSON \(Expecting value\)"),  # was a bare JSONDecodeError
    ('{"text": 5}', r"bad\.jsonl:2: 'text' must be a string, got int"),  # was the document "5"
])  # fmt: skip
def test_a_bad_jsonl_line_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a fine first document"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_texts(str(path))


def test_a_null_parquet_text_is_an_error_not_the_document_none(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["a fine document", None]}).to_parquet(path)  # was scored as the text "None"
    with pytest.raises(ValueError, match=r"t\.parquet row 1: 'text' must be a string, got NoneType"):
        load_texts(str(path))
