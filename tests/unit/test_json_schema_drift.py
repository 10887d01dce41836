"""``schemas/json`` is generated from the types: it must not drift from the code."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import pytest

from schemas import codec
from schemas.messages import (
    Abort,
    Begin,
    Branch,
    Heartbeat,
    Outcome,
    OutcomeKind,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.records import BranchCompleted, BranchPrepared, Decision, TxAborted, TxCommitting

JSON_DIR = Path(codec.__file__).resolve().parent / "json"
REGENERATE = "run `python -m schemas.generate` and commit the result"


def test_json_directory_holds_exactly_the_generated_files() -> None:
    on_disk = {p.name for p in JSON_DIR.glob("*") if p.is_file()}
    generated = set(codec.render_json_schemas())
    assert on_disk == generated, (
        f"schemas/json is out of date: missing {sorted(generated - on_disk)}, "
        f"unexpected {sorted(on_disk - generated)}; {REGENERATE}"
    )


@pytest.mark.parametrize("name", sorted(codec.render_json_schemas()))
def test_json_schema_file_matches_the_code(name: str) -> None:
    expected = codec.render_json_schemas()[name]
    path = JSON_DIR / name
    assert path.exists(), f"schemas/json/{name} is missing; {REGENERATE}"
    actual = path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                actual.splitlines(keepends=True),
                expected.splitlines(keepends=True),
                f"schemas/json/{name} (on disk)",
                f"{name} (generated from the code)",
                n=2,
            )
        )
        pytest.fail(f"schemas/json/{name} drifted from the code; {REGENERATE}\n{diff[:6000]}")


def test_generated_documents_are_json_schema_2020_12() -> None:
    for name, text in codec.render_json_schemas().items():
        doc = json.loads(text)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert doc["$defs"], name


SAMPLES: dict[str, list[Any]] = {
    "messages.schema.json": [
        Begin(
            tx_id="tx-1",
            branches=(
                Branch(participant="bank-a", operation="debit", args={"amount": 10}),
                Branch(participant="bank-b", operation="credit"),
            ),
            timeout_ms=5_000,
            reply_to="twophase.client.c1",
        ),
        Prepare(
            tx_id="tx-1",
            participant="bank-a",
            operation="debit",
            args={"amount": 10, "note": None, "tags": ["a", 1.5]},
            deadline_ms=1_700_000_000_000,
            participants=("bank-a", "bank-b"),
        ),
        Vote(tx_id="tx-1", participant="bank-a", vote=VoteKind.NO, reason="insufficient funds"),
        Abort(tx_id="tx-1", participant="bank-b"),
        Heartbeat(participant="bank-a", sent_at_ms=1, interval_ms=1_000),
        Outcome(tx_id="tx-1", outcome=OutcomeKind.ABORTED, reason="no", at_fault="bank-a"),
    ],
    "coordinator-records.schema.json": [
        TxCommitting(tx_id="tx-1", participants=("bank-a",), reply_to=("c1",)),
        TxAborted(tx_id="tx-2", reason="vote timeout", at_fault="bank-b"),
    ],
    "participant-records.schema.json": [
        BranchPrepared(
            tx_id="tx-1", participant="bank-a", operation="debit", args={}, deadline_ms=5
        ),
        BranchCompleted(tx_id="tx-1", participant="bank-a", decision=Decision.COMMIT),
    ],
}


def test_samples_cover_every_schema_document() -> None:
    assert set(SAMPLES) == set(codec.render_json_schemas())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoded_values_validate_against_the_generated_schema(name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(codec.render_json_schemas()[name])
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    for obj in SAMPLES[name]:
        instance = json.loads(codec.encode(obj))
        errors = [e.message for e in validator.iter_errors(instance)]
        assert not errors, f"{type(obj).__name__}: {errors}"
        # and the schema is strict where the decoder is strict
        assert not validator.is_valid({**instance, "surprise": 1})
        tag = "type" if "type" in instance else "kind"
        assert not validator.is_valid({**instance, tag: "no-such-type"})
