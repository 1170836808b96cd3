"""Data sources, partitioners and the one-sentence errors for bad data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config import DataConfig, PartitionConfig
from fedpeft.data import (
    DataError,
    client_rows,
    load_dataset,
    partition_indices,
    read_rows,
    synthetic_rows,
)


def test_synthetic_is_seeded_and_balanced() -> None:
    a, b = synthetic_rows(400, 4, seed=1), synthetic_rows(400, 4, seed=1)
    assert a == b
    assert a != synthetic_rows(400, 4, seed=2)
    counts = Counter(r["label"] for r in a)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 60


def test_synthetic_causal_lm_rows_are_instructions() -> None:
    ds = load_dataset(DataConfig(synthetic_samples=100), "causal_lm", seed=0)
    user, answer = ds.train[0]["messages"]
    assert user["role"] == "user" and user["content"].endswith(ds.train[0]["text"])
    assert answer == {
        "role": "assistant",
        "content": "sports food technology weather".split()[ds.train[0]["label"]],
    }


def test_jsonl_and_csv_with_string_labels(tmp_path: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text(
        "\n".join(
            json.dumps({"sentence": f"s{i}", "y": "pos" if i % 2 else "neg"}) for i in range(40)
        )
    )
    cfg = DataConfig(source=str(jl), text_field="sentence", label_field="y", test_fraction=0.25)
    ds = load_dataset(cfg, "classification", seed=0)
    assert ds.num_labels == 2 and len(ds.train) == 30 and len(ds.test) == 10
    assert {r["label"] for r in ds.train} == {0, 1}

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nhello,1\nworld,0\n")
    assert read_rows(str(csv_path), "text", "label") == [
        {"text": "hello", "label": "1"},
        {"text": "world", "label": "0"},
    ]


@pytest.mark.parametrize(
    ("content", "suffix", "fragment"),
    [
        (
            '{"text": "a", "label": 1}\n{"text": "b", "label"\n',
            ".jsonl",
            "line 2 is not valid JSON",
        ),
        ('{"text": "a", "label": 1}\n[1, 2]\n', ".jsonl", "line 2 should be a JSON object"),
        ('{"txt": "a", "label": 1}\n', ".jsonl", "row 1 has no text field 'text'"),
        ('{"text": "a"}\n', ".jsonl", "row 1 has no label field 'label'"),
        ("", ".jsonl", "has no rows"),
        ("text,label\n", ".csv", "has no rows"),
        ("a b c", ".txt", "should end in .jsonl or .csv"),
    ],
)
def test_malformed_files(tmp_path: Path, content: str, suffix: str, fragment: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_rows(str(path), "text", "label")
    assert fragment in str(info.value)


def test_missing_file_and_unseen_test_label(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"), "text", "label")
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps({"text": "x", "label": i % 2}) for i in range(10)))
    test.write_text(json.dumps({"text": "x", "label": 7}))
    with pytest.raises(DataError, match="Held-out label 7"):
        load_dataset(DataConfig(source=str(train), test_source=str(test)), "classification", 0)


def test_hub_dataset_offline_is_one_sentence() -> None:
    with pytest.raises(DataError, match="could not be loaded from the Hugging Face hub"):
        load_dataset(DataConfig(source="hf:some-user/some-dataset"), "classification", 0)


LABELS = [i % 4 for i in range(400)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shard"])
def test_partitions_cover_rows_disjointly(scheme: str) -> None:
    parts = partition_indices(LABELS, PartitionConfig(num_clients=5, scheme=scheme), seed=0)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))
    assert len(parts) == 5 and all(len(p) > 0 for p in parts)
    if scheme != "shard":  # shards may drop a remainder
        assert sorted(flat) == list(range(len(LABELS)))


def _label_skew(parts: list[list[int]]) -> float:
    """Mean total-variation distance between client label mixes and the global one."""
    dist = []
    for p in parts:
        mix = np.bincount([LABELS[i] for i in p], minlength=4) / len(p)
        dist.append(0.5 * np.abs(mix - 0.25).sum())
    return float(np.mean(dist))


def test_dirichlet_skews_labels_and_is_seeded() -> None:
    iid = partition_indices(LABELS, PartitionConfig(num_clients=5, scheme="iid"), 0)
    dirich = partition_indices(
        LABELS, PartitionConfig(num_clients=5, scheme="dirichlet", alpha=0.1), 0
    )
    assert _label_skew(dirich) > 0.3 > 0.1 > _label_skew(iid)
    again = partition_indices(
        LABELS, PartitionConfig(num_clients=5, scheme="dirichlet", alpha=0.1), 0
    )
    assert again == dirich


def test_client_rows_split_train_and_test() -> None:
    cfg, part = (
        DataConfig(synthetic_samples=300),
        PartitionConfig(num_clients=3, client_test_fraction=0.2),
    )
    train, test = client_rows(cfg, part, "classification", 0, 1)
    assert len(test) == int(0.2 * (len(train) + len(test)))
    with pytest.raises(DataError, match="Partition 3 does not exist"):
        client_rows(cfg, part, "classification", 0, 3)


def test_too_few_rows_for_clients() -> None:
    with pytest.raises(DataError, match="cannot be split over 10 clients"):
        partition_indices([0, 1, 0], PartitionConfig(num_clients=10), 0)


def test_single_label_and_non_utf8_files(tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(json.dumps({"text": f"t{i}", "label": 1}) for i in range(20)))
    with pytest.raises(DataError, match="1 distinct label"):
        load_dataset(DataConfig(source=str(one)), "classification", 0)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_rows(str(latin), "text", "label")


def test_csv_with_excel_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nhello,1\n".encode())
    assert read_rows(str(path), "text", "label") == [{"text": "hello", "label": "1"}]


def _jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_unseen_test_label_names_the_test_file(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": i % 2} for i in range(10)])
    test = _jsonl(tmp_path / "test.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 7}])
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(source=str(train), test_source=str(test)), "classification", 0)
    assert str(info.value) == (
        f"Held-out label 7 in '{test}' row 2 never occurs in training file '{train}'."
    )


@pytest.mark.parametrize(
    ("record", "found"),
    [
        ({"text": 5, "label": 1}, "the integer 5 in text field 'text', not a string"),
        ({"text": ["a", "b"], "label": 1}, "an array in text field 'text', not a string"),
        ({"text": None, "label": 1}, "null in text field 'text', not a string"),
        (
            {"text": "a", "label": {"id": 1}},
            "an object in label field 'label', not an integer, a string or a boolean",
        ),
        (
            {"text": "a", "label": [1]},
            "an array in label field 'label', not an integer, a string or a boolean",
        ),
        (
            {"text": "a", "label": None},
            "null in label field 'label', not an integer, a string or a boolean",
        ),
    ],
)
def test_fields_of_the_wrong_type(tmp_path: Path, record: dict[str, object], found: str) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": 0}, record])
    with pytest.raises(DataError) as info:
        read_rows(str(path), "text", "label")
    assert str(info.value) == f"Data file '{path}' row 2 has {found}."


def test_mixed_label_types_are_refused_but_csv_text_labels_load(tmp_path: Path) -> None:
    def load(train: Path, test: Path | None = None) -> int:
        cfg = DataConfig(source=str(train), test_source=None if test is None else str(test))
        return load_dataset(cfg, "classification", 0).num_labels

    # 1, "1" and true would have become the classes "1" and "True"
    mixed = _jsonl(
        tmp_path / "mixed.jsonl",
        [{"text": f"t{i}", "label": label} for i, label in enumerate([1, 0, "1", 0, True])],
    )
    with pytest.raises(DataError) as info:
        load(mixed)
    assert str(info.value) == (
        f"Data file '{mixed}' mixes label types: integer 1 at row 1, string \"1\" at row 3, "
        "boolean true at row 5; use one type for all labels."
    )
    floats = _jsonl(
        tmp_path / "floats.jsonl",
        [{"text": f"t{i}", "label": label} for i, label in enumerate([0, 1, 1.0])],
    )
    with pytest.raises(DataError) as info:
        load(floats)
    assert str(info.value) == (
        f"Data file '{floats}' row 3 has the float 1.0 in label field 'label', "
        "not an integer, a string or a boolean."
    )
    ints = _jsonl(tmp_path / "ints.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    strings = _jsonl(tmp_path / "strings.jsonl", [{"text": "t", "label": "0"}])
    with pytest.raises(DataError) as info:
        load(ints, strings)
    assert str(info.value) == (
        f"Labels mix types across files: integer 0 in '{ints}' row 1, "
        f"string \"0\" in '{strings}' row 1; use one type for all labels."
    )
    # CSV cells are untyped text: CSV labels load, alone or beside a JSONL file's
    train_csv, test_csv = tmp_path / "train.csv", tmp_path / "test.csv"
    train_csv.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(12)))
    test_csv.write_text("text,label\nu,2\nv,0\n")
    assert load(train_csv) == 3
    assert load(train_csv, test_csv) == 3
    assert load(train_csv, ints) == 3


def test_the_shipped_sentence_polarity_data_is_whole() -> None:
    """data/mr as its README describes it: 9,596 + 1,066 rows, two labels, no overlap."""
    root = Path(__file__).resolve().parents[1] / "data" / "mr"
    cfg = DataConfig(source=str(root / "train.jsonl"), test_source=str(root / "test.jsonl"))
    ds = load_dataset(cfg, "classification", 0)
    assert (len(ds.train), len(ds.test), ds.num_labels) == (9596, 1066, 2)
    assert Counter(r["label"] for r in ds.train)[1] == 4812
    assert not {r["text"] for r in ds.train} & {r["text"] for r in ds.test}
