"""The WordPiece tokenizer of a Hugging Face BERT folder, behind fmjax's Tokenizer interface.

Encoding goes through Hugging Face's own (Rust) `tokenizers`, so ids equal what transformers
produces: from tokenizer.json when the folder has one (normaliser, pre-tokeniser and vocabulary
exactly as saved), else from vocab.txt with tokenizer_config.json's lower-casing flags
(BertTokenizer's defaults when that file is absent). encode() adds no [CLS]/[SEP]: fmjax's
pipelines add bos/eos themselves, as with the sentencepiece tokenizer.

token_bytes approximates the bytes each piece adds to decoded text (`##x`: len(x); any other piece:
len + 1 for the space before it; specials 0). Punctuation, which decode attaches without a space,
counts one byte too many, so bits-per-byte figures on WordPiece ids are slightly optimistic.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

TOKENIZER_JSON = "tokenizer.json"
VOCAB_TXT = "vocab.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# fmjax role -> (tokenizer_config.json key, BERT's token)
_SPECIALS = {"pad": ("pad_token", "[PAD]"), "unk": ("unk_token", "[UNK]"), "bos": ("cls_token", "[CLS]"),
             "eos": ("sep_token", "[SEP]"), "mask": ("mask_token", "[MASK]")}
_CONTINUATION = "##"


def _settings(folder: str) -> dict:
    """tokenizer_config.json, or {} (BertTokenizer's defaults) when the folder has none."""
    path = os.path.join(folder, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _token(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


class WordPieceTokenizer:
    """A BERT folder's tokenizer with fmjax's special ids (bos = [CLS], eos = [SEP]) and byte lengths."""

    def __init__(self, folder: str | os.PathLike):
        folder = os.fspath(folder)
        settings = _settings(folder)
        names = {role: _token(settings.get(key, default)) for role, (key, default) in _SPECIALS.items()}
        self.path, self._tok = _open(folder, settings, names)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        ids = {}
        for role, token in names.items():
            ids[role] = self._tok.token_to_id(token)
            if ids[role] is None and role != "mask":  # no [MASK]: mask_id None, as fmjax's Tokenizer allows
                raise ValueError(f"{self.path}: special token {token!r} ({role}) is not in the vocabulary")
        self.pad_id, self.unk_id, self.bos_id = ids["pad"], ids["unk"], ids["bos"]
        self.eos_id = ids["eos"]
        self.mask_id: int | None = ids["mask"]
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        special |= {i for i in ids.values() if i is not None}
        pieces = [""] * self.vocab_size
        for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
            pieces[i] = piece
        self.token_bytes = np.array([0 if i in special else _piece_bytes(p) for i, p in enumerate(pieces)],
                                    dtype=np.int32)
        # Pieces that begin a word (whole-word masking); specials count as starts, as in Tokenizer.
        self.word_start = np.array([i in special or not p.startswith(_CONTINUATION) for i, p in enumerate(pieces)],
                                   dtype=bool)
        # What hf_bert.save(..., tokenizer_files=) should copy so the exported folder tokenizes alike.
        candidates = (TOKENIZER_JSON, VOCAB_TXT, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
        self.files = [p for p in (os.path.join(folder, f) for f in candidates) if os.path.isfile(p)]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer({self.path}, vocab_size={self.vocab_size})"


def _open(folder: str, settings: dict, names: dict[str, str]):
    """(file used, tokenizer): tokenizer.json first, for exactness; else vocab.txt."""
    json_path, vocab_path = os.path.join(folder, TOKENIZER_JSON), os.path.join(folder, VOCAB_TXT)
    if os.path.isfile(json_path):
        try:
            tok = tokenizers.Tokenizer.from_file(json_path)
        except Exception as e:  # the Rust side raises a bare Exception for an unreadable file
            raise ValueError(f"{json_path} is not a tokenizers file ({e})") from None
        if not isinstance(tok.model, tokenizers.models.WordPiece):
            raise ValueError(f"{json_path} holds a {type(tok.model).__name__} model, not WordPiece")
        tok.no_truncation()  # saved files often carry their training-time truncation and padding
        tok.no_padding()
        return json_path, tok
    if os.path.isfile(vocab_path):
        try:
            return vocab_path, BertWordPieceTokenizer(
                vocab_path, unk_token=names["unk"], sep_token=names["eos"], cls_token=names["bos"],
                pad_token=names["pad"], mask_token=names["mask"], lowercase=settings.get("do_lower_case", True),
                strip_accents=settings.get("strip_accents"),
                handle_chinese_chars=settings.get("tokenize_chinese_chars", True))
        except Exception as e:  # TypeError for a missing [CLS]/[SEP], a bare Exception for a bad file
            raise ValueError(f"{vocab_path}: cannot build a WordPiece tokenizer ({e})") from None
    raise ValueError(f"{folder}: no tokenizer; looked for {TOKENIZER_JSON} and {VOCAB_TXT}")


def _piece_bytes(piece: str) -> int:
    if piece.startswith(_CONTINUATION):
        return len(piece[len(_CONTINUATION):].encode("utf-8"))
    return len(piece.encode("utf-8")) + 1
