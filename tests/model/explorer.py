"""An explicit-state model checker for the two cores (docs/architecture.md §7).

The world is one ``CoordinatorCore``, a few ``ParticipantCore``s and what their drivers would do:

* each process has a durable log, a volatile buffer of unforced records (made durable by its next
  forced ``Persist`` and, per the driver contract in ``schemas/effects.py``, before its next
  ``Send`` leaves), pending timers, and an inbox of events its driver feeds back
  (``BranchExecuted`` after ``ExecuteBranch``, ``HistoryLoaded`` after ``LookUp``);
* each participant has a resource that behaves like ``ReservationResource``: per transaction
  none / prepared / committed / aborted, durable, with its ``ResourceError`` hazards;
* the network holds every message ever sent, flagged "still in flight": a message in flight can
  be delivered or lost; one delivered already can be delivered again (a duplicate);
* time moves when a timer fires (to its deadline) and in bounded jumps.

A step feeds one event to one process and performs its effects in order; a crash may cut the
list after any effect that leaves a trace (a record, a message, a resource change). The crashed
process restarts at once from its log and resource, through the core's ``Recovered`` event.

``check`` states the write-ahead rules as invariants of one world; ``settle`` stops the faults
(messages in flight arrive, timers fire in order, the client resubmits what it got no answer for)
and then requires that nothing is in doubt. ``explore`` visits every world within ``Bounds``;
``random_walk`` follows one seeded path with larger bounds.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import pickle
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from coordinator.core import CoordinatorCore, CoordinatorSettings, HistoryLoaded, LookUp
from coordinator.core import Recovered as CoordinatorRecovered
from participant import core as pc
from schemas import effects as fx
from schemas import messages as msg
from schemas import records as rec
from schemas import topology
from schemas.codec import decode_message, encode, record_kind
from tests.model.render import render

COORDINATOR, COORDINATOR_QUEUE = "coordinator", topology.COORDINATOR_QUEUE
CLIENT, STATUS_CLIENT = topology.client_queue("model"), topology.client_queue("model-status")
#: effects that leave nothing behind a crash: cutting the list right after them changes nothing
VOLATILE = (fx.StartTimer, fx.CancelTimer, fx.Forget, fx.ProtocolViolation, LookUp)
ALL_CHECKS = frozenset({"atomicity", "rule1", "rule2", "rule3", "rule4", "rule6", "rule7"})


@dataclass(frozen=True)
class Bounds:
    crashes: int = 1  # per process
    total_crashes: int = 2  # of all processes together
    duplicates: int = 1  # in total: deliveries of a message that was delivered before
    losses: int = 1  # in total
    timer_fires: int = 2  # in total
    jumps: int = 1  # time jumps of jump_ms (past a PREPARE's deadline)
    jump_ms: int = 1_001


@dataclass(frozen=True)
class Config:
    participants: tuple[str, ...] = ("p1", "p2")
    #: (tx_id, its participants): the client submits each once at the start
    transactions: tuple[tuple[str, tuple[str, ...]], ...] = (("t1", ("p1", "p2")),)
    refuse: frozenset[tuple[str, str]] = frozenset()  # (participant, tx_id) whose handler says NO
    #: participants that decline one phase: they only prepare, and vote YES
    declines: frozenset[str] = frozenset()
    status_queries: bool = False  # the client also asks for the status of each transaction
    timeout_ms: int = 1_000
    bounds: Bounds = Bounds()
    send_flushes: bool = True  # the driver contract; a test breaks it on purpose
    checks: frozenset[str] = ALL_CHECKS  # a mutation test may switch some off
    #: finished branches a participant remembers (0: each is forgotten early, at once)
    remember_max: int = pc.ParticipantSettings.remember_max


@dataclass
class Proc:
    core: Any
    log: list[Any] = field(default_factory=list)
    buffer: list[Any] = field(default_factory=list)
    timers: dict[fx.TimerKey, int] = field(default_factory=dict)
    inbox: list[Any] = field(default_factory=list)
    crashes: int = 0
    fp: bytes | None = None  # fingerprint cache, valid while no world owns the process


NetKey = tuple[str, bytes]  # (queue, encoded message)
BUDGETS = ("duplicates", "losses", "fires", "jumps")
Action = tuple[Any, ...]


@dataclass
class World:
    config: Config
    procs: dict[str, Proc]
    resource: dict[tuple[str, str], str]
    net: dict[NetKey, bool] = field(default_factory=dict)  # every message sent -> in flight?
    now: int = 0
    used: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BUDGETS, 0))
    hazards: list[str] = field(default_factory=list)  # ResourceErrors: always a failure
    trace: Any = None  # an immutable linked list (previous, line), rendered on failure
    notes: set[str] = field(default_factory=set)  # ProtocolViolations seen (shared by copies)
    owned: set[str] = field(default_factory=set)  # processes this copy may change in place

    def say(self, line: Any) -> None:
        self.trace = (self.trace, line)


def initial_world(config: Config) -> World:
    procs = {COORDINATOR: Proc(new_coordinator(0))}
    procs.update({p: Proc(new_participant(config, p)) for p in config.participants})
    world = World(config, procs, {(p, tx): "none" for tx, ps in config.transactions for p in ps})
    for tx, participants in config.transactions:
        _post(world, COORDINATOR_QUEUE, begin_of(config, tx, participants))
        if config.status_queries:
            _post(world, COORDINATOR_QUEUE, msg.StatusQuery(tx_id=tx, reply_to=STATUS_CLIENT))
    return world


def new_coordinator(now: int) -> CoordinatorCore:
    return CoordinatorCore(CoordinatorSettings(liveness_timeout_ms=10**12), started_ms=now)


def new_participant(config: Config, name: str) -> pc.ParticipantCore:
    return pc.ParticipantCore(name, pc.ParticipantSettings(remember_max=config.remember_max))


def begin_of(config: Config, tx: str, participants: tuple[str, ...]) -> msg.Begin:
    branches = tuple(msg.Branch(p, "op", {"n": 1}) for p in participants)
    return msg.Begin(tx_id=tx, branches=branches, timeout_ms=config.timeout_ms, reply_to=CLIENT)


# ---- copying and fingerprinting (generic over the cores' attributes) --------------------------


def clone(w: World) -> World:
    """A copy sharing the processes (copy on write: see ``own``), the trace and the notes."""
    procs, resource, net, used = {**w.procs}, {**w.resource}, {**w.net}, {**w.used}
    return World(w.config, procs, resource, net, w.now, used, [*w.hazards], w.trace, w.notes)


def own(w: World, name: str, core: bool = True) -> Proc:
    """The process ``name`` of ``w``, ready to be changed."""
    p = w.procs[name]
    if name not in w.owned:
        w.owned.add(name)
        copied = _deep(p.core) if core else p.core
        p = w.procs[name] = Proc(copied, [*p.log], [*p.buffer], {**p.timers}, [*p.inbox], p.crashes)
    p.fp = None
    return p


def fingerprint(w: World) -> bytes:
    """Worlds with the same fingerprint behave the same from here on, fault budgets aside."""
    procs = [p.fp or _proc_fingerprint(p) for p in w.procs.values()]
    return _digest((w.now, procs, sorted(w.resource.items()), sorted(w.net.items()), w.hazards))


def _proc_fingerprint(p: Proc) -> bytes:
    state = (_freeze(p.core), [*map(encode, p.log)], [*map(encode, p.buffer)])
    p.fp = _digest((*state, sorted(p.timers.items()), sorted(map(repr, p.inbox))))
    return p.fp


def _digest(state: Any) -> bytes:
    return hashlib.blake2b(pickle.dumps(state), digest_size=16).digest()


def budget(w: World) -> tuple[int, ...]:
    """What is left of each fault budget: more budget only allows more behaviours."""
    b, crashes = w.config.bounds, [p.crashes for p in w.procs.values()]
    left = [b.crashes - c for c in crashes] + [b.total_crashes - sum(crashes)]
    limits = (b.duplicates, b.losses, b.timer_fires, b.jumps)
    return (*left, *(limit - w.used[k] for k, limit in zip(BUDGETS, limits, strict=True)))


def _deep(x: Any) -> Any:
    """A deep copy that shares what never changes (messages, records, enums, frozen classes)."""
    t = type(x)
    if t is dict:
        return {k: _deep(v) for k, v in x.items()}
    if t is OrderedDict:
        return OrderedDict((k, _deep(v)) for k, v in x.items())
    if t is list:
        return [_deep(v) for v in x]
    if t is set:
        return set(x)
    if _immutable(t):
        return x
    copied = object.__new__(t)
    copied.__dict__.update({k: _deep(v) for k, v in vars(x).items()})
    return copied


def _freeze(x: Any) -> Any:
    """A hashable, canonical view of a core's state (dicts and sets sorted)."""
    t = type(x)
    if t is dict:
        return tuple((k, _freeze(v)) for k, v in sorted(x.items()))
    if t is OrderedDict:  # its order is state: the first is forgotten first
        return ("ordered", *((k, _freeze(v)) for k, v in x.items()))
    if t is list:
        return tuple(map(_freeze, x))
    if t is set:
        return tuple(sorted(x))
    if t in _ATOMS:
        return x
    if _immutable(t):
        return encode(x) if isinstance(x, msgspec.Struct) else repr(x)
    return tuple(_freeze(v) for k, v in vars(x).items() if k != "settings")


