"""docs/configuration.md is generated from fedpeft/config.py's docstrings, and every
config key has a documented meaning there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedpeft import configdoc

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
SECTIONS = configdoc.sections()


def test_page_is_current() -> None:
    assert PAGE.read_text(encoding="utf-8") == configdoc.render(), (
        "docs/configuration.md is stale: run `make docs` to regenerate it from the "
        "docstrings of fedpeft/config.py"
    )


@pytest.mark.parametrize(("section", "cls"), SECTIONS, ids=[name for name, _ in SECTIONS])
def test_every_field_has_a_meaning(section: str, cls: type) -> None:
    meanings = configdoc.meanings(cls)
    missing = [name for name, text in meanings.items() if not text.strip()]
    assert not missing, (
        f"{cls.__name__} ({section}:) has no 'Args:' entry for {missing}; document each "
        "field in the class docstring, then run `make docs`"
    )


@pytest.mark.parametrize(("section", "cls"), SECTIONS, ids=[name for name, _ in SECTIONS])
def test_every_args_entry_names_a_field(section: str, cls: type) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    stale = sorted(set(configdoc.args_block(cls.__doc__)) - fields)
    assert not stale, f"{cls.__name__} ({section}:) documents fields it does not have: {stale}"


def test_top_level_keys_have_a_meaning() -> None:
    meanings = configdoc.top_level_meanings()
    assert "seed" in meanings
    missing = [name for name, text in meanings.items() if not text.strip()]
    assert not missing, f"Config has no 'Args:' entry or sentence for {missing}"


def test_every_section_is_on_the_page() -> None:
    page = configdoc.render()
    for section, cls in SECTIONS:
        assert f"\n## {section}\n" in page
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in page


def test_args_block_joins_continuation_lines() -> None:
    doc = """Summary.

    Args:
        first: one line.
        second: a long entry
            that goes on: with a colon
            and ends here.
        third (int): typed.

    Returns:
        nothing.
    """
    assert configdoc.args_block(doc) == {
        "first": "one line.",
        "second": "a long entry that goes on: with a colon and ends here.",
        "third": "typed.",
    }
    assert configdoc.args_block("No block here.") == {}


def test_defaults_and_literals() -> None:
    assert configdoc.yaml_literal(None) == "null"
    assert configdoc.yaml_literal(True) == "true"
    assert configdoc.yaml_literal(("a", 1)) == "[a, 1]"
    assert configdoc.yaml_literal({"none": {}}) == "{none: {}}"
    assert configdoc.yaml_literal("") == '""'
    assert configdoc.markdown("``a|b`` or c|d, 2**32") == "`a\\|b` or c\\|d, 2\\*\\*32"


def test_an_undocumented_field_has_no_meaning() -> None:
    @dataclasses.dataclass(frozen=True)
    class Section:
        """A section.

        Args:
            documented: has a meaning.
        """

        documented: int = 1
        forgotten: int = 2

    assert configdoc.meanings(Section) == {"documented": "has a meaning.", "forgotten": ""}
