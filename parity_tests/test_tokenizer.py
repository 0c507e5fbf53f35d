"""Tokenizers of a run (jax_residual.train.tokenizer): byte-level BPE trained on the train split
only, the corpus encoded into token streams, the tokenizer a resumed run, a sweep and an
--init-from-hf run use, and bits per byte. In-process; nothing compiles (plans only)."""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import pytest

from jax_residual.convert import save_hf_checkpoint
from jax_residual.train import data, tokenizer
from jax_residual.train.loop import plan
from jax_residual.train.run_config import RunConfig, model_config
from jax_residual.train.sweep import plan_sweep

RARE = "zqxv"  # appears only in the held-out file
RUN = RunConfig(method="standard", preset="tiny", steps=4, batch_size=8, seq_len=32, warmup_steps=1)
BPE = "bpe:300"


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory) -> pathlib.Path:
    """20 text files; the one validation_names holds out is full of RARE, the others never contain it."""
    folder = tmp_path_factory.mktemp("text")
    names = [f"doc{i}.txt" for i in range(20)]
    held_out = data.validation_names(names, data.VALIDATION_FRACTION)
    for i, name in enumerate(names):
        text = f"{RARE} " * 400 if name in held_out else f"the model reads document number {i} again " * 40
        (folder / name).write_text(text)
    return folder


def one_device_plan(run: RunConfig):
    return plan(run, jax.devices()[:1])


def test_bpe_learns_only_from_the_train_split(corpus_folder):
    corpus = data.load_corpus(str(corpus_folder))
    assert RARE.encode() in bytes(corpus.validation) and RARE.encode() not in bytes(corpus.train)
    trained = tokenizer.train_bpe(corpus.train, 300)
    assert trained.token_to_id(RARE) is None and trained.token_to_id("Ġdocument") is not None
    assert trained.token_to_id(tokenizer.EOS_TOKEN) == 0 and trained.get_vocab_size() <= 300
    # the same function given the validation text does learn it: the check above can fail
    assert tokenizer.train_bpe(corpus.validation, 300).token_to_id(RARE) is not None


def test_encoded_stream_keeps_documents_and_separators(corpus_folder):
    corpus = data.load_corpus(str(corpus_folder))
    bpe = tokenizer.shared_bpe(str(corpus_folder), 300)
    ids = tokenizer.encode_stream(bpe, corpus.train)
    assert ids.dtype == np.uint16 and ids.max() < 300
    separators = np.flatnonzero(ids == bpe.eos_id)
    assert len(separators) == bytes(corpus.train).count(bytes([data.EOS])) == 19
    first_document = bytes(corpus.train).split(bytes([data.EOS]))[0].decode()
    assert bpe.tokenizer.decode(ids[:separators[0]].tolist()) == first_document
    assert len(ids) < len(corpus.train) / 2  # merges learnt from the repeated words
    assert tokenizer.encode_stream(tokenizer.BYTE_TOKENIZER, corpus.train) is corpus.train


def test_bits_per_byte():
    assert tokenizer.bits_per_byte(2.0, 1.0) == pytest.approx(2.0 / math.log(2), rel=1e-15)
    assert tokenizer.bits_per_byte(2.0, 0.25) == pytest.approx(0.5 / math.log(2), rel=1e-15)


def test_bpe_run_plans_its_vocabulary_and_resumes_with_its_saved_tokenizer(corpus_folder, tmp_path):
    run = RUN.replace(data=str(corpus_folder), tokenizer=BPE, output_dir=str(tmp_path))
    fresh = one_device_plan(run)
    assert fresh.cfg.vocab_size == 300 == model_config(run).vocab_size and fresh.tokenizer.name == BPE
    text = data.load_corpus(str(corpus_folder))
    assert fresh.corpus.validation_tokens_per_byte == len(fresh.corpus.validation) / len(text.validation)
    assert len(fresh.corpus.train) < len(text.train) / 2
    # a run folder holding another bpe:300 (learnt from other text) is resumed with that one
    other = tokenizer.train_bpe(np.frombuffer(b"completely different words here " * 50, np.uint8), 300)
    other.save(str(tmp_path / tokenizer.TOKENIZER_FILE))
    resumed = one_device_plan(run)
    assert resumed.tokenizer.fingerprint != fresh.tokenizer.fingerprint
    assert resumed.tokenizer.tokenizer.to_str() == other.to_str()
    np.testing.assert_array_equal(resumed.corpus.train, tokenizer.encode_stream(resumed.tokenizer, text.train))


def test_a_sweep_trains_one_tokenizer(corpus_folder, tmp_path):
    run = RUN.replace(data=str(corpus_folder), tokenizer=BPE, output_dir=str(tmp_path))
    plans = plan_sweep(run, ("standard", "method5.2"), 2)
    assert len({id(p.tokenizer) for p in plans}) == 1 and len({id(p.corpus) for p in plans}) == 1


def test_init_from_hf_tokenizes_with_the_folders_tokenizer(corpus_folder, tmp_path):
    from flax import linen as nn

    from jax_residual import LlamaForCausalLM

    cfg = model_config(RUN.replace(tokenizer=BPE))
    params = nn.unbox(jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), np.zeros((1, 4), np.int32)))["params"]
    folder = tmp_path / "hf"
    save_hf_checkpoint(params, cfg, folder, eos_token_id=0)
    bpe = tokenizer.shared_bpe(str(corpus_folder), 300)
    bpe.tokenizer.save(str(folder / tokenizer.TOKENIZER_FILE))
    p = one_device_plan(RUN.replace(data=str(corpus_folder), init_from_hf=str(folder), output_dir=str(tmp_path / "run")))
    assert p.tokenizer.name == "hf" and p.tokenizer.eos_id == 0 and p.cfg.vocab_size == 300
    np.testing.assert_array_equal(p.corpus.train, tokenizer.encode_stream(bpe, data.load_corpus(str(corpus_folder)).train))


@pytest.mark.parametrize("spec", ["bpe:100", "bpe", "wordpiece:300", "bpe:3x"])
def test_bad_tokenizer_specs_say_what_is_allowed(spec):
    with pytest.raises(ValueError, match=r"expected 'bytes' or 'bpe:N' with N >= 257"):
        tokenizer.parse_spec(spec)
