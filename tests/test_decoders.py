"""Unit: every decoder of a received message refuses truncated, oversized, wrong-typed and
wrong-version input with the project's own error, never a library's, and never returns a
value for it (docs/wire-format.md). Hypothesis then fuzzes each decoder with random bytes,
random JSON or CBOR structures and mutations of a valid message: it returns a message or
raises the project's error, nothing else.

A case marked ``xfail(strict=True)`` is a known weakness of a decoder: the test asserts the
right behaviour and its reason says what happens instead.
"""

from __future__ import annotations

import inspect
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import cbor2
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from lime_mqtt.coordinator.stats import RequestStats
from lime_mqtt.core import weight_messages
from lime_mqtt.core.errors import BadWeightMessage, LimeError, MessageError, RequestError, WireError
from lime_mqtt.core.messages import (
    MAX_STATUS_BYTES,
    MAX_TELEMETRY_BYTES,
    Adaptation,
    CoordinatorStatus,
    CoordinatorTelemetry,
    DeviceStatus,
    DeviceTelemetry,
    PlannerStatus,
    decode_coordinator_status,
    decode_coordinator_telemetry,
    decode_device_status,
    decode_device_telemetry,
    decode_planner_status,
)
from lime_mqtt.core.plan import MAX_PLAN_BYTES, Plan, StagePlan
from lime_mqtt.core.protocol import MAX_REQUEST_BYTES, Request, cancel_target, parse_request, resume_target
from lime_mqtt.core.weight_messages import (
    MAX_REPLY_BYTES,
    ChunkReply,
    ErrorReply,
    ManifestReply,
    WeightRequest,
    check_manifest,
    decode_weight_reply,
    decode_weights_request,
    encode_reply,
)
from lime_mqtt.core.wire import (
    MAX_ENVELOPE_BYTES,
    WIRE_VERSION,
    Chain,
    End,
    Sampling,
    StageError,
    Step,
    Token,
    decode_envelope,
)

