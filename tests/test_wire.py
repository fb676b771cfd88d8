"""Unit: the CBOR wire format round-trips exactly and rejects bad input with WireError."""

from __future__ import annotations

import cbor2
import numpy
import pytest
import torch

from lime_mqtt.core.errors import WireError
from lime_mqtt.core.wire import (
    WIRE_VERSION,
    Sampling,
    StageError,
    Step,
    decode_envelope,
    tensor_from_wire,
    tensor_to_wire,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensors_round_trip_bit_exactly(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(1, 7, 33) * 1e3).to(dtype)
    x[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0]).to(dtype)
    y = tensor_from_wire(cbor2.loads(cbor2.dumps(tensor_to_wire(x))))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.uint8 if dtype == torch.float32 else torch.int16),
                       x.view(torch.uint8 if dtype == torch.float32 else torch.int16))


def test_wire_bytes_are_little_endian_raw() -> None:
    wire = tensor_to_wire(torch.tensor([1.0], dtype=torch.float32))
    assert wire == {"dtype": "f32", "shape": [1], "data": b"\x00\x00\x80\x3f"}


def test_envelope_round_trip() -> None:
    hidden = torch.randn(1, 3, 8)
    env = Step("r1", 4, 2, 17, hidden=hidden, sampling=Sampling(0.7, 40, 0.9, 123),
               reply="coord-x")
    back = decode_envelope(env.encode())
    assert isinstance(back, Step)
    assert (back.kind, back.request_id, back.step, back.epoch, back.pos) == ("step", "r1", 4, 2, 17)
    # float32 hidden states arrive as a numpy array of their own (the engine writes to it)
    assert isinstance(back.hidden, numpy.ndarray) and back.hidden.flags.writeable
    assert torch.equal(torch.from_numpy(back.hidden), hidden)
    assert back.sampling == Sampling(0.7, 40, 0.9, 123)
    assert back.reply == env.reply


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hidden_states_round_trip_as_arrays_or_tensors(dtype: torch.dtype) -> None:
    """float32 and float16 hidden states decode to numpy arrays, bfloat16 (which numpy lacks)
    to a tensor; either encodes again to the very same bytes."""
    hidden = torch.randn(1, 2, 8).to(dtype)
    payload = Step("r1", 1, 0, 5, hidden=hidden).encode()
    back = decode_envelope(payload, hidden_size=8)
    assert isinstance(back, Step)
    assert isinstance(back.hidden, torch.Tensor if dtype == torch.bfloat16 else numpy.ndarray)
    assert back.width == 2
    assert back.encode() == payload


def test_numpy_arrays_without_a_wire_dtype_are_refused() -> None:
    with pytest.raises(WireError, match="cannot travel"):
        tensor_to_wire(numpy.zeros(3, dtype=numpy.complex64))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe garbage", "not CBOR"),
        (cbor2.dumps([1, 2]), "CBOR map"),
        (cbor2.dumps({"v": 99, "kind": "step", "rid": "a", "step": 0, "epoch": 1}), "version"),
        (cbor2.dumps({"v": WIRE_VERSION, "kind": "explode", "rid": "a", "step": 0, "epoch": 1}), "kind"),
        (cbor2.dumps({"v": WIRE_VERSION, "kind": "step", "rid": "", "step": 0, "epoch": 1}), "request id"),
        (cbor2.dumps({"v": WIRE_VERSION, "kind": "step", "rid": "a", "step": -2**21, "epoch": 1}), "step"),
        (cbor2.dumps({"v": WIRE_VERSION, "kind": "step", "rid": "a", "step": 1.5, "epoch": 1}), "step"),
        (cbor2.dumps({"v": WIRE_VERSION, "kind": "step", "rid": "a", "step": 0, "epoch": 1, "tokens": ["x"]}),
         "tokens"),
        (cbor2.dumps({"v": WIRE_VERSION, "kind": "step", "rid": "a", "step": 0, "epoch": 1,
                      "hidden": {"dtype": "f32", "shape": [2, 2], "data": b"\x00" * 15}}), "bytes"),
        (cbor2.dumps({"v": WIRE_VERSION, "kind": "step", "rid": "a", "step": 0, "epoch": 1,
                      "hidden": {"dtype": "pickle", "shape": [1], "data": b"\x00"}}), "dtype"),
        (cbor2.dumps({"v": WIRE_VERSION, "kind": "step", "rid": "a", "step": 0, "epoch": 1, "reply": "a/#"}),
         "reply"),
    ],
)
def test_malformed_envelopes_raise_wire_error(payload: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_envelope(payload)


def test_a_stage_error_always_decodes_even_with_an_empty_or_long_message() -> None:
    """What a device sends about a step it could not run must reach the coordinator."""
    for message, expected in (("", "error"), ("x" * 10_000, "x" * 4096), ("bad token id", "bad token id")):
        back = decode_envelope(StageError("r", 3, 1, "dev0", message).encode())
        assert isinstance(back, StageError) and back.message == expected and back.device_id == "dev0"
