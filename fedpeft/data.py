"""Datasets and client partitions.

Sources: an embedded synthetic topic task (offline, generated from the seed), local
``.jsonl``/``.csv`` files, and Hugging Face hub datasets (online only). Partitions come
from flwr-datasets partitioners: IID, Dirichlet label skew (Hsu et al., 2019,
"Measuring the effects of non-identical data distribution", p_k ~ Dir(alpha)) and
label-sorted shards (McMahan et al., 2017).
"""

from __future__ import annotations

import csv
import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import Config, DataConfig, PartitionConfig
from fedpeft.errors import DataError
from fedpeft.instruct import Chat, alpaca_chat, classification_chat, messages_chat, with_system

# {"text": str, "label": int}, and for an instruction of a causal LM {"messages": Chat}
Row = dict[str, Any]


@dataclass(frozen=True)
class Dataset:
    """Train and held-out rows with labels mapped to 0..num_labels-1."""

    train: list[Row]
    test: list[Row]
    num_labels: int


# --------------------------------------------------------------------------- synthetic

_TOPICS: dict[str, list[str]] = {  # split() keeps each topic's words on one line
    "sports": "match goal team coach league striker season stadium referee trophy".split(),
    "food": "recipe soup bread kitchen flavor dinner spice oven dessert chef".split(),
    "technology": "software laptop chip network server code robot battery screen app".split(),
    "weather": "rain storm sunny forecast wind snow cloud humid thunder breeze".split(),
    "music": "guitar concert album singer melody drum band rhythm song piano".split(),
    "travel": "flight hotel beach passport museum train island tour luggage map".split(),
}
_FILLERS = "the a really quite today yesterday new old great strange local big".split()
_TEMPLATES = (
    "i heard the {w0} was {f} and the {w1} too",
    "{f} news about the {w0} and a {w1}",
    "my friend loves the {w0} but not the {w1}",
    "what a {f} {w0} , the {w1} surprised everyone",
    "the {w0} near the {w1} looked {f}",
)
SYNTHETIC_MAX_CLASSES = len(_TOPICS)


def synthetic_rows(n: int, num_classes: int, seed: int) -> list[Row]:
    """Short sentences about ``num_classes`` topics; 20% carry a distractor word from
    another topic and 5% have a flipped label, so the task is learnable but not trivial."""
    if num_classes > SYNTHETIC_MAX_CLASSES:
        raise DataError(
            f"'data.synthetic_classes' should be at most {SYNTHETIC_MAX_CLASSES}, "
            f"got {num_classes}."
        )
    rng = random.Random(seed)
    topics = list(_TOPICS)[:num_classes]
    rows = []
    for _ in range(n):
        label = rng.randrange(num_classes)
        words = _TOPICS[topics[label]]
        w0, w1 = rng.sample(words, 2)
        if rng.random() < 0.2:
            w1 = rng.choice(_TOPICS[topics[rng.randrange(num_classes)]])
        text = rng.choice(_TEMPLATES).format(w0=w0, w1=w1, f=rng.choice(_FILLERS))
        if rng.random() < 0.05:
            label = rng.randrange(num_classes)
        rows.append({"text": text, "label": label})
    return rows


SYNTHETIC_PROMPT = "Name the topic of this sentence in one word.\n\n{text}"


# --------------------------------------------------------------------------- files


