"""Property tests of the boundary: arbitrary and spoiled inputs through the codec and the checks,
and through the real drivers on the in-memory broker, mixed with real transfers.

(a) ``decode_message`` + ``check`` raise nothing but ``DecodeError`` / ``InvalidMessage``, and
what they accept encodes again to the same message.
(b) A coordinator and three banks (``tests/unit/test_drivers.System``) stepped turn by turn:
no exception leaves ``turn()``, every rejected message is in the dead-letter queue with the
category ``twophase.fuzz_corpus.expected_rejection`` names, nothing accepted is there, and the
real transfers commit with every balance as it should be.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from runtime.driver import now_ms
from runtime.memory import MemoryBroker
from schemas import topology
from schemas.codec import DecodeError, decode_message, encode
from schemas.messages import MESSAGE_TYPES, Commit, Envelope, Heartbeat, Outcome, Prepare
from schemas.validation import (
    CLIENT_ACCEPTS,
    COORDINATOR_ACCEPTS,
    PARTICIPANT_ACCEPTS,
    InvalidMessage,
    check,
)
from tests.unit.test_drivers import BANKS, REPLY, System, credit, transfer, unwrap
from twophase.fuzz_corpus import BAD_NAMES, Context, Corpus, dumps, expected_rejection
from twophase.fuzz_traffic import odd_headers

ACCEPTS: dict[str, tuple[type[Any], ...] | None] = {
    topology.COORDINATOR_QUEUE: COORDINATOR_ACCEPTS,
    **{topology.participant_queue(b): PARTICIPANT_ACCEPTS for b in BANKS},
    REPLY: CLIENT_ACCEPTS,
}
FAST = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DRIVERS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**62, -(2**62), 2**63, -(2**63) - 1, 2**64, 10**40])
    | st.floats()
    | st.text(max_size=40)
    | st.sampled_from([f(random.Random(0)) for f in BAD_NAMES]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def corpus(rng: random.Random) -> Corpus:
    return Corpus(rng, Context(participants=BANKS, client_queues=[REPLY], now_ms=now_ms))


def a_message(rng: random.Random, kind: type[Any]) -> Any:
    made = corpus(rng)
    return made.envelope() if kind is Envelope else made.sample(kind)


def only_boundary_errors(body: bytes, accepts: tuple[type[Any], ...] | None) -> None:
    """Decode and check ``body``: a boundary error, or a message that encodes to itself."""
    try:
        message = check(decode_message(body), now_ms(), accepts=accepts)
    except (DecodeError, InvalidMessage):
        return
    assert decode_message(encode(message)) == message


# ---- (a) the codec and the checks --------------------------------------------------------------


@FAST
@given(body=st.binary(max_size=2048), accepts=st.sampled_from(list(ACCEPTS.values())))
@example(body=b"", accepts=None)
@example(body=b"\xef\xbb\xbf{}", accepts=None)
@example(body=b"[" * 100_000 + b"]" * 100_000, accepts=None)
def test_arbitrary_bytes(body: bytes, accepts: tuple[type[Any], ...] | None) -> None:
    only_boundary_errors(body, accepts)


MUTATIONS: dict[str, Callable[[Corpus, Any], bytes]] = {
    "bytes": lambda c, m: c.mutate_bytes(encode(m)),
    "field": lambda c, m: c.mutate_json(m),
    "name": lambda c, m: c.mutate_json_field(m, "name"),
    "number": lambda c, m: c.mutate_json_field(m, "number"),
    "missing": lambda c, m: c.without_a_field(m),
    "unknown-type": lambda _c, m: dumps({**json.loads(encode(m)), "type": "nope"}),
}


@FAST
@given(
    kind=st.sampled_from(MESSAGE_TYPES),
    mutation=st.sampled_from(sorted(MUTATIONS)),
    rng=st.randoms(use_true_random=False),
    accepts=st.sampled_from(list(ACCEPTS.values())),
)
def test_mutations_of_every_message_type(
    kind: type[Any], mutation: str, rng: random.Random, accepts: tuple[type[Any], ...] | None
) -> None:
    made = corpus(rng)
    message = made.envelope() if kind is Envelope else made.sample(kind)
    only_boundary_errors(MUTATIONS[mutation](made, message), accepts)


@FAST
@given(
    kind=st.sampled_from(MESSAGE_TYPES),
    rng=st.randoms(use_true_random=False),
    where=st.integers(min_value=0),
    value=json_values,
)
def test_any_field_replaced_by_any_json_value(
    kind: type[Any], rng: random.Random, where: int, value: Any
) -> None:
    """Any place of the document (nested branches and envelope items too) given any value."""
    doc = json.loads(encode(a_message(rng, kind)))
    places: list[tuple[Any, list[Any]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            places.extend((node, [k]) for k in node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            places.extend((node, [i]) for i in range(len(node)))
            for v in node:
                walk(v)

    walk(doc)
    container, (key,) = places[where % len(places)]
    container[key] = value
    only_boundary_errors(json.dumps(doc).encode(), None)


BAD_IDS = ["", "no such/name", "a" * 201, "b" * 300, "-x", "x y", "ü"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_tx_ids_and_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidMessage):
        check(Commit(tx_id=bad, participant="bank-a"), now_ms())
    with pytest.raises(InvalidMessage):
        check(Commit(tx_id="t1", participant=bad), now_ms())
    with pytest.raises(InvalidMessage):
        check(Heartbeat(participant=bad, sent_at_ms=now_ms(), interval_ms=1000), now_ms())


def test_a_tx_id_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(InvalidMessage):
        check(Commit(tx_id="c" * 65, participant="bank-a"), now_ms())


@pytest.mark.parametrize(
    "reply_to", [topology.CLIENT_QUEUE_PREFIX + "r" * 284, "", topology.COORDINATOR_QUEUE]
)
def test_odd_reply_queues_are_refused(reply_to: str) -> None:
    begin = msgspec.structs.replace(transfer("t1"), reply_to=reply_to)
    with pytest.raises(InvalidMessage):
        check(begin, now_ms())


@pytest.mark.parametrize("deadline", [-1, 0, -(2**62), 2**62])
def test_deadlines_out_of_range_are_refused(deadline: int) -> None:
    prepare = a_message(random.Random(1), Prepare)
    with pytest.raises(InvalidMessage):
        check(msgspec.structs.replace(prepare, deadline_ms=deadline), now_ms())


@pytest.mark.parametrize("deadline", [2**63, 2**64, 10**30, -(10**30)])
def test_deadlines_past_int64_are_refused(deadline: int) -> None:
    """msgspec decodes integers of any size: the range check is what refuses them."""
    doc = json.loads(encode(a_message(random.Random(2), Prepare)))
    doc["deadline_ms"] = deadline
    with pytest.raises((DecodeError, InvalidMessage)):
        check(decode_message(json.dumps(doc).encode()), now_ms())


# ---- (b) the real drivers on the in-memory broker ----------------------------------------------


@st.composite
def hostile_items(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """(queue, body, headers): a corpus body, raw bytes, or a field given any JSON value."""
    rng = draw(st.randoms(use_true_random=False))
    made = corpus(rng)
    queue = draw(st.sampled_from(sorted(ACCEPTS)))
    source = draw(st.sampled_from(["corpus", "corpus", "bytes", "valid"]))
    if source == "bytes":
        body = draw(st.binary(max_size=512))
    elif source == "valid":  # mostly of a type the queue takes: those reach the cores
        takes = ACCEPTS[queue]
        body = encode(made.sample(rng.choice(takes) if takes and rng.random() < 0.8 else None))
    else:
        _, body = made.body()
    _, headers = odd_headers(made)
    return queue, body, shown_headers(headers)


def shown_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    """Headers as a driver sees them (the AMQP channel turns every value into text)."""
    return {
        str(k): v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        for k, v in (headers or {}).items()
    }


def turn_all(system: System, turns: int = 60) -> None:
    """Step every driver until the protocol queues are empty (at most ``turns`` rounds)."""
    queues = [topology.COORDINATOR_QUEUE, *(topology.participant_queue(b) for b in BANKS)]
    for _ in range(turns):
        for driver in system.drivers():
            driver.turn()  # an exception here is the finding: nothing may escape a turn
        if not any(system.broker.depth(q) for q in queues):
            return


def real_outcomes(system: System, tx_ids: set[str]) -> dict[str, Outcome]:
    """The outcomes of ``tx_ids`` in the client's queue, whatever else hostile senders put there."""
    found: dict[str, Outcome] = {}
    deliveries = system.client.poll(0)
    for delivery in deliveries:
        try:
            messages = unwrap([decode_message(delivery.body)])
        except DecodeError:
            continue
        for m in messages:
            if isinstance(m, Outcome) and m.tx_id in tx_ids:
                found[m.tx_id] = m
    system.client.ack(deliveries)
    return found


