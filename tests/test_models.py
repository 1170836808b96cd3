"""Base models and peft adapters: what is trainable, what is exchanged, what flows."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, ViTConfig

from fedpeft import models
from fedpeft.config import LoraConfig, ModelConfig
from fedpeft.models import (
    ModelError,
    adapter_state,
    build_peft_model,
    load_adapter_state,
    load_base_model,
    load_tokenizer,
    packaged_minilm_path,
)

TINY_BERT = ModelConfig(name="tiny-bert", max_length=32)
TINY_GPT2 = ModelConfig(name="tiny-gpt2", task="causal_lm", max_length=32)


def test_only_adapters_and_head_are_exchanged() -> None:
    model = build_peft_model(TINY_BERT, LoraConfig(r=4), num_labels=3)
    state = adapter_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v.size for v in state.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert all("lora_" in k or "classifier" in k for k in state)
    assert any("classifier" in k for k in state) and len(trainable) == len(state)
    # 2 layers x (query, value) x (A, B) + classifier weight and bias
    assert len(state) == 2 * 2 * 2 + 2


def test_head_can_stay_frozen() -> None:
    state = adapter_state(build_peft_model(TINY_BERT, LoraConfig(r=4, train_head=False), 3))
    assert all("lora_" in k for k in state)


def test_rank_pattern_and_layers_to_transform_flow_into_peft() -> None:
    lora = LoraConfig(
        r=2, target_modules=("query", "value"), layers_to_transform=(1,), rank_pattern={"value": 6}
    )
    state = adapter_state(build_peft_model(TINY_BERT, lora, 2))
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and all(".layer.1." in k for k in lora_keys)
    a_value = next(v for k, v in state.items() if "value.lora_A" in k)
    a_query = next(v for k, v in state.items() if "query.lora_A" in k)
    assert a_value.shape[0] == 6 and a_query.shape[0] == 2


def test_base_models_are_identical_across_builds() -> None:
    """Weights outside the adapters never travel, so every process must agree on them."""
    m1 = build_peft_model(TINY_BERT, LoraConfig(r=4), 3, init_seed=1)
    models._cached_base.cache_clear()  # as in another process: built again from scratch
    m2 = build_peft_model(TINY_BERT, LoraConfig(r=4), 3, init_seed=2)
    frozen1 = {n: p for n, p in m1.named_parameters() if not p.requires_grad}
    frozen2 = dict(m2.named_parameters())
    assert all((p == frozen2[n]).all() for n, p in frozen1.items())
    # and the adapter init follows the run seed
    s1, s2 = adapter_state(m1), adapter_state(m2)
    assert any((s1[k] != s2[k]).any() for k in s1)


def test_adapter_state_round_trips() -> None:
    model = build_peft_model(TINY_BERT, LoraConfig(r=4), 3, init_seed=1)
    other = adapter_state(build_peft_model(TINY_BERT, LoraConfig(r=4), 3, init_seed=2))
    load_adapter_state(model, other)
    got = adapter_state(model)
    assert all((got[k] == other[k]).all() for k in other)


def test_causal_lm_gets_default_gpt2_targets() -> None:
    state = adapter_state(build_peft_model(TINY_GPT2, LoraConfig(r=4), 1))
    assert state and all("c_attn.lora_" in k for k in state)


def test_packaged_minilm_loads_offline() -> None:
    model = build_peft_model(
        ModelConfig(name="minilm"), LoraConfig(r=8, target_modules=("query", "value")), 2
    )
    state = adapter_state(model)
    # 6 layers x (q, v) x (A: 8x384, B: 384x8) + classifier 2x384 + 2
    assert sum(v.size for v in state.values()) == 6 * 2 * 2 * 8 * 384 + 2 * 384 + 2


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("/no/such/model", "does not exist"),
        ("someone/some-model", "is not a local directory (no such path"),
        ("my model", "nor a valid Hugging Face hub id"),
    ],
)
def test_bad_model_names(name: str, fragment: str) -> None:
    with pytest.raises(ModelError) as info:
        build_peft_model(ModelConfig(name=name), LoraConfig(), 2)
    assert fragment in str(info.value)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"has no config\.json"):
        build_peft_model(ModelConfig(name=str(tmp_path)), LoraConfig(), 2)


def _tiny_bert_dir(directory: Path, num_labels: int = 2, tokenizer: bool = True) -> str:
    """A local model directory as ``save_pretrained`` writes it: a 2-layer BERT with a
    classification head, and (unless told not to) the packaged MiniLM tokenizer."""
    tok = AutoTokenizer.from_pretrained(packaged_minilm_path())
    config = models._tiny_config("tiny-bert", tok.vocab_size, num_labels)  # as tiny-bert is built
    BertForSequenceClassification(config).save_pretrained(directory)
    if tokenizer:
        tok.save_pretrained(directory)
    return str(directory)


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    """transformers would build a 5-token tokenizer and every word would be [UNK]."""
    name = _tiny_bert_dir(tmp_path, tokenizer=False)
    with pytest.raises(
        ModelError, match=r"has no tokenizer files \(none of tokenizer\.json, "
    ) as info:
        load_tokenizer(name)
    assert f"'{name}'" in str(info.value) and "vocab.txt" in str(info.value)
    # a directory with real tokenizer files still loads
    assert len(load_tokenizer(packaged_minilm_path())) == 30522


@pytest.mark.parametrize("name", ["bert-base-uncased", "mymodels/bert"])
def test_hub_id_while_hf_hub_offline_fails_without_a_request(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where 'mymodels/bert' surely does not exist
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lookups: list[Any] = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        lookups.append(args[0])
        return real_getaddrinfo(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    with pytest.raises(ModelError) as info:
        build_peft_model(ModelConfig(name=name), LoraConfig(), 2)
    message = str(info.value)
    assert f"'{name}' is not a local directory (no such path '{tmp_path / name}')" in message
    assert "HF_HUB_OFFLINE is set" in message and "\n" not in message
    assert lookups == []  # not a single request, not even a name lookup


def test_an_unreachable_hub_is_asked_once_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE, one probe decides (transformers' own download retried for
    about a minute, with a warning per attempt). The hub is pointed at a loopback port
    nothing listens on, so no test sends a request off this machine."""
    from huggingface_hub import constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    models._hub_unreachable.cache_clear()  # probe again, as a fresh process would
    with pytest.raises(ModelError) as info:
        build_peft_model(ModelConfig(name="bert-base-uncased"), LoraConfig(), 2)
    message = str(info.value)
    assert "'bert-base-uncased' is not a local directory" in message
    assert "the Hugging Face hub (http://127.0.0.1:9) is unreachable" in message


