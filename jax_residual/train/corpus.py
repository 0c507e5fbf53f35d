"""The corpus of a run: `--data` names a prepared folder (jax_residual.prepare), or a raw source
(none: the standard library) that is first prepared into the run folder's data/, so training
has one input path.

Raw data is prepared with the run's tokenizer (`tokenizer.prepare_spec`) and the prepare
defaults; a resumed run finds its data/ prepared and reuses it (and so its bpe:N). In a
multi-process run process 0 prepares and the others wait for it. Within a process a source is
prepared, and a folder opened (its checksums verified), once: the runs of a sweep share them.
"""

from __future__ import annotations

import pathlib

import jax
from jax.experimental import multihost_utils

from jax_residual import prepare
from jax_residual.data import shards
from jax_residual.data import tokenizer

DATA_FOLDER = "data"  # where a run's raw source is prepared

_PREPARED: dict[tuple[str, str], pathlib.Path] = {}  # (source, tokenizer spec) -> prepared folder
_OPENED: dict[tuple[pathlib.Path, int], tuple[shards.PreparedCorpus, tokenizer.RunTokenizer]] = {}


def prepare_once(data_arg: str | None, spec: str, run_folder: pathlib.Path, log) -> pathlib.Path:
    """The prepared folder of a raw source: this process's earlier one, else run_folder/data
    (prepared by process 0 if it is not yet; the others wait at a barrier)."""
    key = (prepare.source_name(data_arg), spec)
    if key not in _PREPARED or not shards.is_prepared(_PREPARED[key]):
        folder = run_folder / DATA_FOLDER
        error = None
        if jax.process_index() == 0:
            try:
                prepare.prepare(data_arg, folder, prepare.Settings(*key), log=log)
            except (ValueError, OSError) as raised:  # reported after the barrier, by every process
                error = raised
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"prepared {folder}")
        if error:
            raise error
        _PREPARED[key] = folder
    return _PREPARED[key]


def open_once(folder: pathlib.Path) -> tuple[shards.PreparedCorpus, tokenizer.RunTokenizer]:
    """(corpus, tokenizer) of a prepared folder, opened once per version of its meta.json."""
    key = (folder.absolute(), (folder / shards.META_FILE).stat().st_mtime_ns)
    if key not in _OPENED:
        corpus = shards.open_prepared(folder)
        _OPENED[key] = corpus, prepare.prepared_tokenizer(corpus)
    return _OPENED[key]


def run_corpus(data_arg: str | None, spec: str | None, init_from_hf: str | None, run_folder: pathlib.Path,
               log=print) -> tuple[shards.PreparedCorpus, tokenizer.RunTokenizer]:
    """(corpus, its tokenizer) of a run. A prepared --data must have been made with the run's
    tokenizer, when it names one (ValueError otherwise)."""
    wanted = tokenizer.prepare_spec(spec, init_from_hf)
    if data_arg is not None and shards.is_prepared(pathlib.Path(data_arg)):
        corpus, tok = open_once(pathlib.Path(data_arg))
        if (spec or wanted != tokenizer.BYTES) and not tokenizer.made_with(tok, wanted):
            raise ValueError(f"--data {data_arg} was prepared with tokenizer {tok.name}, not {wanted}; leave "
                             "--tokenizer out or prepare the source again with it")
        return corpus, tok
    if data_arg is not None and (pathlib.Path(data_arg) / shards.INCOMPLETE_MARKER).exists():
        shards.read_meta(pathlib.Path(data_arg))  # raises: an interrupted prepare
    return open_once(prepare_once(data_arg, wanted, run_folder, log))
