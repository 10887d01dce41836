"""Partition ownership by lease with fencing: a model, explored exhaustively (issue 15, step 1).

This is the specification that the high-availability implementation (lease rows in PostgreSQL,
fenced log writes, several ``twophase coordinator`` processes) must follow; it comes before the
implementation and does not import it. docs/architecture.md §12 explains it in prose.

The protocol it proves, for one partition (every partition is the same, and independent), as
rules L1-L9 (L for lease; §3's write-ahead rules keep their numbers):

L1. **The lease row.** A partition has one row (owner, epoch, expiry), changed only by conditional
    updates, each one statement: *acquire* where the row is free or expired by the database's
    clock (``epoch := epoch + 1, owner := me, expiry := now + TTL``), *renew* where ``owner = me
    and epoch = mine`` (``expiry := now + TTL``). A renewal that matches no row means the lease
    is lost: stop serving (L6).
L2. **A new epoch on every acquire.** Each acquire takes an epoch greater than every epoch before
    (also when the same instance takes the partition back after a restart). [mutation
    ``same-epoch``]
L3. **Read after the increment.** Recovery reads the partition's log only after the acquire has
    committed, never from a read taken before it. [mutation ``read-before-acquire``]
L4. **Recover before consuming.** The new owner rebuilds its memory of the partition from that
    read: a logged decision is adopted as it is (a COMMIT is re-sent, never decided or written
    again); a BEGUN without a decision is aborted by a fenced write of ABORT under the new epoch
    (presumed abort), then published. Only then does the owner consume the partition's queue.
    [mutation ``skip-recovery``]
L5. **Every log write is fenced, atomically.** Each write (BEGUN, a decision, recovery's ABORTs)
    checks, in the same database transaction, that the row's epoch is still the writer's, and
    holds a lock on the row until it commits (``SELECT ... FOR SHARE``, or an ``UPDATE`` of the
    row), so that an acquire waits for every write in flight under the old epoch and the recovery
    after it sees them. [mutations ``unfenced-write``, ``unlocked-fence``]
L6. **A failed fenced write ends the serving.** The instance drops its memory of the partition and
    publishes nothing that follows from the write; it is not an outage to retry. It serves the
    partition again only by acquiring it anew (L2) and recovering (L3, L4).
L7. **Publish only what is durable.** A decision leaves only after the fenced write that logged it
    committed. [mutation ``publish-before-write``] Once logged it is final, so it may be sent and
    re-sent by any instance that read it or wrote it, even by an owner that lost its lease without
    noticing (a paused one): participants and clients only ever get identical copies. The same
    holds for answers: an inquiry (or a late YES vote) about a transaction the owner does not hold
    in memory is answered from a log read only with a logged decision. A read that shows BEGUN
    without a decision means a later owner began it (the current owner, once recovered, holds every
    such transaction in memory): the reader must not presume abort from the read; it writes ABORT,
    fenced, first, which fails and ends its serving (L6). [mutation ``presume-abort-on-read``]
L8. **A decision is written once.** An owner decides (COMMIT or ABORT, after its votes) only a
    transaction it began under its current epoch and has not decided; recovery's ABORTs are the
    only decisions written for transactions begun under an earlier epoch.
L9. **Clocks are for liveness only.** An owner renews before its lease expires and stops serving
    when its own clock says the lease has expired, and a new owner waits for the expiry; but no
    safety property rests on a clock, the TTL or a pause: the model lets instances run on stale
    beliefs for any number of ticks, and stays safe when acquires ignore the expiry altogether
    (``Config.steal``).

What is modelled: a global clock (``tick``, up to ``max_clock``); the database (the lease row and
the partition's log of (tx, BEGUN | COMMIT | ABORT, epoch) records); two instances, each with its
belief (epoch, the expiry it computed, its phase) and its memory of the partition's transactions.
A pause is an instance taking no step while the clock ticks: it then acts on its stale belief,
until it looks at its clock or renews. Any instance may crash (losing all it holds) up to
``crashes`` times. The queue is abstracted too: a serving owner may at any time take a Begin for
a transaction it does not hold in memory (redeliveries and resubmissions included), or an inquiry
about one whose BEGUN is logged (only a participant that was sent PREPARE asks, and PREPARE leaves
after BEGUN is durable). Votes are abstracted away: an owner that began a transaction may decide it
either way. What participants and clients receive is the set of published (tx, decision) pairs: a
re-sent decision is the same pair, so duplicates add no state.

Invariants, checked in every state (``check``):

* ``published``: no transaction has both COMMIT and ABORT published;
* ``logged``: no transaction has more than one decision record in the log (decided by one owner,
  once; so a decision never changes);
* ``durable``: every published decision is in the log;
* ``single-writer``: at most one instance would have a write accepted by the database (two may
  believe they own the partition; only one holds the current epoch).

``explore`` visits every state breadth-first (so a counterexample is a shortest one), keyed by the
state itself; from every state at the time horizon ``settle`` stops the faults and requires that
every transaction ends decided once, and published.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

BEGUN, COMMIT, ABORT = "BEGUN", "COMMIT", "ABORT"
DECISIONS = (COMMIT, ABORT)
VOTING, UNDECIDED = "voting", "undecided"  # memory: began here / read as BEGUN by recovery

# phases of an instance
IDLE = "idle"  # holds no epoch
READ_EARLY = "read early"  # mutation read-before-acquire: has read the log, then acquires
ACQUIRED = "acquired"  # holds an epoch, has not read the log yet
RECOVERING = "recovering"  # has read the log; recovery's ABORTs are not written yet
SERVING = "serving"  # recovered: consumes the queue
HOLDING = (ACQUIRED, RECOVERING, SERVING)

MUTATIONS = frozenset(
    {
        "unfenced-write",  # a log write without the epoch check (L5)
        "unlocked-fence",  # the check and the append are two steps, no lock between (L5)
        "publish-before-write",  # a decision leaves before its fenced write (L7)
        "skip-recovery",  # the new owner consumes at once, with an empty memory (L4)
        "same-epoch",  # acquire keeps the epoch (L2)
        "read-before-acquire",  # recovery uses a log read taken before the acquire (L3)
        "presume-abort-on-read",  # an inquiry answered ABORT from a read showing no decision (L7)
    }
)
ALL_CHECKS = frozenset({"published", "logged", "durable", "single-writer"})
NAMES = "AB"


@dataclass(frozen=True)
class Config:
    transactions: tuple[str, ...] = ("t1",)
    instances: int = 2
    ttl: int = 2  # ticks a lease lasts after an acquire or a renewal
    max_clock: int = 6  # the time horizon: bounds pauses and the number of owners
    acquisitions: int = 3  # acquires in all (epochs 1..3)
    crashes: int = 1  # per instance
    steal: bool = False  # acquires ignore the expiry: safety must not need it (L9)
    mutation: str | None = None
    checks: frozenset[str] = ALL_CHECKS
    settle: bool = True  # from every state at the horizon

    def __post_init__(self) -> None:
        assert self.mutation is None or self.mutation in MUTATIONS, self.mutation
        assert self.instances <= len(NAMES)


class Row(NamedTuple):
    owner: int | None
    epoch: int
    expiry: int
    acquisitions: int  # a bound of the search, not a column


class Record(NamedTuple):
    tx: str
    kind: str  # BEGUN, COMMIT or ABORT
    epoch: int


Memory = tuple[tuple[str, str], ...]  # sorted (tx, VOTING | UNDECIDED | COMMIT | ABORT)


class Instance(NamedTuple):
    phase: str
    epoch: int  # believed; -1 when idle
    until: int  # the expiry it believes in (its last acquire or renewal)
    memory: Memory
    pending: tuple[str, str] | None  # mutation unlocked-fence: a checked, unwritten decision
    crashes: int


class State(NamedTuple):
    clock: int
    row: Row
    log: tuple[Record, ...]
    instances: tuple[Instance, ...]
    published: frozenset[tuple[str, str]]


class Step(NamedTuple):
    kind: str
    label: str
    state: State
    tags: tuple[str, ...] = ()
    actor: int = -1  # the instance that takes the step; -1: the clock


def initial(config: Config) -> State:
    idle = Instance(IDLE, -1, 0, (), None, 0)
    return State(0, Row(None, 0, -1, 0), (), (idle,) * config.instances, frozenset())


# ---- the rules ----------------------------------------------------------------------------------


def fence(config: Config, s: State, inst: Instance) -> bool:
    """Would the database accept a log write from ``inst`` now? (L5)"""
    return config.mutation == "unfenced-write" or inst.epoch == s.row.epoch


def recall(memory: Memory, tx: str) -> str | None:
    return dict(memory).get(tx)


def remember(memory: Memory, **updates: str) -> Memory:
    return tuple(sorted({**dict(memory), **updates}.items()))


def read_log(log: tuple[Record, ...]) -> Memory:
    """Recovery's read: every logged decision as it is, every BEGUN without one as UNDECIDED."""
    known: dict[str, str] = {}
    for r in log:
        if r.kind in DECISIONS or r.tx not in known:
            known[r.tx] = UNDECIDED if r.kind == BEGUN else r.kind
    return tuple(sorted(known.items()))


