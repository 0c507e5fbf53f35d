"""Documents from a source, one `str` at a time, in a fixed order (what `prepare` tokenizes).

A source is one of:
  None                     the default corpus: the running interpreter's standard-library *.py
                           sources (installed packages excluded), one document per file
  a `datasets` folder      made by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (every
                           split of a DatasetDict, in its order): one document per row's text field
  a folder                 every non-hidden file under it, sorted, each read by its own format
                           below (a plain text file is one document; binary files are skipped
                           and reported)
  *.jsonl, *.jsonl.gz      one document per line's JSON object's text field
  *.parquet                one document per row's text field (pyarrow, read by record batch)
  any other file           UTF-8 text, one document per paragraph (lines up to a blank line, as
                           `datasets`' text loader with sample_by="paragraph")

Text is UTF-8 without NUL (the byte tokenizer's document separator); empty documents are
dropped. Memory holds one record batch or one file at a time, never the corpus. Bad input
raises `SourceError` with one line naming the file (and line) and what is wrong.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
import sysconfig
from collections.abc import Callable, Iterator

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
DATASETS_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top
PARQUET_BATCH_ROWS = 1024


class SourceError(ValueError):
    """A source that cannot be read as documents; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Source:
    """description: what and where; documents(warn): a fresh iterator over the documents
    (`warn(line)` hears of skipped binary files)."""

    description: str
    documents: Callable[[Callable[[str], None]], Iterator[str]]


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: pathlib.Path) -> list[pathlib.Path]:
    """The standard library's *.py files under root, installed packages excluded, sorted."""
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1]))


def folder_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Every regular, non-hidden file under root, sorted."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def is_datasets_folder(path: pathlib.Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in DATASETS_MARKERS)


def kind_of(path: pathlib.Path) -> str:
    """'jsonl', 'parquet' or 'text', by the file name."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def check_text(text: str, where: str) -> str:
    if "\0" in text:
        raise SourceError(f"{where}: contains NUL bytes, not text (binary?)")
    return text


def decoded(data: bytes, where: str) -> str:
    """UTF-8 text of `data`, else SourceError saying where it stops being text."""
    try:
        return check_text(data.decode("utf-8"), where)
    except UnicodeDecodeError as error:
        raise SourceError(f"{where}: not UTF-8 text at byte {error.start} (binary?)") from None


def field_of(record, field: str, where: str) -> str:
    """record[field] as text; SourceError naming the field and the fields there are."""
    if not isinstance(record, dict):
        raise SourceError(f"{where}: a JSON {type(record).__name__}, not an object with a {field!r} field")
    if field not in record:
        raise SourceError(f"{where}: no text field {field!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                          "pass --text-field")
    if not isinstance(record[field], str):
        raise SourceError(f"{where}: field {field!r} is {type(record[field]).__name__}, not text")
    return check_text(record[field], where)


def jsonl_documents(path: pathlib.Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise SourceError(f"{path} line {number}: not JSON ({error.msg})") from None
                    yield field_of(record, field, f"{path} line {number}")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise SourceError(f"{path}: not UTF-8 JSON lines ({type(error).__name__}: {error})") from None


def column_documents(batches, names: list[str], field: str, where: str) -> Iterator[str]:
    """The text column `field` of Arrow record batches (SourceError naming the columns there are)."""
    if field not in names:
        raise SourceError(f"{where}: no text field {field!r} (fields: {', '.join(names) or 'none'}); pass --text-field")
    for batch in batches:
        for value in batch.column(field).to_pylist():
            if not isinstance(value, str):
                raise SourceError(f"{where}: field {field!r} holds {type(value).__name__}, not text")
            yield check_text(value, where)


def parquet_documents(path: pathlib.Path, field: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise SourceError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
    names = file.schema_arrow.names
    yield from column_documents(file.iter_batches(PARQUET_BATCH_ROWS, columns=[field]) if field in names else (),
                                names, field, str(path))


def datasets_documents(path: pathlib.Path, field: str) -> Iterator[str]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, dataset in parts:
        where = f"{path}{f' split {split}' if split else ''}"
        batches = dataset.select_columns([field]).with_format("arrow").iter(PARQUET_BATCH_ROWS) if field in dataset.column_names else ()
        yield from column_documents(batches, dataset.column_names, field, where)


def paragraphs(path: pathlib.Path) -> Iterator[str]:
    """The blank-line-separated paragraphs of a UTF-8 text file, read line by line."""
    lines = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            line = decoded(raw, f"{path} line {number}")
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\n")


def file_documents(path: pathlib.Path, field: str, warn: Callable[[str], None], whole_text: bool) -> Iterator[str]:
    """The documents of one file by its kind; a text file is one document (`whole_text`, in a
    folder: binary ones are skipped through `warn`) or its paragraphs."""
    kind = kind_of(path)
    if kind == "jsonl":
        yield from jsonl_documents(path, field)
    elif kind == "parquet":
        yield from parquet_documents(path, field)
    elif not whole_text:
        yield from paragraphs(path)
    else:
        try:
            yield decoded(path.read_bytes(), str(path))
        except SourceError as error:
            warn(str(error))


def nonempty(documents: Iterator[str]) -> Iterator[str]:
    return (d for d in documents if d)


def open_source(path_arg: str | None, field: str = "text") -> Source:
    """The Source a path names (None: the standard library); SourceError if it does not exist."""
    if path_arg is None:
        root = stdlib_root()
        files = stdlib_sources(root)
        if not files:
            raise SourceError(f"no standard-library sources under {root}; pass --data FILE_OR_FOLDER")
        return Source(f"Python {sysconfig.get_python_version()} standard library at {root}",
                      lambda warn: nonempty(d for f in files for d in file_documents(f, field, warn, True)))
    path = pathlib.Path(path_arg)
    if is_datasets_folder(path):
        return Source(f"datasets folder {path} (field {field!r})", lambda warn: nonempty(datasets_documents(path, field)))
    if path.is_dir():
        return Source(f"folder {path}", lambda warn: nonempty(
            d for f in folder_files(path) for d in file_documents(f, field, warn, True)))
    if path.is_file():
        return Source(f"{kind_of(path)} file {path}", lambda warn: nonempty(file_documents(path, field, warn, False)))
    raise SourceError(f"{path_arg}: no such file or folder")