_ATOMS = {str, int, bool, bytes, type(None), tuple, frozenset}


def _immutable(t: type) -> bool:
    if t not in _IMMUTABLE:
        frozen = dataclasses.is_dataclass(t) and t.__dataclass_params__.frozen  # type: ignore[attr-defined]
        _IMMUTABLE[t] = t in _ATOMS or issubclass(t, enum.Enum | msgspec.Struct) or frozen
    return _IMMUTABLE[t]


_IMMUTABLE: dict[type, bool] = {}


_MESSAGES: dict[bytes, msg.Protocol] = {}


def message(key: NetKey) -> msg.Protocol:
    if key[1] not in _MESSAGES:
        _MESSAGES[key[1]] = decode_message(key[1])  # type: ignore[assignment]
    return _MESSAGES[key[1]]


# ---- what the drivers do ----------------------------------------------------------------------


def _post(w: World, queue: str, sent: msg.Protocol) -> None:
    raw = encode(sent)
    _MESSAGES.setdefault(raw, sent)
    w.net[queue, raw] = True  # sent (again): a copy is in flight


def perform(w: World, name: str, effect: Any) -> None:
    proc = own(w, name)
    if isinstance(effect, fx.Persist):
        proc.buffer.append(effect.record)
    flush = effect.force if isinstance(effect, fx.Persist) else isinstance(effect, fx.Send)
    if flush and (isinstance(effect, fx.Persist) or w.config.send_flushes):
        proc.log, proc.buffer = proc.log + proc.buffer, []
    if isinstance(effect, fx.Send):
        _post(w, effect.queue, effect.message)
    elif isinstance(effect, fx.StartTimer):
        proc.timers[effect.key] = effect.deadline_ms
    elif isinstance(effect, fx.CancelTimer):
        proc.timers.pop(effect.key, None)
    elif isinstance(effect, LookUp):
        records = [r for r in proc.log + proc.buffer if r.tx_id == effect.tx_id]
        proc.inbox.append(HistoryLoaded(effect.tx_id, records))
    elif isinstance(effect, pc.LookUpBranch):  # participant/worker.py: the log and the resource
        records = [r for r in proc.log + proc.buffer if r.tx_id == effect.tx_id]
        committed = w.resource.get((name, effect.tx_id)) == "committed"
        proc.inbox.append(pc.BranchHistory(effect.tx_id, records, committed))
    elif isinstance(effect, pc.ExecuteBranch | pc.CommitBranch | pc.AbortBranch):
        _resource(w, name, effect)
    elif isinstance(effect, fx.ProtocolViolation):
        w.notes.add(effect.description)