def successors(config: Config, s: State) -> Iterator[Step]:
    if s.clock < config.max_clock:
        yield Step("tick", f"tick: clock {s.clock + 1}", s._replace(clock=s.clock + 1))
    for i, inst in enumerate(s.instances):
        for step in _steps(config, s, i, inst):
            yield step._replace(actor=i)


def _steps(config: Config, s: State, i: int, inst: Instance) -> Iterator[Step]:
    me, mutation = NAMES[i], config.mutation

    def put(new: Instance, **changes: object) -> State:
        instances = (*s.instances[:i], new, *s.instances[i + 1 :])
        return s._replace(instances=instances, **changes)  # type: ignore[arg-type]

    stopped = Instance(IDLE, -1, 0, (), None, inst.crashes)

    def write(
        records: tuple[Record, ...], new: Instance, what: str, tags: tuple[str, ...] = ()
    ) -> Step:
        """A fenced write (L5): it appends, or fails and the instance stops (L6)."""
        if fence(config, s, inst):
            return Step(
                "write",
                f"{me} writes {what} under epoch {inst.epoch}",
                put(new, log=(*s.log, *records)),
                tags,
            )
        label = f"{me} writes {what} under epoch {inst.epoch}: refused (epoch is {s.row.epoch})"
        return Step("write", label, put(stopped), ("a stale owner's write refused",))

    if inst != stopped and inst.crashes < config.crashes:
        crashed = stopped._replace(crashes=inst.crashes + 1)
        yield Step("crash", f"{me} crashes (loses all it holds)", put(crashed))

    row, now = s.row, s.clock
    if inst.phase in (IDLE, READ_EARLY):
        if mutation == "read-before-acquire" and inst.phase == IDLE:
            early = inst._replace(phase=READ_EARLY, memory=read_log(s.log))
            yield Step("read", f"{me} reads the log before acquiring", put(early))
        free = row.owner is None or now > row.expiry or config.steal
        may = mutation != "read-before-acquire" or inst.phase == READ_EARLY
        if free and may and row.acquisitions < config.acquisitions:
            epoch = row.epoch if mutation == "same-epoch" else row.epoch + 1
            new_row = Row(i, epoch, now + config.ttl, row.acquisitions + 1)
            if mutation == "skip-recovery":
                taken = Instance(SERVING, epoch, now + config.ttl, (), None, inst.crashes)
            elif inst.phase == READ_EARLY:
                taken = inst._replace(phase=RECOVERING, epoch=epoch, until=now + config.ttl)
            else:
                taken = Instance(ACQUIRED, epoch, now + config.ttl, (), None, inst.crashes)
            label = f"{me} acquires: epoch {epoch}, expiry {now + config.ttl}"
            tags: tuple[str, ...] = (
                ("two instances believe they own the partition",)
                if any(other.phase in HOLDING for other in s.instances)
                else ()
            )
            yield Step("acquire", label, put(taken, row=new_row), tags)
        return

    # the instance believes it holds the partition (it may be paused past its expiry)
    if now > inst.until:
        yield Step("look", f"{me}'s clock says its lease expired: {me} stops", put(stopped))
    if row.owner == i and row.epoch == inst.epoch:
        if row.expiry != now + config.ttl or inst.until != now + config.ttl:
            renewed = inst._replace(until=now + config.ttl)
            label = f"{me} renews: expiry {now + config.ttl}"
            yield Step("renew", label, put(renewed, row=row._replace(expiry=now + config.ttl)))
    else:
        yield Step("renew", f"{me}'s renewal finds the lease taken: {me} stops", put(stopped))

    if inst.phase == ACQUIRED:
        read = inst._replace(phase=RECOVERING, memory=read_log(s.log))
        yield Step("read", f"{me} reads the log: {_show(read.memory)}", put(read))
        return

    for tx, known in inst.memory:  # L7: what is in memory as decided was logged
        if known in DECISIONS and (tx, known) not in s.published:
            tags = (
                ("a decision published by an owner that lost its lease",)
                if (inst.epoch != row.epoch)
                else ()
            )
            if known == COMMIT and (tx, COMMIT, inst.epoch) not in s.log:
                tags += ("a COMMIT logged under an earlier epoch re-sent",)
            yield Step(
                "publish",
                f"{me} publishes {known} {tx}",
                put(inst, published=s.published | {(tx, known)}),
                tags,
            )

    if inst.phase == RECOVERING:
        undecided = [tx for tx, known in inst.memory if known == UNDECIDED]
        served = inst._replace(
            phase=SERVING, memory=remember(inst.memory, **dict.fromkeys(undecided, ABORT))
        )
        if undecided:
            records = tuple(Record(tx, ABORT, inst.epoch) for tx in undecided)
            what = f"ABORT {' '.join(undecided)} (recovery)"
            yield write(records, served, what, ("recovery aborts an undecided transaction",))
        else:
            yield Step("recover", f"{me} recovered: consumes the queue", put(served))
        return

    if inst.pending is not None:  # mutation unlocked-fence: the append, checked steps ago
        tx, decision = inst.pending
        done = inst._replace(pending=None, memory=remember(inst.memory, **{tx: decision}))
        label = f"{me} appends {decision} {tx} under epoch {inst.epoch} (checked earlier)"
        yield Step("write", label, put(done, log=(*s.log, Record(tx, decision, inst.epoch))))
        return

    for tx in config.transactions:
        knows = recall(inst.memory, tx)
        if knows is None:  # a Begin from the queue, for a transaction this owner does not know
            began = inst._replace(memory=remember(inst.memory, **{tx: VOTING}))
            yield write((Record(tx, BEGUN, inst.epoch),), began, f"BEGUN {tx}")
        if knows is None and any(r.tx == tx for r in s.log):
            yield _answer(config, s, inst, me, tx, put, write)
        if knows != VOTING:
            continue
        for decision in DECISIONS:  # the votes decide; the model tries both
            decided = inst._replace(memory=remember(inst.memory, **{tx: decision}))
            tags = (f"a transaction decided {decision}",)
            if mutation == "unlocked-fence":
                if fence(config, s, inst):
                    checked = inst._replace(pending=(tx, decision))
                    label = f"{me} checks epoch {inst.epoch} for {decision} {tx}: current"
                    yield Step("write", label, put(checked), tags)
                else:
                    yield write((), inst, f"{decision} {tx}")
                continue
            step = write((Record(tx, decision, inst.epoch),), decided, f"{decision} {tx}", tags)
            if mutation == "publish-before-write":  # the decision leaves from memory first
                sent = step.state._replace(published=step.state.published | {(tx, decision)})
                label = f"{me} publishes {decision} {tx}, then {step.label.removeprefix(me + ' ')}"
                step = step._replace(label=label, state=sent)
            yield step


