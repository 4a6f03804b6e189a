"""The sentencepiece tokenizer: trained once per corpus and vocabulary size (cached), or loaded.

Trained tokenizers keep text exactly: identity normalization, no whitespace collapsing, byte
fallback for unseen characters, so decode(encode(text)) == text for any text. Sentencepiece's
default dummy prefix stays on (a document's first word tokenizes like a word mid-text); the
price is one extra "▁" piece-byte per encoded text, which decode removes again:
sum(token_bytes[encode(text)]) == len(text.encode()) + 1 for any non-empty text.
"""

import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Callable, Iterator, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm

from fmjax.data import sources

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WORKDIR_FILE = "tokenizer.model"
MASK_PIECE = "<mask>"  # id 4 in trained tokenizers: masked-LM input (never produced by encode)
# Ids 5-8 in trained tokenizers: chat role markers and end of turn (fmjax.data.chat). Control
# pieces, so encode never produces them: text that spells "<|user|>" cannot forge a turn.
CHAT_PIECES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MODEL_TYPES = {"bpe": "bpe", "unigram": "unigram"}  # data.tokenizer_type -> sentencepiece type
# Nine special ids and 256 byte-fallback pieces come before any learned piece.
MIN_VOCAB_SIZE = 5 + len(CHAT_PIECES) + 256 + 1
# Sentencepiece sees text in chunks of at most this many characters (cut at line breaks), and
# at most _MAX_TRAIN_CHARS of the train split: plenty for a 32k vocabulary, and single-threaded
# training stays within minutes (40M chars: ~15 s bpe, ~200 s unigram, ~1 GB of memory).
_MAX_SENTENCE_CHARS = 4096
_MAX_TRAIN_CHARS = 50_000_000
_TRAINER_ARGS = dict(
    byte_fallback=True,
    character_coverage=1.0,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,  # Runs of indentation become single pieces.
    split_digits=True,
    max_sentence_length=4 * _MAX_SENTENCE_CHARS,  # Bytes; UTF-8 needs at most 4 per char.
    # Single-threaded and without sentence sampling, training is a function of its input.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    control_symbols=[MASK_PIECE, *CHAT_PIECES],
    minloglevel=2,
)


class Tokenizer:
    """A sentencepiece model with fmjax's special ids and per-token byte lengths."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size: int = self._sp.get_piece_size()
        ids = {"pad": self._sp.pad_id(), "unk": self._sp.unk_id(), "bos": self._sp.bos_id(),
               "eos": self._sp.eos_id()}
        if ids != {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}:
            raise ValueError(f"tokenizer {self.path} has special ids {ids}; fmjax needs "
                             f"pad={PAD_ID}, unk={UNK_ID}, bos={BOS_ID}, eos={EOS_ID}")
        self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)],
                                    dtype=np.int32)
        self.mask_id: int | None = self.piece_id(MASK_PIECE)  # None: a tokenizer from elsewhere
        # Pieces that begin a word (whole-word masking); byte pieces count as continuations.
        self.word_start = np.array([self._sp.id_to_piece(i).startswith("\u2581") or self._sp.is_control(i)
                                    for i in range(self.vocab_size)], dtype=bool)

    def piece_id(self, piece: str) -> int | None:
        """The id of `piece` (e.g. a control piece such as a chat marker), None if it has none."""
        i = self._sp.piece_to_id(piece)
        return None if i == UNK_ID and piece != self._sp.id_to_piece(UNK_ID) else i

    def _piece_bytes(self, i: int) -> int:
        """Bytes piece `i` adds to decoded text (used as the bits-per-byte denominator)."""
        if self._sp.is_control(i) or self._sp.is_unknown(i):
            return 0  # Specials decode to nothing; byte fallback means unk is never produced.
        if self._sp.is_byte(i):
            return 1
        return len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size})"


class StandInTokenizer:
    """What an LM task needs of a tokenizer to train on synthetic batches (benchmarks, shape checks):
    `vocab_size` made-up tokens of one byte each."""

    def __init__(self, vocab_size: int):
        self.token_bytes = np.ones(vocab_size, np.int32)


def workdir_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
    """The tokenizer travels with the workdir: the run's own copy, else trained/loaded and copied in."""
    own = os.path.join(workdir, WORKDIR_FILE)
    if os.path.exists(own):
        tokenizer = load_tokenizer(own)
    else:
        tokenizer = get_tokenizer(config)
        if isinstance(tokenizer, Tokenizer):  # a Hugging Face folder stays where data.tokenizer names it
            os.makedirs(workdir, exist_ok=True)
            tmp = f"{own}.{uuid.uuid4().hex}.tmp"  # the processes of a multi-process run copy at once
            shutil.copyfile(tokenizer.path, tmp)
            os.replace(tmp, own)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} but the tokenizer {tokenizer.path} "
                         f"has {tokenizer.vocab_size} pieces")
    return tokenizer


def _pretrained_file(init_from: str) -> str:
    """Where init_from keeps its tokenizer: a Hugging Face BERT folder is its own tokenizer; a
    workdir (or its checkpoints/<step>) holds tokenizer.model."""
    from fmjax.interop import hf_bert
    path = pathlib.Path(init_from)
    if hf_bert.is_hf_folder(path):
        return str(path)
    workdir = path.parent.parent if path.name.isdigit() else path
    return str(workdir / WORKDIR_FILE)


def _same(a: str, b: str) -> bool:
    if os.path.isdir(a) or os.path.isdir(b):
        return os.path.samefile(a, b)
    return pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes()