def read_rows(path: str, text_field: str, label_field: str | None, fmt: str = "text") -> list[Row]:
    """Read a ``.jsonl`` or ``.csv`` file into rows with ``text`` and ``label``; with
    ``fmt`` ``auto``, ``alpaca`` or ``chat`` (``data.format``), instruction records
    become rows with ``messages`` (and a label only if they have one)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"Data file '{path}' does not exist.")
    if p.suffix not in (".jsonl", ".csv"):
        raise DataError(f"Data file '{path}' should end in .jsonl or .csv.")
    try:
        if p.suffix == ".jsonl":
            records = _read_jsonl(p)
        else:
            with p.open(newline="", encoding="utf-8-sig") as fh:
                # a short row leaves its last cells None: missing cells, not JSON nulls
                records = [
                    {k: v for k, v in rec.items() if v is not None} for rec in csv.DictReader(fh)
                ]
    except UnicodeDecodeError as err:
        raise DataError(f"Data file '{path}' is not UTF-8 text.") from err
    except OSError as err:
        raise DataError(f"Data file '{path}' cannot be read ({err.strerror}).") from err
    if not records:
        raise DataError(f"Data file '{path}' has no rows.")
    kinds = [_record_format(r, fmt) for r in records]
    if "text" in kinds and len(set(kinds)) > 1:
        n = kinds.index("text") + 1
        raise DataError(
            f"Data file '{path}' row {n} is not an instruction record (no 'instruction'/"
            "'output' or 'messages') while others are; use one kind of row per file."
        )
    return [
        _row(r, i, path, text_field, label_field)
        if kind == "text"
        else _instruction_row(r, i, path, kind, label_field)
        for i, (r, kind) in enumerate(zip(records, kinds, strict=True), 1)
    ]


def _record_format(rec: dict[str, Any], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if "messages" in rec:
        return "chat"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    return "text"


def _instruction_row(
    rec: dict[str, Any], n: int, path: str, kind: str, label_field: str | None
) -> Row:
    """An Alpaca or chat record as a row; its text (what the audit and plots show) is
    the user's turns, and its label (what partitions it) is optional."""
    line = rec.get(_LINE)
    where = f"Data file '{path}' " + (f"line {line}" if line else f"row {n}")
    chat: Chat = alpaca_chat(rec, where) if kind == "alpaca" else messages_chat(rec, where)
    text = "\n\n".join(t["content"] for t in chat if t["role"] == "user")
    row: Row = {"text": text, "messages": chat}
    if label_field is not None and label_field in rec:
        label = rec[label_field]
        if not isinstance(label, str | int) or label == "":
            raise DataError(
                f"{where} has {_describe(label)} in label field '{label_field}', not an "
                "integer, a string or a boolean."
            )
        row["label"] = label
    return row


_LINE = "\0line"  # the JSONL line a record came from, for instruction rows' errors


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"Data file '{p}' line {lineno} is not valid JSON ({err.msg})."
            ) from err
        if not isinstance(rec, dict):
            raise DataError(f"Data file '{p}' line {lineno} should be a JSON object.")
        rec[_LINE] = lineno
        records.append(rec)
    return records


def _row(rec: dict[str, Any], n: int, path: str, text_field: str, label_field: str | None) -> Row:
    if text_field not in rec:
        raise DataError(f"Data file '{path}' row {n} has no text field '{text_field}'.")
    text = rec[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"Data file '{path}' row {n} has {_describe(text)} in text field '{text_field}', "
            "not a string."
        )
    row: Row = {"text": text}
    if label_field is not None:
        if label_field not in rec:
            raise DataError(f"Data file '{path}' row {n} has no label field '{label_field}'.")
        label = rec[label_field]
        if isinstance(label, str) and not label:  # an empty CSV cell, or ""
            raise DataError(f"Data file '{path}' row {n} has an empty label field '{label_field}'.")
        # Floats are refused, not rounded: 1.0 == 1 (one class to a set) while str() makes
        # "1.0" and "1" two, and a fractional label is a regression target, not a class.
        # bool is an int subclass: true/false labels pass here, and _check_label_types
        # keeps them from mixing with integers.
        if not isinstance(label, str | int):
            raise DataError(
                f"Data file '{path}' row {n} has {_describe(label)} in label field "
                f"'{label_field}', not an integer, a string or a boolean."
            )
        row["label"] = label
    return row


def _describe(value: Any) -> str:
    """A JSON value as a sentence names it: 'null', 'the integer 5', 'an array'."""
    if value is None:
        return "null"
    if isinstance(value, bool | int | float | str):
        return f"the {_label_kind(value)} {json.dumps(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"  # hub datasets may hold other Python objects


def _label_kind(value: bool | int | float | str) -> str:
    """JSON's name of a scalar's type, with integers and floats apart (bool before int:
    it is an int subclass)."""
    for kind, cls in (("boolean", bool), ("integer", int), ("float", float)):
        if isinstance(value, cls):
            return kind
    return "string"


def _check_label_types(parts: list[tuple[str, list[Row]]]) -> None:
    """Refuse labels of more than one type over all ``(source, rows)`` parts: labels are
    matched by str(), which would make 1 and "1" one class and 1 and true two, silently.
    CSV cells are untyped text: a CSV file's "1" stands for another file's 1, so CSV
    files are left out and their labels matched by their text."""
    first: dict[str, tuple[str, int, Any]] = {}  # kind -> its first (source, row, label)
    for source, rows in parts:
        if Path(source).suffix == ".csv":
            continue
        for n, r in enumerate(rows, 1):
            if "label" in r:  # instruction rows may have none
                first.setdefault(_label_kind(r["label"]), (source, n, r["label"]))
    if len(first) < 2:
        return
    sources = {source for source, _, _ in first.values()}
    if len(sources) == 1:
        seen = ", ".join(f"{k} {json.dumps(v)} at row {n}" for k, (_, n, v) in first.items())
        raise DataError(
            f"Data file '{sources.pop()}' mixes label types: {seen}; use one type for all labels."
        )
    seen = ", ".join(f"{k} {json.dumps(v)} in '{s}' row {n}" for k, (s, n, v) in first.items())
    raise DataError(f"Labels mix types across files: {seen}; use one type for all labels.")


