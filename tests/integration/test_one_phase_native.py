"""PostgresResource in one phase: a plain COMMIT with the commit marker, no PREPARE TRANSACTION."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from participant.operations import Refuse
from participant.resources import CommitsAtOnce, PostgresResource
from tests.integration.test_resources_pg import Bank, gids, native_bank, pg_cleanup

pytestmark = pytest.mark.integration


@pytest.fixture
def native(pg_url: str) -> Iterator[Bank]:
    token = f"t{uuid.uuid4().hex[:10]}"
    acc = f"acc_{token}"
    try:
        found = native_bank(pg_url, f"{token}-bank", acc)
        yield found
        for resource in found.resources:
            resource.close()
    finally:
        pg_cleanup(pg_url, token, tables=[acc])


def test_a_one_phase_branch_commits_without_being_prepared(native: Bank) -> None:
    resource = native.resource()
    assert isinstance(resource, PostgresResource) and isinstance(resource, CommitsAtOnce)
    resource.commit_at_once("t1", native.debit, {"account": "alice", "amount": 30})
    assert native.balance("alice") == 70
    assert resource.committed(["t1"]) == {"t1"}  # the marker answers later questions
    assert gids(native.url, f"twophase:{native.participant}") == []  # never prepared
    # a redelivered PREPARE runs nothing again
    resource.commit_at_once("t1", native.debit, {"account": "alice", "amount": 30})
    assert native.balance("alice") == 70


def test_a_refused_one_phase_branch_leaves_nothing(native: Bank) -> None:
    resource = native.resource()
    assert isinstance(resource, PostgresResource)
    with pytest.raises(Refuse, match="insufficient funds"):
        resource.commit_at_once("t2", native.debit, {"account": "bob", "amount": 1})
    assert resource.committed(["t2"]) == set()
    refusals = resource.commit_at_once_many(
        [
            ("t3", native.boom, {"account": "alice", "amount": 1}),
            ("t4", native.debit, {"account": "alice", "amount": 1}),
        ]
    )
    assert isinstance(refusals[0], Refuse) and "ZeroDivisionError" in str(refusals[0])
    assert refusals[1] is None
    assert native.balance("alice") == 99  # boom's update was rolled back, t4's committed
    assert resource.committed(["t3", "t4"]) == {"t4"}


def test_a_branch_prepared_earlier_is_committed_by_its_gid(native: Bank) -> None:
    resource = native.resource()
    resource.prepare("t5", native.debit, {"account": "alice", "amount": 5})
    fresh = native.resource()  # another instance: the prepared branch is found by its gid
    assert isinstance(fresh, PostgresResource)
    fresh.commit_at_once("t5", native.debit, {"account": "alice", "amount": 5})
    assert native.balance("alice") == 95
    assert gids(native.url, f"twophase:{native.participant}") == []
