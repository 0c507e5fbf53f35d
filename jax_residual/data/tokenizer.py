"""The tokenizer of a run or of a prepared corpus (jax_residual.prepare).

bytes (the default): token = UTF-8 byte, vocabulary 256, documents separated by EOS (0).
bpe:N: a byte-level BPE of N tokens (`train_bpe`), trained by prepare on a sample of the TRAIN
    split only and saved as tokenizer.json in the prepared folder (and in the run folder).
A tokenizer.json file, or a HF folder holding one: that tokenizer (documents separated by the
    folder's config.json `eos_token_id`, or a file's own end-of-text special token).
--init-from-hf FOLDER without --tokenizer: the folder's tokenizer.json if it has one, else bytes.
An exported HF folder carries bytes as `byte_tokenizer()`, a tokenizer.json that encodes alike.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import re

VOCAB_SIZE = 256  # the byte tokenizer's
EOS = 0  # the byte tokenizer's document separator (text holds no NUL)


BYTES = "bytes"
EOS_TOKEN = "<|endoftext|>"  # id 0 of a trained BPE, as EOS is byte 0
TOKENIZER_FILE = "tokenizer.json"
_BPE_SPEC = re.compile(r"bpe:(\d+)")
MIN_BPE_VOCAB = 257  # the 256 byte symbols and EOS
END_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")  # a tokenizer.json's document separator


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


BYTE_TOKENIZER = RunTokenizer(BYTES, VOCAB_SIZE, EOS)


def parse_spec(text: str) -> str:
    """'bytes', 'bpe:N' (N >= 257) or an existing tokenizer.json / folder, else ValueError saying
    what is allowed."""
    match = _BPE_SPEC.fullmatch(text)
    if text != BYTES and not (match and int(match[1]) >= MIN_BPE_VOCAB) and not pathlib.Path(text).exists():
        raise ValueError(f"bad tokenizer {text!r}: expected 'bytes', 'bpe:N' with N >= {MIN_BPE_VOCAB}, "
                         "or a tokenizer.json (or a HF folder holding one)")
    return text


def spec_vocab_size(spec: str | None) -> int:
    """The model vocabulary a tokenizer spec gives: 256 for bytes (and None), N for bpe:N, the
    tokenizer's own size for a path."""
    if spec and spec.startswith("bpe:"):
        return int(spec.split(":")[1])
    return VOCAB_SIZE if spec in (None, BYTES) else path_tokenizer(spec).vocab_size


def train_bpe(documents, vocab_size: int, progress: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` tokens (EOS_TOKEN = id 0, the 256
    byte symbols, then merges) learnt from the `documents` (an iterable of str) and nothing else;
    `progress`: the tokenizers library's own progress bars on stderr."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def bpe_tokenizer(tokenizer, spec: str) -> RunTokenizer:
    """A trained (or saved) bpe:N as a RunTokenizer; ValueError if it is not one."""
    vocab_size = spec_vocab_size(spec)
    if tokenizer.get_vocab_size() > vocab_size or tokenizer.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"not a {spec} tokenizer ({tokenizer.get_vocab_size()} tokens, "
                         f"{EOS_TOKEN} {'missing' if tokenizer.token_to_id(EOS_TOKEN) is None else 'present'})")
    return RunTokenizer(spec, vocab_size, tokenizer.token_to_id(EOS_TOKEN), tokenizer)


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
    vocab = {symbols[b]: b for b in range(1, VOCAB_SIZE)} | {chr(EOS): EOS}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(chr(EOS), special=True, normalized=False)])
    return tokenizer


def read_tokenizer(path: pathlib.Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json; ValueError naming the file if unreadable."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own Exception subclass for bad files
        raise ValueError(f"{path} is not a readable tokenizer.json ({str(error).splitlines()[0]})") from None


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


def file_tokenizer(path: pathlib.Path) -> RunTokenizer:
    """A tokenizer.json file alone: documents are separated by its first end-of-text special
    token (END_TOKENS); ValueError if it has none."""
    tokenizer = read_tokenizer(path)
    eos = next((tokenizer.token_to_id(t) for t in END_TOKENS if tokenizer.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError(f"{path} has none of the end-of-text tokens {', '.join(END_TOKENS)} to separate documents "
                         "with; pass the HF folder holding it (its config.json names eos_token_id)")
    return RunTokenizer("hf", tokenizer.get_vocab_size(), eos, tokenizer)


def path_tokenizer(spec: str) -> RunTokenizer:
    """The tokenizer a path spec names: a HF folder (`hf_tokenizer`) or a tokenizer.json file."""
    path = pathlib.Path(spec)
    found = hf_tokenizer(path) if path.is_dir() else file_tokenizer(path) if path.is_file() else None
    if found is None:
        raise ValueError(f"tokenizer {spec}: no tokenizer.json there")
    return found


def prepare_spec(spec: str | None, init_from_hf: str | None) -> str:
    """What a run's raw data is prepared with: --tokenizer, else the --init-from-hf folder when
    it holds a tokenizer.json, else bytes."""
    if spec is None and init_from_hf and (pathlib.Path(init_from_hf) / TOKENIZER_FILE).is_file():
        return init_from_hf
    return spec or BYTES


def made_with(tokenizer: RunTokenizer, spec: str) -> bool:
    """Whether `tokenizer` is what `spec` names: the same name for bytes and bpe:N, the same
    tokenizer for a path."""
    if spec == BYTES or spec.startswith("bpe:"):
        return tokenizer.name == spec
    return tokenizer.fingerprint == path_tokenizer(spec).fingerprint


def bits_per_byte(nats_per_token: float, tokens_per_byte: float) -> float:
    """Validation loss in bits per byte of text, comparable across tokenizers."""
    return nats_per_token * tokens_per_byte / math.log(2)