def _answer(
    config: Config,
    s: State,
    inst: Instance,
    me: str,
    tx: str,
    put: Callable[..., State],
    write: Callable[[tuple[Record, ...], Instance, str], Step],
) -> Step:
    """An inquiry (or a late YES vote) about ``tx``, which this owner does not know: its
    participant prepared, so ``tx`` was begun; the log answers (L7)."""
    logged = read_log(tuple(r for r in s.log if r.tx == tx))[0][1]
    label = f"{me} reads the log for an inquiry about {tx}: {logged}"
    if logged in DECISIONS:  # final: publishing it later is safe
        return Step(
            "answer", label, put(inst._replace(memory=remember(inst.memory, **{tx: logged})))
        )
    if config.mutation == "presume-abort-on-read":
        label += f", answers ABORT {tx} (presumed)"
        return Step("answer", label, put(inst, published=s.published | {(tx, ABORT)}))
    # begun, undecided, unknown here: only a stale owner meets this (L4); abort it, fenced
    aborted = inst._replace(memory=remember(inst.memory, **{tx: ABORT}))
    return write((Record(tx, ABORT, inst.epoch),), aborted, f"ABORT {tx} (inquiry, undecided)")


def _show(memory: Memory) -> str:
    return ", ".join(f"{tx} {known}" for tx, known in memory) or "empty"


