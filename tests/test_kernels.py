"""The engine's kernels (lime_mqtt/model/kernels.c) against their references.

- Every GGUF block format dequantizes to exactly gguf-py's values (the ones transformers'
  GGUF loader uses), bit for bit, on random blocks with sane scales.
- Products are within float32 rounding of torch's on the same values, and batch-invariant:
  a row's result is the same bits for every row count from 1 to 32.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from lime_mqtt.core.errors import ModelError
from lime_mqtt.model import kernels
from lime_mqtt.model.kernels import BLOCKS, PackedWeight


def _random_blocks(fmt: str, out: int, n: int, seed: int) -> np.ndarray:
    """Random bytes of ``out`` rows of ``fmt`` blocks, with float16 scales of a sane size
    (random bytes there could be inf or NaN)."""
    rng = np.random.default_rng(seed)
    values, size = BLOCKS[fmt]
    raw = rng.integers(0, 256, size=(out, n // values, size), dtype=np.uint8)

    def f16(shape: tuple[int, ...]) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.01).astype(np.float16).view(np.uint8).reshape(*shape, 2)

    scales = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[fmt]
    for at in scales:
        raw[..., at : at + 2] = f16(raw.shape[:2])
    return raw.reshape(out, -1)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_blocks_dequantize_to_exactly_gguf_pys_values(fmt: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out, n = 48, 512
    raw = _random_blocks(fmt, out, n, seed=len(fmt))
    reference = dequantize(raw, getattr(GGMLQuantizationType, fmt))
    weight = PackedWeight.blocks(torch.from_numpy(raw.copy()).view(-1), fmt, out, n)
    assert np.array_equal(weight.dense().numpy(), reference)
    assert weight.nbytes == raw.nbytes  # held as the file's blocks
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(1))
    y = kernels.linear(x, weight)
    dense = torch.from_numpy(reference).double()
    expected = x.double() @ dense.T
    scale = x.double().abs() @ dense.abs().T  # float32 sums: error within a few eps of this
    assert bool(((y.double() - expected).abs() <= 1e-5 * scale + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("out", "n"), [(1536, 576), (100, 37), (64, 64)])
def test_products_are_close_to_torch_and_batch_invariant(dtype: torch.dtype, out: int, n: int) -> None:
    generator = torch.Generator().manual_seed(out + n)
    w = torch.randn(out, n, generator=generator).to(dtype)
    x = torch.randn(32, n, generator=generator)
    weight = PackedWeight.of(w)
    full = kernels.linear(x, weight)
    reference = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert bool(((full.double() - reference).abs() <= 1e-5 * scale + 1e-6).all())
    for rows in range(1, 32):
        assert torch.equal(kernels.linear(x[:rows], weight), full[:rows]), rows


def test_bad_shapes_and_formats_are_refused() -> None:
    with pytest.raises(ModelError, match="not supported"):
        PackedWeight.blocks(torch.zeros(10, dtype=torch.uint8), "Q5_K", 1, 256)
    with pytest.raises(ModelError, match="whole number"):
        PackedWeight.blocks(torch.zeros(10, dtype=torch.uint8), "Q8_0", 1, 40)
    with pytest.raises(ModelError, match="needs"):
        PackedWeight.blocks(torch.zeros(10, dtype=torch.uint8), "Q8_0", 1, 32)
    with pytest.raises(ModelError, match="does not fit"):
        kernels.linear(torch.zeros(1, 8), PackedWeight.of(torch.zeros(4, 9)))
    with pytest.raises(ModelError, match="out of range"):
        kernels.rows(PackedWeight.of(torch.zeros(4, 8)), torch.tensor([4]))


def test_threads_split_the_work_but_not_the_sums() -> None:
    """The same bits at 1 and 2 threads: each output stays one thread's fixed-order sum."""
    generator = torch.Generator().manual_seed(3)
    weight = PackedWeight.of(torch.randn(1536, 576, generator=generator))
    x = torch.randn(5, 576, generator=generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, weight)
        torch.set_num_threads(2)
        two = kernels.linear(x, weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("fmt", ["F32", "BF16", "Q4_K"])
def test_one_weight_row_at_a_time_or_six_side_by_side_give_the_same_bits(fmt: str) -> None:
    """Both ways a one- or two-row product can read its weights (the load-time probe picks
    one per machine) sum each output in the same order."""
    generator = torch.Generator().manual_seed(11)
    dense = torch.randn(300, 512, generator=generator)
    weight = PackedWeight.of(dense.to(torch.bfloat16)) if fmt == "BF16" else PackedWeight.of(dense)
    if fmt == "Q4_K":
        raw = _random_blocks(fmt, 300, 512, seed=5)
        weight = PackedWeight.blocks(torch.from_numpy(raw.copy()).view(-1), fmt, 300, 512)
    x = torch.randn(3, 512, generator=generator)
    results = []
    before = kernels.set_narrow_rows(kernels.NARROW_CHOICES[0])
    try:
        for rows in kernels.NARROW_CHOICES:
            kernels.set_narrow_rows(rows)
            results.append([kernels.linear(x[:count], weight) for count in (1, 2, 3)])
    finally:
        kernels.set_narrow_rows(before)
    for one, other in zip(*results, strict=True):
        assert torch.equal(one, other)
    assert torch.equal(results[0][0], results[0][2][:1])  # and alone as in a batch of three


def test_a_bad_narrow_rows_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = kernels.library()
    before = kernels.set_narrow_rows(0)
    try:
        for value, message in (("two", "whole number"), ("-1", "negative")):
            monkeypatch.setenv("LIME_MQTT_NARROW_ROWS", value)
            with pytest.raises(ModelError, match=message):
                kernels.choose_narrow_rows(lib)
        monkeypatch.setenv("LIME_MQTT_NARROW_ROWS", "2")
        assert kernels.choose_narrow_rows(lib) == 2
        monkeypatch.delenv("LIME_MQTT_NARROW_ROWS")
        assert kernels.choose_narrow_rows(lib) in kernels.NARROW_CHOICES
        assert kernels._threads == 0  # the probe ran at one thread: library() sets the real count again
    finally:
        kernels.set_narrow_rows(before)


def test_flushing_weights_from_the_caches_keeps_them_as_they_were() -> None:
    """The probe of choose_narrow_rows empties the caches of its matrices before each
    sweep, so that it times memory: the flush writes back, it never changes a byte."""
    lib = kernels._load()
    weights = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(7))  # 4 MB
    before = weights.clone()
    flushed = lib.lime_flush(weights.data_ptr(), weights.numel() * 4)
    assert flushed == (0 if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64", "i686") else -1)
    assert torch.equal(weights, before)


@pytest.mark.parametrize("n", [64, 576, 1000])  # 1000: a tail after the last full vector
def test_the_final_norm_is_close_to_transformers_and_row_by_row(n: int) -> None:
    """kernels.rms_norm_at (a float32 model's final norm) against transformers' formula, in
    place or not; each row's bits do not depend on the other rows."""
    torch.manual_seed(n)
    x, weight, eps = torch.randn(5, n) * 3, torch.rand(n) + 0.5, 1e-6
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    y = torch.empty_like(x)
    kernels.rms_norm_at(x.data_ptr(), 5, n, weight, eps, y.data_ptr())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    for row in range(5):
        alone = x[row : row + 1].clone()
        kernels.rms_norm_at(alone.data_ptr(), 1, n, weight, eps, alone.data_ptr())  # in place
        assert torch.equal(alone, y[row : row + 1])
