"""Offline byte-level tokenizer for the random-weight tiny models.

The tiny models have no pretrained tokenizer and nothing may be downloaded, so they get a deterministic
byte-level BPE with no merges: every UTF-8 byte is one token (ids 0..255) plus BOS/EOS/PAD (256..258).
It is a real `PreTrainedTokenizerFast`, so lm-eval's HFLM, `decode`, batching and padding all work.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
N_BYTE_TOKENS = 256
BYTE_VOCAB_SIZE = N_BYTE_TOKENS + len(SPECIAL_TOKENS)  # 259: the tiny models' embedding rows


def _byte_vocab() -> dict[str, int]:
    # ByteLevel maps each byte to a printable unicode stand-in; ordering by byte value makes id == byte.
    table = bytes_to_unicode()  # byte value -> stand-in char, the same table the ByteLevel pre-tokenizer uses
    vocab = {table[b]: b for b in range(N_BYTE_TOKENS)}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = N_BYTE_TOKENS + offset
    return vocab


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer (no files, deterministic): id == UTF-8 byte value, then BOS, EOS, PAD."""
    backend = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
