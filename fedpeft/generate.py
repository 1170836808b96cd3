"""``fedpeft generate DIR --prompt ...``: ask a finished (or running) run's model.

The base model of the run's config plus the adapter the server saved in ``DIR/adapter``
after its last round, the prompt rendered with the tokenizer's chat template as in
training, and greedy decoding (or sampling at ``temperature`` with nucleus ``top_p``,
Holtzman et al., 2020).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from fedpeft import instruct
from fedpeft.checkpoint import load_checkpoint
from fedpeft.config import Config, ConfigError, config_from_dict
from fedpeft.models import load_base_model, load_tokenizer

MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class Sampling:
    """How the answer is decoded: greedy at temperature 0."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"'--max-new-tokens' should be in [1, {MAX_NEW_TOKENS}].")
        if not 0 <= self.temperature <= 100:
            raise ConfigError("'--temperature' should be in [0, 100] (0: greedy).")
        if not 0 < self.top_p <= 1:
            raise ConfigError("'--top-p' should be in (0, 1].")


def run_config(run_dir: Path) -> Config:
    """The resolved config a run in ``run_dir`` was started with (from its checkpoint)."""
    if not run_dir.is_dir():
        raise ConfigError(f"Run directory '{run_dir}' does not exist.")
    cfg = config_from_dict(load_checkpoint(run_dir).config)
    if cfg.model.task != "causal_lm":
        raise ConfigError(
            f"The run in '{run_dir}' trained a {cfg.model.task} model, which does not "
            "generate text; generate needs a 'model.task: causal_lm' run."
        )
    return cfg


def load_run_model(run_dir: Path, use_adapter: bool = True) -> tuple[Config, torch.nn.Module]:
    """The run's base model with its saved adapter (or without, to compare)."""
    cfg = run_config(run_dir)
    base = load_base_model(cfg.model, num_labels=1)  # a causal LM has no head to size
    if not use_adapter:
        return cfg, base
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"'{run_dir}' has no saved adapter yet (adapter/ is written after round 1)."
        )
    return cfg, PeftModel.from_pretrained(base, str(adapter))


def answer(model: torch.nn.Module, cfg: Config, prompt: str, sampling: Sampling) -> str:
    """The model's reply to one user turn."""
    sampling.check()
    tok = load_tokenizer(cfg.model.name)
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    ids = instruct.prompt_tokens(tok, instruct.with_system(chat, cfg.data.system))
    options = None
    if sampling.temperature > 0:
        options = {"temperature": sampling.temperature, "top_p": sampling.top_p}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sampling.seed)
        (new,) = instruct.generate(
            model,
            [ids],
            pad_id=int(tok.pad_token_id),
            eos_id=instruct.end_of_answer(tok)[1],
            max_new_tokens=sampling.max_new_tokens,
            batch_size=1,
            sample=options,
        )
    return str(tok.decode(new, skip_special_tokens=True)).strip()