def test_config_json_that_is_not_json(tmp_path: Path) -> None:
    name = _tiny_bert_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert",\n')
    with pytest.raises(
        ModelError, match=r"config\.json' is not valid JSON \(.* line 2, column 1\)"
    ):
        build_peft_model(ModelConfig(name=name), LoraConfig(), 2)


def test_trained_head_with_another_number_of_labels(tmp_path: Path) -> None:
    """The head is refused, not silently re-initialised: its training would be lost."""
    name = _tiny_bert_dir(tmp_path, num_labels=2)
    with pytest.raises(
        ModelError, match=r"head of '.*' has 2 labels but the data has 4; use data with 2 labels"
    ):
        build_peft_model(ModelConfig(name=name), LoraConfig(r=2), 4)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("unknown model_type", "names model_type 'frobnicator', which transformers"),
        ("config.json is a list", "config.json' is not a JSON object"),
        ("no weights", "holds no weights (no model.safetensors"),
        ("truncated weights", "are not a valid safetensors file (Error while deserializing"),
        ("an image model", "is a vit model, which transformers has no AutoModelForSequenceC"),
    ],
)
def test_damaged_model_directories(tmp_path: Path, damage: str, fragment: str) -> None:
    name = _tiny_bert_dir(tmp_path)
    config, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    if damage == "unknown model_type":
        config.write_text(config.read_text().replace('"bert"', '"frobnicator"'))
    elif damage == "config.json is a list":
        config.write_text("[1, 2]")
    elif damage == "no weights":
        weights.unlink()
    elif damage == "an image model":
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).to_json_file(config)
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError) as info:
        load_tokenizer(name)  # the CLI's preflight loads the tokenizer first
        build_peft_model(ModelConfig(name=name), LoraConfig(r=2), 2)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_target_modules_that_do_not_exist() -> None:
    with pytest.raises(ModelError, match="LoRA config does not fit model"):
        build_peft_model(TINY_BERT, LoraConfig(target_modules=("no_such_proj",)), 2)


def test_local_model_directory(tmp_path: Path) -> None:
    """Any local Hugging Face model directory (weights + tokenizer) loads by path."""
    load_base_model(TINY_BERT, 2).save_pretrained(tmp_path)
    load_tokenizer("tiny-bert").save_pretrained(tmp_path)
    state = adapter_state(build_peft_model(ModelConfig(name=str(tmp_path)), LoraConfig(r=2), 2))
    assert any("lora_A" in k for k in state)


def test_model_dropout_sets_every_dropout_layer() -> None:
    """model.dropout: 0 makes a training step deterministic (the audit's fedSGD setting)."""
    import torch

    build = build_peft_model
    dropouts = [
        m.p
        for m in build(ModelConfig(name="tiny-bert", dropout=0.0), LoraConfig(r=2), 2).modules()
        if isinstance(m, torch.nn.Dropout)
    ]
    assert dropouts and all(p == 0.0 for p in dropouts)
    default = build(ModelConfig(name="tiny-bert"), LoraConfig(r=2), 2)
    assert any(m.p == 0.1 for m in default.modules() if isinstance(m, torch.nn.Dropout))


MEAN = ModelConfig(name="tiny-bert", max_length=16, pooling="mean")


def _batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    """Token ids 1000.. with [CLS]/[SEP] framing, right-padded to the longest."""
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.tensor([101, *range(1000, 1000 + n - 2), 102])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def test_mean_pooling_feeds_the_head_the_masked_mean_of_token_states() -> None:
    model = load_base_model(MEAN, num_labels=3)
    batch = _batch([5, 9])
    out = model(**batch, output_hidden_states=True)
    states, mask = out.hidden_states[-1], batch["attention_mask"].unsqueeze(-1).float()
    mean = (states * mask).sum(1) / mask.sum(1)
    assert torch.allclose(out.logits, model.classifier(mean), atol=1e-6)
    # padding changes nothing: the first sentence alone gives the same logits
    alone = model(**_batch([5])).logits
    assert torch.allclose(alone[0], out.logits[0], atol=1e-5)


@torch.no_grad()
def test_each_copy_of_a_mean_pooling_model_pools_with_its_own_mask() -> None:
    first, second = load_base_model(MEAN, 3), load_base_model(MEAN, 3)
    first(**_batch([4, 6]))
    assert first.bert.pooler.mask is not None and second.bert.pooler.mask is None
    cls = load_base_model(ModelConfig(name="tiny-bert", max_length=16), 3)
    assert type(cls.bert.pooler).__name__ == "BertPooler"  # the default keeps BERT's


def test_mean_pooling_needs_a_pooler() -> None:
    with pytest.raises(ModelError, match="needs a BERT-like model with a pooler"):
        build_peft_model(ModelConfig(name="tiny-gpt2", pooling="mean"), LoraConfig(r=2), 2)
