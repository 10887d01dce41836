"""The example bank participant used by the demo, the chaos test and the benchmark.

Each bank holds accounts; a transfer debits one bank, credits another, and pays a fee to a third.
With ``ReservationResource`` a debit holds the amount at prepare and applies it at commit; with
``PostgresResource`` the debit runs inside the native prepared branch.

Run one as a service: ``TWOPHASE_PARTICIPANT_NAME=bank-a TWOPHASE_BANK_DB=bank-a.db
twophase participant --app twophase.bank:from_env``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from participant.operations import Refuse
from participant.reservation import ReservationResource
from participant.resources import PostgresResource
from participant.worker import Participant
from runtime.errors import ConfigurationError
from runtime.store import database_url

RESOURCE_KINDS = ("reservation", "postgres")


def create_bank(
    name: str, db_url: str, *, resource: str = "reservation", **options: Any
) -> Participant:
    if resource == "postgres":
        return _postgres_bank(name, db_url, **options)
    if resource == "reservation":
        return _reservation_bank(name, db_url, **options)
    raise ConfigurationError(
        f"unknown bank resource {resource!r}: use one of {', '.join(RESOURCE_KINDS)}"
    )


def from_env() -> Participant:
    """Factory for ``twophase participant --app twophase.bank:from_env``."""
    name = os.environ.get("TWOPHASE_PARTICIPANT_NAME", "")
    db = os.environ.get("TWOPHASE_BANK_DB", "")
    if not name or not db:
        raise ConfigurationError("set TWOPHASE_PARTICIPANT_NAME and TWOPHASE_BANK_DB for the bank")
    return create_bank(name, db, resource=os.environ.get("TWOPHASE_BANK_RESOURCE", "reservation"))


def _amount(args: dict[str, Any]) -> int:
    amount = args.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise Refuse(f"amount must be a positive integer, got {amount!r}")
    return amount


def _account(args: dict[str, Any]) -> str:
    account = args.get("account")
    if not isinstance(account, str) or not account:
        raise Refuse(f"account must be a non-empty string, got {account!r}")
    return account


def _transfer(args: dict[str, Any]) -> dict[str, Any]:
    return {"account": args["account"], "amount": args["amount"]}


# ---- reservation flavour (any SQLAlchemy database) ----------------------------------------


def table_name(bank: str) -> str:
    """Each bank has its own table, so that several banks may share one database."""
    return "accounts_" + re.sub(r"[^A-Za-z0-9_]", "_", bank).lower()


def accounts_table(bank: str) -> sa.TableClause:
    return sa.table(table_name(bank), sa.column("id"), sa.column("balance"), sa.column("held"))


def _reservation_bank(name: str, db_url: str, **options: Any) -> Participant:
    bank = Participant(name, ReservationResource(db_url), **options)
    table = table_name(name)  # made of [a-z0-9_] only, so safe to format into SQL
    # One conditional UPDATE checks and holds at once: no race, one round trip.
    hold = sa.text(
        f"UPDATE {table} SET held = held + :amount "
        "WHERE id = :account AND balance - held >= :amount"
    )
    lookup = sa.text(f"SELECT balance, held FROM {table} WHERE id = :account")
    apply_hold = sa.text(
        f"UPDATE {table} SET balance = balance - :amount, held = held - :amount WHERE id = :account"
    )
    release = sa.text(f"UPDATE {table} SET held = held - :amount WHERE id = :account")
    exists = sa.text(f"SELECT 1 FROM {table} WHERE id = :account")
    deposit = sa.text(f"UPDATE {table} SET balance = balance + :amount WHERE id = :account")

    @bank.operation("debit")
    def debit(db: sa.Connection, args: dict[str, Any]) -> None:
        params = {"account": _account(args), "amount": _amount(args)}
        if db.execute(hold, params).rowcount == 1:
            return
        row = db.execute(lookup, params).first()
        if row is None:
            raise Refuse(f"no account {params['account']!r} at {name}")
        raise Refuse(
            f"insufficient funds in {params['account']} at {name}: "
            f"balance {row.balance}, held {row.held}, needs {params['amount']}"
        )

    @debit.prepare_many
    def hold_debits(db: sa.Connection, args_list: list[dict[str, Any]]) -> list[Refuse | None]:
        """A batch's holds with one executemany. Each UPDATE holds at most one row, so the
        count tells whether all went through; if not, the batch runs again branch by branch
        (the resource's fallback), where each refusal gets its own reason."""
        params = [{"account": _account(args), "amount": _amount(args)} for args in args_list]
        held = db.execute(hold, params).rowcount
        if held != len(params):
            raise Refuse(f"{len(params) - held} of {len(params)} debits could not be held")
        return [None] * len(params)

    # Batch hooks: a batch's debits (or credits) are applied by one executemany, which psycopg
    # sends as one pipeline. Each row is its own UPDATE, so an account twice in a batch is fine.
    @debit.on_commit_many
    def apply_debits(db: sa.Connection, args_list: list[dict[str, Any]]) -> None:
        db.execute(apply_hold, [_transfer(args) for args in args_list])

    @debit.on_abort_many
    def release_debits(db: sa.Connection, args_list: list[dict[str, Any]]) -> None:
        db.execute(release, [_transfer(args) for args in args_list])

    @bank.operation("credit")
    def credit(db: sa.Connection, args: dict[str, Any]) -> None:
        params = {"account": _account(args), "amount": _amount(args)}
        if db.execute(exists, params).first() is None:
            raise Refuse(f"no account {params['account']!r} at {name}")

    exist = sa.text(f"SELECT id FROM {table} WHERE id IN :accounts").bindparams(
        sa.bindparam("accounts", expanding=True)
    )

    @credit.prepare_many
    def check_credits(db: sa.Connection, args_list: list[dict[str, Any]]) -> list[Refuse | None]:
        """A batch's credits checked with one query (a credit holds nothing until commit)."""
        refusals: list[Refuse | None] = []
        wanted = []
        for args in args_list:
            try:
                _amount(args)
                wanted.append(_account(args))
                refusals.append(None)
            except Refuse as refusal:
                refusals.append(refusal)
        found = set(db.execute(exist, {"accounts": sorted(set(wanted))}).scalars())
        return [
            refusal
            if refusal is not None or args["account"] in found
            else Refuse(f"no account {args['account']!r} at {name}")
            for args, refusal in zip(args_list, refusals, strict=True)
        ]

    @credit.on_commit_many
    def apply_credits(db: sa.Connection, args_list: list[dict[str, Any]]) -> None:
        db.execute(deposit, [_transfer(args) for args in args_list])

    return bank


# ---- native PostgreSQL flavour -------------------------------------------------------------


def _postgres_bank(name: str, db_url: str, **options: Any) -> Participant:
    bank = Participant(name, PostgresResource(db_url), **options)
    table = table_name(name)  # made of [a-z0-9_] only, so safe to format into SQL

    @bank.operation("debit")
    def debit(db: Any, args: dict[str, Any]) -> None:
        account, amount = _account(args), _amount(args)
        cursor = db.execute(
            f"UPDATE {table} SET balance = balance - %s WHERE id = %s AND balance >= %s",
            (amount, account, amount),
        )
        if cursor.rowcount == 1:
            return
        found = db.execute(f"SELECT balance FROM {table} WHERE id = %s", (account,)).fetchone()
        if found is None:
            raise Refuse(f"no account {account!r} at {name}")
        raise Refuse(
            f"insufficient funds in {account} at {name}: balance {found[0]}, needs {amount}"
        )

    @bank.operation("credit")
    def credit(db: Any, args: dict[str, Any]) -> None:
        account, amount = _account(args), _amount(args)
        cursor = db.execute(
            f"UPDATE {table} SET balance = balance + %s WHERE id = %s", (amount, account)
        )
        if cursor.rowcount != 1:
            raise Refuse(f"no account {account!r} at {name}")

    return bank


# ---- set-up and inspection (used by the demo, chaos and bench) ----------------------------


def open_accounts(db_url: str, bank: str, accounts: Iterable[tuple[str, int]]) -> None:
    """Create (or reset) the bank's accounts table with the given opening balances."""
    table = table_name(bank)
    engine = sa.create_engine(_sa_url(db_url))
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {table} (id VARCHAR(64) PRIMARY KEY, "
                "balance BIGINT NOT NULL, held BIGINT NOT NULL DEFAULT 0)"
            )
        )
        conn.execute(
            sa.insert(accounts_table(bank)),
            [{"id": a, "balance": b, "held": 0} for a, b in accounts],
        )
    engine.dispose()


def totals(db_url: str, bank: str) -> tuple[int, int]:
    """(sum of balances, sum of holds) of one bank."""
    table = table_name(bank)
    engine = sa.create_engine(_sa_url(db_url))
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(f"SELECT COALESCE(SUM(balance), 0), COALESCE(SUM(held), 0) FROM {table}")
            ).one()
            return int(row[0]), int(row[1])
    finally:
        engine.dispose()


def _sa_url(db_url: str) -> str:
    return database_url(db_url)
