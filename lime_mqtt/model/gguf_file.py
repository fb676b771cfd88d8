"""GGUF files served as they are: their tensors under transformers' names, blocks kept.

``--model file.gguf`` becomes a small model folder in the cache (``config.json`` and
tokenizer files written once by transformers' own GGUF reader, and a link to the file);
:class:`~lime_mqtt.model.checkpoint.Checkpoint` then reads the tensors straight from the
GGUF file. A quantized matrix stays in its blocks
(:class:`~lime_mqtt.model.kernels.PackedWeight`), so a device's memory follows the file's
size; the kernels dequantize it when used, to exactly the values transformers' loader
computes. Query and key rows are put back in transformers' order (llama.cpp's converter
permutes them for its RoPE layout), as transformers' loader does.

Architectures: llama (also Mistral and SmolLM2 files), qwen2, qwen3.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lime_mqtt.core.errors import ModelError
from lime_mqtt.model.kernels import BLOCKS, PackedWeight

if TYPE_CHECKING:
    from lime_mqtt.model.checkpoint import Checkpoint, TensorInfo

ARCHITECTURES = ("llama", "qwen2", "qwen3")
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# GGUF value types: sizes of the fixed-width ones; 8 is a string, 9 an array.
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K", 30: "BF16"}


class _Header:
    """The header of a GGUF file (version 2 or 3), read without keeping its metadata: a
    device needs the architecture and where each tensor is, not the tokenizer's
    vocabulary (parsing that whole, as gguf-py does, leaves tens of MB of small objects)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.strings: dict[str, str] = {}
        self.alignment = 32
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, GGUF dims, type, offset
        with path.open("rb") as fh:
            self._fh = fh
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{path} is not a GGUF file")
            version, tensors, values = self._unpack("<IQQ")
            if version not in (2, 3):
                raise ModelError(f"{path}: GGUF version {version} is not supported (2 or 3)")
            for _ in range(values):
                key = self._string()
                (kind,) = self._unpack("<I")
                value = self._value(kind)
                if isinstance(value, str):
                    self.strings[key] = value
                elif key == "general.alignment" and isinstance(value, int) and value > 0:
                    self.alignment = value
            for _ in range(tensors):
                name = self._string()
                (dims,) = self._unpack("<I")
                shape = self._unpack(f"<{dims}Q") if dims else ()
                kind, offset = self._unpack("<IQ")
                self.tensors.append((name, tuple(shape), kind, offset))
            end = fh.tell()
        self.data_start = (end + self.alignment - 1) // self.alignment * self.alignment

    def _unpack(self, layout: str) -> tuple[int, ...]:
        size = struct.calcsize(layout)
        raw = self._fh.read(size)
        if len(raw) != size:
            raise ModelError(f"{self.path} ends inside its header")
        return struct.unpack(layout, raw)

    def _string(self) -> str:
        (size,) = self._unpack("<Q")
        if size > 1 << 24:
            raise ModelError(f"{self.path}: a header string of {size} bytes")
        return self._fh.read(size).decode("utf-8", errors="replace")

    def _value(self, kind: int) -> Any:
        if kind == 8:
            return self._string()
        if kind in _SCALARS:
            raw = self._fh.read(_SCALARS[kind])
            return int.from_bytes(raw, "little") if kind in (4, 10) else None
        if kind == 9:
            inner, count = self._unpack("<IQ")
            if inner in _SCALARS:
                self._fh.seek(_SCALARS[inner] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self._value(inner)
            return None
        raise ModelError(f"{self.path}: unknown GGUF value type {kind}")


def architecture(path: Path) -> str:
    arch = _Header(path).strings.get("general.architecture")
    if arch is None:
        raise ModelError(f"{path} has no general.architecture")
    return arch


def hf_name(name: str) -> str | None:
    """transformers' name for a GGUF tensor name; None for one lime-mqtt does not use."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    return None


@lru_cache(maxsize=8)
def _tensor_table(path: Path, size: int, mtime: int) -> tuple[str, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    header = _Header(path)
    arch = header.strings.get("general.architecture", "")
    table = {}
    for gguf_name, dims, kind_id, offset in header.tensors:
        name = hf_name(gguf_name)
        if name is None:
            continue
        kind = _TYPE_NAMES.get(kind_id)
        if kind is None:
            raise ModelError(f"{path}: tensor {gguf_name} has GGUF type {kind_id}; lime-mqtt serves "
                             f"{', '.join(sorted(BLOCKS))}")
        values, block = BLOCKS[kind]
        count = 1
        for d in dims:
            count *= d
        if dims and dims[0] % values:
            raise ModelError(f"{path}: tensor {gguf_name} rows of {dims[0]} are not whole {kind} blocks")
        shape = tuple(reversed(dims))  # GGUF lists the fastest dimension first
        table[name] = (kind, shape, header.data_start + offset, count // values * block)
    if max((offset + stored for _, _, offset, stored in table.values()), default=0) > size:
        raise ModelError(f"{path} is shorter than its tensors")
    return arch, table


def gguf_tensors(path: Path, config: dict[str, Any]) -> dict[str, TensorInfo]:
    from lime_mqtt.model.checkpoint import TensorInfo

    stat = path.stat()
    arch, table = _tensor_table(path.resolve(), stat.st_size, stat.st_mtime_ns)
    if arch not in ARCHITECTURES:
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not served (supported: {', '.join(ARCHITECTURES)})")
    return {name: TensorInfo(path, kind, shape, offset, stored)
            for name, (kind, shape, offset, stored) in table.items()}


def _unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE permutation of the rows of a query or key matrix (rows of any
    element type: floats or block bytes), as transformers' GGUF loader does."""
    count = rows.shape[0]
    half = count // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape).contiguous()


def read_gguf(checkpoint: Checkpoint, keys: list[str], drop_page_cache: bool = False) -> dict[str, Any]:
    """Exactly ``keys``, read from the GGUF file: float tensors, or :class:`PackedWeight` blocks."""
    from lime_mqtt.model.checkpoint import buffer_aligned_like

    path = checkpoint.gguf_file
    assert path is not None
    config = checkpoint.config_dict
    stat = path.stat()
    llama = _tensor_table(path.resolve(), stat.st_size, stat.st_mtime_ns)[0] == "llama"
    out: dict[str, Any] = {}
    with path.open("rb") as fh:
        for key in keys:
            info = checkpoint.tensors.get(key)
            if info is None:
                raise ModelError(f"tensor {key} is missing from {path}")
            raw = buffer_aligned_like(info.offset, info.nbytes)
            fh.seek(info.offset)
            if fh.readinto(memoryview(raw.numpy())) != info.nbytes:
                raise ModelError(f"{path} ends inside tensor {key}")
            if drop_page_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
            rows = info.shape[0]
            data = raw.view(_FLOAT_TYPES[info.dtype]) if info.dtype in _FLOAT_TYPES else raw
            data = data.view(rows, -1) if len(info.shape) == 2 else data.view(info.shape)
            if llama and key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                heads = int(config["num_attention_heads"] if ".q_proj." in key else
                            config.get("num_key_value_heads") or config["num_attention_heads"])
                data = _unpermute(data, heads)
            if info.dtype in _FLOAT_TYPES:
                out[key] = data
            else:
                out[key] = PackedWeight.blocks(data.reshape(-1), info.dtype, info.shape[0], info.shape[1])
    return out


def write_gguf_folder(gguf_path: Path, folder: Path, tokenizer_from: Path | None = None) -> Path:
    """A model folder for ``gguf_path``: config and tokenizer from transformers' GGUF reader
    (or the tokenizer files of ``tokenizer_from``, a folder converted from the same file),
    and a link to the file. Written atomically into ``folder``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    gguf_path = gguf_path.resolve()
    arch = architecture(gguf_path)
    if arch not in ARCHITECTURES:
        raise ModelError(f"{gguf_path}: GGUF architecture {arch!r} is not served "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=folder.parent))
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    if tokenizer_from is not None:
        for item in tokenizer_from.iterdir():
            if item.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                shutil.copy2(item, tmp / item.name)
    else:
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
    (tmp / "model.gguf").symlink_to(gguf_path)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path)}) + "\n")
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(folder)
    except OSError:
        if not (folder / ".complete").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
