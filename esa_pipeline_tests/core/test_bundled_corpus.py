"""The bundled corpus is the default evaluation text: it must be large, varied and free of repetition.

The system ESA replaces published PPL 1.025 for Llama-3.1-8B from a four-sentence text repeated a hundred
times; these tests keep our own default text from drifting towards that failure.
"""

import collections
import pathlib
import re

CORPUS = pathlib.Path(__file__).resolve().parents[2] / "data" / "corpus"
REGISTERS = ("narrative", "dialogue", "expository", "technical")


def _documents() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(CORPUS.glob("*.txt"))}


def test_corpus_covers_every_register_with_several_documents() -> None:
    docs = _documents()
    per_register = collections.Counter(name.split("_")[0] for name in docs)
    for register in REGISTERS:
        assert per_register[register] >= 4, f"register {register!r} has {per_register[register]} documents"


def test_no_sentence_of_five_or_more_words_repeats_anywhere() -> None:
    counts: collections.Counter[str] = collections.Counter()
    for text in _documents().values():
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            normalized = " ".join(sentence.split())
            # Short conversational turns ("Hold on.", "Okay.") recur in any natural dialogue.
            if len(normalized.split()) >= 5:
                counts[normalized] += 1
    repeated = [s for s, n in counts.items() if n > 1]
    assert not repeated, f"repeated sentences: {repeated[:5]}"


def test_no_paragraph_repeats() -> None:
    paragraphs = [p.strip() for text in _documents().values() for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) == len(set(paragraphs))


def test_corpus_has_at_least_30k_smollm2_tokens(smollm2) -> None:
    n_tokens = sum(len(smollm2.tokenizer(text)["input_ids"]) for text in _documents().values())
    assert n_tokens >= 30_000, n_tokens
