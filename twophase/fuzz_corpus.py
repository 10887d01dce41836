"""Hostile inputs for ``twophase fuzz`` and the fuzz property tests.

Everything here is made from a ``random.Random`` (hypothesis drives the same generators through
``st.randoms()``); in ``twophase fuzz`` the clock and the real messages captured for replay enter
too, so a seed gives the same kinds of input, not the same bytes.

Hostile messages live in their own id namespace (``evil-...`` transactions, ``evil-acct-...``
accounts): a random mutation cannot turn one into a *forgery* of a real transaction, which no
robustness check could survive (the protocol has no authentication; a well-formed COMMIT for a
real prepared branch is obeyed). Real messages
are only ever replayed unchanged.

What a service should do with a body is :func:`expected_rejection`: the size limit, then the
codec, then ``schemas.validation.check`` with what the queue accepts. The generators aim at each
of those, at the field level as well as at the byte level.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from schemas import topology
from schemas.codec import DecodeError, decode_message, encode
from schemas.messages import (
    MESSAGE_TYPES,
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
from schemas.validation import DEFAULT_LIMITS, InvalidMessage, Limits, check, size_problem

#: the categories of ``x-twophase-error`` (the header's text up to ": ")
CATEGORIES = ("oversized", "undecodable", "invalid", "poison")
HOSTILE_PREFIX = "evil-"
#: the header that carries a hostile message's number (the dead-letter copy keeps headers)
ID_HEADER = "x-fuzz-id"
#: a body at or above this size draws from the run's budget of big messages
BIG = 64 * 1024

_PROTOCOL_TYPES: tuple[type[Any], ...] = tuple(t for t in MESSAGE_TYPES if t is not Envelope)


def expected_rejection(
    body: bytes, accepts: tuple[type[Any], ...] | None, now_ms: int, limits: Limits = DEFAULT_LIMITS
) -> str | None:
    """The category a service must dead-letter ``body`` with, or None if it must take it."""
    if size_problem(len(body), limits) is not None:
        return "oversized"
    try:
        check(decode_message(body), now_ms, limits, accepts)
    except DecodeError:
        return "undecodable"
    except InvalidMessage:
        return "invalid"
    return None


class Raw(str):
    """JSON text spliced in verbatim (what ``json.dumps`` cannot write: NaN, 10**5 levels)."""


#: names and ids that break a rule each: empty, a slash or space, too long, odd characters
BAD_NAMES: tuple[Callable[[random.Random], str], ...] = (
    lambda _r: "",
    lambda _r: "no such/name",
    lambda _r: "no such name",
    lambda r: "a" * r.randint(201, 300),
    lambda r: "b" * r.randint(65, 120),
    lambda _r: "-leading-dash",
    lambda _r: ".",
    lambda _r: "ünïcødé",
    lambda _r: "tab\there",
    lambda _r: "nul\x00byte",
    lambda _r: "line\nbreak",
    lambda _r: "../../etc/passwd",
    lambda _r: "'; DROP TABLE accounts; --",
    lambda _r: "twophase.participant.",
    lambda _r: "\u202eright-to-left",
    lambda _r: "😀",
)

_BAD_REPLY_TO: tuple[Callable[[random.Random], str], ...] = (
    lambda r: topology.CLIENT_QUEUE_PREFIX + "c" * (300 - len(topology.CLIENT_QUEUE_PREFIX)),
    lambda _r: topology.COORDINATOR_QUEUE,
    lambda _r: topology.DEAD_LETTER_QUEUE,
    lambda _r: topology.participant_queue("bank-a"),
    lambda _r: "amq.gen-evil",
    lambda _r: "",
    lambda _r: topology.CLIENT_QUEUE_PREFIX,
    lambda _r: topology.CLIENT_QUEUE_PREFIX + "no such/queue",
)


def odd_value(rng: random.Random) -> Any:
    """A JSON value of a type or size a field does not expect."""
    choice = rng.randrange(24)
    if choice < 12:
        return [
            None,
            True,
            False,
            0,
            -1,
            2**31,
            2**62,
            -(2**62),
            2**63,  # one past int64: the codec must refuse it, not overflow
            10**30,
            1.5,
            -0.0,
        ][choice]
    if choice == 12:
        return rng.choice(BAD_NAMES)(rng)
    if choice == 13:
        return "x" * rng.choice((201, 300, 4096, 70_000))
    if choice == 14:
        return [None] * rng.randint(0, 3)
    if choice == 15:
        return {"type": rng.choice(["begin", "envelope", "evil"])}
    if choice == 16:
        depth = rng.choice((10, 200, 1_000, 100_000))
        return Raw("[" * depth + "]" * depth)
    if choice == 17:
        return Raw(rng.choice(("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400")))
    if choice == 18:
        return Raw(rng.choice(('"\\ud800"', '"\\udfff"', '"\\u0000"', '"\\x41"', "'single'")))
    if choice == 19:
        return 1e308
    if choice == 20:
        return ""
    if choice == 21:
        return rng.choice(("begin", "yes", "committed", "1"))
    if choice == 22:
        return -rng.randint(1, 2**62)
    return {"nested": {"deeper": [1, {"x": None}]}}


def dumps(value: Any) -> bytes:
    """``json.dumps`` that splices :class:`Raw` values in verbatim."""
    raws: list[str] = []

    def placeholder(node: Any) -> Any:
        if isinstance(node, Raw):
            raws.append(str(node))
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(node, dict):
            return {k: placeholder(v) for k, v in node.items()}
        if isinstance(node, list):
            return [placeholder(v) for v in node]
        return node

    text = json.dumps(placeholder(value), separators=(",", ":"))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw, 1)
    return text.encode("utf-8", errors="surrogatepass")


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a decoded JSON document (its keys and list indexes)."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


@dataclass
class Context:
    """What the generators aim at: real participant names and queues of the run."""

    participants: Sequence[str] = ("bank-a", "bank-b", "bank-c")
    client_queues: Sequence[str] = ()
    now_ms: Callable[[], int] = field(default=lambda: 0)
    limits: Limits = DEFAULT_LIMITS
    #: bytes the run may spend on big bodies (>= BIG); each draws from it, none past it
    big_budget: int = 64 * 1024 * 1024
    counter: int = 0
    #: generator and header kinds left out (say, one that hits a bug already reported)
    without: frozenset[str] = frozenset()

    def spend(self, size: int) -> bool:
        if size < BIG:
            return True
        if size > self.big_budget:
            return False
        self.big_budget -= size
        return True


class Corpus:
    """Valid messages in the hostile namespace, and every way of spoiling them."""

    def __init__(self, rng: random.Random, context: Context | None = None) -> None:
        self.rng = rng
        self.ctx = context or Context()

    # ---- valid messages ---------------------------------------------------------------------

    def tx_id(self) -> str:
        self.ctx.counter += 1
        return f"{HOSTILE_PREFIX}{self.ctx.counter}-{self.rng.randrange(10**6)}"

    def participant(self) -> str:
        if self.rng.random() < 0.6:
            return self.rng.choice(list(self.ctx.participants))
        return f"evil-p{self.rng.randrange(1000)}"

    def args(self) -> dict[str, Any]:
        return {
            "account": f"evil-acct-{self.rng.randrange(100)}",
            "amount": self.rng.randint(1, 99),
        }

    def reply_to(self) -> str:
        if self.ctx.client_queues and self.rng.random() < 0.3:
            return self.rng.choice(list(self.ctx.client_queues))
        return topology.client_queue(f"evil{self.rng.randrange(1000)}")

    def sample(self, kind: type[Any] | None = None) -> Protocol:
        """A valid message of ``kind`` (any protocol type by default)."""
        rng = self.rng
        kind = kind or rng.choice(_PROTOCOL_TYPES)
        now = self.ctx.now_ms()
        tx, who = self.tx_id(), self.participant()
        if kind is Begin:
            names = list(dict.fromkeys(self.participant() for _ in range(rng.randint(1, 3))))
            branches = tuple(
                Branch(n, rng.choice(("debit", "credit", "evil-op")), self.args()) for n in names
            )
            return Begin(
                tx_id=tx,
                branches=branches,
                timeout_ms=rng.randint(50, 3000),
                reply_to=self.reply_to(),
            )
        if kind is Prepare:
            return Prepare(
                tx_id=tx,
                participant=who,
                operation=rng.choice(("debit", "credit", "evil-op")),
                args=self.args(),
                deadline_ms=now + rng.randint(-5000, 5000),
                participants=(who, self.participant()) if rng.random() < 0.5 else (who,),
                one_phase=rng.random() < 0.3,
            )
        if kind is Vote:
            vote = rng.choice(list(VoteKind))
            return Vote(tx_id=tx, participant=who, vote=vote, reason=rng.choice(("", "evil")))
        if kind is Abort:
            return Abort(tx_id=tx, participant=who, reason="evil", one_phase=rng.random() < 0.5)
        if kind in (Commit, Ack, Inquire):
            made: Protocol = kind(tx_id=tx, participant=who)
            return made
        if kind is Heartbeat:
            return Heartbeat(
                participant=f"evil-p{rng.randrange(10**6)}" if rng.random() < 0.8 else who,
                sent_at_ms=now - rng.randint(0, 10_000),
                interval_ms=rng.randint(10, 30_000),
            )
        if kind is Outcome:
            return Outcome(
                tx_id=tx,
                outcome=rng.choice(list(OutcomeKind)),
                reason="evil",
                at_fault=rng.choice((None, who)),
            )
        assert kind is StatusQuery, kind
        return StatusQuery(tx_id=tx, reply_to=self.reply_to())

    def envelope(self, count: int | None = None) -> Envelope:
        n = self.rng.randint(1, 8) if count is None else count
        items = tuple(
            Enveloped(message=self.sample(), traceparent=self.traceparent()) for _ in range(n)
        )
        return Envelope(messages=items)

    def traceparent(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"
        return rng.choice(("", "garbage", "00-zz-zz-zz", "ff" * 300, "00-" + "0" * 32 + "-x-01"))

    # ---- spoiled messages -------------------------------------------------------------------

    def body(self) -> tuple[str, bytes]:
        """(generator name, body): one hostile body, by a generator drawn at random."""
        names, weights = zip(
            *[(n, w) for n, w in _WEIGHTS if n not in self.ctx.without], strict=True
        )
        name = self.rng.choices(names, weights)[0]
        body = _GENERATORS[name](self)
        if not self.ctx.spend(len(body)):
            name, body = "random-bytes", self.random_bytes(self.rng.randint(0, 512))
        return name, body

    def random_bytes(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def valid_body(self) -> bytes:
        return encode(self.envelope() if self.rng.random() < 0.15 else self.sample())

    def mutate_bytes(self, raw: bytes) -> bytes:
        """Flip, insert, delete, truncate, duplicate or overwrite bytes (one to a few times)."""
        rng = self.rng
        data = bytearray(raw)
        for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
            at = rng.randint(0, len(data))
            op = rng.randrange(7)
            if op == 0 and data:
                i = min(at, len(data) - 1)
                data[i] ^= rng.randint(1, 255)
            elif op == 1:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
            elif op == 2:
                del data[at : at + rng.randint(1, 16)]
            elif op == 3:
                del data[at:]
            elif op == 4:
                data[at:at] = data[max(0, at - 32) : at]
            elif op == 5:
                token = rng.choice((b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\x00"))
                data[at:at] = token + rng.choice((b"", b"\xff", b"\xc3", b"\\ud800"))
            else:
                data[at : at + 1] = bytes([rng.choice(b"0123456789-eE.")])
        return bytes(data)

    def mutate_json(self, message: Message) -> bytes:
        """One field-level spoiling: a value of the wrong type or size, a field removed or added,
        an unknown ``type``, an odd version; anywhere in the document, nested ones included."""
        rng = self.rng
        doc: Any = json.loads(encode(message))
        places = [p for p in _paths(doc) if p]
        op = rng.randrange(10)
        if op <= 3 and places:
            path = rng.choice(places)
            _parent(doc, path)[path[-1]] = odd_value(rng)
        elif op == 4 and places:
            path = rng.choice([p for p in places if isinstance(p[-1], str)] or places)
            del _parent(doc, path)[path[-1]]
        elif op == 5:
            doc[rng.choice(("extra", "type_", "tx", "v2"))] = odd_value(rng)
        elif op == 6:
            doc["type"] = rng.choice(("bogus", "", "BEGIN", "envelope", 7, None, "outcome "))
        elif op == 7:
            doc["v"] = rng.choice((0, 2, -1, "1", None, 2**62, 1.0))
        elif op == 8:
            self._spoil_name(doc)
        else:
            self._spoil_number(doc)
        return dumps(doc)

    def _spoil_name(self, doc: dict[str, Any]) -> None:
        """An id or name field made invalid (the alphabet, the length, the reply queue)."""
        rng = self.rng
        if "reply_to" in doc and rng.random() < 0.4:
            doc["reply_to"] = rng.choice(_BAD_REPLY_TO)(rng)
            return
        fields: list[str] = [
            k for k in ("tx_id", "participant", "operation", "at_fault") if k in doc
        ]
        if "participants" in doc:
            fields.append("participants")
        if not fields:
            doc["tx_id"] = rng.choice(BAD_NAMES)(rng)
            return
        name = rng.choice(fields)
        bad = rng.choice(BAD_NAMES)(rng)
        doc[name] = [bad, *doc[name]] if name == "participants" else bad

    def _spoil_number(self, doc: dict[str, Any]) -> None:
        """Deadlines, timeouts and intervals at and past every bound."""
        rng = self.rng
        fields = [k for k in ("deadline_ms", "timeout_ms", "sent_at_ms", "interval_ms") if k in doc]
        if not fields:
            doc["deadline_ms"] = 0
            return
        now = self.ctx.now_ms()
        doc[rng.choice(fields)] = rng.choice(
            (-1, 0, 1, 9, 2**62, -(2**62), 2**63 - 1, now + 10**9, now + 700_000, -now)
        )

    def mutate_json_field(self, message: Message, what: str) -> bytes:
        doc: dict[str, Any] = json.loads(encode(message))
        (self._spoil_name if what == "name" else self._spoil_number)(doc)
        return dumps(doc)

    def without_a_field(self, message: Message) -> bytes:
        doc: dict[str, Any] = json.loads(encode(message))
        required = [k for k in doc if k not in ("v", "type")]
        if required:
            del doc[self.rng.choice(required)]
        return dumps(doc)

    def encoding_oddity(self) -> bytes:
        """Valid JSON text in an odd coat: BOM, UTF-16, trailing garbage, duplicate keys..."""
        rng = self.rng
        raw = self.valid_body()
        op = rng.randrange(7)
        if op == 0:
            return b"\xef\xbb\xbf" + raw
        if op == 1:
            return raw.decode().encode(rng.choice(("utf-16", "utf-32", "utf-16-le")))
        if op == 2:
            return raw + rng.choice((b"garbage", b"{}", b"\x00", b"]"))
        if op == 3:
            return b" \n\t" + raw + b"\r\n"  # whitespace is valid JSON: taken
        if op == 4:
            # a fresh id: hostile messages sharing one could vote for each other's transaction
            return raw[:-1] + b',"tx_id":"%s"}' % self.tx_id().encode()
        if op == 5:
            return raw + raw
        return raw.replace(b":", b" : ").replace(b",", b" , ")

    def big(self) -> bytes:
        """Sizes at the limit and past it: valid messages padded to exactly the limit, one byte
        more, bodies of random bytes past it, and arguments past their own limit."""
        rng, limit = self.rng, self.ctx.limits.max_message_bytes
        op = rng.randrange(5)
        if op == 0:
            return self.random_bytes(limit + rng.choice((1, 2, 1000, limit)))
        if op == 1:
            args = {"account": "evil-acct-0", "pad": "p" * (self.ctx.limits.max_args_bytes + 1)}
            begin = self.sample(Begin)
            assert isinstance(begin, Begin)
            branch = Branch(begin.branches[0].participant, "debit", args)
            return encode(msgspec.structs.replace(begin, branches=(branch,)))
        return self.padded(limit + (0 if op <= 3 else 1))

    def padded(self, size: int) -> bytes:
        """A valid message of exactly ``size`` bytes (a long reason or whitespace)."""
        message = self.sample(self.rng.choice((Vote, Abort, Outcome)))
        short = encode(message)
        reason = "r" * max(0, size - len(short))
        body = encode(msgspec.structs.replace(message, reason=reason))
        return body + b" " * max(0, size - len(body))

    def heavy_envelope(self) -> bytes:
        """Well-formed single-branch Begins for one real participant, each with arguments near
        their limit, as many as fit the size limit: their PREPAREs, all for one queue, make an
        envelope the coordinator must split to send."""
        rng, limits = self.rng, self.ctx.limits
        bank = rng.choice(list(self.ctx.participants))
        pad = "p" * (limits.max_args_bytes - 64)
        items: list[Enveloped] = []
        size = 64
        while len(items) < 256:
            args = {"account": f"evil-acct-{rng.randrange(100)}", "amount": 1, "pad": pad}
            begin = Begin(
                tx_id=self.tx_id(),
                branches=(Branch(bank, rng.choice(("debit", "credit")), args),),
                timeout_ms=rng.randint(1000, 5000),
                reply_to=self.reply_to(),
            )
            item = Enveloped(message=begin)
            size += len(encode(item)) + 1
            if size > limits.max_message_bytes:
                break
            items.append(item)
        return encode(Envelope(messages=tuple(items)))

    def envelope_body(self) -> bytes:
        """Envelopes: empty, over the count limit, nested, with one bad item among good ones."""
        rng = self.rng
        op = rng.randrange(6)
        if op == 0:
            return b'{"type":"envelope","messages":[]}'
        if op == 1:
            return encode(self.envelope(rng.choice((257, 300))))
        if op == 2:
            inner = encode(self.envelope(2)).decode()
            return f'{{"type":"envelope","messages":[{{"message":{inner}}}]}}'.encode()
        if op == 3:
            doc = json.loads(encode(self.envelope(rng.randint(2, 6))))
            victim = rng.randrange(len(doc["messages"]))
            spoiled = self.mutate_json(self.sample()).decode("utf-8", errors="surrogatepass")
            doc["messages"][victim]["message"] = Raw(spoiled)
            return dumps(doc)
        if op == 4:
            return encode(self.envelope(rng.randint(1, 256)))
        doc = json.loads(encode(self.envelope(2)))
        doc["messages"][0]["traceparent"] = odd_value(rng)
        return dumps(doc)


_GENERATORS: dict[str, Callable[[Corpus], bytes]] = {
    "random-bytes": lambda c: c.random_bytes(c.rng.choice((0, 1, 2, 16, 64, 256, 4096))),
    "valid-hostile": lambda c: c.valid_body(),
    "byte-mutation": lambda c: c.mutate_bytes(c.valid_body()),
    "field-mutation": lambda c: c.mutate_json(c.sample()),
    "bad-name": lambda c: c.mutate_json_field(c.sample(), "name"),
    "bad-number": lambda c: c.mutate_json_field(
        c.sample(c.rng.choice((Begin, Prepare, Heartbeat))), "number"
    ),
    "unknown-type": lambda c: dumps({**json.loads(c.valid_body()), "type": "evil"}),
    "missing-field": lambda c: c.without_a_field(c.sample()),
    "encoding": lambda c: c.encoding_oddity(),
    "envelope": lambda c: c.envelope_body(),
    "big": lambda c: c.big(),
    "heavy-envelope": lambda c: c.heavy_envelope(),
    "json-not-object": lambda c: c.rng.choice((b"[]", b"null", b"1", b'"begin"', b"true", b"")),
}

_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("random-bytes", 10),
    ("valid-hostile", 12),
    ("byte-mutation", 20),
    ("field-mutation", 20),
    ("bad-name", 8),
    ("bad-number", 6),
    ("unknown-type", 3),
    ("missing-field", 6),
    ("encoding", 5),
    ("envelope", 6),
    ("big", 0.2),
    ("heavy-envelope", 0.03),
    ("json-not-object", 2),
)

#: what ``twophase fuzz --without`` may name besides the header kinds of twophase.fuzz_traffic
GENERATOR_KINDS = tuple(name for name, _ in _WEIGHTS)
