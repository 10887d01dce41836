"""Message authentication (docs/architecture.md §11): the permission table
(schemas.permissions), signing and verifying (runtime.auth). Key files, ``load_auth`` and
``twophase keys``: tests/unit/test_auth_keys.py.

Each case goes the way the boundary will: sign the encoded body, verify the bytes and headers
against the queue the message arrived at, decode, then authorise the decoded message.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Mapping

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import auth
from runtime.auth import Keyring, Refusal, SigningKey, Verified
from schemas import permissions, topology, validation
from schemas.codec import decode_message, encode
from schemas.messages import (
    Abort,
    Ack,
    Begin,
    Branch,
    Commit,
    Envelope,
    Enveloped,
    Heartbeat,
    Inquire,
    Message,
    Outcome,
    OutcomeKind,
    Prepare,
    Protocol,
    StatusQuery,
    Vote,
    VoteKind,
)
from schemas.permissions import (
    BAD_SIGNATURE,
    KEY_ID_HEADER,
    KINDS_HEADER,
    NOT_PERMITTED,
    SENDER_HEADER,
    SIGNATURE_HEADER,
    UNKNOWN_KEY,
    Identity,
    Role,
)

COORDINATOR = permissions.COORDINATOR
BANK_A = permissions.participant("bank-a")
BANK_B = permissions.participant("bank-b")
WEB = permissions.client("web")
OTHER_CLIENT = permissions.client("other")

COORDINATOR_Q = topology.COORDINATOR_QUEUE
BANK_A_Q = topology.participant_queue("bank-a")
BANK_B_Q = topology.participant_queue("bank-b")
WEB_Q = topology.client_queue("web.0123456789abcdef")
OTHER_Q = topology.client_queue("other.0123456789abcdef")

KEYS = {identity: auth.generate(identity) for identity in (COORDINATOR, BANK_A, BANK_B, WEB)}
KEYRING = Keyring.of((identity, key.public) for identity, key in KEYS.items())


def message_for(kind: str, sender: Identity) -> Protocol:
    """A valid message of ``kind`` as ``sender`` would send it: a participant's names itself, a
    client's asks for replies in its own queue (bank-a and web's queue for the others)."""
    me = sender.name if sender.role is Role.PARTICIPANT else "bank-a"
    reply_to = topology.client_queue(f"{sender.name}.1") if sender.role is Role.CLIENT else WEB_Q
    built: dict[str, Protocol] = {
        "prepare": Prepare(
            tx_id="t1",
            participant="bank-a",
            operation="debit",
            args={"amount": 5},
            deadline_ms=1_000,
            participants=("bank-a",),
        ),
        "commit": Commit(tx_id="t1", participant="bank-a"),
        "abort": Abort(tx_id="t1", participant="bank-a"),
        "outcome": Outcome(tx_id="t1", outcome=OutcomeKind.COMMITTED),
        "vote": Vote(tx_id="t1", participant=me, vote=VoteKind.YES),
        "ack": Ack(tx_id="t1", participant=me),
        "inquire": Inquire(tx_id="t1", participant=me),
        "heartbeat": Heartbeat(participant=me, sent_at_ms=1, interval_ms=1_000),
        "begin": Begin(
            tx_id="t1",
            branches=(Branch(participant="bank-a", operation="debit"),),
            timeout_ms=1_000,
            reply_to=reply_to,
        ),
        "status": StatusQuery(tx_id="t1", reply_to=reply_to),
    }
    return built[kind]


KINDS = (
    *("prepare", "commit", "abort", "outcome"),
    *("vote", "ack", "inquire", "heartbeat"),
    *("begin", "status"),
)

#: the specification of issue 14, written out independently of schemas.permissions.PERMISSIONS:
#: (sender role, recipient queue's role, kind) that must be accepted; every other must not
ALLOWED = {
    ("coordinator", "participant", "prepare"),
    ("coordinator", "participant", "commit"),
    ("coordinator", "participant", "abort"),
    ("coordinator", "client", "outcome"),
    ("participant", "coordinator", "vote"),
    ("participant", "coordinator", "ack"),
    ("participant", "coordinator", "inquire"),
    ("participant", "coordinator", "heartbeat"),
    ("client", "coordinator", "begin"),
    ("client", "coordinator", "status"),
}
QUEUES = {"coordinator": COORDINATOR_Q, "participant": BANK_A_Q, "client": WEB_Q}
SENDERS = {"coordinator": COORDINATOR, "participant": BANK_A, "client": WEB}


def signed(key: SigningKey, queue: str, message: Message) -> tuple[bytes, dict[str, str]]:
    body = encode(message)
    return body, key.sign(body, queue, permissions.kinds_text(message))


def admit(
    body: bytes, headers: Mapping[str, object], queue: str, keyring: Keyring = KEYRING
) -> Verified | Refusal:
    """What the boundary will do: verify the bytes, decode, authorise."""
    verified = keyring.verify(body, headers, queue)
    if isinstance(verified, Refusal):
        return verified
    return auth.authorise(verified, queue, decode_message(body)) or verified


def reason(result: Verified | Refusal) -> str:
    return result.reason if isinstance(result, Refusal) else "accepted"


# ---- the permission table --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "recipient", "kind"), list(itertools.product(SENDERS, QUEUES, KINDS))
)
def test_every_permission_row(sender: str, recipient: str, kind: str) -> None:
    identity = SENDERS[sender]
    body, headers = signed(KEYS[identity], QUEUES[recipient], message_for(kind, identity))
    result = admit(body, headers, QUEUES[recipient])
    expected = "accepted" if (sender, recipient, kind) in ALLOWED else NOT_PERMITTED
    assert reason(result) == expected, result
    if expected == "accepted":
        assert isinstance(result, Verified)
        assert result.sender == identity
        assert result.key_id == KEYS[identity].key_id


def test_the_table_is_the_specification_and_within_what_each_queue_accepts() -> None:
    table = {(s.value, r.value, permissions.kind_of(k)) for s, r, k in permissions.PERMISSIONS}
    assert table == ALLOWED
    for _sender, recipient, kind in permissions.PERMISSIONS:
        assert kind in permissions.ACCEPTS[recipient]
    for recipient, accepted in permissions.ACCEPTS.items():
        for kind in accepted:  # every kind a queue takes has someone who may send it
            assert any(r is recipient and k is kind for _, r, k in permissions.PERMISSIONS)


@pytest.mark.parametrize("kind", ["vote", "ack", "inquire", "heartbeat"])
def test_a_participant_speaks_only_for_itself(kind: str) -> None:
    forged = message_for(kind, BANK_A)  # names bank-a
    body, headers = signed(KEYS[BANK_B], COORDINATOR_Q, forged)
    result = admit(body, headers, COORDINATOR_Q)
    assert reason(result) == NOT_PERMITTED
    assert "participant 'bank-a'" in str(result)


@pytest.mark.parametrize("kind", ["prepare", "commit", "abort"])
def test_a_compromised_participant_cannot_decide_for_another(kind: str) -> None:
    message = message_for(kind, COORDINATOR)
    bank_b = KEYS[BANK_B]
    body, headers = signed(bank_b, BANK_A_Q, message)  # under its own name
    assert reason(admit(body, headers, BANK_A_Q)) == NOT_PERMITTED
    posing = {**headers, SENDER_HEADER: "coordinator"}  # under the coordinator's, its own key
    assert reason(admit(body, posing, BANK_A_Q)) == UNKNOWN_KEY
    coordinator_key_id = {**posing, KEY_ID_HEADER: KEYS[COORDINATOR].key_id}
    assert reason(admit(body, coordinator_key_id, BANK_A_Q)) == BAD_SIGNATURE


@pytest.mark.parametrize(
    ("reply_to", "expected"),
    [
        (topology.client_queue("web"), "accepted"),
        (topology.client_queue("web.instance-1"), "accepted"),
        (topology.client_queue("web2"), NOT_PERMITTED),  # a prefix of another client's name
        (topology.client_queue("webx.1"), NOT_PERMITTED),
        (OTHER_Q, NOT_PERMITTED),
        (topology.client_queue("other"), NOT_PERMITTED),
    ],
)
def test_a_client_asks_for_replies_in_its_own_queues_only(reply_to: str, expected: str) -> None:
    for message in (
        Begin(
            tx_id="t1",
            branches=(Branch(participant="bank-a", operation="x"),),
            timeout_ms=1_000,
            reply_to=reply_to,
        ),
        StatusQuery(tx_id="t1", reply_to=reply_to),
    ):
        body, headers = signed(KEYS[WEB], COORDINATOR_Q, message)
        assert reason(admit(body, headers, COORDINATOR_Q)) == expected


def test_an_outcome_is_valid_only_in_the_queue_it_was_signed_for() -> None:
    body, headers = signed(KEYS[COORDINATOR], WEB_Q, message_for("outcome", COORDINATOR))
    assert reason(admit(body, headers, WEB_Q)) == "accepted"
    assert reason(admit(body, headers, OTHER_Q)) == BAD_SIGNATURE


def test_a_client_cannot_make_an_outcome_even_for_its_own_queue() -> None:
    body, headers = signed(KEYS[WEB], WEB_Q, message_for("outcome", COORDINATOR))
    assert reason(admit(body, headers, WEB_Q)) == NOT_PERMITTED


# ---- envelopes: one signature per AMQP message ----------------------------------------------


def envelope(*messages: Protocol) -> Envelope:
    return Envelope(messages=tuple(Enveloped(message=m) for m in messages))


def test_an_envelope_is_signed_once_with_every_kind_it_carries() -> None:
    batch = envelope(
        message_for("prepare", COORDINATOR),
        message_for("commit", COORDINATOR),
        message_for("prepare", COORDINATOR),
    )
    body, headers = signed(KEYS[COORDINATOR], BANK_A_Q, batch)
    assert headers[KINDS_HEADER] == "commit,prepare"
    assert reason(admit(body, headers, BANK_A_Q)) == "accepted"


def test_one_forbidden_message_refuses_the_whole_envelope() -> None:
    batch = envelope(message_for("vote", BANK_B), message_for("vote", BANK_A))
    body, headers = signed(KEYS[BANK_B], COORDINATOR_Q, batch)
    assert reason(admit(body, headers, COORDINATOR_Q)) == NOT_PERMITTED


@pytest.mark.parametrize("claimed", ["vote", "ack,vote,heartbeat", "heartbeat"])
def test_the_decoded_kinds_must_be_exactly_the_signed_ones(claimed: str) -> None:
    """A key holder that signs other kinds than it sends is refused after decoding."""
    batch = envelope(message_for("vote", BANK_A), message_for("ack", BANK_A))
    body = encode(batch)
    headers = KEYS[BANK_A].sign(body, COORDINATOR_Q, claimed)
    result = admit(body, headers, COORDINATOR_Q)
    assert reason(result) == NOT_PERMITTED
    assert "carries 'ack,vote'" in str(result)


# ---- tampering ---------------------------------------------------------------------------------


@pytest.fixture
def prepare_to_bank_a() -> tuple[bytes, dict[str, str]]:
    return signed(KEYS[COORDINATOR], BANK_A_Q, message_for("prepare", COORDINATOR))


def test_untampered_is_accepted(prepare_to_bank_a: tuple[bytes, dict[str, str]]) -> None:
    body, headers = prepare_to_bank_a
    assert reason(admit(body, headers, BANK_A_Q)) == "accepted"


def test_tampered_body(prepare_to_bank_a: tuple[bytes, dict[str, str]]) -> None:
    body, headers = prepare_to_bank_a
    changed = body.replace(b'"amount":5', b'"amount":9')
    assert changed != body
    assert reason(admit(changed, headers, BANK_A_Q)) == BAD_SIGNATURE


def test_tampered_queue(prepare_to_bank_a: tuple[bytes, dict[str, str]]) -> None:
    body, headers = prepare_to_bank_a
    assert reason(admit(body, headers, BANK_B_Q)) == BAD_SIGNATURE


def test_tampered_kind(prepare_to_bank_a: tuple[bytes, dict[str, str]]) -> None:
    body, headers = prepare_to_bank_a
    assert reason(admit(body, {**headers, KINDS_HEADER: "commit"}, BANK_A_Q)) == BAD_SIGNATURE


def test_tampered_sender(prepare_to_bank_a: tuple[bytes, dict[str, str]]) -> None:
    """The key id is not a key of the sender named: no key to check it with."""
    body, headers = prepare_to_bank_a
    for sender in ("participant:bank-b", "client:web", "nobody", ""):
        result = admit(body, {**headers, SENDER_HEADER: sender}, BANK_A_Q)
        assert reason(result) == (UNKNOWN_KEY if sender else BAD_SIGNATURE), sender


def test_tampered_key_id(prepare_to_bank_a: tuple[bytes, dict[str, str]]) -> None:
    body, headers = prepare_to_bank_a
    unknown = {**headers, KEY_ID_HEADER: "0000000000000000"}
    assert reason(admit(body, unknown, BANK_A_Q)) == UNKNOWN_KEY
    # another key of the same sender (a rotation): found, and it does not match
    second = auth.generate(COORDINATOR)
    keyring = Keyring({**KEYRING.keys, (COORDINATOR, second.key_id): second.public})
    other = {**headers, KEY_ID_HEADER: second.key_id}
    assert reason(admit(body, other, BANK_A_Q, keyring)) == BAD_SIGNATURE


def test_tampered_or_missing_signature(prepare_to_bank_a: tuple[bytes, dict[str, str]]) -> None:
    body, headers = prepare_to_bank_a
    raw = bytearray(base64.b64decode(headers[SIGNATURE_HEADER]))
    raw[0] ^= 1
    for signature in (base64.b64encode(bytes(raw)).decode(), "not base64!", "AAAA"):
        result = admit(body, {**headers, SIGNATURE_HEADER: signature}, BANK_A_Q)
        assert reason(result) == BAD_SIGNATURE
    for name in (SENDER_HEADER, KEY_ID_HEADER, KINDS_HEADER, SIGNATURE_HEADER):
        missing = {k: v for k, v in headers.items() if k != name}
        assert reason(admit(body, missing, BANK_A_Q)) == BAD_SIGNATURE
        assert reason(admit(body, {**headers, name: 7}, BANK_A_Q)) == BAD_SIGNATURE
    assert reason(admit(body, {}, BANK_A_Q)) == BAD_SIGNATURE


def test_verify_never_parses_the_body() -> None:
    """Verification comes before decoding: garbage is refused for its signature, not its JSON;
    and garbage that a key holder signed passes verification (decoding then refuses it)."""
    garbage = b"\xff{not json"
    headers = KEYS[BANK_A].sign(b"other", COORDINATOR_Q, "vote")
    assert reason(KEYRING.verify(garbage, headers, COORDINATOR_Q)) == BAD_SIGNATURE
    headers = KEYS[BANK_A].sign(garbage, COORDINATOR_Q, "vote")
    assert isinstance(KEYRING.verify(garbage, headers, COORDINATOR_Q), Verified)


@given(body=st.binary(min_size=1, max_size=2_000), data=st.data())
def test_any_change_of_one_byte_of_the_body_is_refused(body: bytes, data: st.DataObject) -> None:
    headers = KEYS[COORDINATOR].sign(body, BANK_A_Q, "prepare")
    assert isinstance(KEYRING.verify(body, headers, BANK_A_Q), Verified)
    at = data.draw(st.integers(0, len(body) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = body[:at] + bytes([body[at] ^ flip]) + body[at + 1 :]
    assert reason(KEYRING.verify(changed, headers, BANK_A_Q)) == BAD_SIGNATURE


@given(queue=st.text(max_size=120), kinds=st.text(min_size=1, max_size=60))
def test_any_other_queue_or_kinds_is_refused(queue: str, kinds: str) -> None:
    body = b'{"type":"commit"}'
    headers = KEYS[COORDINATOR].sign(body, BANK_A_Q, "commit")
    if queue != BANK_A_Q:
        assert reason(KEYRING.verify(body, headers, queue)) == BAD_SIGNATURE
    if kinds != "commit":
        changed = {**headers, KINDS_HEADER: kinds}
        assert reason(KEYRING.verify(body, changed, BANK_A_Q)) == BAD_SIGNATURE


fields = st.tuples(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20))


@given(a=st.tuples(fields, st.text(max_size=10)), b=st.tuples(fields, st.text(max_size=10)))
def test_signed_data_of_different_fields_differs(
    a: tuple[tuple[str, str, str], str], b: tuple[tuple[str, str, str], str]
) -> None:
    """Length prefixes: moving text from one field to the next changes the signed bytes."""
    (sa, ka, qa), kinds_a = a
    (sb, kb, qb), kinds_b = b
    same = auth.signed_data(sa, ka, qa, kinds_a, b"x") == auth.signed_data(
        sb, kb, qb, kinds_b, b"x"
    )
    assert same == (a == b)


# ---- rotation ----------------------------------------------------------------------------------


def test_rotation_old_and_new_keys_both_accepted_then_the_removed_one_refused() -> None:
    old, new = KEYS[BANK_A], auth.generate(BANK_A)
    vote = message_for("vote", BANK_A)
    during = Keyring({**KEYRING.keys, (BANK_A, new.key_id): new.public})
    after = Keyring(
        {k: v for k, v in during.keys.items() if k != (BANK_A, old.key_id)},
    )
    for key, keyring, expected in [
        (old, during, "accepted"),
        (new, during, "accepted"),
        (new, after, "accepted"),
        (old, after, UNKNOWN_KEY),
    ]:
        body, headers = signed(key, COORDINATOR_Q, vote)
        assert reason(admit(body, headers, COORDINATOR_Q, keyring)) == expected


# ---- identities ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["coordinator", "participant:bank-a", "participant:a.b_c-1", "client:web"]
)
def test_identity_round_trip(text: str) -> None:
    assert str(Identity.parse(text)) == text


REFUSED_IDENTITIES = (
    *("", "coordinator:x", "participant", "participant:", "participant:a b", "client:web.x"),
    *("client:", "root:x", "client:" + "w" * 65, "participant:" + "p" * 101),
)


@pytest.mark.parametrize("text", REFUSED_IDENTITIES)
def test_identity_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Identity.parse(text)


def test_queue_owner() -> None:
    assert permissions.queue_owner(COORDINATOR_Q) == (Role.COORDINATOR, "")
    assert permissions.queue_owner(BANK_A_Q) == (Role.PARTICIPANT, "bank-a")
    assert permissions.queue_owner(WEB_Q) == (Role.CLIENT, "web.0123456789abcdef")
    for queue in ("twophase.dead-letter", topology.PARTICIPANT_QUEUE_PREFIX, "", "x"):
        assert permissions.queue_owner(queue) is None


def test_nothing_may_be_sent_to_a_queue_of_no_one() -> None:
    problem = permissions.permission_problem(
        COORDINATOR, "twophase.dead-letter", message_for("commit", COORDINATOR)
    )
    assert problem is not None and "no protocol queue" in problem


def test_a_client_instance_reply_queue_is_owned_by_its_client() -> None:
    queue = permissions.client_reply_queue("web", "0" * 32)
    assert queue == topology.client_queue("web." + "0" * 32)
    assert permissions.client_owns_queue("web", queue)
    assert not permissions.client_owns_queue("other", queue)
    begin = message_for("begin", WEB)
    longest = permissions.client_reply_queue("w" * 64, "i" * 35)
    assert validation.check(msgspec.structs.replace(begin, reply_to=longest), 0) is not None
    for name, instance in (("web", ""), ("web", "a.b"), ("web", "i" * 36), ("a.b", "1")):
        with pytest.raises(ValueError):
            permissions.client_reply_queue(name, instance)


header_values = st.one_of(st.text(max_size=100), st.binary(max_size=20), st.integers(), st.none())


@given(
    body=st.binary(max_size=200),
    headers=st.dictionaries(
        st.sampled_from([*permissions.AUTH_HEADERS, "traceparent", "x"]), header_values
    ),
    keep=st.sets(st.sampled_from(permissions.AUTH_HEADERS)),
)
def test_hostile_headers_are_refused_and_never_raise(
    body: bytes, headers: dict[str, object], keep: set[str]
) -> None:
    """The first thing a hostile message meets: whatever its headers, a Refusal, not an error
    (some taken from a real signature, so that lookups and base64 succeed now and then)."""
    real = KEYS[BANK_A].sign(b"real", COORDINATOR_Q, "vote")
    mixed = {**headers, **{name: real[name] for name in keep}}
    result = KEYRING.verify(body, mixed, COORDINATOR_Q)
    if body == b"real" and all(mixed.get(n) == real[n] for n in permissions.AUTH_HEADERS):
        assert isinstance(result, Verified)
    else:
        assert isinstance(result, Refusal)
        assert result.reason in (BAD_SIGNATURE, UNKNOWN_KEY)