def _resource(
    w: World, name: str, effect: pc.ExecuteBranch | pc.CommitBranch | pc.AbortBranch
) -> None:
    """What ``ReservationResource`` does (participant/resources.py)."""
    key, tx = (name, effect.tx_id), effect.tx_id
    state = w.resource.get(key, "none")
    if isinstance(effect, pc.ExecuteBranch):  # prepare; a no-op when prepared or committed
        ok = state != "aborted" and (state != "none" or key not in w.config.refuse)
        # one phase: prepare and commit in the same step, as the worker's unit does
        at_once = ok and effect.one_phase and name not in w.config.declines
        executed = pc.BranchExecuted(tx, ok, "" if ok else "refused", committed=at_once)
        own(w, name).inbox.append(executed)
        if at_once:
            w.resource[key] = "committed"
        else:
            w.resource[key] = state if state in ("committed", "aborted") or not ok else "prepared"
        return
    verb, done = (
        ("commit", "committed") if isinstance(effect, pc.CommitBranch) else ("abort", "aborted")
    )
    if state not in ("prepared", done) and (state != "none" or verb == "commit"):
        w.hazards.append(f"ResourceError: {verb} of {key}, which is {state}")
    w.resource[key] = done if state == "prepared" else state


def _recovered(w: World, name: str) -> CoordinatorRecovered | pc.Recovered:
    """What the drivers read from the log (and the resource) at a restart."""
    log = w.procs[name].log
    if name == COORDINATOR:  # coordinator/log.py: transactions neither ABORTED nor ENDED
        finished = {r.tx_id for r in log if record_kind(r) in rec.COORDINATOR_FINISHED_KINDS}
        unfinished: dict[str, list[Any]] = {}
        for r in log:
            if r.tx_id not in finished:
                unfinished.setdefault(r.tx_id, []).append(r)
        return CoordinatorRecovered(unfinished)
    completed = [r for r in log if isinstance(r, rec.BranchCompleted)]  # participant/worker.py
    done = {r.tx_id for r in completed}
    prepared = [r for r in log if isinstance(r, rec.BranchPrepared) and r.tx_id not in done]
    mine = {tx: state for (p, tx), state in w.resource.items() if p == name}
    in_resource = {tx for tx, state in mine.items() if state == "prepared"}
    committed = {r.tx_id for r in prepared if mine.get(r.tx_id) == "committed"}
    return pc.Recovered(prepared, in_resource, committed, completed=completed)