def finetune_file(config: ml_collections.ConfigDict, scratch: Callable[[], str]) -> str:
    """The tokenizer file (or Hugging Face folder) a fine-tuning run uses.

    A fine-tuned model only understands the ids it was pretrained with, so the user names one
    thing: data.tokenizer if set; else, with init_from, the tokenizer the pretraining workdir holds
    (or the Hugging Face folder itself); else (from scratch) `scratch()`, e.g. one trained on the
    fine-tuning texts. data.tokenizer and init_from's tokenizer must agree when both are given.
    """
    given = config.data.tokenizer
    if given and not os.path.exists(given):
        raise ValueError(f"data.tokenizer={given!r} does not exist")
    pretrained = _pretrained_file(config.init_from) if config.init_from else ""
    if pretrained and not os.path.exists(pretrained):
        if given:
            return given
        raise ValueError(f"init_from={config.init_from!r} has no {pretrained}; set data.tokenizer to the "
                         "tokenizer that model was pretrained with")
    if given and pretrained and not _same(given, pretrained):
        raise ValueError(f"data.tokenizer={given!r} is not the tokenizer the init_from model was "
                         f"pretrained with ({pretrained}); set data.tokenizer=''")
    return given or pretrained or scratch()


def finetune_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                       scratch: Callable[[], str]) -> tuple[ml_collections.ConfigDict, Tokenizer]:
    """(config with data.tokenizer set to finetune_file's choice, the workdir's tokenizer). A resumed
    run keeps the copy in its own workdir."""
    if not os.path.exists(os.path.join(workdir, WORKDIR_FILE)):
        path = finetune_file(config, scratch)
        if path != config.data.tokenizer:
            config = config.copy_and_resolve_references()
            with config.unlocked():
                config.data.tokenizer = path
    return config, workdir_tokenizer(config, workdir)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a sentencepiece .model file, or a Hugging Face WordPiece folder (BERT models)."""
    if os.path.isdir(path):
        from fmjax.interop.wordpiece import WordPieceTokenizer
        return WordPieceTokenizer(path)
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer(path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path} is not a sentencepiece .model file ({e})") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for tokenizer settings a user can get wrong (loads, never trains)."""
    d = config.data
    if d.tokenizer:
        _load_configured(config)
        return
    if d.tokenizer_type not in MODEL_TYPES:
        raise ValueError(f"data.tokenizer_type={d.tokenizer_type!r} is unknown; valid types are "
                         f"{sorted(MODEL_TYPES)}")
    if config.model.vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is too small to train a "
                         f"tokenizer; it needs at least {MIN_VOCAB_SIZE} (9 special ids, 256 "
                         "byte-fallback pieces) plus one per distinct character of the corpus")


def _load_configured(config: ml_collections.ConfigDict) -> Tokenizer:
    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except ValueError as e:
        raise ValueError(f"data.tokenizer: {e}") from None
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"data.tokenizer={config.data.tokenizer!r} has {tokenizer.vocab_size} "
                         f"pieces but model.vocab_size={config.model.vocab_size}; make them equal")
    return tokenizer


def _sentences(source: sources.TextSource) -> Iterator[str]:
    """Train-split text in pieces sentencepiece accepts, cut at line breaks, up to the budget."""
    budget = _MAX_TRAIN_CHARS
    for i in range(len(source)):
        text = source[i]["text"]
        chunk = ""
        for line in text.splitlines(keepends=True):
            while len(line) > _MAX_SENTENCE_CHARS:  # A line too long to keep whole.
                yield line[:_MAX_SENTENCE_CHARS]
                line = line[_MAX_SENTENCE_CHARS:]
            if len(chunk) + len(line) > _MAX_SENTENCE_CHARS:
                yield chunk
                chunk = ""
            chunk += line
        if chunk:
            yield chunk
        budget -= len(text)
        if budget <= 0:
            return


def _train(config: ml_collections.ConfigDict, path: pathlib.Path) -> None:
    """Trains on the train split and writes `path` atomically (readers never see half a file)."""
    train_file(sources.load_split(config, config.data.train_split), config.model.vocab_size,
               config.data.tokenizer_type, path)


def train_file(source: sources.TextSource, vocab_size: int, kind: str, path: pathlib.Path) -> None:
    """Trains a `kind` (bpe | unigram) tokenizer of vocab_size pieces on `source`, into `path`."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_sentences(source), model_writer=model,
                                       vocab_size=vocab_size, model_type=MODEL_TYPES[kind],
                                       **_TRAINER_ARGS)
    except RuntimeError as e:
        # Sentencepiece states the valid range itself ("Please set it to a value <= 4736").
        reason = re.sub(r"^.*?\] ", "", str(e))
        raise ValueError(f"cannot train a {kind} tokenizer with model.vocab_size={vocab_size} on "
                         f"{source.name}: {reason} (change model.vocab_size or "
                         "data.tokenizer_type, or use a larger corpus)") from None
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)


def tokenizer_path(config: ml_collections.ConfigDict) -> pathlib.Path:
    """Where the tokenizer trained for this config's corpus, size and type is cached."""
    key = json.dumps([sources.dataset_id(config), config.model.vocab_size,
                      config.data.tokenizer_type, _TRAINER_ARGS, _MAX_SENTENCE_CHARS,
                      _MAX_TRAIN_CHARS], sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    return sources.cache_dir(config) / "tokenizers" / f"{name}.model"


def get_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer data.tokenizer names, else one trained on the train split (cached)."""
    validate(config)
    if config.data.tokenizer:
        return _load_configured(config)
    path = tokenizer_path(config)
    if not path.exists():
        with sources.locked(path.with_suffix(".lock")):
            if not path.exists():  # Another process may have trained it while we waited.
                _train(config, path)
    return Tokenizer(path)
