-- twophase demo databases. Run once by the postgres image (docker-entrypoint-initdb.d) as the
-- postgres superuser, and only on an EMPTY data directory: after changing this file run
-- `docker compose -f compose/docker-compose.yml down -v` to start from scratch.
--
-- One role and one database per service, each role owning only its own database:
--   coordinator -> twophase_coordinator  (the decision log, TWOPHASE_LOG_URL)
--   bank_a      -> bank_a                (PostgresResource: native PREPARE TRANSACTION branches,
--                                          its prepare log and its accounts)
--   bank_b      -> bank_b                (ReservationResource on PostgreSQL: holds, prepare log,
--                                          accounts)
-- Passwords are DEMO-ONLY placeholders, repeated in docker-compose.yml; never reuse them.
-- Native two-phase commit also needs max_prepared_transactions > 0: docker-compose.yml starts
-- the server with -c max_prepared_transactions=200.

CREATE ROLE coordinator LOGIN PASSWORD 'coordinator-pg-demo-only';
CREATE ROLE bank_a LOGIN PASSWORD 'bank-a-pg-demo-only';
CREATE ROLE bank_b LOGIN PASSWORD 'bank-b-pg-demo-only';

CREATE DATABASE twophase_coordinator OWNER coordinator;
CREATE DATABASE bank_a OWNER bank_a;
CREATE DATABASE bank_b OWNER bank_b;

-- Only the owner (and the superuser) may connect to each database.
REVOKE ALL ON DATABASE twophase_coordinator FROM PUBLIC;
REVOKE ALL ON DATABASE bank_a FROM PUBLIC;
REVOKE ALL ON DATABASE bank_b FROM PUBLIC;

-- The accounts tables of twophase/bank.py (table_name(): "accounts_" + the participant name with
-- non [A-Za-z0-9_] characters replaced by "_"), created as their owner. The participants create
-- their own log and bookkeeping tables at start (twophase_prepare_log_*, twophase_commit_marker,
-- twophase_reservation); as database owners they may (PostgreSQL 15: the public schema belongs
-- to pg_database_owner).

\connect bank_a
SET ROLE bank_a;
CREATE TABLE accounts_bank_a (
    id VARCHAR(64) PRIMARY KEY,
    balance BIGINT NOT NULL,
    held BIGINT NOT NULL DEFAULT 0
);
INSERT INTO accounts_bank_a (id, balance) VALUES
    ('a1', 1000), ('a2', 1000), ('a3', 1000), ('a4', 1000), ('a5', 1000);
RESET ROLE;

\connect bank_b
SET ROLE bank_b;
CREATE TABLE accounts_bank_b (
    id VARCHAR(64) PRIMARY KEY,
    balance BIGINT NOT NULL,
    held BIGINT NOT NULL DEFAULT 0
);
INSERT INTO accounts_bank_b (id, balance) VALUES
    ('b1', 1000), ('b2', 1000), ('b3', 1000), ('b4', 1000), ('b5', 1000);
RESET ROLE;