# ---- steps ------------------------------------------------------------------------------------


def handle(w: World, name: str, event: Any, label: Any, crashes: bool = True) -> list[World]:
    """Feed ``event`` to ``name`` and perform the effects: the resulting world, preceded (while
    the process may still crash) by the worlds where it crashed part-way and restarted.

    A crash is tried after each effect that leaves a trace, and at the end; a crash later on
    reaches nothing new: other processes neither read this one's memory nor write its log."""
    effects = own(w, name).core.handle(event, w.now)
    w.say((label, effects))
    results = []
    if crashes and _may_crash(w, name):
        lasting = [not isinstance(e, VOLATILE) and getattr(e, "force", True) for e in effects]
        for k in [k for k in range(1, len(effects)) if lasting[k - 1]] + [len(effects)]:
            cut = clone(w)
            for effect in effects[:k]:
                perform(cut, name, effect)
            results += crash(cut, name, f"crash {name} after effect {k}")
    for effect in effects:
        perform(w, name, effect)
    return [*results, w]


def _may_crash(w: World, name: str) -> bool:
    b = w.config.bounds
    total = sum(p.crashes for p in w.procs.values())
    return w.procs[name].crashes < b.crashes and total < b.total_crashes


def crash(w: World, name: str, label: str) -> list[World]:
    """``name`` loses its memory, timers, inbox and unflushed records, and restarts at once."""
    proc = own(w, name, core=False)  # replaced, not changed
    proc.crashes, proc.buffer, proc.timers, proc.inbox = proc.crashes + 1, [], {}, []
    if name == COORDINATOR:
        proc.core = new_coordinator(w.now)
    else:
        proc.core = new_participant(w.config, name)
    return handle(w, name, _recovered(w, name), (label, "; restart"))


