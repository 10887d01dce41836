"""The wire and log contract: every message and record round-trips; bad bytes -> DecodeError.

Instances are built from the declared field types (``msgspec.structs.fields``), so a field added
to a message or record is covered without touching this file; a field of a type the builders do
not know makes the tests fail loudly instead of being skipped.
"""

from __future__ import annotations

import enum
import json
import random
import types
import typing
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import codec, topology
from schemas.codec import DecodeError
from schemas.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message
from schemas.records import (
    COORDINATOR_RECORD_TYPES,
    PARTICIPANT_RECORD_TYPES,
    CoordinatorRecord,
    ParticipantRecord,
    Record,
)

Decoder = Callable[[bytes], Any]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# (type, the decoder that must accept it)
#: ManualAction is written to both logs; every other record belongs to one side only
ALL_RECORD_TYPES = tuple(dict.fromkeys(COORDINATOR_RECORD_TYPES + PARTICIPANT_RECORD_TYPES))
COORDINATOR_ONLY = tuple(t for t in COORDINATOR_RECORD_TYPES if t not in PARTICIPANT_RECORD_TYPES)
PARTICIPANT_ONLY = tuple(t for t in PARTICIPANT_RECORD_TYPES if t not in COORDINATOR_RECORD_TYPES)

ALL_TYPES: list[tuple[type[Any], Decoder]] = (
    [(t, codec.decode_message) for t in MESSAGE_TYPES]
    + [(t, codec.decode_coordinator_record) for t in COORDINATOR_RECORD_TYPES]
    + [(t, codec.decode_participant_record) for t in PARTICIPANT_RECORD_TYPES]
)
ALL_DECODERS: list[Decoder] = [
    codec.decode_message,
    codec.decode_coordinator_record,
    codec.decode_participant_record,
]


def _id(value: object) -> str:
    return getattr(value, "__name__", repr(value))


# ---- builders from the declared field types ------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
#: what ``dict[str, Any]`` (operation args) may hold: JSON values (arrays decode as lists)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _is_optional(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for values of a field type used in ``schemas``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return JSON_VALUES
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(INT64_MIN, INT64_MAX)
    if tp is str:
        return st.text(max_size=40)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_strategy(tp)
    if _is_optional(tp):
        return st.one_of([strategy_for(arg) for arg in typing.get_args(tp)])
    if tp is type(None):
        return st.none()
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0]), max_size=4).map(tuple)
    if origin is dict:
        key, value = typing.get_args(tp)
        assert key is str, f"JSON object keys are strings, not {key!r}"
        return st.dictionaries(st.text(max_size=10), strategy_for(value), max_size=4)
    raise TypeError(f"no strategy for field type {tp!r}: teach tests/unit/test_schemas.py")


def struct_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for field in msgspec.structs.fields(cls):
        if field.name == "v":
            kwargs["v"] = st.just(PROTOCOL_VERSION)
        else:
            kwargs[field.name] = strategy_for(field.type)
    return st.builds(cls, **kwargs)


def sample_value(tp: Any) -> Any:
    """A deterministic, valid value of a field type."""
    if tp is Any:
        return {"n": 1}
    if tp is bool:
        return True
    if tp is int:
        return 1_700_000_000_000
    if tp is str:
        return "s"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return next(iter(tp))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return sample(tp)
    if _is_optional(tp):
        return sample_value(next(a for a in typing.get_args(tp) if a is not type(None)))
    origin = typing.get_origin(tp)
    if origin is tuple:
        return (sample_value(typing.get_args(tp)[0]),)
    if origin is dict:
        return {"k": sample_value(typing.get_args(tp)[1])}
    raise TypeError(f"no sample for field type {tp!r}: teach tests/unit/test_schemas.py")


def sample(cls: type[Any]) -> Any:
    """An instance of ``cls`` with every field set (defaults included) to a valid value."""
    return cls(
        **{
            f.name: PROTOCOL_VERSION if f.name == "v" else sample_value(f.type)
            for f in msgspec.structs.fields(cls)
        }
    )


def wrong_value(tp: Any) -> Any:
    """A JSON value that is not valid for a field of type ``tp``."""
    if tp is Any:
        pytest.skip("an Any field accepts every JSON value")
    if typing.get_origin(tp) is dict:
        return [1, 2]
    return {"unexpected": "object"}


def as_json(obj: Any) -> dict[str, Any]:
    doc = json.loads(codec.encode(obj))
    assert isinstance(doc, dict)
    return doc


def tag_field(cls: type[Any]) -> str:
    tag = cls.__struct_config__.tag_field
    assert isinstance(tag, str)
    return tag


