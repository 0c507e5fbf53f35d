"""The tokenizer of a run and the corpus encoded with it.

--tokenizer bytes (the default): token = byte, vocabulary 256, documents separated by EOS (0).
--tokenizer bpe:N: a byte-level BPE of N tokens (`train_bpe`), trained on the TRAIN split only;
    the run saves it as tokenizer.json and a resumed run reads it back from there.
--init-from-hf FOLDER without --tokenizer: the folder's tokenizer.json if it has one (documents
    separated by its config.json `eos_token_id`), else bytes.
An exported HF folder carries bytes as `byte_tokenizer()`, a tokenizer.json that encodes alike.

The corpus is encoded once per (data, tokenizer) into token-id streams (`token_streams`) and
then windowed exactly as bytes are (data.train_batch), so batch k stays a pure function of
(seed, k). Documents are encoded one by one and joined with the EOS id where the byte stream
has its EOS bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import re

import numpy as np

from jax_residual.train import data

BYTES = "bytes"
EOS_TOKEN = "<|endoftext|>"  # id 0 of a trained BPE, as EOS is byte 0
TOKENIZER_FILE = "tokenizer.json"
_BPE_SPEC = re.compile(r"bpe:(\d+)")
MIN_BPE_VOCAB = 257  # the 256 byte symbols and EOS


@dataclasses.dataclass(frozen=True, eq=False)
class RunTokenizer:
    """name: 'bytes', 'bpe:N' or 'hf'; vocab_size: ids are < it; eos_id: the document separator;
    tokenizer: a `tokenizers.Tokenizer` (None for bytes)."""

    name: str
    vocab_size: int
    eos_id: int
    tokenizer: object | None = None

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's JSON (of the name for bytes): equal tokenizers encode alike."""
        text = self.name if self.tokenizer is None else self.tokenizer.to_str()
        return hashlib.sha256(text.encode()).hexdigest()


BYTE_TOKENIZER = RunTokenizer(BYTES, data.VOCAB_SIZE, data.EOS)


def parse_spec(text: str) -> str:
    """'bytes' or 'bpe:N' (N >= 257), else ValueError saying what is allowed."""
    match = _BPE_SPEC.fullmatch(text)
    if text != BYTES and not (match and int(match[1]) >= MIN_BPE_VOCAB):
        raise ValueError(f"bad tokenizer {text!r}: expected 'bytes' or 'bpe:N' with N >= {MIN_BPE_VOCAB}")
    return text


def spec_vocab_size(spec: str | None) -> int:
    """The model vocabulary a tokenizer spec gives: 256 for bytes (and None), N for bpe:N."""
    return int(spec.split(":")[1]) if spec and spec.startswith("bpe:") else data.VOCAB_SIZE


def documents(stream: np.ndarray) -> list[str]:
    """A uint8 stream cut at its EOS bytes: the pieces between them (the last may be empty),
    as text (invalid UTF-8 becomes U+FFFD)."""
    return [piece.decode("utf-8", errors="replace") for piece in bytes(stream).split(bytes([data.EOS]))]