def _label_order(name: str) -> tuple[bool, int, str]:
    """Numeric labels in numeric order, then the others alphabetically."""
    numeric = name.isdecimal()
    return (not numeric, int(name) if numeric else 0, name)


def _map_labels(
    train: list[Row], test: list[Row], source: str, test_source: str | None
) -> list[str]:
    """Map raw labels (all of one type: see _check_label_types) to 0..K-1 in sorted
    order, in place; returns the label names in that order. ``test`` comes from
    ``test_source``, or is held out of ``source`` when that is None."""
    names = sorted({str(r["label"]) for r in train}, key=_label_order)
    if len(names) < 2:
        raise DataError(
            f"Training data of '{source}' has {len(names)} distinct label(s); classification needs 2 or more."
        )
    index = {name: i for i, name in enumerate(names)}
    for n, r in enumerate(test, 1):
        if str(r["label"]) not in index:
            raise DataError(_unseen_label(r["label"], n, test, source, test_source))
    for r in train + test:
        r["label"] = index[str(r["label"])]
    return names


def _unseen_label(label: Any, n: int, test: list[Row], source: str, test_source: str | None) -> str:
    """The sentence for a held-out label without training rows (row ``n`` of ``test``)."""
    if test_source is not None:  # test rows are the test file's, in its order
        return (
            f"Held-out label {json.dumps(label)} in '{test_source}' row {n} never occurs in "
            f"training file '{source}'."
        )
    count = sum(r["label"] == label for r in test)  # all its rows: none is in training
    return (
        f"Label {json.dumps(label)} occurs in {count} row(s) of '{source}', all held out for "
        "testing; add rows with that label or lower 'data.test_fraction'."
    )


# --------------------------------------------------------------------------- hub


def _hub_rows(name: str, split: str, cfg: DataConfig) -> list[Row]:
    """A hub dataset's split through flwr-datasets (partitioning happens later, here)."""
    try:
        from flwr_datasets import FederatedDataset
        from flwr_datasets.partitioner import IidPartitioner

        fds = FederatedDataset(dataset=name, partitioners={split: IidPartitioner(1)})
        ds = fds.load_split(split)
    except Exception as err:  # datasets raises many kinds when offline
        raise DataError(
            f"Dataset 'hf:{name}' could not be loaded from the Hugging Face hub "
            f"(offline or unknown id: {type(err).__name__}); use a local .jsonl/.csv file."
        ) from err
    source = f"hf:{name}"
    return [_row(dict(r), i, source, cfg.text_field, cfg.label_field) for i, r in enumerate(ds, 1)]


# --------------------------------------------------------------------------- loading


def load_dataset(cfg: DataConfig, task: str, seed: int) -> Dataset:
    """Train/held-out rows for a run (cached per process; callers must not mutate rows)."""
    return _load_dataset_cached(cfg, task, seed)


@functools.lru_cache(maxsize=2)
def _load_dataset_cached(cfg: DataConfig, task: str, seed: int) -> Dataset:
    fmt = cfg.format if task == "causal_lm" else "text"
    train, test = _raw_split(cfg, seed, fmt)
    if _unlabelled_instructions(train + test, cfg):
        for r in train + test:
            r["label"] = 0  # one class: partitions differ in size, not in labels
        names = ["all"]
    else:
        names = _map_labels(train, test, cfg.source, cfg.test_source)
    train = _cap(train, cfg.max_train_samples, seed)
    test = _cap(test, cfg.max_test_samples, seed + 1)
    prompt = cfg.prompt or (SYNTHETIC_PROMPT if cfg.source == "synthetic" else None)
    if task == "causal_lm" and prompt is not None:
        words = _label_words(cfg, names)
        train = [_as_instruction(r, prompt, words) for r in train]
        test = [_as_instruction(r, prompt, words) for r in test]
    if task == "causal_lm" and cfg.system is not None:
        train, test = _with_system(train, cfg.system), _with_system(test, cfg.system)
    return Dataset(train=train, test=test, num_labels=len(names))


def _with_system(rows: list[Row], system: str) -> list[Row]:
    return [
        {**r, "messages": with_system(r["messages"], system)} if "messages" in r else r
        for r in rows
    ]


def _unlabelled_instructions(rows: list[Row], cfg: DataConfig) -> bool:
    """Instruction rows need no label; if one has a label, all must."""
    labelled = ["label" in r for r in rows]
    if all(labelled):
        return False
    if any(labelled):
        n = labelled.index(False) + 1
        raise DataError(
            f"Instruction rows of '{cfg.source}' have a '{cfg.label_field}' field in some "
            f"rows but not all (row {n} has none); label all of them or none."
        )
    return True