def enabled(w: World, crash_anytime: bool = False) -> list[Action]:
    """Fault-free actions last (a depth-first search takes them first)."""
    b, used = w.config.bounds, w.used
    actions: list[Action] = [("jump",)] if used["jumps"] < b.jumps else []
    if crash_anytime:  # ``handle`` offers a crash after every step anyway
        actions += [("crash", name) for name in w.procs if _may_crash(w, name)]
    if used["fires"] < b.timer_fires:
        actions += [("fire", n, key) for n, p in w.procs.items() for key in sorted(p.timers)]
    for key, in_flight in w.net.items():
        if key[0] in (CLIENT, STATUS_CLIENT):
            continue  # the client only reads its queues
        if in_flight and used["losses"] < b.losses:
            actions.append(("lose", key))
        if in_flight or used["duplicates"] < b.duplicates:
            actions.append(("deliver", key))
    return actions + [("feed", n, i) for n, p in w.procs.items() for i in range(len(p.inbox))]


def apply(w: World, action: Action, crashes: bool = True) -> list[World]:
    """Take ``action`` in ``w`` (which it changes); return the resulting world(s)."""
    kind = action[0]
    if kind == "feed":
        name, event = action[1], own(w, action[1]).inbox.pop(action[2])
        return handle(w, name, event, (name, " <- ", event), crashes)
    if kind == "deliver":
        key = action[1]
        queue = key[0].removeprefix(topology.PARTICIPANT_QUEUE_PREFIX)
        name = COORDINATOR if queue == COORDINATOR_QUEUE else queue
        again = "" if w.net[key] else " (duplicate)"
        w.used["duplicates"] += not w.net[key]
        w.net[key] = False
        event = fx.Incoming(message(key))
        return handle(w, name, event, (name, " <- ", event.message, again), crashes)
    if kind == "lose":
        w.net[action[1]] = False
        w.used["losses"] += 1
        w.say(("lost ", message(action[1])))
        return [w]
    if kind == "fire":
        name, key = action[1], action[2]
        w.now = max(w.now, own(w, name).timers.pop(key))
        w.used["fires"] += 1
        return handle(w, name, fx.TimerFired(key), f"{name} <- timer {key} at {w.now}", crashes)
    if kind == "crash":
        return crash(w, action[1], f"crash {action[1]}")
    w.now += w.config.bounds.jump_ms
    w.used["jumps"] += 1
    w.say(f"time jumps to {w.now}")
    return [w]


# ---- invariants -------------------------------------------------------------------------------


