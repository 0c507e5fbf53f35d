"""The data path (jax_residual/data, jax_residual.prepare, train/data.py): every source format
prepares to the same token shards, the splits by document hash, the shards and their checks,
windows and batches, bad input. On tiny corpora the tests write; in-process but for the
command lines (one line, exit status 2)."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from jax_residual import prepare as prep
from jax_residual.data import shards, sources
from jax_residual.train import corpus as run_corpus, data, step
from jax_residual.train.loop import plan
from jax_residual.train.run_config import RunConfig
from llama_testlib import in_process

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # datasets reads only the local folders the tests write
WORDS = ("the", "model", "reads", "alpha", "beta", "gamma", "über", "日本", "x", "y", "=", "(", ")")
SHARD = 257  # tiny shards: windows cross their boundaries
RUN = RunConfig(method="standard", preset="tiny", steps=4, batch_size=8, seq_len=32, warmup_steps=1,
                eval_batches=2)


def documents(count: int, seed: int) -> list[str]:
    """`count` distinct documents of 20-80 random words on a few lines (no blank line, no NUL)."""
    rng = np.random.default_rng(seed)
    return [f"doc {seed}-{i}\n" + "\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(rng.integers(2, 8)))
            for i in range(count)]


def settings(source: pathlib.Path, tokenizer: str = "bytes", **changes) -> prep.Settings:
    return prep.Settings(prep.source_name(str(source)), tokenizer, shard_tokens=SHARD, **changes)


def prepared(source: pathlib.Path, out: pathlib.Path, tokenizer: str = "bytes", workers: int = 1,
             **changes) -> shards.PreparedCorpus:
    prep.prepare(str(source), out, settings(source, tokenizer, **changes), workers, log=lambda _: None)
    return shards.open_prepared(out)


def text_folder(folder: pathlib.Path, docs: list[str]) -> pathlib.Path:
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return folder


def stream(tokens: shards.ShardedTokens) -> np.ndarray:
    return tokens.read(0, len(tokens))


def split_documents(corpus: shards.PreparedCorpus, split: str) -> list[str]:
    """A bytes corpus's split cut back into its documents."""
    return [d.decode() for d in bytes(stream(corpus.splits[split]).astype(np.uint8)).split(b"\0")[:-1]]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return documents(60, seed=0)


@pytest.fixture(scope="module")
def folder_corpus(docs, tmp_path_factory) -> shards.PreparedCorpus:
    root = tmp_path_factory.mktemp("folder")
    return prepared(text_folder(root / "text", docs), root / "out")


# ----------------------------------------------------------------------------- sources


def write_jsonl(path: pathlib.Path, docs: list[str], field: str = "text"):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs))


def write_parquet(path: pathlib.Path, docs: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)


def write_datasets(path: pathlib.Path, docs: list[str], as_dict: bool):
    import datasets

    dataset = datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    if as_dict:  # every split, in order
        dataset = datasets.DatasetDict({"train": dataset.select(range(40)), "test": dataset.select(range(40, len(docs)))})
    dataset.save_to_disk(str(path))


def write_source(kind: str, root: pathlib.Path, docs: list[str]) -> pathlib.Path:
    """The documents as a source of `kind`."""
    if kind == "txt":
        (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
        return root / "corpus.txt"
    if kind in ("jsonl", "jsonl.gz"):
        write_jsonl(root / f"corpus.{kind}", docs)
        return root / f"corpus.{kind}"
    if kind == "parquet":
        write_parquet(root / "corpus.parquet", docs)
        return root / "corpus.parquet"
    if kind == "folder of jsonl and parquet":
        (root / "mixed").mkdir()
        write_jsonl(root / "mixed/a.jsonl", docs[:25])
        write_parquet(root / "mixed/b.parquet", docs[25:])
        return root / "mixed"
    write_datasets(root / "hf", docs, as_dict=kind == "datasets dict")
    return root / "hf"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "parquet", "datasets", "datasets dict",
                                  "folder of jsonl and parquet"])
def test_each_source_format_gives_the_text_folder_stream(kind, docs, folder_corpus, tmp_path):
    corpus = prepared(write_source(kind, tmp_path, docs), tmp_path / "out")
    for split in shards.SPLITS:
        np.testing.assert_array_equal(stream(corpus.splits[split]), stream(folder_corpus.splits[split]), err_msg=split)
        assert corpus.meta["splits"][split]["documents"] == folder_corpus.meta["splits"][split]["documents"]


