"""Instruction tuning of a causal LM: chat rows, response-only targets, greedy answers.

A row is a conversation, ``[{"role": "user", "content": ...}, {"role": "assistant",
"content": ...}]``, rendered with the tokenizer's own chat template (or, for a tokenizer
without one, the Alpaca prompt of Taori et al., 2023). The loss is the supervised
fine-tuning loss of instruction tuning (Ouyang et al., 2022; Wang et al., 2023, "How
Far Can Camels Go?"): token cross-entropy over the assistant turns only,

    L = - Σ_t m_t log p(x_t | x_<t) / Σ_t m_t,   m_t = 1 on response tokens,

so prompt and padding carry the label -100 that ``CrossEntropyLoss`` ignores. Answers
are scored by exact match after SQuAD's normalization (Rajpurkar et al., 2016: lower
case, no punctuation, single spaces).

Where the rows come from: Alpaca records (``instruction``, ``input``, ``output``), chat
records (``messages``), or a labelled classification row turned into an instruction by
``data.prompt`` (a template with ``{text}``) and ``data.label_words``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedpeft.errors import DataError

Chat = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
IGNORE = -100  # CrossEntropyLoss's ignore_index
ALPACA_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


# --------------------------------------------------------------------------- rows


def alpaca_chat(rec: dict[str, Any], where: str) -> Chat:
    """An Alpaca record as a two-turn chat: instruction (+ input) -> output."""
    fields = {}
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = rec.get(key, "")
        if required and key not in rec:
            raise DataError(
                f"{where} has no '{key}' field (an Alpaca row needs instruction and output)."
            )
        if not isinstance(value, str):
            raise DataError(f"{where} has a non-string '{key}' field.")
        fields[key] = value
    if not fields["instruction"].strip() or not fields["output"].strip():
        raise DataError(f"{where} has an empty 'instruction' or 'output'.")
    user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]


def messages_chat(rec: dict[str, Any], where: str) -> Chat:
    """A ``messages`` record, checked: role/content strings, ending with the assistant."""
    turns = rec.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where} has no non-empty 'messages' list.")
    chat: Chat = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise DataError(f"{where} message {i} should be an object with a string 'content'.")
        if turn.get("role") not in ROLES:
            raise DataError(
                f"{where} message {i} has role {turn.get('role')!r}; expected one of {list(ROLES)}."
            )
        chat.append({"role": turn["role"], "content": turn["content"]})
    if chat[-1]["role"] != "assistant":
        raise DataError(f"{where} should end with an assistant message (the response to learn).")
    if all(t["role"] == "assistant" for t in chat):
        raise DataError(f"{where} has assistant messages only; the answers need a question.")
    return chat


def classification_chat(text: str, prompt: str, word: str) -> Chat:
    """A labelled row as an instruction: the prompt around the text -> the label word."""
    return [
        {"role": "user", "content": prompt.replace("{text}", text)},
        {"role": "assistant", "content": word},
    ]


def with_system(chat: Chat, system: str | None) -> Chat:
    """The chat with ``system`` as its first turn, unless it has one or ``system`` is None."""
    if system is None or (chat and chat[0]["role"] == "system"):
        return chat
    return [{"role": "system", "content": system}, *chat]


def reference(chat: Chat) -> str:
    """The answer a held-out row expects: its last assistant turn."""
    return chat[-1]["content"]


# --------------------------------------------------------------------------- tokens


def end_of_answer(tok: PreTrainedTokenizerBase) -> tuple[str, int | None]:
    """The token an answer ends with, and generation stops at: the tokenizer's EOS, or
    for a BERT-like tokenizer (which has none) its [SEP]."""
    if tok.eos_token is not None:
        return tok.eos_token, tok.eos_token_id
    if tok.sep_token is not None:
        return tok.sep_token, tok.sep_token_id
    return "", None


def _render(tok: PreTrainedTokenizerBase, chat: Chat, generation_prompt: bool) -> str:
    if tok.chat_template:
        text: str = tok.apply_chat_template(  # type: ignore[assignment]
            chat, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text
    # no template (e.g. a BERT tokenizer on a tiny test model): Alpaca's prompt
    parts = []
    for turn in chat:
        if turn["role"] == "assistant":
            parts.append(turn["content"] + end_of_answer(tok)[0] + "\n")
        else:
            parts.append(ALPACA_PROMPT.format(user=turn["content"]))
    return "".join(parts)  # a chat ending on a user turn ends with "### Response:"


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    # the template already holds every special token the model expects
    return list(tok(text, add_special_tokens=False)["input_ids"])


def chat_tokens(tok: PreTrainedTokenizerBase, chat: Chat) -> tuple[list[int], list[int]]:
    """(input ids, targets) of a whole conversation; targets are the ids on assistant
    turns and -100 elsewhere. Each assistant turn's span is what the rendering of the
    chat up to that turn adds to the rendering of the chat before it, with the
    generation prompt (so the model learns to answer after it, as it is asked): the ids
    before the last span are :func:`prompt_tokens` of the chat."""
    ids: list[int] = []
    targets: list[int] = []
    for i, turn in enumerate(chat):
        if turn["role"] != "assistant":
            continue
        before = _ids(tok, _render(tok, chat[:i], generation_prompt=True)) if i else []
        upto = _ids(tok, _render(tok, chat[: i + 1], generation_prompt=False))
        if upto[: len(before)] != before or before[: len(ids)] != ids:
            raise DataError(
                "The tokenizer's chat template does not render a conversation as the "
                "rendering of its beginning plus the new turn, so the response tokens "
                "cannot be told apart."
            )
        targets += [IGNORE] * (len(before) - len(ids)) + upto[len(before) :]
        ids = upto
    return ids, targets


def prompt_tokens(tok: PreTrainedTokenizerBase, chat: Chat) -> list[int]:
    """The ids a model answers after: the chat without its last (assistant) turn, with
    the generation prompt."""
    return _ids(tok, _render(tok, chat[:-1], generation_prompt=True))


def truncate(
    ids: list[int], targets: list[int], max_length: int
) -> tuple[list[int], list[int]] | None:
    """At most ``max_length`` tokens, cut on the left of the prompt so that the response
    and the question closest to it survive; None when the response alone does not fit
    (no position would be trained)."""
    if len(ids) <= max_length:
        return ids, targets
    first = next((i for i, t in enumerate(targets) if t != IGNORE), len(targets))
    cut = len(ids) - max_length
    if cut > first:
        return None
    return ids[cut:], targets[cut:]


def truncate_prompt(ids: list[int], max_length: int) -> list[int]:
    """A prompt cut on the left like :func:`truncate` cuts training rows."""
    return ids[-max_length:] if len(ids) > max_length else ids


# --------------------------------------------------------------------------- answers


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (SQuAD's exact match,
    without its article removal: a label word may be an article's neighbour)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(generation: str, ref: str) -> bool:
    return normalize_answer(generation) == normalize_answer(ref)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    batch_size: int,
    sample: dict[str, float] | None = None,
) -> list[list[int]]:
    """New tokens after each prompt, batched with left padding (a decoder continues at
    the right end); greedy unless ``sample`` gives temperature/top_p."""
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding
    for lo in range(0, len(order), batch_size):
        index = order[lo : lo + batch_size]
        width = max(len(prompts[i]) for i in index)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            seq = prompts[i]
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        kwargs: dict[str, Any] = {"do_sample": False}
        if sample is not None:
            kwargs = {"do_sample": True, **sample}
        generated = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **kwargs,
        )
        for row, i in enumerate(index):
            new = generated[row, width:].tolist()
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id)]
            out[i] = new
    return out
