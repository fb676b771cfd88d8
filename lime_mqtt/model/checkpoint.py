"""Read a model folder: its config and tensor metadata, and single tensors on demand.

Nothing here reads a tensor that was not asked for: sizes come from the safetensors
headers, and tensors are read one by one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lime_mqtt.core.errors import ModelError

if TYPE_CHECKING:
    from lime_mqtt.planning.cost import ModelSize

_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                 "I64": "int64", "I32": "int32", "U8": "uint8", "I8": "int8"}
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path`` and the file offset where tensor data starts."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if size <= 0 or size > 100_000_000:
            raise ModelError(f"{path} is not a safetensors file")
        header: dict[str, Any] = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # a safetensors dtype, or a GGUF type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)
    shape: tuple[int, ...]  # as transformers holds it ([out, in] for a matrix)
    offset: int = 0  # byte offset of the tensor in the file
    stored: int | None = None  # bytes in the file, for block formats

    @property
    def nbytes(self) -> int:
        if self.stored is not None:
            return self.stored
        count = 1
        for dim in self.shape:
            count *= dim
        return count * _DTYPE_BYTES.get(self.dtype, 4)

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


_ALIGN = 64


def buffer_aligned_like(file_offset: int, nbytes: int) -> Any:
    """A uint8 tensor of ``nbytes`` whose address has the same remainder mod 64 as ``file_offset``.

    CPU kernels pick their vector code paths by address alignment, and the last bits of a
    float32 result can depend on it (measured: a 49152x576 GEMV differs by 6e-6). transformers
    computes on tensors memory-mapped from the file, whose addresses are the file offsets
    mod 64; giving our copies the same alignment keeps the results bit-identical to it.
    """
    import torch

    block = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    shift = (file_offset - block.data_ptr()) % _ALIGN
    return block[shift : shift + nbytes]


class Checkpoint:
    """A Hugging Face model folder: ``config.json`` plus one or more safetensors files."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ModelError(f"{self.folder} has no config.json")

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.folder)!r}, tensors={len(self.tensors)})"

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.folder / "config.json").read_text())
        return data

    @cached_property
    def config(self) -> Any:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.folder)
        config._attn_implementation = "sdpa"  # the same default transformers picks on CPU
        return config

    @property
    def num_layers(self) -> int:
        return int(self.config_dict["num_hidden_layers"])

    @cached_property
    def gguf_file(self) -> Path | None:
        """The GGUF file this folder serves its tensors from (lime-mqtt's GGUF folders), if any."""
        files = sorted(self.folder.glob("*.gguf"))
        return files[0] if files and not any(self.folder.glob("*.safetensors")) else None

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        if self.gguf_file is not None:
            from lime_mqtt.model.gguf_file import gguf_tensors

            return gguf_tensors(self.gguf_file, self.config_dict)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({self.folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.folder} has no safetensors files")
        out: dict[str, TensorInfo] = {}
        for path in files:
            header, data_start = _read_header(path)
            for key, info in header.items():
                start, stop = info["data_offsets"]
                tensor = TensorInfo(path, info["dtype"], tuple(info["shape"]), data_start + start)
                if tensor.nbytes != stop - start:
                    raise ModelError(f"{path}: tensor {key} has {stop - start} bytes, its shape needs {tensor.nbytes}")
                out[key] = tensor
        return out

    def has_folder_tensors(self, keys: list[str]) -> bool:
        """Whether this folder has safetensors files holding all of ``keys`` (and any at all)."""
        try:
            return bool(keys) and all(k in self.tensors for k in keys)
        except ModelError:
            return False

    def keys_with_prefix(self, prefix: str) -> list[str]:
        try:
            return sorted(k for k in self.tensors if k.startswith(prefix))
        except ModelError:  # no safetensors files here (yet)
            return []

    def bytes_of(self, keys: list[str]) -> int:
        return sum(self.tensors[k].nbytes for k in keys)

    def layer_bytes(self, index: int) -> int:
        return self.bytes_of(self.keys_with_prefix(f"model.layers.{index}."))

    @property
    def embed_bytes(self) -> int:
        return self.bytes_of(["model.embed_tokens.weight"])

    @property
    def head_bytes(self) -> int:
        """Bytes the last stage holds for the head: final norm plus the output matrix."""
        norm = self.bytes_of(self.keys_with_prefix("model.norm."))
        head = self.tensors.get("lm_head.weight") or self.tensors["model.embed_tokens.weight"]
        return norm + head.nbytes

    @property
    def itemsize(self) -> int:
        """Bytes per value of activations and KV cache (the compute dtype's)."""
        return int(self.compute_dtype.itemsize)

    def kv_bytes_per_token_per_layer(self) -> int:
        cfg = self.config_dict
        heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        return 2 * heads * head_dim * self.itemsize

    @property
    def compute_dtype(self) -> Any:
        """The dtype the model computes in (float32, bfloat16 or float16)."""
        import torch

        if self.gguf_file is not None:
            return torch.float32  # transformers dequantizes GGUF files to float32
        # The config's dtype, as transformers loads it (``dtype="auto"``); read from the
        # config alone, as a device fetching its tensors over MQTT has no tensors yet.
        named = self.config_dict.get("dtype") or self.config_dict.get("torch_dtype")
        if named is None:
            info = self.tensors.get("model.embed_tokens.weight") or next(iter(self.tensors.values()))
            named = _TORCH_DTYPES.get(info.dtype, "float32")
        return getattr(torch, str(named)) if named in ("float16", "bfloat16") else torch.float32

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, keys: list[str], drop_page_cache: bool = False) -> dict[str, Any]:
        """Exactly ``keys``, each read from its file straight into a new tensor.

        Only the requested byte ranges are read, one tensor at a time, into ordinary
        (anonymous) memory: no copy of the file is kept, and page-cache pages are not
        part of the process's resident memory. (Tensors on a memory map of the file
        would save the copy but measured 12% slower per token here: file-backed pages
        get no huge pages.) ``drop_page_cache`` asks the kernel to forget the file pages
        just read, as a device with no memory to spare for a page cache would: a layer
        streamed for every token then really comes from the disk every time.
        """
        import torch

        if self.gguf_file is not None:
            from lime_mqtt.model.gguf_file import read_gguf

            return read_gguf(self, keys, drop_page_cache)
        out: dict[str, Any] = {}
        handles: dict[Path, BufferedReader] = {}
        try:
            for key in keys:
                info = self.tensors.get(key)
                if info is None:
                    raise ModelError(f"tensor {key} is missing from {self.folder}")
                dtype = _TORCH_DTYPES.get(info.dtype)
                if dtype is None:
                    raise ModelError(f"tensor {key} has unsupported dtype {info.dtype}")
                if not info.numel:
                    out[key] = torch.empty(info.shape, dtype=getattr(torch, dtype))
                    continue
                raw = buffer_aligned_like(info.offset, info.nbytes)
                fh = handles.get(info.file) or handles.setdefault(info.file, info.file.open("rb"))
                fh.seek(info.offset)
                if fh.readinto(memoryview(raw.numpy())) != info.nbytes:
                    raise ModelError(f"{info.file} ends inside tensor {key}")
                if drop_page_cache and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fh.fileno(), info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
                out[key] = raw.view(getattr(torch, dtype)).view(info.shape)
        finally:
            for fh in handles.values():
                fh.close()
        return out

def model_size(checkpoint: Checkpoint, name: str) -> ModelSize:
    """The byte sizes the planner needs, from the safetensors headers alone."""
    from lime_mqtt.planning.cost import ModelSize

    itemsize = checkpoint.itemsize
    return ModelSize(
        name=name,
        layer_bytes=tuple(checkpoint.layer_bytes(i) for i in range(checkpoint.num_layers)),
        embed_bytes=checkpoint.embed_bytes,
        head_bytes=checkpoint.head_bytes,
        kv_bytes_per_token_per_layer=checkpoint.kv_bytes_per_token_per_layer(),
        hidden_bytes_per_token=int(checkpoint.config_dict["hidden_size"]) * itemsize,
    )