@DRIVERS
@given(
    hostile=st.lists(hostile_items(), min_size=1, max_size=12),
    real=st.integers(min_value=0, max_value=3),
    order=st.randoms(use_true_random=False),
)
def test_the_drivers_survive_hostile_messages_among_real_traffic(
    hostile: list[tuple[str, bytes, dict[str, str]]], real: int, order: random.Random
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        system = System(Path(tmp), MemoryBroker())
        begins = [transfer(f"real-{i}", 1) for i in range(real)] + [credit("real-one", "bank-c")]
        sends: list[tuple[str, bytes, dict[str, str]]] = [
            (topology.COORDINATOR_QUEUE, encode(b), {}) for b in begins
        ]
        sends += hostile
        order.shuffle(sends)
        expected: Counter[tuple[str, bytes, str]] = Counter()
        accepted: set[tuple[str, bytes]] = set()
        for queue, body, headers in sends:
            system.client.publish(queue, body, headers=headers)
            if queue == REPLY:
                continue  # the client drops what it cannot use; nothing dead-letters there
            category = expected_rejection(body, ACCEPTS[queue], now_ms())
            event(f"{queue.split('.')[1]}: {category or 'taken'}")
            if category is None:
                accepted.add((queue, body))
            else:
                expected[(queue, body, category)] += 1
        turn_all(system)

        found: Counter[tuple[str, bytes, str]] = Counter()
        for message in system.broker.queues[topology.DEAD_LETTER_QUEUE]:
            reason = message.headers.get(topology.ERROR_HEADER, "")
            category, sep, details = reason.partition(": ")
            assert sep and details, f"no reason on a dead letter: {message.headers}"
            found[(message.routing_key, message.body, category)] += 1
            assert (message.routing_key, message.body) not in accepted, reason
        assert found == expected

        outcomes = real_outcomes(system, {b.tx_id for b in begins})
        assert {t: o.outcome.value for t, o in outcomes.items()} == {
            b.tx_id: "committed" for b in begins
        }
        assert system.balance("bank-a") == (100 - 2 * real, 0)
        assert system.balance("bank-b") == (100 + real, 0)
        assert system.balance("bank-c") == (100 + real + 1, 0)


def test_sizes_at_and_past_the_limit_through_the_coordinator(tmp_path: Path) -> None:
    system = System(tmp_path, MemoryBroker())
    made = corpus(random.Random(3))
    limit = system.coordinator.limits.max_message_bytes
    at_limit = made.padded(limit)
    past = made.padded(limit + 1)
    assert (len(at_limit), len(past)) == (limit, limit + 1)
    for body in (at_limit, past):
        system.client.publish(topology.COORDINATOR_QUEUE, body)
    system.client.publish(topology.COORDINATOR_QUEUE, encode(transfer("after-big")))
    turn_all(system)
    reasons = [
        (len(m.body), m.headers[topology.ERROR_HEADER].split(":")[0])
        for m in system.broker.queues[topology.DEAD_LETTER_QUEUE]
    ]
    assert (limit + 1, "oversized") in reasons
    assert (limit, "oversized") not in reasons
    assert real_outcomes(system, {"after-big"})["after-big"].outcome.value == "committed"
