"""Evaluation like everyone else (jax_residual.evaluate, and exported folders for lm-evaluation-harness).

Fast: our rolling windows are lm-eval's own (`utils.get_rolling_token_windows` +
`make_disjoint_window`); an exported folder is complete for `transformers.AutoTokenizer` (the
ids training encoded, the separator as EOS = config.json's eos_token_id, no BOS) for the bytes,
bpe:N and --init-from-hf tokenizers, standard and method folders alike; the CLI's JSON.
Slow: lm-eval itself (`lm_eval.simple_evaluate`, the torch model of the exported folder) gives
the bits per byte `jax_residual.evaluate` gives (JAX, the run's checkpoint) on the same
documents, for standard and one method of each family; a multiple_choice task gives the same
loglikelihoods with batch_size 4 (right-padded batches) as with 1.

Runs are made here, not trained: the trainer's own config.json (`loop.describe`), tokenizer and
an orbax checkpoint at step 0 of random parameters moved off their initial values (so every
method weight matters). float32 throughout; no network (local jsonl tasks, offline datasets).
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from jax_residual import evaluate
from llama_testlib import stdlib_corpus
from jax_residual.convert import save_hf_checkpoint
from jax_residual.export import export_run
from jax_residual.sample import TextCodec
from jax_residual import prepare
from jax_residual.data import shards, sources, tokenizer
from jax_residual.train import checkpoint, optim, step
from jax_residual.train.loop import describe, plan
from jax_residual.train.run_config import RunConfig

RUN = RunConfig(method="standard", preset="tiny", steps=1, batch_size=2, seq_len=32, warmup_steps=0, eval_batches=1)
TEXTS = ["def add(a, b):\n    return a + b\n", "naïve café: 50 € 😀\n\ttabs and  spaces",
         "import os\nprint(os.listdir('.'))\n" * 3]
BPE = "bpe:300"
MAX_LENGTH = 24  # several windows per document in the agreement test
BPB_RTOL = 1e-5  # float32 on both sides, sums of ~1e3 token NLLs in different orders


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory) -> pathlib.Path:
    """Standard-library sources: a trainer corpus with held-out files (llama_testlib.stdlib_corpus)."""
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"))


def moved_off_init(params, seed: int):
    """Host copies of params + N(0, 0.1^2) noise on every entry (method weights too: none stays
    at its initial value)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.standard_normal(p.shape, np.float32), params)


def initialised_run(run: RunConfig) -> pathlib.Path:
    """A run folder as the trainer writes it (config.json, tokenizer.json, checkpoints/0) whose
    checkpoint holds `moved_off_init` parameters (from --init-from-hf's, if given)."""
    p = plan(run, jax.devices()[:1])
    tx = optim.make_optimizer(run.lr, run.warmup_steps, run.schedule_steps, run.weight_decay, run.grad_clip)
    shardings, abstract = step.state_shardings(p.mesh, p.cfg, tx, run.seq_len)
    params = (jax.device_get(step.init_params(p.cfg, run.seed, run.seq_len, shardings.params))
              if p.host_params is None else p.host_params)
    state = step.init_state(step.place_params(moved_off_init(params, run.seed), shardings.params), tx, shardings)
    p.folder.mkdir(parents=True, exist_ok=True)  # plan prepared its data/ there
    num_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params))
    (p.folder / "config.json").write_text(json.dumps(describe(run, p.cfg, p.mesh, p.corpus, p.tokenizer, num_params)))
    if p.tokenizer.tokenizer is not None:
        p.tokenizer.tokenizer.save(str(p.folder / tokenizer.TOKENIZER_FILE))
    manager = checkpoint.open_manager(p.folder / "checkpoints", run.keep_checkpoints)
    checkpoint.save(manager, state, {"step": 0, "data_seed": run.batch_seed, "data_position": 0, "init_seed": run.seed})
    manager.wait_until_finished()
    manager.close()
    return p.folder