def train_bpe(train_stream: np.ndarray, vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` tokens (EOS_TOKEN = id 0, the 256
    byte symbols, then merges) learnt from the documents of `train_stream` and nothing else."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents(train_stream), trainer)
    return tokenizer


@functools.lru_cache(maxsize=4)
def shared_bpe(data_arg: str | None, vocab_size: int) -> RunTokenizer:
    """bpe:N trained on the train split of --data (cached: the runs of a sweep share one)."""
    tokenizer = train_bpe(data.load_corpus(data_arg).train, vocab_size)
    return RunTokenizer(f"bpe:{vocab_size}", vocab_size, tokenizer.token_to_id(EOS_TOKEN), tokenizer)


def byte_symbols() -> dict[int, str]:
    """byte -> the printable character that stands for it in a byte-level BPE (GPT-2's table, as
    tokenizers' ByteLevel pre-tokenizer maps bytes): printable Latin-1 bytes stand for
    themselves, the other 68 for U+0100 onwards, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def byte_tokenizer():
    """The bytes tokenizer as a `tokenizers.Tokenizer` (for HF folders): the ids of a text are its
    UTF-8 bytes. Id 0 (EOS) is the special token "\\x00" itself, so the NUL byte (which documents
    never hold) encodes as the separator and decodes to it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    symbols = byte_symbols()
    vocab = {symbols[b]: b for b in range(1, data.VOCAB_SIZE)} | {chr(data.EOS): data.EOS}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(chr(data.EOS), special=True, normalized=False)])
    return tokenizer


def read_tokenizer(path: pathlib.Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json; ValueError naming the file if unreadable."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own Exception subclass for bad files
        raise ValueError(f"{path} is not a readable tokenizer.json ({str(error).splitlines()[0]})") from None


def saved_bpe(path: pathlib.Path, spec: str) -> RunTokenizer:
    """The bpe:N a run saved at `path` (a resumed run must encode with exactly it)."""
    tokenizer = read_tokenizer(path)
    vocab_size = spec_vocab_size(spec)
    if tokenizer.get_vocab_size() > vocab_size or tokenizer.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"{path} is not a {spec} tokenizer ({tokenizer.get_vocab_size()} tokens, "
                         f"{EOS_TOKEN} {'missing' if tokenizer.token_to_id(EOS_TOKEN) is None else 'present'})")
    return RunTokenizer(spec, vocab_size, tokenizer.token_to_id(EOS_TOKEN), tokenizer)


def hf_tokenizer(folder: pathlib.Path) -> RunTokenizer | None:
    """The tokenizer.json of a HF checkpoint folder (None if it has none); documents are separated
    by config.json's eos_token_id."""
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    tokenizer = read_tokenizer(folder / TOKENIZER_FILE)
    try:
        eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        eos = None  # load_hf_checkpoint reports the unreadable config.json
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int):
        raise ValueError(f"{folder}/config.json has no integer eos_token_id to separate documents with "
                         f"its tokenizer.json (got {eos!r})")
    return RunTokenizer("hf", tokenizer.get_vocab_size(), eos, tokenizer)


def resolve(spec: str | None, data_arg: str | None, init_from_hf: str | None, run_folder: pathlib.Path) -> RunTokenizer:
    """The tokenizer of a run: its saved tokenizer.json when resuming a bpe run, a new (shared)
    bpe:N, the --init-from-hf folder's own (spec None), or bytes."""
    if spec is None and init_from_hf:
        found = hf_tokenizer(pathlib.Path(init_from_hf))
        if found is not None:
            return found
    if spec and spec.startswith("bpe:"):
        saved = run_folder / TOKENIZER_FILE
        return saved_bpe(saved, spec) if saved.is_file() else shared_bpe(data_arg, spec_vocab_size(spec))
    return BYTE_TOKENIZER


def encode_stream(tokenizer: RunTokenizer, stream: np.ndarray) -> np.ndarray:
    """uint8 byte stream -> token ids (uint16, or int32 past 65536 tokens): each document encoded
    on its own, EOS ids where the stream has EOS bytes. Bytes: the stream itself."""
    if tokenizer.tokenizer is None:
        return stream
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    pieces = [np.asarray(piece.ids, dtype)
              for piece in tokenizer.tokenizer.encode_batch(documents(stream), add_special_tokens=False)]
    eos = np.asarray([tokenizer.eos_id], dtype)
    return np.concatenate([part for i, piece in enumerate(pieces) for part in ((eos, piece) if i else (piece,))])


_STREAMS: dict[tuple, data.Corpus] = {}


def token_streams(corpus: data.Corpus, tokenizer: RunTokenizer) -> data.Corpus:
    """The corpus as token ids, `validation_tokens_per_byte` set; encoded once per (corpus,
    tokenizer) in this process."""
    key = (corpus.description, len(corpus.train), len(corpus.validation), tokenizer.fingerprint)
    if key not in _STREAMS:
        train, validation = encode_stream(tokenizer, corpus.train), encode_stream(tokenizer, corpus.validation)
        _STREAMS[key] = data.Corpus(train, validation, f"{corpus.description}; tokenizer {tokenizer.name}",
                                    len(validation) / len(corpus.validation))
    return _STREAMS[key]


def bits_per_byte(nats_per_token: float, tokens_per_byte: float) -> float:
    """Validation loss in bits per byte of text, comparable across tokenizers."""
    return nats_per_token * tokens_per_byte / math.log(2)