def assert_decode_error(decode: Decoder, raw: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    exc = info.value
    assert exc.raw == raw
    assert isinstance(exc.cause, str)
    assert exc.cause.strip(), "DecodeError.cause must say what is wrong"
    assert str(exc) == exc.cause
    return exc


# ---- the type lists agree with the unions ------------------------------------------------------


@pytest.mark.parametrize(
    ("union", "listed"),
    [
        (Message, MESSAGE_TYPES),
        (CoordinatorRecord, COORDINATOR_RECORD_TYPES),
        (ParticipantRecord, PARTICIPANT_RECORD_TYPES),
        (Record, ALL_RECORD_TYPES),
    ],
    ids=["messages", "coordinator-records", "participant-records", "records"],
)
def test_type_tuples_match_unions(union: Any, listed: tuple[type[Any], ...]) -> None:
    assert set(typing.get_args(union)) == set(listed)
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize(
    "listed",
    [MESSAGE_TYPES, ALL_RECORD_TYPES],
    ids=["messages", "records"],
)
def test_tags_are_unique_strings(listed: tuple[type[Any], ...]) -> None:
    tags = [cls.__struct_config__.tag for cls in listed]
    assert all(isinstance(tag, str) and tag for tag in tags)
    assert len(set(tags)) == len(tags)
    assert len({tag_field(cls) for cls in listed}) == 1


@pytest.mark.parametrize("cls", [t for t, _ in ALL_TYPES], ids=_id)
def test_structs_are_frozen_and_strict(cls: type[Any]) -> None:
    config = cls.__struct_config__
    assert config.frozen
    assert config.forbid_unknown_fields


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "decode"), ALL_TYPES, ids=_id)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(cls: type[Any], decode: Decoder, data: st.DataObject) -> None:
    obj = data.draw(struct_strategy(cls))
    raw = codec.encode(obj)
    assert isinstance(raw, bytes)
    back = decode(raw)
    assert type(back) is cls
    assert back == obj
    # equal bytes too: catches 1 == 1.0 == True style coincidences in ``==``
    assert codec.encode(back) == raw


@pytest.mark.parametrize(("cls", "decode"), ALL_TYPES, ids=_id)
def test_round_trip_of_full_sample(cls: type[Any], decode: Decoder) -> None:
    obj = sample(cls)
    doc = as_json(obj)
    assert doc[tag_field(cls)] == cls.__struct_config__.tag
    if cls in MESSAGE_TYPES:
        assert doc["v"] == PROTOCOL_VERSION
    assert decode(codec.encode(obj)) == obj


@pytest.mark.parametrize(("cls", "decode"), ALL_TYPES, ids=_id)
def test_defaults_may_be_omitted_on_the_wire(cls: type[Any], decode: Decoder) -> None:
    obj = sample(cls)
    doc = {
        name: value
        for name, value in as_json(obj).items()
        if name == tag_field(cls)
        or next(f for f in msgspec.structs.fields(cls) if f.encode_name == name).required
    }
    back = decode(json.dumps(doc).encode())
    assert type(back) is cls
    for field in msgspec.structs.fields(cls):
        if field.required:
            assert getattr(back, field.name) == getattr(obj, field.name)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=_id)
def test_record_decoders_reject_messages(cls: type[Any]) -> None:
    raw = codec.encode(sample(cls))
    assert_decode_error(codec.decode_coordinator_record, raw)
    assert_decode_error(codec.decode_participant_record, raw)


@pytest.mark.parametrize("cls", COORDINATOR_ONLY, ids=_id)
def test_coordinator_records_are_not_participant_records_or_messages(cls: type[Any]) -> None:
    raw = codec.encode(sample(cls))
    assert_decode_error(codec.decode_participant_record, raw)
    assert_decode_error(codec.decode_message, raw)


@pytest.mark.parametrize("cls", PARTICIPANT_ONLY, ids=_id)
def test_participant_records_are_not_coordinator_records_or_messages(cls: type[Any]) -> None:
    raw = codec.encode(sample(cls))
    assert_decode_error(codec.decode_coordinator_record, raw)
    assert_decode_error(codec.decode_message, raw)


@pytest.mark.parametrize("cls", [t for t, _ in ALL_TYPES], ids=_id)
def test_record_kind_is_the_tag(cls: type[Any]) -> None:
    assert codec.record_kind(sample(cls)) == cls.__struct_config__.tag


# ---- bad bytes ------------------------------------------------------------------------------

