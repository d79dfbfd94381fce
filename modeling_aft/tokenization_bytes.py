"""A byte-level tokenizer: one token per UTF-8 byte, token id = byte value (vocab 256), as in the paper's enwik8 setup.

It is a real `PreTrainedTokenizerFast` (saved as tokenizer.json, loaded back with `AutoTokenizer`), written as the
`tokenizers` JSON description with the standard library only:

- normalizer: ByteLevel maps every byte of the text to one printable character (GPT-2's byte ↔ unicode table), then the
  character of byte 0 is replaced by NUL itself;
- model: a BPE without merges, i.e. one token per character, whose vocabulary maps each character to its byte's id;
- decoder: ByteLevel maps the characters back to bytes (NUL, outside its table, passes through as byte 0).

The padding token is NUL (id 0), declared on the *normalized* text. After the replacement above, a NUL there can only
come from a 0 byte, so padding never captures real text (with the plain ByteLevel table the pad token would be "Ā",
and a literal "Ā" in the input would become a pad). For every string, `decode(encode(text)) == text` and
`encode(text) == list(text.encode())`.
"""

import json
import os
import tempfile

from transformers import PreTrainedTokenizerFast

BYTE_VOCAB_SIZE = 256
PAD_BYTE = 0
PAD_TOKEN = chr(PAD_BYTE)


def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte → printable unicode character table (the `tokenizers` ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(BYTE_VOCAB_SIZE):
        if byte not in table:
            table[byte] = chr(BYTE_VOCAB_SIZE + shifted)
            shifted += 1
    return table


def byte_level_tokenizer_json() -> dict:
    """The tokenizer.json content of the byte-level tokenizer."""
    chars = byte_to_char()
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": PAD_BYTE, "content": PAD_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": True, "special": True},
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "ByteLevel"},
            {"type": "Replace", "pattern": {"String": chars[PAD_BYTE]}, "content": PAD_TOKEN},
        ]},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {PAD_TOKEN if byte == PAD_BYTE else chars[byte]: byte for byte in range(BYTE_VOCAB_SIZE)},
            "merges": [],
        },
    }


def byte_level_tokenizer(model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A fresh byte-level `PreTrainedTokenizerFast` (vocab 256, pad = byte 0, no BOS/EOS, left padding)."""
    with tempfile.TemporaryDirectory(prefix="aft-bytes-") as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(byte_level_tokenizer_json(), f, ensure_ascii=False)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=path,
            pad_token=PAD_TOKEN,
            padding_side="left",
            clean_up_tokenization_spaces=False,
            model_max_length=model_max_length or int(1e30),
        )
    return tokenizer


__all__ = ["byte_level_tokenizer", "byte_level_tokenizer_json", "byte_to_char", "BYTE_VOCAB_SIZE"]