# Reproducible fuzzing (derandomize: a fixed seed per test; no example database). The fast
# tier (make test-fast) runs 400 cases per decoder; make test sets LIME_FUZZ_SCALE=8: 3,200
# per decoder (1,600 random byte strings, 800 random structures, 800 mutations of a valid message).
FUZZ_SCALE = max(1, int(os.environ.get("LIME_FUZZ_SCALE", "1")))
FUZZ = settings(max_examples=200 * FUZZ_SCALE, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SMALL = settings(FUZZ, max_examples=100 * FUZZ_SCALE)
DEEP = 100_000
BIGNUM = 10**5000  # a valid CBOR bignum; Python cannot print it (sys.get_int_max_str_digits)
BIGNUM_JSON = b"1" + b"0" * 5000  # the same as a JSON number
HIDDEN = 4  # H of the envelopes' hidden states
WIRE_LIMIT = 1 << 20  # max_bytes of the envelope decoder in these tests: oversizing it stays cheap

# ---- what a value is, and which values a field's type takes ---------------------------------------------

KINDS = ("str", "int", "float", "bool", "null", "list", "map", "bytes")


def kind_of(value: object) -> str:
    """The JSON/CBOR kind of a decoded value."""
    if isinstance(value, bool):
        return "bool"
    for kind, python in (("int", int), ("float", float), ("str", str), ("bytes", bytes), ("list", list | tuple),
                         ("map", dict)):
        if isinstance(value, python):
            return kind
    if value is None:
        return "null"
    raise AssertionError(f"no kind for {type(value)}")


def field_kinds(annotation: Any) -> frozenset[str]:
    """The kinds a strict pydantic field of this annotation takes (a float field takes an int too)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return frozenset(KINDS)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(field_kinds(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return frozenset(kind_of(arg) for arg in get_args(annotation))
    simple = {type(None): {"null"}, bool: {"bool"}, int: {"int"}, float: {"int", "float"}, str: {"str"}}
    if annotation in simple:
        return frozenset(simple[annotation])
    if origin in (list, tuple):
        return frozenset({"list"})
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return frozenset({"map"})
    raise AssertionError(f"no kinds known for {annotation!r}")


def model_fields(model: type[BaseModel], **overrides: frozenset[str]) -> dict[str, frozenset[str]]:
    """Each field of ``model`` with the kinds its type takes, from the model itself."""
    fields = {name: field_kinds(info.annotation) for name, info in model.model_fields.items()}
    return fields | overrides


# Values of every kind that replace a field in the wrong-typed tests; the label names the case.
REPLACEMENTS: dict[str, object] = {
    "str": "x",
    "float": 1.5,
    "bool": True,
    "null": None,
    "list": [1],
    "map": {"a": 1},
    "huge_int": 2**70,
    "negative": -1,
    "bytes": b"\x01",  # CBOR messages only
}

# ---- the message types: a valid sample of each, its decoder, its error, its fields ------------------------


@dataclass(frozen=True)
class Codec:
    """One message type as a decoder sees it."""

    name: str
    decode: Callable[[bytes], object]
    error: type[LimeError]
    returns: type | tuple[type, ...]
    expected: object  # what the sample decodes to
    sample: bytes
    fmt: Literal["json", "cbor"]
    limit: int  # the most bytes the decoder takes
    fields: dict[str, frozenset[str]]  # top-level field -> the kinds its type takes
    version: str  # the version field
    version_value: int
    empty: object = None  # what b"" decodes to, if it is valid (``empty_valid``)
    empty_valid: bool = False
    version_optional: bool = False  # the version may be left out

    def __repr__(self) -> str:
        return f"Codec({self.name})"

    def body(self) -> dict[Any, Any]:
        body = json.loads(self.sample) if self.fmt == "json" else cbor2.loads(self.sample)
        assert isinstance(body, dict)
        return body

    def encode(self, body: object) -> bytes:
        return json.dumps(body).encode() if self.fmt == "json" else cbor2.dumps(body)

    def replacements(self) -> dict[str, object]:
        return {k: v for k, v in REPLACEMENTS.items() if self.fmt == "cbor" or k != "bytes"}


def same(a: object, b: object) -> bool:
    if isinstance(a, Step | Token | End | StageError):
        return a.encode() == b.encode()  # type: ignore[attr-defined]
    return a == b


STATUS = DeviceStatus(
    v=1, device_id="d0", state="ready", model="tiny-llama", memory_mb=512.5, host="pi-1", pid=1234,
    torch_device="cpu", threads=4, baseline_rss_mb=100.0, baseline_anon_mb=80.0, ts=1.7e9, peak_rss_mb=300.0,
    rss_mb=250.0, anon_mb=200.0, plan_epoch=3, stages=[0], layers=[(0, 4)], streamed=[2], streamed_by_plan=[2],
    param_count=1000, capabilities={"matmul_gflops": 12.5}, error="out of memory once",
)
TELEMETRY = DeviceTelemetry(
    v=1, device_id="d0", ts=1.7e9, rss_mb=250.0, peak_rss_mb=300.0, kv_sequences=1, kv_tokens=40,
    peak_kv_tokens=64, queue_depth=0, steps_done=12, batches=10, duplicates=1, adaptations=1,
    last_adaptation=Adaptation(ts=1.7e9, kv_mb=1.0, budget_mb=100.0, held_mb_before=90.0, held_mb_after=80.0,
                               streamed=[2], action="stream"),
    streamed=[2], held_mb=80.0, compute_s=1.25, streamed_mb=4.0, stream_wait_s=0.5,
)
COORDINATOR_TELEMETRY = RequestStats()
COORDINATOR_TELEMETRY.answer(12, 20, 140.0, 21.5)
COORDINATOR_TELEMETRY.error("cancelled")
COORDINATOR_FIGURES = COORDINATOR_TELEMETRY.telemetry("main", 1, 2)
PLANNER = PlannerStatus(v=1, state="planned", message="planned 2 stages", model="tiny-llama", devices=["d0", "d1"],
                        ts=1.7e9)
COORDINATOR = CoordinatorStatus(v=1, name="c0", state="online", model="tiny-llama")
PLAN = Plan(
    epoch=3, model="tiny-llama", num_layers=4, created=1.7e9, strategy="optimal", objective="latency", optimal=True,
    context_tokens=256, sequences=1, predicted_ms_per_token=3.0, overhead_ms=1.0, left_out={"d2": "too small"},
    stages=[
        StagePlan(stage=0, device_id="d0", start=0, stop=2, embed=True, head=False, weight_bytes=1000,
                  kv_tokens=256, streamed=[1], slots=1, streamed_bytes=100, compute_ms=1.5, link_ms=0.2,
                  stall_ms=0.0),
        StagePlan(stage=1, device_id="d1", start=2, stop=4, embed=False, head=True, weight_bytes=1000,
                  kv_tokens=512, streamed=[], slots=0, streamed_bytes=0, compute_ms=1.0, link_ms=0.2, stall_ms=0.1),
    ],
)
REQUEST_BODY = {"v": 1, "id": "r1", "prompt": "hello", "max_tokens": 8, "temperature": 0.5, "top_p": 0.9,
                "top_k": 40, "seed": 7, "stop": ["\n"], "stream": True,
                "return_logits": False, "deadline_s": 30.0}
WEIGHT_REQUEST = WeightRequest(v=1, op="tensor", model="tiny-llama", reply="f3a9c1", id="q1",
                               name="lm_head.weight", offset=0, length=4096)
MANIFEST: dict[str, Any] = {
    "v": 1,
    "model": "tiny-llama",
    "config": {"hidden_size": HIDDEN, "architectures": ["LlamaForCausalLM"]},
    "tensors": {
        "lm_head.weight": {"dtype": "F32", "shape": [6, 4], "nbytes": 96, "offset": 0, "sha256": "ab" * 32},
        "model.norm.weight": {"dtype": "BF16", "shape": [4], "nbytes": 8, "offset": 96, "sha256": "cd" * 32},
    },
}

SAMPLING = Sampling(0.7, 40, 0.9, 123)
REPLY = "coord-x"  # the coordinator the last stage answers
STEP_TOKENS = Step("r1", 0, 3, 0, tokens=[1, 2, 3], sampling=SAMPLING, want_logits=True, reply=REPLY,
                   chain=Chain(64, (2,)))
STEP_HIDDEN = Step("r1", 1, 3, 3, hidden=torch.arange(8, dtype=torch.float32).reshape(1, 2, HIDDEN),  # [1, S, H]
                   sampling=SAMPLING, want_logits=True, reply=REPLY)
TOKEN = Token("r1", 1, 3, 5, token=42, logits=torch.arange(6, dtype=torch.float32))  # [V]
END = End("r1", 3)
STAGE_ERROR = StageError("r1", 1, 3, "d1", "token id past the vocabulary")

# The envelope decoder's fields, by kind (docs/wire-format.md); "tokens", "reply" and "token" may be null.
HEAD = {name: frozenset({"int"}) for name in ("v", "step", "epoch", "pos")} | {
    "kind": frozenset({"str"}), "rid": frozenset({"str"})}
STEP_FIELDS = HEAD | {"tokens": frozenset({"list", "null"}), "hidden": frozenset({"map"}),
                      "sampling": frozenset({"map"}), "want_logits": frozenset({"bool"}),
                      "reply": frozenset({"str", "null"}), "chain": frozenset({"map"})}
TOKEN_FIELDS = HEAD | {"token": frozenset({"int", "null"}), "logits": frozenset({"map"})}
ERROR_FIELDS = HEAD | {"device_id": frozenset({"str"}), "message": frozenset({"str"})}
# The weight reply decoder's fields, by kind.
REPLY_HEAD = {"v": frozenset({"int"}), "id": frozenset({"str"}), "kind": frozenset({"str"})}


def envelope_codec(name: str, envelope: Step | Token | End | StageError, fields: dict[str, frozenset[str]]) -> Codec:
    return Codec(
        name, lambda p: decode_envelope(p, hidden_size=HIDDEN, max_bytes=WIRE_LIMIT), WireError,
        (Step, Token, End, StageError), envelope, envelope.encode(), "cbor", WIRE_LIMIT, fields, "v", WIRE_VERSION,
    )


def reply_codec(label: str, expected: ManifestReply | ChunkReply | ErrorReply, fields: dict[str, frozenset[str]],
                **body: Any) -> Codec:
    return Codec(
        label, decode_weight_reply, BadWeightMessage, (ManifestReply, ChunkReply, ErrorReply), expected,
        encode_reply(expected.id, expected.kind, **body), "cbor", MAX_REPLY_BYTES, REPLY_HEAD | fields, "v",
        weight_messages.WEIGHTS_VERSION,
    )


CODECS = [
    Codec("device_status", lambda p: decode_device_status(p, "d0"), MessageError, DeviceStatus, STATUS,
          STATUS.encode(), "json", MAX_STATUS_BYTES, model_fields(DeviceStatus), "v", 1,
          empty=DeviceStatus.offline("d0"), empty_valid=True),
    Codec("device_telemetry", lambda p: decode_device_telemetry(p, "d0"), MessageError, DeviceTelemetry,
          TELEMETRY, TELEMETRY.encode(), "json", MAX_TELEMETRY_BYTES, model_fields(DeviceTelemetry), "v", 1),
    Codec("coordinator_telemetry", lambda p: decode_coordinator_telemetry(p, "main"), MessageError,
          CoordinatorTelemetry, COORDINATOR_FIGURES, COORDINATOR_FIGURES.encode(), "json", MAX_TELEMETRY_BYTES,
          model_fields(CoordinatorTelemetry), "v", 1),
    Codec("planner_status", decode_planner_status, MessageError, PlannerStatus, PLANNER, PLANNER.encode(), "json",
          MAX_STATUS_BYTES, model_fields(PlannerStatus), "v", 1),
    Codec("coordinator_status", decode_coordinator_status, MessageError, CoordinatorStatus, COORDINATOR,
          COORDINATOR.encode(), "json", MAX_STATUS_BYTES, model_fields(CoordinatorStatus), "v", 1,
          empty=None, empty_valid=True),
    Codec("plan", Plan.from_json, MessageError, Plan, PLAN, PLAN.to_json(), "json", MAX_PLAN_BYTES,
          model_fields(Plan), "version", 2),
    envelope_codec("step_tokens", STEP_TOKENS, STEP_FIELDS),
    envelope_codec("step_hidden", STEP_HIDDEN, STEP_FIELDS),
    envelope_codec("token", TOKEN, TOKEN_FIELDS),
    envelope_codec("end", END, HEAD),
    envelope_codec("stage_error", STAGE_ERROR, ERROR_FIELDS),
    Codec("request", parse_request, RequestError, Request, Request.model_validate(REQUEST_BODY),
          json.dumps(REQUEST_BODY).encode(), "json", MAX_REQUEST_BYTES,
          model_fields(Request, stop=frozenset({"list", "str"})), "v", 1, version_optional=True),
    Codec("weights_request", decode_weights_request, BadWeightMessage, WeightRequest, WEIGHT_REQUEST,
          WEIGHT_REQUEST.model_dump_json().encode(), "json", weight_messages.MAX_REQUEST_BYTES,
          model_fields(WeightRequest), "v", 1),
    reply_codec("weight_manifest_reply", ManifestReply("q1", MANIFEST), {"manifest": frozenset({"map"})},
                manifest=MANIFEST),
    reply_codec("weight_chunk_reply", ChunkReply("q2", "lm_head.weight", 16, 96, bytes(range(32))),
                {"name": frozenset({"str"}), "offset": frozenset({"int"}), "total": frozenset({"int"}),
                 "data": frozenset({"bytes"})},
                name="lm_head.weight", offset=16, total=96, data=bytes(range(32))),
    reply_codec("weight_error_reply", ErrorReply("q3", "no such tensor"), {"message": frozenset({"str"})},
                message="no such tensor"),
]
BY_NAME = {codec.name: codec for codec in CODECS}
JSON_CODECS = [c for c in CODECS if c.fmt == "json"]
CBOR_CODECS = [c for c in CODECS if c.fmt == "cbor"]
ENVELOPES = [c for c in CODECS if c.error is WireError]


# ---- known weaknesses: "test:case id" -> what happens instead (each such case is xfail(strict=True)) ------

REPLIES = ["weight_manifest_reply", "weight_chunk_reply", "weight_error_reply"]
ENVELOPE_NAMES = ["step_tokens", "step_hidden", "token", "end", "stage_error"]

# Every weakness these tests found has been fixed (strict version fields, library errors
# translated at each decoder's boundary, trailing bytes after a CBOR item refused, tensor
# dtypes and dimensions checked before use). A new one goes here, named by its case id,
# until it is fixed.
XFAIL: dict[str, str] = {}


ALL_CASES: dict[str, list[Any]] = {}  # test -> its cases, filled as the tests are defined


def cases(test: str, items: list[tuple[str, tuple[object, ...]]]) -> list[Any]:
    """``pytest.param``s with their ids, marked xfail where a known weakness (``XFAIL["test:id"]``) breaks them."""
    params = []
    for name, values in items:
        reason = XFAIL.get(f"{test}:{name}")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(*values, id=name, marks=marks))
    ALL_CASES.setdefault(test, []).extend(params)
    return params


def test_every_known_weakness_names_a_case() -> None:
    """No stale entry: each key of XFAIL is the id of a collected case."""
    collected = {f"{test}:{param.id}" for test, params in ALL_CASES.items() for param in params}
    assert set(XFAIL) <= collected, sorted(set(XFAIL) - collected)


# ---- outcomes ---------------------------------------------------------------------------------------------


def outcome(codec: Codec, payload: bytes) -> tuple[str, object]:
    """("refused", error), ("returned", value) or ("escaped", the foreign exception)."""
    try:
        return "returned", codec.decode(payload)
    except codec.error as exc:
        return "refused", exc
    except Exception as exc:  # what must never happen: a library's error got out
        return "escaped", exc


def describe(result: tuple[str, object]) -> str:
    what, value = result
    if isinstance(value, BaseException):
        return f"{what} {type(value).__name__}: {str(value)[:120]}"
    return f"{what} {type(value).__name__}"


def assert_refused(codec: Codec, payload: bytes) -> None:
    result = outcome(codec, payload)
    assert result[0] == "refused", describe(result)


def assert_decodes_or_refused(codec: Codec, payload: bytes) -> None:
    result = outcome(codec, payload)
    assert result[0] == "refused" or (result[0] == "returned" and isinstance(result[1], codec.returns)), \
        describe(result)


def with_field(codec: Codec, name: str, placeholder: object) -> dict[Any, Any]:
    return codec.body() | {name: placeholder}


def splice(codec: Codec, body: dict[Any, Any], raw: bytes, placeholder: str = "@@SPLICE@@") -> bytes:
    """``body`` encoded, with the value ``placeholder`` replaced by the raw encoding ``raw``."""
    encoded = codec.encode(body)
    marker = codec.encode(placeholder)
    assert encoded.count(marker) == 1
    return encoded.replace(marker, raw)


# ---- every type: the valid sample decodes -----------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_the_valid_sample_decodes(codec: Codec) -> None:
    decoded = codec.decode(codec.sample)
    assert isinstance(decoded, codec.returns)
    assert same(decoded, codec.expected)
    if codec.empty_valid:
        assert codec.decode(b"") == codec.empty


# ---- truncated --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_every_truncation_is_refused(codec: Codec) -> None:
    if not codec.empty_valid:
        assert_refused(codec, b"")
    bad = {n: describe(r) for n in range(1, len(codec.sample))
           if (r := outcome(codec, codec.sample[:n]))[0] != "refused"}
    assert not bad, f"{len(bad)} of {len(codec.sample) - 1} prefixes were not refused, e.g. {next(iter(bad.items()))}"


def cut_byte_strings() -> list[Any]:
    items = []
    for codec in CBOR_CODECS:
        body = codec.body()
        for field in ("hidden", "logits"):
            if field in body:
                data = body[field]["data"]
                items += [(f"{codec.name}-{field}-short", (codec, body | {field: body[field] | {"data": data[:-1]}})),
                          (f"{codec.name}-{field}-long", (codec, body | {field: body[field] | {"data": data + b"0"}}))]
        if "data" in body:
            past = body["total"] - body["offset"] + 1
            items.append((f"{codec.name}-data-past-total", (codec, body | {"data": b"\x00" * past})))
    return cases("cut", items)


@pytest.mark.parametrize(("codec", "body"), cut_byte_strings())
def test_tensor_and_chunk_data_that_do_not_match_their_message_are_refused(codec: Codec, body: dict[Any, Any]) -> None:
    """A tensor's bytes one short or long of its shape; a chunk's bytes past its tensor's end."""
    assert_refused(codec, codec.encode(body))


# ---- oversized --------------------------------------------------------------------------------------------


def cbor_head(major: int, length: int) -> bytes:
    """The head of a CBOR item of ``major`` type and ``length`` (RFC 8949, section 3)."""
    if length < 24:
        return bytes([major << 5 | length])
    width = next(w for w in (1, 2, 4, 8) if length < 1 << (8 * w))
    return bytes([major << 5 | {1: 24, 2: 25, 4: 26, 8: 27}[width]]) + length.to_bytes(width, "big")


def padded(codec: Codec, size: int) -> bytes:
    """The sample grown to exactly ``size`` bytes by an unknown field "pad" that every decoder ignores
    (spliced in as raw bytes: cbor2 takes a while to encode 64 MiB)."""
    room = size - len(codec.encode(codec.body() | {"pad": "@@SPLICE@@"})) + len(codec.encode("@@SPLICE@@"))
    if codec.fmt == "json":
        raw = b'"' + b"x" * (room - 2) + b'"'
    else:
        n = next(room - w for w in (1, 2, 3, 5, 9) if len(cbor_head(2, room - w)) == w)
        raw = cbor_head(2, n) + b"x" * n
    payload = splice(codec, codec.body() | {"pad": "@@SPLICE@@"}, raw)
    assert len(payload) == size
    return payload


# The three weight reply codecs share one decoder, whose size check comes first: 64 MiB once is enough.
@pytest.mark.parametrize("codec", [c for c in CODECS if c.name not in REPLIES[1:]], ids=lambda c: c.name)
def test_one_byte_over_the_limit_is_refused(codec: Codec) -> None:
    at_limit = padded(codec, codec.limit)
    assert isinstance(codec.decode(at_limit), codec.returns)
    assert_refused(codec, padded(codec, codec.limit + 1))
    assert_refused(codec, codec.sample + (b" " if codec.fmt == "json" else b"\x00") * (codec.limit + 1))


def test_the_envelope_decoder_takes_at_most_the_mqtt_maximum_by_default() -> None:
    assert inspect.signature(decode_envelope).parameters["max_bytes"].default == MAX_ENVELOPE_BYTES


def deep(codec: Codec, depth: int) -> bytes:
    return b"[" * depth + b"]" * depth if codec.fmt == "json" else b"\x81" * depth + b"\x00"


def deep_cases() -> list[Any]:
    """The message itself, its first and its last field; "fits" where 100 000 levels pass the size limit."""
    items = []
    for codec in CODECS:
        first, last = next(iter(codec.body())), list(codec.body())[-1]
        for where in ("top", first, last):
            depths = ["100000", "fits"] if len(deep(codec, DEEP)) > codec.limit else ["100000"]
            items += [(f"{codec.name}-{where}-{depth}", (codec, where, depth)) for depth in depths]
    return cases("deep", items)


@pytest.mark.parametrize(("codec", "where", "depth"), deep_cases())
def test_deep_nesting_is_refused_not_a_recursion_error(codec: Codec, where: str, depth: str) -> None:
    """``[[[[...]]]]`` as the message or as a field: 100 000 deep, and as deep as fits in the limit."""
    overhead = 0 if where == "top" else len(codec.encode(with_field(codec, where, "")))
    levels = DEEP if depth == "100000" else min(DEEP, (codec.limit - overhead) // 2 - 8)
    raw = deep(codec, levels)
    payload = raw if where == "top" else splice(codec, with_field(codec, where, "@@SPLICE@@"), raw)
    assert depth == "100000" or len(payload) <= codec.limit
    assert_refused(codec, payload)


# ---- wrong-typed ------------------------------------------------------------------------------------------


def split_known(test: str, case: str, labels: list[str]) -> list[tuple[str, list[str]]]:
    """One case ``case`` for the labels that must pass, and one case each for the known weaknesses
    among them (``XFAIL["test:case-label"]``), so that each of those shows as its own xfail."""
    weak = [label for label in labels if f"{test}:{case}-{label}" in XFAIL]
    return [(case, [label for label in labels if label not in weak])] + [(f"{case}-{label}", [label]) for label in weak]


def wrong_type_cases() -> list[Any]:
    items = []
    for codec in CODECS:
        for name in codec.fields:
            for case, labels in split_known("type", f"{codec.name}-{name}", list(codec.replacements())):
                items.append((case, (codec, name, labels)))
    return cases("type", items)


@pytest.mark.parametrize(("codec", "name", "labels"), wrong_type_cases())
def test_a_field_of_another_type(codec: Codec, name: str, labels: list[str]) -> None:
    """The field replaced by a string, float, bool, null, list, map, 2**70, -1 (and bytes in CBOR): a value
    of a kind the field's type does not take is refused; one it takes gives a message or the project's
    error (its range may still be wrong)."""
    failures = {}
    for label in labels:
        value = REPLACEMENTS[label]
        result = outcome(codec, codec.encode(with_field(codec, name, value)))
        typed = kind_of(value) in codec.fields[name]
        if not (result[0] == "refused" or (typed and result[0] == "returned" and isinstance(result[1], codec.returns))):
            failures[label] = describe(result)
    assert not failures


def test_every_field_has_a_wrong_type_that_is_refused() -> None:
    """The wrong-typed cases leave no field without at least one kind it must refuse."""
    for codec in CODECS:
        for name, kinds in codec.fields.items():
            wrong = [label for label, value in codec.replacements().items() if kind_of(value) not in kinds]
            assert wrong, f"{codec.name}.{name} takes every kind"


def bignum_cases() -> list[Any]:
    items = []
    for codec in CODECS:
        names = list(codec.fields) if codec.fmt == "cbor" else [codec.version, "unknown_field"]
        items += [(f"{codec.name}-{name}", (codec, name)) for name in names]
    return cases("bignum", items)


@pytest.mark.parametrize(("codec", "name"), bignum_cases())
def test_a_5000_digit_integer_in_a_field(codec: Codec, name: str) -> None:
    """JSON numbers and CBOR bignums have no size limit, Python's int printing has one."""
    payload = splice(codec, with_field(codec, name, "@@SPLICE@@"), BIGNUM_JSON) if codec.fmt == "json" \
        else codec.encode(with_field(codec, name, BIGNUM))
    if name == "unknown_field" or "int" in codec.fields.get(name, frozenset()):
        assert_decodes_or_refused(codec, payload)
    else:
        assert_refused(codec, payload)


# ---- wrong version ----------------------------------------------------------------------------------------


def version_values(codec: Codec) -> dict[str, object]:
    v = codec.version_value
    values: dict[str, object] = {"missing": ..., "zero": 0, "next": v + 1, "previous": v - 1, "negative": -1,
                                 "huge": 2**70, "string": str(v), "float_same": float(v), "bool_true": True,
                                 "null": None, "list": [v], "map": {"v": v}}
    if codec.fmt == "cbor":
        values |= {"simple_same": cbor2.CBORSimpleValue(v), "bytes": bytes([v]), "text_tag": cbor2.CBORTag(32, str(v))}
    return values


def version_cases() -> list[Any]:
    items = []
    for codec in CODECS:
        items += [(f"{codec.name}-{label}", (codec, value)) for label, value in version_values(codec).items()]
    return cases("version", items)


@pytest.mark.parametrize(("codec", "value"), version_cases())
def test_a_wrong_version_is_refused(codec: Codec, value: object) -> None:
    body = codec.body()
    if value is ...:
        del body[codec.version]
    else:
        body[codec.version] = value
    if value is ... and codec.version_optional:
        assert isinstance(codec.decode(codec.encode(body)), codec.returns)
    else:
        assert_refused(codec, codec.encode(body))


@pytest.mark.parametrize("codec", cases("trailing", [(c.name, (c,)) for c in CBOR_CODECS]))
def test_trailing_bytes_after_a_cbor_message_are_refused(codec: Codec) -> None:
    """A JSON decoder refuses anything after the object; a CBOR message is one item, too."""
    assert_refused(codec, codec.sample + cbor2.dumps("trailing"))


@pytest.mark.parametrize("codec", JSON_CODECS, ids=lambda c: c.name)
def test_trailing_bytes_after_a_json_message_are_refused(codec: Codec) -> None:
    assert_refused(codec, codec.sample + b'{"trailing": 1}')
    assert_refused(codec, codec.sample + b"\x00")


# ---- per type: what the model's own checks add ------------------------------------------------------------


def test_a_status_on_the_topic_of_another_device_is_refused() -> None:
    with pytest.raises(MessageError, match="arrived on the topic"):
        decode_device_status(STATUS.encode(), "d1")
    with pytest.raises(MessageError, match="arrived on the topic"):
        decode_device_telemetry(TELEMETRY.encode(), "d1")
    with pytest.raises(MessageError, match="device id"):
        decode_device_status(b"")
    assert decode_device_status(STATUS.encode()) == STATUS


@pytest.mark.parametrize("codec", ENVELOPES, ids=lambda c: c.name)
def test_an_envelope_of_another_kind_is_refused(codec: Codec) -> None:
    for kind in ("explode", "", "STEP", "step "):
        assert_refused(codec, codec.encode(codec.body() | {"kind": kind}))


def test_hidden_states_of_another_width_are_refused() -> None:
    payload = STEP_HIDDEN.encode()
    assert isinstance(decode_envelope(payload, hidden_size=HIDDEN), Step)
    assert isinstance(decode_envelope(payload), Step)  # no width known: any width
    for width in (HIDDEN - 1, HIDDEN + 1, 1, 4096):
        with pytest.raises(WireError, match="hidden size"):
            decode_envelope(payload, hidden_size=width)


def tensor(dtype: object, shape: tuple[int, ...], data: bytes | None = None, itemsize: int = 4) -> dict[str, object]:
    """A tensor map; by default with as many zero bytes as its shape needs."""
    count = 1
    for dim in shape:
        count *= dim
    return {"dtype": dtype, "shape": list(shape), "data": b"\x00" * itemsize * count if data is None else data}


def bad_tensors(good: tuple[int, ...], other_rank: tuple[int, ...]) -> dict[str, object]:
    """Tensors that are not the float tensor of shape like ``good`` an envelope field needs."""
    big = (1 << 70,)
    return {
        "int_dtype": tensor("i64", good, itemsize=8),
        "unknown_dtype": tensor("f64", good, itemsize=8),
        "dtype_not_text": tensor(1, good),
        "dtype_missing": {"shape": list(good), "data": tensor("f32", good)["data"]},
        "dtype_a_list": tensor(["f32"], good),
        "dtype_a_map": tensor({"f32": 1}, good),
        "dtype_bignum": tensor(BIGNUM, good),
        "other_rank": tensor("f32", other_rank),
        "shape_a_map": {"dtype": "f32", "shape": {"a": 1}, "data": b""},
        "shape_of_floats": tensor("f32", good) | {"shape": [float(d) for d in good]},
        "shape_of_bools": tensor("f32", good) | {"shape": [True, *good]},
        "shape_negative": tensor("f32", good, data=b"") | {"shape": [-d for d in good]},
        "shape_past_int64_empty": tensor("f32", (*good[:-1], *big, 0), data=b""),
        "shape_past_int64": tensor("f32", (*good[:-1], *big), data=b""),
        "shape_bignum": tensor("f32", (*good[:-1], BIGNUM), data=b""),
        "shape_count_bignum": tensor("f32", (*good[:-1], 10**2200, 10**2200), data=b""),
        "shape_too_many_dims": tensor("f32", (1,) * 100 + good),
        "data_not_bytes": tensor("f32", good) | {"data": "x" * 4},
        "data_missing": {"dtype": "f32", "shape": list(good)},
        "data_short": tensor("f32", good) | {"data": tensor("f32", good)["data"][:-1]},
        "data_long": tensor("f32", good) | {"data": tensor("f32", good)["data"] + b"\x00"},
        "not_a_map": list(good),
        "null": None,
    }


def bad_tensor_cases() -> list[Any]:
    items = []
    for envelope, field, good, other in ((STEP_HIDDEN, "hidden", (1, 2, HIDDEN), (2, HIDDEN)),
                                         (TOKEN, "logits", (6,), (1, 6))):
        items += [(f"{envelope.kind}-{field}-{label}", (envelope, field, obj))
                  for label, obj in bad_tensors(good, other).items()]
    items.append(("step-hidden-no_positions", (STEP_HIDDEN, "hidden", tensor("f32", (1, 0, HIDDEN)))))
    items.append(("step-hidden-batch_of_two", (STEP_HIDDEN, "hidden", tensor("f32", (2, 2, HIDDEN)))))
    items.append(("step-hidden-other_width", (STEP_HIDDEN, "hidden", tensor("f32", (1, 2, HIDDEN + 1)))))
    return cases("tensor", items)


@pytest.mark.parametrize(("envelope", "field", "obj"), bad_tensor_cases())
def test_a_malformed_tensor_is_refused(envelope: Step | Token, field: str, obj: object) -> None:
    payload = cbor2.dumps(cbor2.loads(envelope.encode()) | {field: obj})
    with pytest.raises(WireError):
        decode_envelope(payload, hidden_size=HIDDEN)


def test_a_step_with_tokens_and_hidden_states_is_refused() -> None:
    body = cbor2.loads(STEP_HIDDEN.encode()) | {"tokens": [1, 2]}
    with pytest.raises(WireError, match="not both"):
        decode_envelope(cbor2.dumps(body))


SAMPLINGS = {
    "no_seed": {"t": 0.7, "k": 40, "p": 0.9},
    "extra_key": {"t": 0.7, "k": 40, "p": 0.9, "s": 1, "x": 0},
    "t_negative": {"t": -0.1, "k": 0, "p": 1.0, "s": 0},
    "t_above_10": {"t": 11, "k": 0, "p": 1.0, "s": 0},
    "p_zero": {"t": 0.0, "k": 0, "p": 0.0, "s": 0},
    "k_negative": {"t": 0.0, "k": -1, "p": 1.0, "s": 0},
    "s_past_uint64": {"t": 0.0, "k": 0, "p": 1.0, "s": 2**64},
    "t_bool": {"t": True, "k": 0, "p": 1.0, "s": 0},
    "k_float": {"t": 0.0, "k": 1.0, "p": 1.0, "s": 0},
    "t_nan": {"t": float("nan"), "k": 0, "p": 1.0, "s": 0},
    "t_text": {"t": "0", "k": 0, "p": 1.0, "s": 0},
    "a_list": [0.7, 40, 0.9, 123],
    "null": None,
    "t_bignum": {"t": BIGNUM, "k": 0, "p": 1.0, "s": 0},
    "s_bignum": {"t": 0.0, "k": 0, "p": 1.0, "s": -BIGNUM},
}


@pytest.mark.parametrize("sampling", cases("sampling", [(k, (v,)) for k, v in SAMPLINGS.items()]))
def test_bad_sampling_parameters_are_refused(sampling: object) -> None:
    body = cbor2.loads(STEP_TOKENS.encode()) | {"sampling": sampling}
    with pytest.raises(WireError):
        decode_envelope(cbor2.dumps(body))


CHUNK_CHANGES = {
    "offset_negative": {"offset": -1},
    "total_too_small": {"total": 47},
    "past_the_end": {"offset": 80},
    "over_four_chunks": {"data": b"\x00" * (4 * weight_messages.CHUNK_BYTES + 1), "total": 1 << 30},
    "name_empty_map": {"name": {}},
    "data_text": {"data": "text"},
}


@pytest.mark.parametrize("change", CHUNK_CHANGES.values(), ids=CHUNK_CHANGES)
def test_a_chunk_that_does_not_fit_its_tensor_is_refused(change: dict[str, object]) -> None:
    body = BY_NAME["weight_chunk_reply"].body() | change
    with pytest.raises(BadWeightMessage):
        decode_weight_reply(cbor2.dumps(body))


def test_cancel_and_resume_return_none_for_anything_else() -> None:
    assert cancel_target(b'{"cancel": "r1"}') == "r1"
    resume = resume_target(b'{"resume": "r1", "after": 3}')
    assert resume is not None and (resume.request_id, resume.after, resume.request) == ("r1", 3, None)
    garbage = [b"", b"\xff\xfe", b"null", b"[]", b'"cancel"', b"{}", b'{"cancel": 1}', b'{"cancel": "r1", "x": 1}',
               b'{"resume": ""}', b'{"resume": "r1", "after": "3"}', b'{"resume": "r1", "after": true}',
               b'{"resume": "r1", "request": []}', BY_NAME["request"].sample, STATUS.encode(), STEP_TOKENS.encode()]
    garbage += [b'{"cancel": "r1"}'[:n] for n in range(16)] + [b'{"resume": "r1", "after": 3}'[:n] for n in range(28)]
    for payload in garbage:
        assert cancel_target(payload) is None, payload
        assert resume_target(payload) is None, payload


@pytest.mark.parametrize("payload", cases("never_raise", [
    ("deep", (deep(BY_NAME["request"], DEEP),)),
    ("bignum", (b'{"cancel": "r1", "after": ' + BIGNUM_JSON + b"}",)),
]))
def test_cancel_and_resume_never_raise(payload: bytes) -> None:
    assert cancel_target(payload) is None
    assert resume_target(payload) is None


REQUEST_CODES = {
    "empty": (b"", "invalid_json"),
    "cut": (b'{"prompt": "x"', "invalid_json"),
    "not_utf8": (b"\xff", "invalid_json"),
    "a_list": (b'["prompt"]', "invalid_json"),
    "null": (b"null", "invalid_json"),
    "prompt_a_number": (b'{"prompt": 1}', "invalid_request"),
    "version_2": (b'{"prompt": "x", "v": 2}', "invalid_request"),
    "prompt_and_messages": (b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', "invalid_request"),
    "too_large": (b'{"prompt": "' + b"x" * MAX_REQUEST_BYTES + b'"}', "request_too_large"),
}


@pytest.mark.parametrize(("payload", "code"), REQUEST_CODES.values(), ids=REQUEST_CODES)
def test_a_refused_request_says_why_in_its_code(payload: bytes, code: str) -> None:
    with pytest.raises(RequestError) as refused:
        parse_request(payload)
    assert refused.value.code == code


# ---- manifests: check_manifest takes the decoded object ---------------------------------------------------


def test_the_manifest_of_a_real_checkpoint_passes_and_its_reply_refuses_every_truncation(tiny_model: Path) -> None:
    from lime_mqtt.model.checkpoint import Checkpoint
    from lime_mqtt.weights.files import build_manifest

    manifest = build_manifest(Checkpoint(tiny_model), "tiny-llama")
    assert check_manifest(manifest) is manifest
    payload = encode_reply("q1", "manifest", manifest=manifest)
    assert decode_weight_reply(payload) == ManifestReply("q1", manifest)
    codec = BY_NAME["weight_manifest_reply"]
    bad = {n: describe(r) for n in range(len(payload)) if (r := outcome(codec, payload[:n]))[0] != "refused"}
    assert not bad


def manifest_with(*path: str, value: object = ...) -> dict[str, Any]:
    """A deep copy of MANIFEST with the key at ``path`` set to ``value`` (``...``: removed)."""
    manifest = json.loads(json.dumps(MANIFEST))
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return manifest


ENTRY = ("tensors", "lm_head.weight")
MANIFEST_FIELDS = {"v": frozenset({"int"}), "model": frozenset({"str"}), "config": frozenset({"map"}),
                   "tensors": frozenset({"map"})}
ENTRY_FIELDS = {"dtype": frozenset({"str"}), "shape": frozenset({"list"}), "nbytes": frozenset({"int"}),
                "offset": frozenset({"int"}), "sha256": frozenset({"str"})}


def test_the_manifest_sample_passes() -> None:
    assert check_manifest(MANIFEST) is MANIFEST
    assert check_manifest(manifest_with("tensors", value={})) is not None  # a model with no tensors is well formed


def manifest_truncations() -> list[Any]:
    items = [(f"missing-{k}", (manifest_with(k),)) for k in MANIFEST_FIELDS]
    items += [(f"entry-missing-{k}", (manifest_with(*ENTRY, k),)) for k in ENTRY_FIELDS]
    items += [("sha256-cut", (manifest_with(*ENTRY, "sha256", value="ab" * 31 + "a"),)),
              ("shape-cut", (manifest_with(*ENTRY, "shape", value=[6]),)),
              ("entry-empty", (manifest_with(*ENTRY, value={}),)),
              ("empty", ({},))]
    return cases("manifest_cut", items)


@pytest.mark.parametrize("obj", manifest_truncations())
def test_a_truncated_manifest_is_refused(obj: object) -> None:
    with pytest.raises(BadWeightMessage):
        check_manifest(obj)


def nested(depth: int) -> list[Any]:
    node: list[Any] = []
    for _ in range(depth):
        node = [node]
    return node


@pytest.mark.parametrize("obj", [
    pytest.param(manifest_with("model", value="m" * 257), id="model-name"),
    pytest.param(manifest_with("tensors", "x" * 1025, value=MANIFEST["tensors"]["lm_head.weight"]), id="tensor-name"),
    pytest.param(manifest_with(*ENTRY, "shape", value=[1] * 8 + [24]), id="nine-dims"),
    pytest.param(manifest_with(*ENTRY, "nbytes", value=2**70), id="nbytes-past-shape"),
    pytest.param(nested(DEEP), id="deep"),
    pytest.param(manifest_with("tensors", value=nested(DEEP)), id="deep-tensors"),
    pytest.param(manifest_with(*ENTRY, value=nested(DEEP)), id="deep-entry"),
    pytest.param(manifest_with(*ENTRY, "shape", value=nested(DEEP)), id="deep-shape"),
    pytest.param(manifest_with(*ENTRY, "shape", value=[BIGNUM]), id="bignum-dim"),
    pytest.param(manifest_with("tensors", value={BIGNUM: MANIFEST["tensors"]["lm_head.weight"]}), id="bignum-name"),
])
def test_an_oversized_manifest_is_refused(obj: object) -> None:
    with pytest.raises(BadWeightMessage):
        check_manifest(obj)


def manifest_type_cases() -> list[Any]:
    items = []
    for path, fields in (((), MANIFEST_FIELDS), (ENTRY, ENTRY_FIELDS)):
        for name, kinds in fields.items():
            case = ".".join((*path[:1], name))
            for case_id, labels in split_known("manifest_type", case, list(REPLACEMENTS)):
                items.append((case_id, ((*path, name), kinds, labels)))
    return cases("manifest_type", items)


@pytest.mark.parametrize(("path", "kinds", "labels"), manifest_type_cases())
def test_a_manifest_field_of_another_type(path: tuple[str, ...], kinds: frozenset[str], labels: list[str]) -> None:
    failures = {}
    for label in labels:
        obj = manifest_with(*path, value=REPLACEMENTS[label])
        try:
            result = check_manifest(obj)
        except BadWeightMessage:
            continue
        except Exception as exc:
            failures[label] = f"escaped {type(exc).__name__}: {exc}"
            continue
        if kind_of(REPLACEMENTS[label]) not in kinds or result is not obj:
            failures[label] = f"returned {type(result).__name__}"
    assert not failures


@pytest.mark.parametrize("value", cases("manifest_version", [
    (label, (value,)) for label, value in version_values(BY_NAME["weight_manifest_reply"]).items()
]))
def test_a_manifest_of_another_version_is_refused(value: object) -> None:
    with pytest.raises(BadWeightMessage):
        check_manifest(manifest_with("v", value=value))


# ---- fuzzing ----------------------------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
CBOR_SCALARS = (JSON_SCALARS | st.binary(max_size=24)
                | st.builds(cbor2.CBORSimpleValue, st.integers(0, 19) | st.integers(32, 255)))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
CBOR_VALUES = st.recursive(
    CBOR_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    | st.builds(cbor2.CBORTag, st.integers(0, 300), inner),
    max_leaves=16,
)


def values_for(codec: Codec) -> st.SearchStrategy[Any]:
    return JSON_VALUES if codec.fmt == "json" else CBOR_VALUES


def field_values(codec: Codec) -> st.SearchStrategy[Any]:
    """Small values for one field: a scalar, or a short list or map of them."""
    scalars = JSON_SCALARS if codec.fmt == "json" else CBOR_SCALARS
    return scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4), scalars, max_size=2)


def shaped(codec: Codec) -> st.SearchStrategy[dict[Any, Any]]:
    """The message's own keys, each left out, kept, or given a random value."""
    return st.fixed_dictionaries({}, optional={k: st.just(v) | field_values(codec) for k, v in codec.body().items()})


STRUCTURES = {codec.name: values_for(codec) | shaped(codec) for codec in CODECS}


@st.composite
def mutated(draw: st.DrawFn, sample: bytes) -> bytes:
    """The sample with a few bytes flipped, inserted, deleted, or its tail cut off."""
    data = bytearray(sample)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data.insert(i, draw(st.integers(0, 255)))
        elif op == "delete" and data:
            del data[i]
        elif op == "cut":
            del data[i:]
    return bytes(data)


def decodes_or_refuses(codec: Codec, payload: bytes) -> None:
    try:
        value = codec.decode(payload)
    except codec.error:
        return
    assert isinstance(value, codec.returns) or (codec.empty_valid and payload == b"" and value == codec.empty)


# One codec per decoder: the envelope codecs share one, and so do the weight reply codecs.
DECODERS = {"envelope" if c.name == "step_tokens" else "weight_reply" if c.name == REPLIES[0] else c.name: c
            for c in CODECS if c.name not in ENVELOPE_NAMES[1:] + REPLIES[1:]}


@pytest.mark.parametrize("codec", DECODERS.values(), ids=DECODERS)
@FUZZ
@given(payload=st.binary(max_size=256))
def test_fuzz_random_bytes(codec: Codec, payload: bytes) -> None:
    decodes_or_refuses(codec, payload)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@FUZZ_SMALL
@given(data=st.data())
def test_fuzz_random_structures(codec: Codec, data: st.DataObject) -> None:
    value = data.draw(STRUCTURES[codec.name])
    decodes_or_refuses(codec, codec.encode(value))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@FUZZ_SMALL
@given(data=st.data())
def test_fuzz_mutations_of_the_valid_message(codec: Codec, data: st.DataObject) -> None:
    decodes_or_refuses(codec, data.draw(mutated(codec.sample)))


@FUZZ
@given(payload=st.binary(max_size=128) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_fuzz_cancel_and_resume_never_raise(payload: bytes) -> None:
    assert cancel_target(payload) is None or isinstance(cancel_target(payload), str)
    resume = resume_target(payload)
    assert resume is None or isinstance(resume.after, int)


@FUZZ
@given(obj=CBOR_VALUES | st.fixed_dictionaries({}, optional={k: st.just(v) | CBOR_VALUES for k, v in MANIFEST.items()}))
def test_fuzz_check_manifest(obj: object) -> None:
    try:
        assert check_manifest(obj) is obj
    except BadWeightMessage:
        pass



