"""A node's on-disk cache of its tokenized partition.

Flower's deployment runtime starts a new ClientApp process for every message (subprocess
isolation), so whatever a process builds in memory is gone after one round. Measured on
this machine for MiniLM on ``data/mr`` (``simulations/bench_startup.py``): the
base model is ready in about 0.2 s (its safetensors weights are memory-mapped, and the
page cache keeps the file between processes), while reading the dataset, partitioning it
with flwr-datasets and tokenizing the partition take 1-2 s per process. This module keeps
the partition's token ids on disk, keyed by everything they depend on, so that every
process after the first reads one small ``.npz`` file instead.

The cache lives in ``$FEDPEFT_CACHE`` (``off`` disables it), else in
``$XDG_CACHE_HOME/fedpeft`` or ``~/.cache/fedpeft``. Files are written atomically (a
temporary file, then a rename), and an unreadable file is rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from fedpeft.train import Encoded

CACHE_ENV = "FEDPEFT_CACHE"
# Bump when what a cached file means changes (partitioning, encoding), so that old files
# are ignored rather than misread.
FORMAT = 2


def cache_root() -> Path | None:
    """The cache directory, or None when the cache is off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off") else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fedpeft"


def file_stamp(name: str | None) -> dict[str, object] | None:
    """What a cached entry must remember of a source file: a changed file is a new key."""
    if name is None or not Path(name).is_file():
        return None  # not a file (synthetic data, a hub id): the name in the key suffices
    stat = Path(name).stat()
    return {"path": str(Path(name).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def digest(parts: Mapping[str, object]) -> str:
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _ragged(arrays: dict[str, np.ndarray], key: str, lists: list[list[int]]) -> None:
    arrays[f"{key}.lengths"] = np.array([len(x) for x in lists], dtype=np.int64)
    arrays[key] = np.array([v for x in lists for v in x], dtype=np.int64)


def _unragged(arrays: Mapping[str, np.ndarray], key: str, count: int) -> list[list[int]]:
    flat, lengths = arrays[key], arrays[f"{key}.lengths"]
    if int(lengths.sum()) != len(flat) or len(lengths) != count:
        raise ValueError(f"inconsistent cached array '{key}'")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[a:b].tolist() for a, b in itertools.pairwise(bounds)]


def pack(named: Mapping[str, Encoded]) -> dict[str, np.ndarray]:
    """Ragged token id lists as one flat array and their lengths, per split (and for
    instructions the targets, the prompts and the references as UTF-8 bytes)."""
    arrays: dict[str, np.ndarray] = {}
    for name, enc in named.items():
        _ragged(arrays, f"{name}.ids", enc.input_ids)
        arrays[f"{name}.labels"] = np.array(enc.labels, dtype=np.int64)
        if enc.targets is not None and enc.prompts is not None and enc.references is not None:
            _ragged(arrays, f"{name}.targets", enc.targets)
            _ragged(arrays, f"{name}.prompts", enc.prompts)
            refs = [list(r.encode("utf-8")) for r in enc.references]
            _ragged(arrays, f"{name}.references", refs)
    return arrays


def unpack(arrays: Mapping[str, np.ndarray], name: str) -> Encoded:
    count = len(arrays[f"{name}.labels"])
    ids = _unragged(arrays, f"{name}.ids", count)
    if f"{name}.targets" not in arrays:
        return Encoded(input_ids=ids, labels=arrays[f"{name}.labels"].tolist())
    refs = _unragged(arrays, f"{name}.references", count)
    return Encoded(
        input_ids=ids,
        labels=arrays[f"{name}.labels"].tolist(),
        targets=_unragged(arrays, f"{name}.targets", count),
        prompts=_unragged(arrays, f"{name}.prompts", count),
        references=[bytes(r).decode("utf-8") for r in refs],
    )


def _read(path: Path, names: tuple[str, ...]) -> dict[str, Encoded] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return {name: unpack(arrays, name) for name in names}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing, truncated by a crash elsewhere, or from another layout


def _write(path: Path, named: Mapping[str, Encoded]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **pack(named))  # type: ignore[arg-type]
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_splits(
    key: Mapping[str, object],
    names: tuple[str, ...],
    build: Callable[[], dict[str, Encoded]],
) -> dict[str, Encoded]:
    """The encoded splits stored under ``key``, built (and stored) when absent or
    unreadable. A cache that cannot be written (read-only disk) is skipped silently: it
    saves time, it never decides a result."""
    root = cache_root()
    if root is None:
        return build()
    path = root / "partitions" / f"{digest(key)}.npz"
    found = _read(path, names)
    if found is not None:
        return found
    built = build()
    with contextlib.suppress(OSError):
        _write(path, built)
    return built
