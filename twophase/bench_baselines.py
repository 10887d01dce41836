"""The two baselines ``twophase bench`` measures in the same run, on the same machine."""

from __future__ import annotations

import random
import threading
import time
import uuid

import psycopg

from runtime.amqp import AmqpChannel
from runtime.store import psycopg_url
from twophase import bank

PAYLOAD = b"x" * 200  # about the size of an encoded protocol message


def broker_ceiling(amqp_url: str, seconds: float = 5.0, batch: int = 500) -> float:
    """Persistent messages per second through a durable queue, published with confirms by one
    connection and consumed with acks by another, end to end."""
    queue = f"twophase.bench.ceiling.{uuid.uuid4().hex[:8]}"
    publisher = AmqpChannel(amqp_url, connection_name="twophase-bench-publisher")
    publisher.declare_queue(queue)
    consumed = [0]
    stop = threading.Event()

    def consume() -> None:
        consumer = AmqpChannel(
            amqp_url, prefetch=2 * batch, connection_name="twophase-bench-consumer"
        )
        consumer.consume(queue)
        try:
            while not stop.is_set():
                deliveries = consumer.poll(0.05, 2 * batch)
                consumer.ack(deliveries)
                consumed[0] += len(deliveries)
        finally:
            consumer.close()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    time.sleep(0.2)
    started = time.perf_counter()
    start_count = consumed[0]
    while time.perf_counter() - started < seconds:
        for _ in range(batch):
            publisher.publish(queue, PAYLOAD)
        publisher.wait_for_confirms()
    elapsed = time.perf_counter() - started
    rate = (consumed[0] - start_count) / elapsed
    stop.set()
    thread.join(5)
    publisher.close()
    _delete_queue(amqp_url, queue)
    return rate


def _delete_queue(amqp_url: str, queue: str) -> None:
    import pika

    from runtime import tls

    connection = pika.BlockingConnection(tls.amqp_parameters(amqp_url))
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


def naive_two_phase_commit(
    db_url: str, banks: list[str], accounts: int, seconds: float = 5.0
) -> float:
    """Transactions per second of a plain loop: for each bank tpc_begin, UPDATE, tpc_prepare;
    then tpc_commit each. One thread, one connection per bank, the same tables as the bench."""
    connections = [psycopg.connect(psycopg_url(db_url)) for _ in banks]
    rng = random.Random(3)
    done = 0
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            gid = uuid.uuid4().hex
            for conn, name in zip(connections, banks, strict=True):
                conn.tpc_begin(f"naive:{name}:{gid}")
                conn.execute(
                    f"UPDATE {bank.table_name(name)} SET balance = balance + 0 WHERE id = %s",
                    (f"{name}-{rng.randrange(accounts)}",),
                )
                conn.tpc_prepare()
            for conn in connections:
                conn.tpc_commit()
            done += 1
        return done / (time.perf_counter() - started)
    finally:
        for conn in connections:
            conn.close()
