"""Encoding and validated decoding of messages and records (JSON via msgspec).

JSON rather than MessagePack so that participants in other languages can use the generated JSON
Schema documents in ``schemas/json`` with any JSON library.
"""

from __future__ import annotations

import functools
import json
import operator
from typing import Any, TypeVar

import msgspec

from schemas.errors import ProtocolError
from schemas.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message
from schemas.records import (
    COORDINATOR_RECORD_TYPES,
    PARTICIPANT_RECORD_TYPES,
    CoordinatorRecord,
    ParticipantRecord,
)

_T = TypeVar("_T")


class DecodeError(ProtocolError):
    """Bytes that are not a valid message; keeps the raw bytes and the cause."""

    def __init__(self, raw: bytes, cause: str) -> None:
        super().__init__(cause)
        self.raw = raw
        self.cause = cause


_encoder = msgspec.json.Encoder()
_message_decoder: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)
_coordinator_record_decoder: msgspec.json.Decoder[CoordinatorRecord] = msgspec.json.Decoder(
    CoordinatorRecord
)
_participant_record_decoder: msgspec.json.Decoder[ParticipantRecord] = msgspec.json.Decoder(
    ParticipantRecord
)


def _decode(decoder: msgspec.json.Decoder[_T], raw: bytes) -> _T:
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise DecodeError(raw, str(exc)) from exc
    except UnicodeDecodeError as exc:  # invalid UTF-8 inside a JSON string
        raise DecodeError(raw, f"JSON is malformed: {exc}") from exc
    except RecursionError as exc:  # absurdly deep nesting inside an ``args`` value
        raise DecodeError(raw, f"JSON is nested too deeply: {exc}") from exc


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def decode_message(raw: bytes) -> Message:
    message = _decode(_message_decoder, raw)
    if message.v != PROTOCOL_VERSION:
        raise DecodeError(
            raw, f"unsupported protocol version {message.v} (this is v{PROTOCOL_VERSION})"
        )
    return message


def decode_coordinator_record(raw: bytes) -> CoordinatorRecord:
    return _decode(_coordinator_record_decoder, raw)


def decode_participant_record(raw: bytes) -> ParticipantRecord:
    return _decode(_participant_record_decoder, raw)


def record_kind(record: msgspec.Struct) -> str:
    tag = type(record).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def _union(types: tuple[type[Any], ...]) -> Any:
    return functools.reduce(operator.or_, types)


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema documents kept in ``schemas/json`` (file name -> document)."""

    def schema_for(types: tuple[type[Any], ...]) -> dict[str, Any]:
        (schema,), components = msgspec.json.schema_components(
            [_union(types)], ref_template="#/$defs/{name}"
        )
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            **schema,
            "$defs": components,
        }

    return {
        "messages.schema.json": schema_for(MESSAGE_TYPES),
        "coordinator-records.schema.json": schema_for(COORDINATOR_RECORD_TYPES),
        "participant-records.schema.json": schema_for(PARTICIPANT_RECORD_TYPES),
    }


def render_json_schemas() -> dict[str, str]:
    return {
        name: json.dumps(doc, indent=2, sort_keys=True) + "\n"
        for name, doc in json_schemas().items()
    }
