"""Tokenizers of a run (jax_residual.train.tokenizer) as prepare makes them: byte-level BPE trained
on the train split only, the tokenizer a resumed run, a sweep and an --init-from-hf run use, and
bits per byte. In-process; nothing compiles (plans only)."""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import pytest

from jax_residual import prepare
from jax_residual.convert import save_hf_checkpoint
from jax_residual.data import tokenizer
from jax_residual.train import corpus as run_corpus
from jax_residual.train.loop import plan
from jax_residual.train.run_config import RunConfig, model_config
from jax_residual.train.sweep import plan_sweep

RARE = "zqxv"  # appears only in the validation documents
RUN = RunConfig(method="standard", preset="tiny", steps=4, batch_size=8, seq_len=32, warmup_steps=1)
BPE = "bpe:300"


def split_of(text: str) -> str:
    return prepare.split_of(text.encode(), prepare.VALIDATION_FRACTION, prepare.TEST_FRACTION)


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory) -> pathlib.Path:
    """Text files: those whose text (full of RARE) the hash puts in validation, and train ones
    that never contain it."""
    folder = tmp_path_factory.mktemp("text")
    rare = [t for t in (f"{RARE} {i} " * 400 for i in range(200)) if split_of(t) == "validation"][:2]
    common = [t for t in (f"the model reads document number {i} again " * 40 for i in range(40))
              if split_of(t) == "train"]
    for i, text in enumerate(rare + common):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def one_device_plan(run: RunConfig):
    return plan(run, jax.devices()[:1])


def test_bpe_learns_only_from_the_train_split(corpus_folder, tmp_path):
    p = one_device_plan(RUN.replace(data=str(corpus_folder), tokenizer=BPE, output_dir=str(tmp_path)))
    trained = p.tokenizer.tokenizer
    assert trained.token_to_id(RARE) is None and trained.token_to_id("Ġdocument") is not None
    assert trained.token_to_id(tokenizer.EOS_TOKEN) == 0 and trained.get_vocab_size() <= 300
    # the same function given the validation text does learn it: the check above can fail
    texts = [path.read_text() for path in sorted(corpus_folder.iterdir())]
    assert tokenizer.train_bpe([t for t in texts if split_of(t) == "validation"], 300).token_to_id(RARE) is not None


def test_bits_per_byte():
    assert tokenizer.bits_per_byte(2.0, 1.0) == pytest.approx(2.0 / math.log(2), rel=1e-15)
    assert tokenizer.bits_per_byte(2.0, 0.25) == pytest.approx(0.5 / math.log(2), rel=1e-15)


def test_bpe_run_plans_its_vocabulary_and_resumes_with_its_prepared_tokenizer(corpus_folder, tmp_path, monkeypatch):
    run = RUN.replace(data=str(corpus_folder), tokenizer=BPE, output_dir=str(tmp_path))
    monkeypatch.setattr(run_corpus, "_PREPARED", {})  # a new process: not the corpus an earlier test prepared
    fresh = one_device_plan(run)
    assert fresh.cfg.vocab_size == 300 == model_config(run).vocab_size and fresh.tokenizer.name == BPE
    assert fresh.corpus.folder == (tmp_path / run_corpus.DATA_FOLDER).absolute()
    meta = fresh.corpus.meta["splits"]["validation"]
    # the validation text is RARE, which the BPE never saw: about a token per byte
    assert fresh.corpus.validation_tokens_per_byte == meta["tokens"] / meta["bytes"]
    assert len(fresh.corpus.train) < 0.5 * fresh.corpus.meta["splits"]["train"]["bytes"]
    # a new process (empty caches) resuming the run reads data/ back and trains nothing
    monkeypatch.setattr(run_corpus, "_PREPARED", {})
    monkeypatch.setattr(run_corpus, "_OPENED", {})
    monkeypatch.setattr(tokenizer, "train_bpe", lambda *_, **__: pytest.fail("retrained the tokenizer"))
    resumed = one_device_plan(run)
    assert resumed.tokenizer.fingerprint == fresh.tokenizer.fingerprint and resumed.corpus is not fresh.corpus
    assert resumed.corpus.meta == fresh.corpus.meta


def test_a_sweep_prepares_one_corpus_and_tokenizer(corpus_folder, tmp_path):
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
    bpe = tokenizer.train_bpe(["some other words to learn from " * 20], 300)
    bpe.save(str(folder / tokenizer.TOKENIZER_FILE))
    p = one_device_plan(RUN.replace(data=str(corpus_folder), init_from_hf=str(folder), output_dir=str(tmp_path / "run")))
    assert p.tokenizer.name == "hf" and p.tokenizer.eos_id == 0 and p.cfg.vocab_size == 300
    assert p.tokenizer.fingerprint == tokenizer.hf_tokenizer(folder).fingerprint
    first = (corpus_folder / "doc02.txt").read_text()  # the first train document
    np.testing.assert_array_equal(p.corpus.train.read(0, len(bpe.encode(first).ids)), bpe.encode(first).ids)


@pytest.mark.parametrize("spec", ["bpe:100", "bpe", "wordpiece:300", "bpe:3x"])
def test_bad_tokenizer_specs_say_what_is_allowed(spec):
    with pytest.raises(ValueError, match=r"expected 'bytes', 'bpe:N' with N >= 257, or a tokenizer.json"):
        tokenizer.parse_spec(spec)