_rng = random.Random(20240601)
DEEP = b"[" * 100_000 + b"]" * 100_000
GARBAGE: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b"  \n\t ",
    "not-json": b"not json at all",
    "truncated": b'{"type": "commit", "tx_id": "t',
    "trailing-garbage": b'{"type":"commit","tx_id":"t","participant":"p"} x',
    "invalid-utf8": b"\xff\xfe\xfd",
    "invalid-utf8-in-string": b'{"type":"commit","tx_id":"\xff\xfe","participant":"p"}',
    "lone-surrogate-escape": b'{"type":"commit","tx_id":"\\ud800","participant":"p"}',
    "nul": b"\x00",
    "json-null": b"null",
    "json-number": b"42",
    "json-string": b'"commit"',
    "json-array": b'["commit", "t", "p"]',
    "json-true": b"true",
    "empty-object": b"{}",
    "tag-not-string": b'{"type": 1, "kind": 1}',
    "tag-null": b'{"type": null, "kind": null}',
    "huge-random": _rng.randbytes(1 << 20),
    "huge-repeated": b"garbage" * 200_000,
    "deep-array": b"[" * 200_000,
    "deep-object": b'{"a":' * 100_000,
    "deep-args-message": b'{"type":"prepare","args":{"a":' + DEEP + b"}}",
    "deep-args-record": b'{"kind":"prepared","args":{"a":' + DEEP + b"}}",
    "huge-number": b'{"type":"commit","kind":"ended","tx_id":' + b"9" * 100_000 + b"}",
}


@pytest.mark.parametrize("raw", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("decode", ALL_DECODERS, ids=_id)
def test_garbage_raises_decode_error(decode: Decoder, raw: bytes) -> None:
    assert_decode_error(decode, raw)


@pytest.mark.parametrize("decode", ALL_DECODERS, ids=_id)
def test_unknown_tag(decode: Decoder) -> None:
    for tag in ("nope", "", "Commit", "COMMIT", "begun ", "decided"):
        raw = json.dumps({"type": tag, "kind": tag, "tx_id": "t", "participant": "p"}).encode()
        assert_decode_error(decode, raw)


@pytest.mark.parametrize(("cls", "decode"), ALL_TYPES, ids=_id)
def test_missing_tag(cls: type[Any], decode: Decoder) -> None:
    doc = as_json(sample(cls))
    del doc[tag_field(cls)]
    assert_decode_error(decode, json.dumps(doc).encode())


@pytest.mark.parametrize(("cls", "decode"), ALL_TYPES, ids=_id)
def test_missing_required_field(cls: type[Any], decode: Decoder) -> None:
    required = [f for f in msgspec.structs.fields(cls) if f.required]
    if not required:
        pytest.skip(f"{cls.__name__} has no required field")
    for field in required:
        doc = as_json(sample(cls))
        del doc[field.encode_name]
        exc = assert_decode_error(decode, json.dumps(doc).encode())
        assert field.encode_name in exc.cause


@pytest.mark.parametrize(("cls", "decode"), ALL_TYPES, ids=_id)
def test_wrong_field_type(cls: type[Any], decode: Decoder) -> None:
    checked = 0
    for field in msgspec.structs.fields(cls):
        if field.type is Any:
            continue
        doc = as_json(sample(cls))
        doc[field.encode_name] = wrong_value(field.type)
        exc = assert_decode_error(decode, json.dumps(doc).encode())
        assert field.encode_name in exc.cause
        checked += 1
    assert checked


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [
        (MESSAGE_TYPES[0], "v", "1"),
        (MESSAGE_TYPES[0], "v", 1.0),
        (MESSAGE_TYPES[0], "v", True),
        (MESSAGE_TYPES[0], "v", None),
    ]
    + [
        (cls, f.encode_name, value)
        for cls, _ in ALL_TYPES
        for f in msgspec.structs.fields(cls)
        if f.type in (int, str) or (isinstance(f.type, type) and issubclass(f.type, enum.Enum))
        for value in (
            [None, "12", 1.5, True, [1]]
            if f.type is int
            else [None, 12, True, ["s"]]
            if f.type is str
            else ["bogus", None, 1]
        )
    ],
)
def test_wrong_scalar_type(cls: type[Any], name: str, value: object) -> None:
    decode = next(d for t, d in ALL_TYPES if t is cls)
    doc = as_json(sample(cls))
    doc[name] = value
    assert_decode_error(decode, json.dumps(doc).encode())


@pytest.mark.parametrize(("cls", "decode"), ALL_TYPES, ids=_id)
def test_unknown_extra_field(cls: type[Any], decode: Decoder) -> None:
    doc = as_json(sample(cls))
    doc["surprise"] = 1
    exc = assert_decode_error(decode, json.dumps(doc).encode())
    assert "surprise" in exc.cause


def test_unknown_field_inside_a_nested_struct() -> None:
    from schemas.messages import Begin

    doc = as_json(sample(Begin))
    doc["branches"][0]["surprise"] = 1
    assert_decode_error(codec.decode_message, json.dumps(doc).encode())