def test_a_bpe_corpus_decodes_to_its_documents(docs, tmp_path):
    """bpe:300 learnt from the train split: every split decodes back to its documents, each
    followed by the separator; validation text per token is less than a byte."""
    corpus = prepared(text_folder(tmp_path / "text", docs), tmp_path / "out", "bpe:300")
    tok = prep.prepared_tokenizer(corpus)
    assert corpus.meta["dtype"] == "uint16" and tok.eos_id == 0 and tok.vocab_size == 300
    for split in shards.SPLITS:
        ids = stream(corpus.splits[split])
        assert ids[-1] == tok.eos_id and ids.max() < 300
        pieces = np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1)[:-1]
        decoded = [tok.tokenizer.decode(p[:-1].tolist()) for p in pieces]
        assert decoded and all(prep.split_of(d.encode(), 0.05, 0.05) == split for d in decoded)
        assert set(decoded) <= set(docs)
    assert corpus.validation_tokens_per_byte < 0.9


@pytest.mark.slow
def test_worker_processes_write_the_same_shards(docs, folder_corpus, tmp_path):
    corpus = prepared(folder_corpus.meta["settings"]["source"], tmp_path / "out", workers=2)
    assert corpus.meta["splits"] == folder_corpus.meta["splits"]


# ----------------------------------------------------------------------------- splits


def test_splits_are_disjoint_and_stable_when_documents_are_added(docs, folder_corpus, tmp_path):
    by_split = {split: split_documents(folder_corpus, split) for split in shards.SPLITS}
    assert sorted(d for ds in by_split.values() for d in ds) == sorted(docs)  # each document once
    assert all(by_split.values())  # 60 documents: every split has some
    grown = docs[:30] + documents(100, seed=1) + docs[30:] + [docs[5]]  # new ones among them, and a duplicate
    corpus = prepared(text_folder(tmp_path / "grown", grown), tmp_path / "out")
    after = {d: split for split in shards.SPLITS for d in split_documents(corpus, split)}
    assert all(after[d] == split for split, ds in by_split.items() for d in ds)
    assert split_documents(corpus, after[docs[5]]).count(docs[5]) == 2  # a duplicate never straddles splits


# ----------------------------------------------------------------------------- windows and batches


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[np.ndarray, shards.ShardedTokens]:
    """(ids, the same ids written as SHARD-long shards)."""
    folder = tmp_path_factory.mktemp("shards")
    ids = np.random.default_rng(0).integers(0, 60_000, 5000).astype(np.uint16)
    writer = shards.ShardWriter(folder, "train", np.dtype(np.uint16), SHARD)
    for piece in np.array_split(ids, 13):
        writer.add(piece)
    written = writer.close()
    assert [s["tokens"] for s in written] == [SHARD] * (5000 // SHARD) + [5000 % SHARD]
    return ids, shards.ShardedTokens([folder / s["file"] for s in written], [s["tokens"] for s in written],
                                     np.dtype(np.uint16))


def test_windows_cross_shard_boundaries(sharded):
    ids, tokens = sharded
    starts = np.array([0, SHARD - 1, SHARD - 40, 3 * SHARD, len(ids) - 600, len(ids) - 1])
    windows = tokens.windows(starts[:-1], 600)
    np.testing.assert_array_equal(windows, ids[starts[:-1, None] + np.arange(600)].astype(np.int32))
    assert tokens.read(len(ids) - 1, 1)[0] == ids[-1]
    with pytest.raises(IndexError):
        tokens.read(len(ids) - 1, 2)


def test_batches_equal_the_old_pipeline_on_the_same_stream(sharded):
    """The old in-memory pipeline's batch k (windows at default_rng([seed, k]).integers(0, n - s, b)),
    written out: the sharded stream gives the same batches."""
    ids, tokens = sharded
    for seed, index in ((0, 0), (3, 7), (3, 8)):
        starts = np.random.default_rng([seed, index]).integers(0, len(ids) - 32, 8)
        old = ids[starts[:, None] + np.arange(33)].astype(np.int32).reshape(2, 4, 33)
        np.testing.assert_array_equal(data.train_batch(tokens, seed, index, 8, 32, 2), old)


def test_batch_k_is_a_pure_function_of_seed_and_k_and_rows_partition_it(sharded):
    _, tokens = sharded
    first = data.train_batch(tokens, seed=3, index=7, batch_size=8, seq_len=16, grad_accum=2)
    assert first.shape == (2, 4, 17) and first.dtype == np.int32
    np.testing.assert_array_equal(first, data.train_batch(tokens, 3, 7, 8, 16, 2))
    assert not np.array_equal(first, data.train_batch(tokens, 3, 8, 8, 16, 2))
    assert not np.array_equal(first, data.train_batch(tokens, 4, 7, 8, 16, 2))
    # accumulation only reshapes the batch: the same windows in the same order
    np.testing.assert_array_equal(first.reshape(8, 17), data.train_batch(tokens, 3, 7, 8, 16, 1)[0])
    # two processes' rows: disjoint, and together the batch
    halves = [data.train_batch(tokens, 3, 7, 8, 16, 2, rows) for rows in (slice(0, 2), slice(2, 4))]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), first)


