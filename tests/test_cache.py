"""The nodes' on-disk partition cache: a hit equals a fresh build and skips it, a changed
source or a damaged file is rebuilt, and ``FEDPEFT_CACHE=off`` writes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpeft import cache, client, data
from fedpeft.config import config_from_dict
from fedpeft.train import Encoded


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    client._client_data.cache_clear()  # the in-process cache would hide the disk
    yield root
    client._client_data.cache_clear()


def _write_rows(path: Path, n: int) -> None:
    rows = [{"text": f"sentence number {i} " * (1 + i % 5), "label": i % 2} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(source: Path):  # type: ignore[no-untyped-def]
    return config_from_dict(
        {
            "model": {"name": "tiny-bert", "max_length": 16},
            "data": {"source": str(source), "test_fraction": 0.2},
            "partition": {"num_clients": 3, "scheme": "dirichlet", "alpha": 0.5},
        }
    )


def _fresh(cfg, partition_id: int) -> client.ClientData:  # type: ignore[no-untyped-def]
    client._client_data.cache_clear()
    return client.client_data(cfg, partition_id)


def test_pack_round_trip_keeps_ragged_and_empty_sequences() -> None:
    enc = Encoded(input_ids=[[101, 7, 102], [], [5]], labels=[1, 0, 2])
    back = cache.unpack(cache.pack({"train": enc}), "train")
    assert back == enc


def test_hit_equals_build_and_skips_partitioning(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "rows.jsonl"
    _write_rows(source, 90)
    cfg = _config(source)
    cold = [_fresh(cfg, pid) for pid in range(3)]
    assert len(list((cache_dir / "partitions").glob("*.npz"))) == 3

    def no_partitioning(*args: object) -> None:
        raise AssertionError("a cache hit must not read or partition the dataset")

    monkeypatch.setattr(client, "client_rows", no_partitioning)
    warm = [_fresh(cfg, pid) for pid in range(3)]
    assert warm == cold
    assert sum(len(d.train) + len(d.test) for d in warm) == 72  # 90 rows less the 20% held out


def test_changed_source_is_a_new_key(cache_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    _write_rows(source, 60)
    before = [_fresh(_config(source), pid) for pid in range(3)]
    _write_rows(source, 150)
    data._load_dataset_cached.cache_clear()  # this process's copy of the file; a node's is new
    data._partitions.cache_clear()
    after = [_fresh(_config(source), pid) for pid in range(3)]
    assert sum(len(d.train) for d in after) > sum(len(d.train) for d in before)
    assert len(list((cache_dir / "partitions").glob("*.npz"))) == 6


def test_damaged_file_is_rebuilt(cache_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    _write_rows(source, 60)
    cfg = _config(source)
    built = _fresh(cfg, 1)
    [path] = (cache_dir / "partitions").glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])  # as if a crash had cut it
    assert _fresh(cfg, 1) == built
    assert cache._read(path, ("train", "test")) is not None  # rewritten whole


def test_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    assert cache.cache_root() is None
    calls = []

    def build() -> dict[str, Encoded]:
        calls.append(1)
        return {"train": Encoded([[1]], [0])}

    cache.cached_splits({"k": 1}, ("train",), build)
    cache.cached_splits({"k": 1}, ("train",), build)
    assert len(calls) == 2