# ---- the invariants -----------------------------------------------------------------------------


def check(config: Config, s: State) -> str | None:
    on = config.checks
    for tx in config.transactions:
        if "published" in on and {(tx, COMMIT), (tx, ABORT)} <= s.published:
            return f"published: both COMMIT and ABORT of {tx} were sent"
        decided = [r for r in s.log if r.tx == tx and r.kind in DECISIONS]
        if "logged" in on and len(decided) > 1:
            shown = ", ".join(f"{r.kind} under epoch {r.epoch}" for r in decided)
            return f"logged: {tx} was decided more than once ({shown})"
    for tx, decision in sorted(s.published):
        logged = any(r.tx == tx and r.kind == decision for r in s.log)
        if "durable" in on and not logged:
            return f"durable: {decision} {tx} was sent, and the log holds no {decision} {tx}"
    writers = [
        NAMES[i]
        for i, inst in enumerate(s.instances)
        if inst.phase in HOLDING and fence(config, s, inst)
    ]
    if "single-writer" in on and len(writers) > 1:
        return f"single-writer: {' and '.join(writers)} could both write the log"
    return None


# ---- the faults stop ----------------------------------------------------------------------------

_OWNER_ORDER = ("write", "read", "recover", "publish")


def settle(
    config: Config, s: State, good: set[State] | None = None, max_steps: int = 200
) -> tuple[str | None, list[str]]:
    """No more crashes or pauses: stale owners publish what they logged and find out they lost
    the lease, the current owner (or, once the lease has expired, instance A) recovers, begins and
    decides every transaction and publishes it. Then every transaction must be decided once, and
    its decision sent. ``good`` holds states known to settle well (the run is deterministic, so
    reaching one ends it)."""
    unbounded = replace(config, max_clock=config.max_clock + 4 * max_steps, acquisitions=10**9)
    unbounded = replace(unbounded, steal=False)
    lines: list[str] = ["-- the faults stop --"]
    path: list[State] = []
    for _ in range(max_steps):
        if good is not None and s in good:
            good.update(path)
            return None, lines
        path.append(s)
        problem = check(config, s)
        if problem:
            return problem, lines
        steps = [step for step in successors(unbounded, s) if step.kind != "crash"]
        step = _fair(s, steps)
        if step is None:
            break
        lines.append(step.label)
        s = step.state
    for tx in config.transactions:
        decided = [r.kind for r in s.log if r.tx == tx and r.kind in DECISIONS]
        if len(decided) != 1 or (tx, decided[0]) not in s.published:
            problem = f"settle: {tx} ends with decisions {decided}, published {sorted(s.published)}"
            return problem, lines
    if good is not None:
        good.update(path)
    return None, lines


