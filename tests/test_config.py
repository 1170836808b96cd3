"""Config loading: every kind of mistake ends in one sentence naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*.yaml"))  # run configs; device profiles live below


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_the_mr_recipe_switches_to_sgd_with_one_override() -> None:
    """configs/mr.yaml carries AdamW's ε; SGD ignores it rather than refusing the
    recipe (the hetero benchmark's SGD runs switch optimizer this way)."""
    cfg = load_config(ROOT / "configs" / "mr.yaml", ["train.optimizer=sgd"])
    assert cfg.train.optimizer == "sgd" and cfg.train.adam_eps == 1e-3


@pytest.mark.parametrize(
    "path", [*CONFIGS, *sorted(ROOT.glob("configs/audit/*.yaml"))], ids=lambda p: p.name
)
def test_shipped_configs_read_files_of_the_repository(path: Path) -> None:
    """A fresh clone runs every shipped config: its data files are in the repository."""
    data = load_config(path).data
    for name in (data.source, data.test_source):
        if name is not None and name != "synthetic" and not name.startswith("hf:"):
            assert (ROOT / name).resolve().is_relative_to(ROOT), name
            assert (ROOT / name).is_file(), name


@pytest.mark.parametrize(
    "path",
    sorted(ROOT.glob("configs/devices/**/*.yaml")),
    ids=lambda p: str(p.relative_to(ROOT / "configs" / "devices")),
)
def test_shipped_device_profiles_load(path: Path) -> None:
    from fedpeft.devices import load_profile

    assert load_profile(str(path)).memory_mb > 0


def test_defaults_are_valid() -> None:
    cfg = config_from_dict({})
    assert cfg.model.name == "minilm" and cfg.federation.aggregator == "fedit"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"modle": {}}, "Unknown config key 'modle'"),
        ({"simulation": {"ray_address": " "}}, "'simulation.ray_address' should be a Ray head"),
        ({"lora": {"rank": 4}}, "Unknown config key 'lora.rank'"),
        ({"lora": {"r": "eight"}}, "'lora.r' should be int, got 'eight'"),
        ({"lora": {"r": 2.5}}, "'lora.r' should be int"),
        ({"train": {"lr": "fast"}}, "'train.lr' should be float"),
        ({"lora": {"train_head": 1}}, "'lora.train_head' should be bool"),
        ({"lora": {"scaling": "sqrt"}}, "'lora.scaling' should be one of"),
        ({"lora": {"target_modules": "query"}}, "'lora.target_modules' should be a list"),
        ({"lora": {"rank_pattern": {"query": "x"}}}, "'lora.rank_pattern.query' should be int"),
        (
            {"model": {"task": "regression"}},
            "'model.task' should be one of ['classification', 'causal_lm']",
        ),
        ({"partition": {"scheme": "zipf"}}, "'partition.scheme' should be one of"),
        ({"lora": {"r": 0}}, "'lora.r' should be a positive integer."),
        ({"train": {"lr": -1}}, "'train.lr' should be positive."),
        ({"data": {"test_fraction": 1.5}}, "'data.test_fraction' should be in (0, 1)."),
        ({"federation": {"aggregator": "magic"}}, "'federation.aggregator' should be one of"),
        (
            {"federation": {"min_clients": 9}, "partition": {"num_clients": 3}},
            "'federation.min_clients' should be between 1 and",
        ),
        ({"model": 3}, "'model' should be a mapping"),
    ],
)
def test_mistakes_name_the_key(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_yaml_scientific_notation_is_a_float() -> None:
    assert config_from_dict({"train": {"lr": "5e-4"}}).train.lr == pytest.approx(5e-4)


def test_overrides_apply_and_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\n")
    cfg = load_config(
        path, ["lora.r=16", "lora.target_modules=[query, key]", "federation.rounds=7"]
    )
    assert cfg.lora.r == 16
    assert cfg.lora.target_modules == ("query", "key")
    assert cfg.federation.rounds == 7


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("lora.r", "should look like section.key=value"),
        ("lora.nope=3", "Unknown config key 'lora.nope'"),
        ("seed.x=1", "'seed' is not a section"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert fragment in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_config_is_hashable_and_round_trips_json() -> None:
    from fedpeft.config import config_from_json

    cfg = config_from_dict({"lora": {"rank_pattern": {"query": 4}, "target_modules": ["query"]}})
    assert hash(cfg) == hash(config_from_json(cfg.to_json()))
    assert config_from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"seed": -1}, "'seed' should be an integer from 0 to 2**32 - 1"),
        ({"lora": {"alpha": -2.0}}, "'lora.alpha' should be a positive number."),
        ({"lora": {"target_modules": []}}, "'lora.target_modules' should list module names"),
        ({"fleet": {"profiles": ["a.yaml"]}}, "'fleet.profiles' and 'fleet.mix' go together."),
        (
            {"fleet": {"profiles": ["a.yaml"], "mix": {"a": 2}}, "partition": {"num_clients": 3}},
            "should add up to",
        ),
        ({"train": {"optimizer": "adam"}}, "'train.optimizer' should be one of adamw, sgd"),
        ({"train": {"momentum": 0.9}}, "'train.momentum' applies to 'train.optimizer: sgd'"),
        ({"train": {"optimizer": "sgd", "momentum": 1.0}}, "'train.momentum' should be in"),
        ({"train": {"adam_eps": 0}}, "'train.adam_eps' should be positive."),
    ],
)
def test_more_value_rules(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert fragment in str(info.value)


def test_override_value_that_is_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, ["lora.target_modules=[query, value"])