def test_grain_pipeline_streams_batches_start_to_stop(sharded):
    """What the loop reads: batch k of the grain pipeline is train_batch k, also when the
    pipeline starts at k (a resumed run)."""
    _, tokens = sharded
    sharding = step.stacked_batch_sharding(jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                                                         devices=jax.devices()[:1]))
    streamed = [np.asarray(b) for b in data.train_batches(tokens, 5, 0, 6, 8, 16, 2, sharding)]
    resumed = [np.asarray(b) for b in data.train_batches(tokens, 5, 4, 6, 8, 16, 2, sharding)]
    assert len(streamed) == 6 and len(resumed) == 2
    for index, batch in enumerate(streamed):
        np.testing.assert_array_equal(batch, data.train_batch(tokens, 5, index, 8, 16, 2))
    np.testing.assert_array_equal(np.stack(resumed), np.stack(streamed[4:]))


# ----------------------------------------------------------------------------- the run's corpus


class EvaluationFed(Exception):
    """Raised by the recording eval step: the run has shown what it evaluates on."""


def test_evaluation_reads_only_validation_documents(docs, tmp_path, monkeypatch):
    """Every window the loop evaluates on lies in one validation document (or spans two of them
    across a separator), none in a train or test document; the raw folder is prepared into the
    run folder's data/."""
    fed = []

    def recording_eval_step(model, param_shardings, mesh):
        def evaluate(params, batches):
            fed.append(np.asarray(batches))
            raise EvaluationFed

        return evaluate

    monkeypatch.setattr(step, "make_eval_step", recording_eval_step)
    run = RUN.replace(data=str(text_folder(tmp_path / "text", docs)), seq_len=16, batch_size=4, eval_batches=3,
                      output_dir=str(tmp_path / "run"))
    p = plan(run, jax.devices()[:1])
    assert p.corpus.folder == (tmp_path / "run" / run_corpus.DATA_FOLDER).absolute()
    from jax_residual.train.loop import train

    with pytest.raises(EvaluationFed):
        train(p, log=lambda _: None)
    windows = fed[0].reshape(-1, 17)
    held_out = split_documents(p.corpus, "validation")
    others = [d.encode() for split in ("train", "test") for d in split_documents(p.corpus, split)]
    assert len({bytes(w.astype(np.uint8)) for w in windows}) == len(windows)  # spread over the stream
    for window in windows:
        text = bytes(window.astype(np.uint8))
        assert all(piece.decode() in "\0".join(held_out) for piece in text.split(b"\0") if piece)
        assert not any(text.replace(b"\0", b"") in d for d in others if len(text.replace(b"\0", b"")) > 12)


def test_a_prepared_folder_made_with_another_tokenizer_is_refused(docs, tmp_path):
    corpus = prepared(text_folder(tmp_path / "text", docs), tmp_path / "bpe", "bpe:300")
    with pytest.raises(ValueError, match=r"prepared with tokenizer bpe:300, not bytes"):
        plan(RUN.replace(data=str(corpus.folder), tokenizer="bytes", output_dir=str(tmp_path / "r1")),
             jax.devices()[:1])
    with pytest.raises(ValueError, match=r"the tokenizer \(bpe:300\) has 300 tokens but the model's vocab_size is 256"):
        plan(RUN.replace(data=str(corpus.folder), output_dir=str(tmp_path / "r2"),
                         init_from_hf=str(bytes_checkpoint(tmp_path))), jax.devices()[:1])
    p = plan(RUN.replace(data=str(corpus.folder), output_dir=str(tmp_path / "r3")), jax.devices()[:1])
    assert p.cfg.vocab_size == 300 and p.tokenizer.name == "bpe:300"  # no --tokenizer: the corpus's