def check(w: World) -> str | None:
    """The first write-ahead rule or safety property that ``w`` breaks, if any."""
    on, coordinator = w.config.checks, w.procs[COORDINATOR]
    if w.hazards:
        return w.hazards[0]
    sent = [(key[0], message(key)) for key in w.net]
    agreed = {(m.tx_id, m.participant) for _, m in sent if isinstance(m, msg.Vote) and m.vote != NO}
    for tx, participants in w.config.transactions:
        states = {w.resource[p, tx] for p in participants}
        if "atomicity" in on and {"committed", "aborted"} <= states:
            return f"atomicity: {tx} is committed at one participant and aborted at another"
        answer = told(w, tx)
        if "atomicity" in on and answer is msg.OutcomeKind.ABORTED and "committed" in states:
            return f"atomicity: the client was told {tx} aborted, a branch committed"
        if "atomicity" in on and answer is msg.OutcomeKind.COMMITTED and "aborted" in states:
            return f"atomicity: the client was told {tx} committed, a branch aborted"
        written = coordinator.log + coordinator.buffer
        kinds = {type(r) for r in written if r.tx_id == tx} & {rec.TxCommitting, rec.TxAborted}
        if "rule4" in on and len(kinds) == 2:
            return f"rule 4: the decision on {tx} changed (COMMITTING and ABORTED are logged)"
        silent = [p for p in participants if (tx, p) not in agreed]
        if "rule3" in on and rec.TxCommitting in kinds and silent:
            return f"rule 3: COMMITTING logged for {tx} without a YES vote from {silent}"
        for p in participants:
            log = w.procs[p].log + w.procs[p].buffer
            decided = {
                r.decision for r in log if isinstance(r, rec.BranchCompleted) and r.tx_id == tx
            }
            if "rule4" in on and len(decided) == 2:
                return f"rule 4: {p} logged both a commit and an abort of {tx}"
    committing = {r.tx_id for r in coordinator.log if isinstance(r, rec.TxCommitting)}
    aborted = {r.tx_id for r in coordinator.log if isinstance(r, rec.TxAborted)}
    for queue, m in sent:
        if "rule1" in on and isinstance(m, msg.Vote) and m.vote is msg.VoteKind.YES:
            log = w.procs[m.participant].log
            if not any(isinstance(r, rec.BranchPrepared) and r.tx_id == m.tx_id for r in log):
                return f"rule 1: {m.participant} voted YES on {m.tx_id}, PREPARED is not durable"
        if "rule2" in on and isinstance(m, msg.Commit) and m.tx_id not in committing:
            return f"rule 2: COMMIT sent for {m.tx_id}, COMMITTING is not durable"
        if (
            "rule6" in on
            and (isinstance(m, msg.Ack) or (isinstance(m, msg.Vote) and m.vote is COMMITTED))
            and w.resource[m.participant, m.tx_id] != "committed"
        ):
            what = "ACKed" if isinstance(m, msg.Ack) else "voted COMMITTED on"
            return f"rule 6: {m.participant} {what} {m.tx_id}, its resource is not committed"
        if "rule7" in on and isinstance(m, msg.Outcome) and queue in (CLIENT, STATUS_CLIENT):
            if m.outcome is msg.OutcomeKind.COMMITTED and m.tx_id not in committing:
                return f"rule 7: client told {m.tx_id} committed, COMMITTING is not durable"
            if m.outcome is msg.OutcomeKind.ABORTED and (
                m.tx_id in committing or m.tx_id not in aborted
            ):
                return f"rule 7: client told {m.tx_id} aborted, the durable log does not say so"
    return None


NO, COMMITTED = msg.VoteKind.NO, msg.VoteKind.COMMITTED


def settle(w: World, max_steps: int = 1_000) -> str | None:
    """Stop the faults: feed every inbox, deliver every message in flight, fire timers in
    deadline order, resubmit what the client has no answer for. At the fixpoint nothing may be
    in doubt. Returns the first problem (``w`` keeps the trace)."""
    w.say("-- the faults stop --")
    resubmitted: set[str] = set()
    for _ in range(max_steps):
        action = _fair_action(w, resubmitted)
        if action is None:
            return quiescence_problem(w)
        apply(w, action, crashes=False)
        problem = check(w)
        if problem:
            return problem
    return f"still busy after {max_steps} fault-free steps"


def _fair_action(w: World, resubmitted: set[str]) -> Action | None:
    for name, proc in w.procs.items():
        if proc.inbox:
            return ("feed", name, 0)
    for key, in_flight in w.net.items():
        if in_flight and key[0] not in (CLIENT, STATUS_CLIENT):
            return ("deliver", key)
    timers = [(when, name, key) for name, p in w.procs.items() for key, when in p.timers.items()]
    if timers:
        return ("fire", *min(timers)[1:])
    for tx, participants in w.config.transactions:
        if tx not in resubmitted and told(w, tx) is None:
            resubmitted.add(tx)
            w.say(f"the client resubmits {tx}")
            _post(w, COORDINATOR_QUEUE, begin_of(w.config, tx, participants))
            return _fair_action(w, resubmitted)
    return None