def llama_like_hf_folder(folder: pathlib.Path, corpus_folder: pathlib.Path) -> pathlib.Path:
    """A standard HF folder whose tokenizer.json adds a BOS ("<s>", as Llama's does) when asked
    for special tokens; its eos_token_id is the BPE's separator."""
    from flax import linen as nn
    from tokenizers import processors

    from jax_residual import LlamaForCausalLM
    from jax_residual.train.run_config import model_config

    bpe = tokenizer.train_bpe(sources.open_source(str(corpus_folder)).documents(lambda line: None), 300)
    hf = type(bpe).from_str(bpe.to_str())
    hf.add_special_tokens(["<s>"])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    cfg = model_config(RUN.replace(tokenizer=f"bpe:{hf.get_vocab_size()}"))  # vocabulary: the BPE's and "<s>"
    params = nn.unbox(jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(1), np.zeros((1, 4), np.int32)))["params"]
    save_hf_checkpoint(params, cfg, folder, eos_token_id=hf.token_to_id(tokenizer.EOS_TOKEN))
    hf.save(str(folder / tokenizer.TOKENIZER_FILE))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_folder):
    """runs(kind, method) -> a cached `initialised_run` with tokenizer kind bytes, bpe:300 or hf."""
    made = {}

    def get(kind: str, method: str) -> pathlib.Path:
        if (kind, method) not in made:
            root = tmp_path_factory.mktemp(f"{kind.replace(':', '')}-{method}")
            flags = ({"init_from_hf": str(llama_like_hf_folder(root / "hf", corpus_folder))} if kind == "hf"
                     else {"tokenizer": kind})
            made[kind, method] = initialised_run(RUN.replace(method=method, data=str(corpus_folder),
                                                             output_dir=str(root / "run"), **flags))
        return made[kind, method]

    return get


@pytest.fixture(scope="module", autouse=True)
def hf_caches(tmp_path_factory, remote_code_cache):
    """Remote-code modules (conftest.py) and datasets' caches in tmp dirs; datasets offline."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        yield


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("num_tokens", [1, 5, 23, 24, 25, 47, 48, 49, 100])
@pytest.mark.parametrize("max_length", [1, 4, 24])
def test_rolling_windows_are_lm_evals(num_tokens, max_length):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(1000, 1000 + num_tokens))
    sequence = [7, *tokens]  # the prefix token, then the document
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_length, context_len=1)]
    # what lm-eval's _loglikelihood_tokens feeds the model, and which predictions it sums
    theirs = [((context + continuation)[-(max_length + 1):][:-1], continuation) for context, continuation in theirs]
    ours = [(sequence[start:stop - 1], sequence[stop - scored:stop])
            for start, stop, scored in evaluate.rolling_windows(num_tokens, max_length)]
    assert ours == theirs
    assert sorted(t for _, scored in ours for t in scored) == tokens  # every token scored exactly once


def test_window_rows_weigh_exactly_the_scored_predictions():
    sequence = [7, *range(100, 130)]
    tokens, weights = evaluate.window_rows(sequence, 8)
    for (start, stop, scored), row, weight in zip(evaluate.rolling_windows(30, 8), tokens, weights):
        predicted = row[1:][weight == 1]  # token_losses' position t predicts row[t + 1]
        np.testing.assert_array_equal(predicted, sequence[stop - scored:stop])
        np.testing.assert_array_equal(row[stop - start:], 0)


# ----------------------------------------------------------------------------- exported folders


@pytest.mark.parametrize("kind", ["bytes", BPE, "hf"])
@pytest.mark.parametrize("method", ["standard", "method1"])
def test_exported_folder_is_complete_for_autotokenizer(kind, method, runs, tmp_path):
    from transformers import AutoTokenizer

    run_dir = runs(kind, method)
    export_run(run_dir, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    run_tokenizer = json.loads((run_dir / "config.json").read_text())["tokenizer"]
    assert hf.eos_token_id == config["eos_token_id"] == run_tokenizer["eos_id"] == hf.pad_token_id
    assert hf.bos_token_id is None and hf.chat_template is None
    assert hf.model_max_length == config["max_position_embeddings"]
    assert isinstance(hf.decode(hf.eos_token_id), str)  # lm-eval decodes its prefix token
    prepared = json.loads((run_dir / "config.json").read_text())["corpus"]["prepared"]
    trained = prepare.prepared_tokenizer(shards.open_prepared(pathlib.Path(prepared)))  # what the run trained on
    codec = TextCodec.of_run(run_dir, run_tokenizer["eos_id"])
    for text in TEXTS:
        ids = hf.encode(text)
        assert ids == prepare.encode_documents([text], trained.tokenizer, trained.eos_id)[:-1].tolist(), text
        assert ids == codec.encode(text) and hf.decode(ids) == text


def test_evaluate_cli_prints_and_writes_json(runs, tmp_path, capsys):
    run_dir = runs(BPE, "standard")
    capsys.readouterr()  # what training the fixture's run printed (when this test is the first to ask for it)
    documents = tmp_path / "docs.jsonl"
    documents.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    out = tmp_path / "result.json"
    assert evaluate.main([str(run_dir), "--data", str(documents), "--split", "all", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["documents"] == len(TEXTS)
    assert printed["bytes"] == sum(len(text.encode()) for text in TEXTS) and printed["max_length"] == 1024
    assert printed["perplexity"] == pytest.approx(math.exp(printed["loss"]), rel=1e-12)
    assert printed["bits_per_byte"] == pytest.approx(
        printed["loss"] * printed["tokens"] / printed["bytes"] / math.log(2), rel=1e-12)
    assert evaluate.main([str(run_dir), "--data", str(documents), "--split", "tset"]) == 2
    assert "--split" in capsys.readouterr().err


def test_splits_are_prepares_and_partition_the_documents(tmp_path):
    """--split reads the documents prepare puts in that split (the hash of each document), so
    "test" holds what no training run reads; the three splits partition "all"."""
    documents = tmp_path / "docs.jsonl"
    texts = [f"document {i}: " + " ".join(TEXTS) for i in range(60)]
    documents.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    splits = {split: evaluate.load_documents(str(documents), split) for split in ("train", "validation", "test")}
    assert splits["test"] == [t for t in texts if prepare.split_of(t.encode(), 0.05, 0.05) == "test"] != []
    assert sorted(sum(splits.values(), [])) == sorted(evaluate.load_documents(str(documents), "all")) == sorted(texts)


# ----------------------------------------------------------------------------- lm-evaluation-harness


def lm_eval_task(folder: pathlib.Path, name: str, output_type: str, rows: list[dict], fields: dict) -> pathlib.Path:
    """A local lm-eval task: `name`.yaml reading `name`.jsonl (rows) in `folder`."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {folder / f'{name}.jsonl'}", "test_split: test", f"output_type: {output_type}",
             *(f"{key}: {json.dumps(value)}" for key, value in fields.items())]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return folder


