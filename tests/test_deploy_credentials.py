"""``fedpeft credentials``: a directory it cannot use, or one that already holds
credentials, ends in one sentence; nothing is replaced without ``force``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import ConfigError
from fedpeft.deploy import write_credentials

FILES = ["ca.crt", "ca.key", "server.crt", "server.key", "node-0", "node-0.pub"]


def _contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("where", ["proc", "a file", "under a file"])
def test_a_directory_that_cannot_be_created_is_one_sentence(tmp_path: Path, where: str) -> None:
    """/proc/nope used to end in FileNotFoundError's traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    out = {"proc": Path("/proc/nope"), "a file": blocker, "under a file": blocker / "creds"}[where]
    with pytest.raises(ConfigError) as info:
        write_credentials(out, 1)
    message = str(info.value)
    reason = {"proc": "No such file", "a file": "File exists", "under a file": "Not a directory"}
    assert message.startswith(f"Cannot create the credentials directory '{out}' (")
    assert reason[where] in message and "\n" not in message


def test_a_file_that_cannot_be_written_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").mkdir()  # what --force would write over is a directory
    with pytest.raises(ConfigError) as info:
        write_credentials(tmp_path, 1, force=True)
    assert str(info.value) == (
        f"Cannot write the credentials file '{tmp_path / 'ca.crt'}' (Is a directory)."
    )


def test_existing_credentials_are_kept_unless_forced(tmp_path: Path) -> None:
    """A second run used to replace the CA and every node key without a word: every
    deployed node then stopped being trusted."""
    first = write_credentials(tmp_path, 1)
    assert sorted(p.name for p in first) == sorted(FILES)
    before = _contents(tmp_path)
    with pytest.raises(ConfigError) as info:
        write_credentials(tmp_path, 1)
    assert str(info.value) == (
        f"'{tmp_path / 'ca.crt'}' already exists; pass --force to replace the credentials in "
        f"'{tmp_path}' (every node set up with the old CA or keys then has to get the new ones)."
    )
    assert _contents(tmp_path) == before
    again = write_credentials(tmp_path, 1, force=True)
    after = _contents(tmp_path)
    assert again == first and after.keys() == before.keys()
    assert all(after[name] != before[name] for name in FILES)  # a new CA and new keys


def test_any_one_existing_file_refuses_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "node-2.pub").write_text("ecdsa-sha2-nistp384 AAAA old\n")
    (tmp_path / "notes.txt").write_text("not ours\n")
    with pytest.raises(ConfigError, match=r"node-2\.pub' already exists; pass --force"):
        write_credentials(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-2.pub", "notes.txt"]
    # files it does not write never block it
    assert len(write_credentials(tmp_path, 2)) == 8