def told(w: World, tx: str) -> msg.OutcomeKind | None:
    """What the client was told about ``tx``, if anything."""
    for key in w.net:
        m = message(key) if key[0] == CLIENT else None
        if isinstance(m, msg.Outcome) and m.tx_id == tx:
            return m.outcome
    return None


def quiescence_problem(w: World) -> str | None:
    coordinator = w.procs[COORDINATOR]
    if coordinator.core.transactions:
        return f"quiescence: the coordinator still holds {sorted(coordinator.core.transactions)}"
    for name in w.config.participants:
        if w.procs[name].core.in_doubt():
            return f"quiescence: {name} is in doubt about {w.procs[name].core.in_doubt()}"
    committing = {r.tx_id for r in coordinator.log if isinstance(r, rec.TxCommitting)}
    for tx, participants in w.config.transactions:
        want = {"committed"} if tx in committing else {"none", "aborted"}
        wrong = [f"{p}: {w.resource[p, tx]}" for p in participants if w.resource[p, tx] not in want]
        if wrong:
            return f"quiescence: {tx} is {wrong}, but the decision says {sorted(want)}"
        expected = msg.OutcomeKind.COMMITTED if tx in committing else msg.OutcomeKind.ABORTED
        if told(w, tx) is not expected:
            return f"quiescence: the client was told {told(w, tx)} about {tx}, not {expected}"
    return None


# ---- search -----------------------------------------------------------------------------------


@dataclass
class Result:
    states: int = 0
    settled: int = 0
    problem: str | None = None
    trace: list[str] = field(default_factory=list)
    notes: set[str] = field(default_factory=set)  # ProtocolViolations seen: reported, not failed

    def report(self) -> str:
        return "\n".join([f"VIOLATION: {self.problem}", *(f"  {line}" for line in self.trace)])


def explore(config: Config, limit: int = 3_000_000) -> Result:
    """Depth-first search of every world reachable within ``config.bounds``, skipping a world
    when one with the same fingerprint and at least as much of every budget was seen. ``settle``
    runs from every world where nothing is in flight or in an inbox (only timers could move)."""
    result, start = Result(), initial_world(config)
    seen: dict[bytes, list[tuple[int, ...]]] = {fingerprint(start): [budget(start)]}
    stack = [start]
    while stack and result.states < limit:
        w = stack.pop()
        result.states += 1
        if not any(w.net.values()) and not any(p.inbox for p in w.procs.values()):
            result.settled += 1
            problem = settle(settled := clone(w))
            if problem:
                return _failed(result, problem, settled)
        for action in enabled(w):
            for after in apply(clone(w), action):
                left, known = budget(after), seen.setdefault(fingerprint(after), [])
                if any(all(map(int.__ge__, old, left)) for old in known):
                    continue
                problem = check(after)
                if problem:
                    return _failed(result, problem, after)
                known.append(left)
                stack.append(after)
    result.notes = start.notes
    return result


#: how often a random walk takes each kind of action (a duplicate delivery weighs 2)
_WEIGHTS = {"feed": 30, "deliver": 30, "lose": 1, "fire": 3, "crash": 1, "jump": 1}


def random_walk(config: Config, seed: int, steps: int = 400) -> Result:
    rng, result, w = random.Random(seed), Result(), initial_world(config)
    w.say(f"random walk, seed {seed}")
    for _ in range(steps):
        actions = enabled(w, crash_anytime=True)
        if not actions:
            break
        weights = [_WEIGHTS[a[0]] if a[0] != "deliver" or w.net[a[1]] else 2 for a in actions]
        worlds = apply(w, rng.choices(actions, weights)[0])
        w = worlds[-1] if rng.random() < 0.9 else rng.choice(worlds)  # sometimes a crash
        result.states += 1
        problem = check(w)
        if problem:
            return _failed(result, problem, w)
    result.settled, result.notes = 1, w.notes
    problem = settle(w)
    return _failed(result, problem, w) if problem else result


def _failed(result: Result, problem: str, w: World) -> Result:
    result.problem, result.trace, result.notes = problem, render(w.trace), w.notes
    return result