def bytes_checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    """A HF folder of a tiny bytes-vocabulary model (no tokenizer.json)."""
    from flax import linen as nn

    from jax_residual import LlamaForCausalLM
    from jax_residual.convert import save_hf_checkpoint
    from jax_residual.train.run_config import model_config

    cfg = model_config(RUN)
    params = nn.unbox(jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), np.zeros((1, 4), np.int32)))["params"]
    save_hf_checkpoint(params, cfg, tmp_path / "hf")
    return tmp_path / "hf"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("write, message", [
    (lambda root: write_jsonl(root / "c.jsonl", ["a", "b"], field="content"),
     "c.jsonl line 1: no text field 'text' (fields: id, content); pass --text-field"),
    (lambda root: write_parquet(root / "c.parquet", ["a"]) or (root / "c.parquet").rename(root / "c.jsonl"),
     "c.jsonl: not UTF-8 JSON lines"),
    (lambda root: (root / "c.txt").write_bytes(np.random.default_rng(0).bytes(1 << 16)), "c.txt line 1: not UTF-8"),
    (lambda root: (root / "c.txt").write_text(""), "no documents (an empty source"),
    (lambda root: (root / "c.txt").write_text("one paragraph\n"), "the validation split is empty (1 documents"),
])
def test_bad_sources_fail_with_one_line_and_leave_nothing(write, message, tmp_path):
    write(tmp_path)
    (source,) = [p for p in tmp_path.iterdir()]
    with pytest.raises(sources.SourceError) as error:
        prep.prepare(str(source), tmp_path / "out", settings(source), log=lambda _: None)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_skips_binary_files_and_says_so(docs, tmp_path):
    root = text_folder(tmp_path / "text", docs)
    (root / "zz.bin").write_bytes(bytes(range(256)))
    skipped = []
    prep.prepare(str(root), tmp_path / "out", settings(root), log=lambda _: None, warn=skipped.append)
    assert len(skipped) == 1 and "zz.bin" in skipped[0] and "not UTF-8" in skipped[0]
    assert sum(s["documents"] for s in shards.read_meta(tmp_path / "out")["splits"].values()) == len(docs)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:-2]), "is truncated or damaged"),
    (lambda path: path.write_bytes(bytes([path.read_bytes()[0] ^ 1]) + path.read_bytes()[1:]),
     "does not match its SHA-256 in meta.json"),
    (lambda path: path.unlink(), "is missing"),
])
def test_a_damaged_shard_is_refused(damage, message, folder_corpus, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(folder_corpus.folder, folder)
    damage(folder / "train/00001.bin")
    with pytest.raises(shards.CorpusError, match=message):
        shards.open_prepared(folder)


def test_an_interrupted_prepare_leaves_no_index_and_a_rerun_restarts(docs, folder_corpus, tmp_path, monkeypatch):
    source = pathlib.Path(folder_corpus.meta["settings"]["source"])
    flush = shards.ShardWriter.flush

    def killed_after_two_shards(writer, count):
        if writer.split == "train" and len(writer.shards) == 2:
            raise KeyboardInterrupt
        flush(writer, count)

    monkeypatch.setattr(shards.ShardWriter, "flush", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(source), tmp_path / "out", settings(source), log=lambda _: None)
    assert (tmp_path / "out/train/00001.bin").exists() and not shards.is_prepared(tmp_path / "out")
    with pytest.raises(shards.CorpusError, match="an interrupted prepare"):
        shards.open_prepared(tmp_path / "out")
    monkeypatch.setattr(shards.ShardWriter, "flush", flush)
    lines = []
    prep.prepare(str(source), tmp_path / "out", settings(source), log=lines.append)
    assert lines[0].startswith("restarting the interrupted prepare")
    assert shards.read_meta(tmp_path / "out") == folder_corpus.meta
    prep.prepare(str(source), tmp_path / "out", settings(source), log=lines.append)
    assert "already holds this corpus" in lines[-1]
    with pytest.raises(ValueError, match="prepared with other settings"):
        prep.prepare(str(source), tmp_path / "out", settings(source, test_fraction=0.1), log=lambda _: None)


def test_prepare_cli_reports_bad_input_in_one_line(tmp_path):
    """`python -m jax_residual.prepare`'s main, called here: exit 2 and one stderr line."""
    write_jsonl(tmp_path / "c.jsonl", ["a"], field="body")
    commands = {(str(tmp_path / "c.jsonl"), str(tmp_path / "out")): "no text field 'text' (fields: id, body)",
                (str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--tokenizer", "bpe:7"): "bad tokenizer 'bpe:7'"}
    for args, message in commands.items():
        status, _, err = in_process(prep.main, list(args))
        assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