@pytest.mark.parametrize("version", [0, 2, -1, PROTOCOL_VERSION + 1, 2**40])
@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=_id)
def test_wrong_protocol_version(cls: type[Any], version: int) -> None:
    doc = as_json(sample(cls))
    doc["v"] = version
    exc = assert_decode_error(codec.decode_message, json.dumps(doc).encode())
    assert str(version) in exc.cause


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=_id)
def test_missing_version_means_current(cls: type[Any]) -> None:
    doc = as_json(sample(cls))
    del doc["v"]
    assert codec.decode_message(json.dumps(doc).encode()).v == PROTOCOL_VERSION


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_decode_error(raw: bytes) -> None:
    for decode in ALL_DECODERS:
        try:
            decode(raw)
        except DecodeError as exc:
            assert exc.raw == raw
            assert exc.cause


@st.composite
def mutated_encodings(draw: st.DrawFn) -> tuple[Decoder, bytes]:
    cls, decode = draw(st.sampled_from(ALL_TYPES))
    raw = bytearray(codec.encode(draw(struct_strategy(cls))))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "insert" or position == len(raw):
            raw[position:position] = draw(st.binary(min_size=1, max_size=3))
        elif action == "flip":
            raw[position] ^= 1 << draw(st.integers(0, 7))
        else:
            del raw[position]
    return decode, bytes(raw)


@settings(max_examples=300, deadline=None)
@given(case=mutated_encodings())
def test_mutated_encodings_decode_or_raise_decode_error(case: tuple[Decoder, bytes]) -> None:
    decode, raw = case
    try:
        obj = decode(raw)
    except DecodeError as exc:
        assert exc.raw == raw
        assert exc.cause
    else:
        assert decode(codec.encode(obj)) == obj


def test_decode_error_is_an_exception_with_raw_and_cause() -> None:
    exc = DecodeError(b"\x00raw", "the cause")
    assert isinstance(exc, Exception)
    assert exc.raw == b"\x00raw"
    assert exc.cause == "the cause"
    assert str(exc) == "the cause"


# ---- topology -------------------------------------------------------------------------------

GOOD_NAMES = ["a", "A", "0", "bank-1", "bank_1", "bank.eu.1", "x" * 100, "a-", "a."]
BAD_NAMES = [
    "",
    " ",
    "a b",
    " a",
    "a ",
    "-a",
    ".a",
    "_a",
    "x" * 101,
    "a/b",
    "a#b",
    "a*",
    "a:b",
    "é",
    "bänk",
    "a\n",
    "\na",
    "a\x00",
    "a\tb",
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_participant_queue_accepts_safe_names(name: str) -> None:
    assert topology.is_valid_participant_name(name)
    queue = topology.participant_queue(name)
    assert queue == topology.PARTICIPANT_QUEUE_PREFIX + name
    assert queue.startswith("twophase.")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_participant_queue_rejects_unsafe_names(name: str) -> None:
    assert not topology.is_valid_participant_name(name)
    with pytest.raises(ValueError, match="invalid participant name"):
        topology.participant_queue(name)


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=120))
def test_participant_queue_valid_iff_name_is_valid(name: str) -> None:
    if topology.is_valid_participant_name(name):
        queue = topology.participant_queue(name)
        assert queue.endswith(name)
        assert len(queue.encode()) <= 255  # AMQP short string
        assert name.isascii()
        assert name.strip() == name
    else:
        with pytest.raises(ValueError):
            topology.participant_queue(name)


def test_client_queue_is_prefixed() -> None:
    assert topology.client_queue("c1") == topology.CLIENT_QUEUE_PREFIX + "c1"


def test_topology_names_are_distinct_and_do_not_collide_with_prefixes() -> None:
    fixed = [
        topology.EXCHANGE,
        topology.DEAD_LETTER_EXCHANGE,
        topology.DEAD_LETTER_QUEUE,
        topology.COORDINATOR_QUEUE,
    ]
    assert len(set(fixed)) == len(fixed)
    prefixes = [topology.PARTICIPANT_QUEUE_PREFIX, topology.CLIENT_QUEUE_PREFIX]
    assert not topology.PARTICIPANT_QUEUE_PREFIX.startswith(topology.CLIENT_QUEUE_PREFIX)
    assert not topology.CLIENT_QUEUE_PREFIX.startswith(topology.PARTICIPANT_QUEUE_PREFIX)
    for name in fixed:
        assert not any(name.startswith(prefix) for prefix in prefixes)
    for name in fixed + prefixes:
        assert len(name.encode()) <= 255 and not name.startswith("amq.")


def test_durable_queue_arguments_dead_letter_to_the_dlx() -> None:
    args = topology.durable_queue_arguments()
    assert args["x-dead-letter-exchange"] == topology.DEAD_LETTER_EXCHANGE
    assert topology.durable_queue_arguments() == args  # stable: must match on every declare
    assert topology.durable_queue_arguments() is not args  # callers may not share a mutable dict
