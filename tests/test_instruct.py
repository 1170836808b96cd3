"""Instruction tuning: chat rows from files, response-only targets, left-padded greedy
generation and exact match, on the SmolLM2 tokenizer (tiny-llama) and a tokenizer
without a chat template (tiny-gpt2's)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedpeft import instruct, train
from fedpeft.cache import pack, unpack
from fedpeft.config import DataConfig, EvalConfig, LoraConfig, ModelConfig
from fedpeft.data import load_dataset
from fedpeft.errors import DataError
from fedpeft.models import build_peft_model, load_tokenizer
from fedpeft.train import collate, encode, forward_loss, instruction_metrics, lm_logits

LLAMA = ModelConfig(name="tiny-llama", task="causal_lm", max_length=96)


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer("tiny-llama")


def _chat(user: str, answer: str) -> instruct.Chat:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _trained(tok: Any, ids: list[int], targets: list[int]) -> str:
    return str(tok.decode([i for i, t in zip(ids, targets, strict=True) if t != instruct.IGNORE]))


def test_targets_are_the_response_and_its_end_of_turn(tok: Any) -> None:
    ids, targets = instruct.chat_tokens(tok, _chat("Is it good?\n\nfine film", "positive"))
    assert len(ids) == len(targets)
    assert _trained(tok, ids, targets) == "positive<|im_end|>\n"
    prompt = instruct.prompt_tokens(tok, _chat("Is it good?\n\nfine film", "positive"))
    assert ids[: len(prompt)] == prompt  # the model learns to answer where it is asked
    assert all(t == instruct.IGNORE for t in targets[: len(prompt)])
    assert [t for t in targets if t != instruct.IGNORE] == ids[len(prompt) :]


def test_every_assistant_turn_is_trained_and_no_user_turn(tok: Any) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    ]
    ids, targets = instruct.chat_tokens(tok, chat)
    assert _trained(tok, ids, targets) == "first answer<|im_end|>\nsecond answer<|im_end|>\n"
    assert "Be brief" not in _trained(tok, ids, targets)
    (prompt,) = encode([{"text": "", "label": 0, "messages": chat}], tok, 200).prompts or [[]]
    assert prompt == instruct.prompt_tokens(tok, chat)  # the second question, answered
    assert tok.decode(prompt).endswith("second question<|im_end|>\n<|im_start|>assistant\n")


def test_a_tokenizer_without_template_gets_the_alpaca_prompt() -> None:
    bert = load_tokenizer("tiny-gpt2")
    assert not bert.chat_template
    ids, targets = instruct.chat_tokens(bert, _chat("name the topic", "sports"))
    assert bert.decode(ids).startswith("# # # instruction")
    assert bert.eos_token is None  # BERT's vocabulary: an answer ends with [SEP]
    assert _trained(bert, ids, targets) == "sports [SEP]"


@pytest.mark.parametrize(
    ("max_length", "kept"),
    [(100, "all"), (20, "tail"), (3, "tail"), (2, None)],
)
def test_truncation_keeps_the_response(tok: Any, max_length: int, kept: str | None) -> None:
    ids, targets = instruct.chat_tokens(tok, _chat("word " * 30, "positive"))
    cut = instruct.truncate(ids, targets, max_length)
    if kept is None:  # the response (3 tokens) does not fit even with nothing before it
        assert cut is None
        return
    assert cut is not None
    assert len(cut[0]) == min(len(ids), max_length)
    assert cut[0] == ids[-len(cut[0]) :]
    assert _trained(tok, *cut) == "positive<|im_end|>\n"


@pytest.mark.parametrize(
    ("generation", "reference", "hit"),
    [
        ("Positive.", "positive", True),
        ("  positive\n", "positive", True),
        ("positive!!", "Positive", True),
        ("It is positive.", "positive", False),
        ("negative", "positive", False),
        ("", "positive", False),
        ("New  York", "new york", True),
    ],
)
def test_exact_match_after_normalization(generation: str, reference: str, hit: bool) -> None:
    assert instruct.exact_match(generation, reference) is hit


def test_loss_covers_the_response_tokens_only(tok: Any) -> None:
    rows = [
        {"text": "a", "label": 0, "messages": _chat("short one", "negative")},
        {"text": "b", "label": 1, "messages": _chat("a much longer question " * 3, "positive")},
    ]
    data = encode(rows, tok, 96)
    model = build_peft_model(LLAMA, LoraConfig(r=2), num_labels=2)
    batch = collate(data, [0, 1], tok.pad_token_id, "causal_lm")
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1][labels != -100], labels[labels != -100]
    )
    assert torch.allclose(loss, manual, atol=1e-5)
    assert int((labels != -100).sum()) == 6  # two 3-token answers
    # training computes the logits only where a target follows, to the same loss
    kept, _ = lm_logits(model, batch)
    assert kept.shape[1] < batch["input_ids"].shape[1] - 1
    assert torch.allclose(forward_loss(model, batch, "causal_lm")[0], loss, atol=1e-5)


def test_left_padded_batches_answer_as_single_prompts(tok: Any) -> None:
    model = build_peft_model(LLAMA, LoraConfig(r=2), num_labels=2)
    prompts = [
        instruct.prompt_tokens(tok, _chat(q, "")) for q in ("hi", "a far longer question here")
    ]
    pad, eos = int(tok.pad_token_id), tok.eos_token_id
    together = instruct.generate(model, prompts, pad, eos, max_new_tokens=6, batch_size=2)
    alone = [
        instruct.generate(model, [p], pad, eos, max_new_tokens=6, batch_size=1)[0] for p in prompts
    ]
    assert together == alone
    assert all(0 < len(a) <= 6 for a in alone)


def test_instruction_metrics_score_and_sample(tok: Any) -> None:
    rows = [{"text": str(i), "label": 0, "messages": _chat(f"q{i}", "yes")} for i in range(5)]
    data = encode(rows, tok, 64)
    assert data.prompts == [instruct.prompt_tokens(tok, r["messages"]) for r in rows]
    model = build_peft_model(LLAMA, LoraConfig(r=2), num_labels=2)
    metrics, samples = instruction_metrics(
        model, data, tok, EvalConfig(max_new_tokens=3, generate_examples=4, samples=2), 8
    )
    assert set(metrics) == {"loss", "perplexity", "exact_match"}
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert len(samples) == 2 and samples[0]["reference"] == "yes"
    assert samples[0]["prompt"].endswith("<|im_start|>assistant\n")
    none, _ = instruction_metrics(model, data, tok, EvalConfig(generate_examples=0), 8)
    assert set(none) == {"loss", "perplexity"} and none["loss"] == metrics["loss"]


@pytest.fixture(scope="module")
def overfit(tok: Any) -> tuple[Any, Any]:
    """A tiny Llama trained on 8 rows until its greedy answers are mostly theirs (its
    frozen, random output layer keeps the loss high; the argmax is what it learns)."""
    words = ["yes", "no", "maybe so", "yes"]
    rows = [
        {"text": str(i), "label": 0, "messages": _chat(f"question {i}", words[i % 4])}
        for i in range(8)
    ]
    data = encode(rows, tok, 64)
    model = build_peft_model(LLAMA, LoraConfig(r=8, alpha=16), num_labels=2, init_seed=0)
    cfg = train.TrainConfig(local_steps=60, batch_size=8, lr=2e-2)
    train.train_local(model, data, cfg, int(tok.pad_token_id), "causal_lm", seed=0)
    return model, data


@pytest.mark.parametrize("max_new_tokens", [1, 4])  # an answer and its end: 2 tokens or more
def test_settled_answers_score_as_greedy_decoding_does(
    tok: Any, overfit: tuple[Any, Any], max_new_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = overfit
    # held out: the same prompts, some with a reference the model never learned
    refs = [r if i % 3 else "elephant" for i, r in enumerate(data.references or [])]
    held = dataclasses.replace(data, references=refs)
    generated: list[int] = []
    real = instruct.generate
    monkeypatch.setattr(
        instruct, "generate", lambda m, p, *a, **k: generated.append(len(p)) or real(m, p, *a, **k)
    )
    cfg = EvalConfig(max_new_tokens=max_new_tokens, generate_examples=8, samples=1)
    metrics, _ = instruction_metrics(model, held, tok, cfg, 3)
    greedy = real(
        model, data.prompts or [], int(tok.pad_token_id), tok.eos_token_id, max_new_tokens, 3
    )
    texts = tok.batch_decode(greedy, skip_special_tokens=True)
    expected = sum(instruct.exact_match(t, r) for t, r in zip(texts, refs, strict=True)) / 8
    assert metrics["exact_match"] == expected > 0
    if max_new_tokens == 1:  # no answer ends within 1 token: teacher forcing settles none
        assert sum(generated) == 8
    else:  # teacher forcing settled some answers: they were not generated
        assert sum(generated) < 8


def test_a_row_truncated_to_its_answer_is_scored(tok: Any) -> None:
    chat = _chat("a question of several words", "one two three")
    _, targets = instruct.chat_tokens(tok, chat)
    answer = sum(t != instruct.IGNORE for t in targets)
    data = encode([{"text": "x", "label": 0, "messages": chat}], tok, answer)
    assert data.targets is not None and instruct.IGNORE not in data.targets[0]  # no prompt
    model = build_peft_model(LLAMA, LoraConfig(r=2), num_labels=2)
    cfg = EvalConfig(max_new_tokens=2, samples=0)
    metrics, _ = instruction_metrics(model, data, tok, cfg, 4)
    assert set(metrics) == {"loss", "perplexity", "exact_match"}


def test_a_system_turn_is_added_where_a_chat_has_none(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(20)]
    cfg = DataConfig(
        source=_write(tmp_path / "mr.jsonl", rows), prompt="{text}", system="Be brief."
    )
    ds = load_dataset(cfg, "causal_lm", 0)
    assert all(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in ds.train)
    own = [{"role": "system", "content": "Mine."}, *_chat("q", "a")]
    assert instruct.with_system(own, "Be brief.") == own
    assert instruct.with_system(own[1:], None) == own[1:]


def test_encoded_instructions_survive_the_cache(tok: Any) -> None:
    rows = [{"text": "t", "label": 1, "messages": _chat("question é", "réponse")}]
    data = encode(rows, tok, 64)
    assert unpack(pack({"train": data}), "train") == data


# --------------------------------------------------------------------------- files


def _write(path: Path, records: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_alpaca_and_chat_files_become_chats(tmp_path: Path) -> None:
    alpaca = [
        {"instruction": f"add {i} and 1", "input": "" if i % 2 else "numbers", "output": str(i + 1)}
        for i in range(20)
    ]
    ds = load_dataset(DataConfig(source=_write(tmp_path / "a.jsonl", alpaca)), "causal_lm", 0)
    assert ds.num_labels == 1  # unlabelled: one class, partitions differ in size only
    row = next(
        r for r in ds.train + ds.test if r["messages"][0]["content"] == "add 4 and 1\n\nnumbers"
    )
    assert row["messages"][1] == {"role": "assistant", "content": "5"}
    chats = [{"messages": _chat(f"q{i}", f"a{i}"), "label": i % 2} for i in range(20)]
    ds = load_dataset(DataConfig(source=_write(tmp_path / "c.jsonl", chats)), "causal_lm", 0)
    assert ds.num_labels == 2 and all(len(r["messages"]) == 2 for r in ds.train)


def test_labelled_rows_become_instructions_with_label_words(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(20)]
    cfg = DataConfig(
        source=_write(tmp_path / "mr.jsonl", rows),
        prompt="Is the sentiment positive or negative?\n\n{text}",
        label_words=("negative", "positive"),
    )
    ds = load_dataset(cfg, "causal_lm", 0)
    for r in ds.train:
        assert (
            r["messages"][0]["content"] == f"Is the sentiment positive or negative?\n\n{r['text']}"
        )
        assert r["messages"][1]["content"] == (
            "positive" if int(r["text"].split()[1]) % 2 else "negative"
        )


@pytest.mark.parametrize(
    ("records", "fmt", "fragment"),
    [
        ([{"instruction": "x"}], "auto", "line 1 has no 'output' field"),
        ([{"instruction": "x", "output": 3}], "auto", "line 1 has a non-string 'output'"),
        ([{"instruction": " ", "output": "y"}], "auto", "line 1 has an empty 'instruction'"),
        ([{"messages": []}], "auto", "line 1 has no non-empty 'messages' list"),
        (
            [{"messages": [{"role": "user", "content": "x"}]}],
            "auto",
            "should end with an assistant",
        ),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "auto", "message 1 has role 'bot'"),
        (
            [{"messages": [{"role": "user"}]}],
            "auto",
            "message 1 should be an object with a string 'content'",
        ),
        (
            [{"instruction": "x", "output": "y"}, {"text": "t", "label": 0}],
            "auto",
            "row 2 is not an instruction",
        ),
        ([{"text": "t", "label": 0}], "alpaca", "line 1 has no 'instruction'"),
        (
            [{"instruction": "x", "output": "y", "label": 1}, {"instruction": "x", "output": "y"}]
            * 5,
            "auto",
            "some rows but not all (row",
        ),
    ],
)
def test_malformed_instruction_rows_name_file_and_line(
    tmp_path: Path, records: list[Any], fmt: str, fragment: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=r"bad\.jsonl") as err:
        load_dataset(DataConfig(source=path, format=fmt), "causal_lm", 0)  # type: ignore[arg-type]
    assert fragment in str(err.value)


def test_label_words_must_match_the_labels(tmp_path: Path) -> None:
    rows = [{"text": f"r{i}", "label": i % 3} for i in range(30)]
    cfg = DataConfig(
        source=_write(tmp_path / "three.jsonl", rows), prompt="{text}", label_words=("no", "yes")
    )
    with pytest.raises(DataError, match="has 2 words but the data has 3 labels"):
        load_dataset(cfg, "causal_lm", 0)


def test_a_response_longer_than_max_length_is_left_out(tok: Any, caplog: Any) -> None:
    rows = [
        {"text": "a", "label": 0, "messages": _chat("q", "long answer " * 40)},
        {"text": "b", "label": 0, "messages": _chat("q", "ok")},
    ]
    data = encode(rows, tok, 32)
    assert data.references == ["ok"]
    assert "1 of 2 instructions left out" in caplog.text