def _fair(s: State, steps: list[Step]) -> Step | None:
    def by(i: int, kinds: tuple[str, ...]) -> Step | None:
        return next((st for k in kinds for st in steps if st.actor == i and st.kind == k), None)

    holders = [i for i, inst in enumerate(s.instances) if inst.phase in HOLDING]
    for i in holders:  # a stale owner resumes: it sends what it logged, then learns it lost
        if s.instances[i].epoch != s.row.epoch:
            return by(i, ("publish", "renew"))
    for i in holders:
        return by(i, _OWNER_ORDER)
    for i, inst in enumerate(s.instances):
        if inst.phase in (IDLE, READ_EARLY):
            step = by(i, ("read", "acquire"))
            if step:
                return step
    return by(-1, ("tick",))


# ---- the search ---------------------------------------------------------------------------------


@dataclass
class Result:
    states: int = 0
    settled: int = 0
    problem: str | None = None
    trace: list[str] = field(default_factory=list)
    reached: set[str] = field(default_factory=set)  # interesting steps taken somewhere

    def report(self) -> str:
        return "\n".join([f"VIOLATION: {self.problem}", *(f"  {line}" for line in self.trace)])


def explore(config: Config, limit: int = 5_000_000) -> Result:
    """Breadth-first search of every state within ``config``'s bounds; the first violation
    found comes with a shortest trace to it."""
    result, start = Result(), initial(config)
    parents: dict[State, tuple[State, str] | None] = {start: None}
    queue, good = deque([start]), set[State]()
    while queue and result.states < limit:
        s = queue.popleft()
        result.states += 1
        if config.settle and s.clock == config.max_clock:
            result.settled += 1
            problem, lines = settle(config, s, good)
            if problem:
                return _failed(result, problem, parents, s, lines)
        for step in successors(config, s):
            result.reached.update(step.tags)
            if step.state in parents:
                continue
            parents[step.state] = (s, step.label)
            problem = check(config, step.state)
            if problem:
                return _failed(result, problem, parents, step.state, [])
            queue.append(step.state)
    return result


def _failed(
    result: Result,
    problem: str,
    parents: dict[State, tuple[State, str] | None],
    s: State,
    after: list[str],
) -> Result:
    lines: list[str] = []
    link = parents[s]
    while link is not None:
        s, label = link
        lines.append(label)
        link = parents[s]
    result.problem, result.trace = problem, [*lines[::-1], *after]
    return result