def simple_evaluate(folder: pathlib.Path, tasks: pathlib.Path, name: str, batch_size: int, **model_args) -> dict:
    """lm-eval's simple_evaluate of the folder's HF model on the local task `name` (its task
    index holds the local tasks only: indexing lm-eval's thousands of built-in task files took
    over half of each test's time)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = ",".join(f"{k}={v}" for k, v in {"pretrained": folder, "trust_remote_code": True, **model_args}.items())
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[name], batch_size=batch_size, device="cpu",
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                   log_samples=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["standard", "hyper_connections"])
def test_lm_eval_bits_per_byte_equals_ours(method, runs, tmp_path):
    """lm-eval's rolling-window bits per byte on the exported folder equal ours. Two models: the
    plain Llama and the scheme whose exported code differs most (n residual streams); that every
    other scheme's exported model computes JAX's logits is test_hf_export's, and the multiple-
    choice test below runs method1 through lm-eval."""
    run_dir = runs(BPE, method)
    export_run(run_dir, tmp_path / "hf")
    tasks = lm_eval_task(tmp_path, "ppl", "loglikelihood_rolling", [{"text": text} for text in TEXTS],
                         {"doc_to_text": "", "doc_to_target": "{{text}}",
                          "metric_list": [{"metric": "bits_per_byte"}]})
    theirs = simple_evaluate(tmp_path / "hf", tasks, "ppl", 2, max_length=MAX_LENGTH)["results"]["ppl"]
    ours = evaluate.evaluate_run(run_dir, TEXTS, max_length=MAX_LENGTH, batch_size=8, progress=False)  # data=8
    assert ours["windows"] > len(TEXTS)  # several windows per document
    assert ours["bits_per_byte"] == pytest.approx(theirs["bits_per_byte,none"], rel=BPB_RTOL)


@pytest.mark.slow
def test_lm_eval_multiple_choice_right_padded_batches_change_nothing(runs, tmp_path):
    """lm-eval right-pads loglikelihood batches and passes no attention mask to a causal model:
    the padding comes after every scored position, so batches of 4 give the loglikelihoods of 1."""
    export_run(runs(BPE, "method1"), tmp_path / "hf")
    rows = [{"question": "def add(a, b):\n    return a", "choices": [" + b\n", " ^^ }{\n", " -"], "answer": 0},
            {"question": "import", "choices": [" os\n", " ))((\n"], "answer": 0}]
    tasks = lm_eval_task(tmp_path, "mc", "multiple_choice", rows,
                         {"doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                          "metric_list": [{"metric": "acc"}]})
    one, four = (simple_evaluate(tmp_path / "hf", tasks, "mc", size) for size in (1, 4))

    def loglikelihoods(result):
        return [resp[0][0] for sample in result["samples"]["mc"] for resp in sample["resps"]]

    np.testing.assert_allclose(loglikelihoods(four), loglikelihoods(one), rtol=1e-5)
    assert four["results"]["mc"]["acc,none"] == one["results"]["mc"]["acc,none"]