def _label_words(cfg: DataConfig, names: list[str]) -> list[str]:
    words = list(cfg.label_words) if cfg.label_words else names
    if cfg.source == "synthetic" and not cfg.label_words:
        words = list(_TOPICS)[: len(names)]
    if len(words) != len(names):
        raise DataError(
            f"'data.label_words' has {len(words)} words but the data has {len(names)} "
            f"labels ({', '.join(names)}); give one word per label, in that order."
        )
    return words


def _as_instruction(row: Row, prompt: str, words: list[str]) -> Row:
    chat = classification_chat(row["text"], prompt, words[row["label"]])
    return {"text": row["text"], "label": row["label"], "messages": chat}


def _raw_split(cfg: DataConfig, seed: int, fmt: str) -> tuple[list[Row], list[Row]]:
    if cfg.source == "synthetic":
        rows = synthetic_rows(cfg.synthetic_samples, cfg.synthetic_classes, seed)
    elif cfg.source.startswith("hf:"):
        rows = _hub_rows(cfg.source[3:], "train", cfg)
    else:
        rows = read_rows(cfg.source, cfg.text_field, cfg.label_field, fmt)
    if cfg.test_source is not None:
        test = read_rows(cfg.test_source, cfg.text_field, cfg.label_field, fmt)
        _check_label_types([(cfg.source, rows), (cfg.test_source, test)])
        return rows, test
    _check_label_types([(cfg.source, rows)])
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = max(1, round(cfg.test_fraction * len(rows)))
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


def _cap(rows: list[Row], cap: int | None, seed: int) -> list[Row]:
    if cap is None or cap >= len(rows):
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), cap, replace=False))
    return [rows[i] for i in keep]


# --------------------------------------------------------------------------- partitions


def partition_indices(labels: list[int], cfg: PartitionConfig, seed: int) -> list[list[int]]:
    """Row indices of each client's partition, drawn by a flwr-datasets partitioner."""
    import datasets
    from flwr_datasets import partitioner as fp

    n = cfg.num_clients
    if len(labels) < n:
        raise DataError(f"{len(labels)} training rows cannot be split over {n} clients.")
    table = datasets.Dataset.from_dict({"label": labels, "idx": list(range(len(labels)))})
    part: Any
    if cfg.scheme == "iid":
        part = fp.IidPartitioner(num_partitions=n)
        table = table.shuffle(seed=seed)
    elif cfg.scheme == "dirichlet":
        part = fp.DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=min(10, len(labels) // (2 * n)),
            self_balancing=True,
            seed=seed,
        )
    else:
        part = fp.ShardPartitioner(
            num_partitions=n,
            partition_by="label",
            num_shards_per_partition=cfg.shards_per_client,
            seed=seed,
        )
    part.dataset = table
    try:
        return [list(part.load_partition(i)["idx"]) for i in range(n)]
    except ValueError as err:
        raise DataError(f"Partitioning {len(labels)} rows over {n} clients failed: {err}") from err


@functools.lru_cache(maxsize=2)
def _partitions(cfg: DataConfig, pcfg: PartitionConfig, task: str, seed: int) -> list[list[int]]:
    ds = load_dataset(cfg, task, seed)
    return partition_indices([r["label"] for r in ds.train], pcfg, seed)


def partition_label_counts(cfg: Config, label: int) -> list[int]:
    """Each partition's number of training examples of ``label`` (label id)."""
    ds = load_dataset(cfg.data, cfg.model.task, cfg.seed)
    if any("label" not in r for r in ds.train[:1]):
        raise DataError("'fleet.assign: skewed' needs labelled training rows.")
    parts = _partitions(cfg.data, cfg.partition, cfg.model.task, cfg.seed)
    return [sum(ds.train[i]["label"] == label for i in part) for part in parts]


def client_rows(
    cfg: DataConfig, pcfg: PartitionConfig, task: str, seed: int, partition_id: int
) -> tuple[list[Row], list[Row]]:
    """(train, held-out) rows of one client's partition."""
    if not 0 <= partition_id < pcfg.num_clients:
        raise DataError(f"Partition {partition_id} does not exist ({pcfg.num_clients} clients).")
    ds = load_dataset(cfg, task, seed)
    idx = list(_partitions(cfg, pcfg, task, seed)[partition_id])
    random.Random(seed * 7919 + partition_id).shuffle(idx)
    n_test = int(pcfg.client_test_fraction * len(idx))
    rows = [ds.train[i] for i in idx]
    return rows[n_test:], rows[:n_test]