def test_non_utf8_config_and_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "latin.yaml"
    bad.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    good = tmp_path / "rel.yaml"
    good.write_text("data:\n  source: data/train.jsonl\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(good)
    assert cfg.data.source == str(
        tmp_path / "data" / "train.jsonl"
    )  # clients elsewhere read the same file


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=.inf",
        "train.lr=-.inf",
        "train.lr=.nan",
        "train.lr=inf",  # YAML reads a string here; float() turns it into inf
        "train.lr=1e999",
        "train.weight_decay=.inf",
        "train.logit_adjustment=.inf",
        "lora.alpha=.inf",
        "partition.alpha=.inf",
        "federation.timeout=.inf",
        "federation.max_update_norm=.nan",
        "compression.density=.nan",
        "simulation.client_cpus=.inf",
        "privacy.delta=.nan",  # checked even with privacy.mode: none
        "privacy.epsilon=.inf",
    ],
)
def test_non_finite_numbers_are_refused(tmp_path: Path, override: str) -> None:
    """inf passed every 'positive' rule and nan every rule a mode did not reach."""
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    key = override.partition("=")[0]
    message = str(info.value)
    assert f"'{key}' should be a finite number" in message
    assert "\n" not in message


@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**32), "-1"])
def test_seed_out_of_range_is_one_sentence(tmp_path: Path, seed: str) -> None:
    """A huge seed passed validation and ended in torch.manual_seed's OverflowError."""
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [f"seed={seed}"])
    assert str(info.value) == "'seed' should be an integer from 0 to 2**32 - 1 (4294967295)."


def test_the_largest_seed_works_in_every_consumer(tmp_path: Path) -> None:
    """Every use of the seed in the code base, with the offsets it adds, at 2**32 - 1."""
    import random

    import numpy as np
    import torch

    from fedpeft.client import round_seed

    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    seed = load_config(path, [f"seed={2**32 - 1}"]).seed
    torch.manual_seed(seed)  # models.build_peft_model(init_seed=seed)
    torch.manual_seed(round_seed(seed, 10**6, 10**4))  # train.train_local's dropout
    np.random.default_rng([seed, 10**6])  # server sampling
    for offset in (0, 1, 2, 7919, 7920, 7921):  # data caps, canaries
        np.random.default_rng(seed + offset)
    random.Random(seed * 7919 + 10**4).shuffle([1, 2])  # data.client_rows
    random.Random(seed).shuffle([1, 2])  # devices.assign_profiles


def test_noise_seed_has_the_seed_range(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=r"'privacy.noise_seed' should be an integer from 0"):
        load_config(
            path, ["privacy.mode=user", "privacy.noise_multiplier=1", f"privacy.noise_seed={2**32}"]
        )
