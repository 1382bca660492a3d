"""Schema migrations for the SQL backends, applied in order and recorded in the database.

A migration is never edited once released: a schema change is a new entry at the end. Each
migration is written once per dialect, side by side, so the two schemas cannot drift apart
unnoticed (the contract suite also compares them column by column). The PostgreSQL text
differs only where the dialects do: ``BYTEA`` for ``BLOB``, ``DOUBLE PRECISION`` for SQLite's
8-byte ``REAL``, ``BIGINT`` for ``INTEGER``, and triggers.

Request counts per batch (migration 3) are kept by a trigger on every change of a request's
state, in ``batch_counts``, so that reading a batch's progress costs O(1) instead of a scan of
its requests. On PostgreSQL each database session adds into shard ``pg_backend_pid() % 16``, so
replicas committing into the same batch rarely wait on one counter row (only two sessions of
one shard do); readers sum the shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["sqlite", "postgresql"]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: str
    postgresql: str

    def sql(self, dialect: Dialect) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgresql


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema: files, batches, requests, leases, vehicles",
        """
        CREATE TABLE files (
            id TEXT PRIMARY KEY,
            purpose TEXT NOT NULL,
            filename TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            status TEXT NOT NULL
        );
        CREATE TABLE file_chunks (
            file_id TEXT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
            part INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (file_id, part)
        );
        CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            input_file_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            metadata TEXT,
            errors TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            in_progress_at INTEGER,
            finalizing_at INTEGER,
            completed_at INTEGER,
            failed_at INTEGER,
            expired_at INTEGER,
            cancelling_at INTEGER,
            cancelled_at INTEGER,
            seq_no INTEGER NOT NULL
        );
        CREATE INDEX batches_status ON batches(status, seq_no);
        CREATE UNIQUE INDEX batches_order ON batches(seq_no);
        CREATE TABLE requests (
            batch_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            model TEXT NOT NULL,
            encoding_format TEXT NOT NULL,
            texts TEXT NOT NULL,
            sort_key INTEGER NOT NULL,
            state TEXT NOT NULL,
            lease_id TEXT,
            vehicle_id TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            vectors BLOB,
            dim INTEGER,
            token_count INTEGER,
            error_status INTEGER,
            error_body TEXT,
            body BLOB,
            finished_at REAL,
            PRIMARY KEY (batch_id, seq)
        );
        CREATE UNIQUE INDEX requests_custom_id ON requests(batch_id, custom_id);
        CREATE INDEX requests_queue ON requests(batch_id, state, sort_key, seq);
        CREATE INDEX requests_lease ON requests(lease_id);
        CREATE INDEX requests_vehicle ON requests(vehicle_id, state);
        CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            batch_id TEXT NOT NULL,
            vehicle_id TEXT NOT NULL,
            model TEXT NOT NULL,
            seqs TEXT NOT NULL,
            created_at REAL NOT NULL,
            deadline REAL NOT NULL,
            state TEXT NOT NULL
        );
        CREATE INDEX leases_active ON leases(state, deadline);
        CREATE INDEX leases_batch ON leases(batch_id, state);
        CREATE TABLE vehicles (
            id TEXT PRIMARY KEY,
            hardware TEXT NOT NULL,
            models TEXT NOT NULL,
            registered_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            status TEXT NOT NULL
        );
        """,
        """
        CREATE TABLE files (
            id TEXT PRIMARY KEY,
            purpose TEXT NOT NULL,
            filename TEXT NOT NULL,
            bytes BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            status TEXT NOT NULL
        );
        CREATE TABLE file_chunks (
            file_id TEXT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
            part BIGINT NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (file_id, part)
        );
        CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            input_file_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            metadata TEXT,
            errors TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            in_progress_at BIGINT,
            finalizing_at BIGINT,
            completed_at BIGINT,
            failed_at BIGINT,
            expired_at BIGINT,
            cancelling_at BIGINT,
            cancelled_at BIGINT,
            seq_no BIGINT NOT NULL
        );
        CREATE INDEX batches_status ON batches(status, seq_no);
        CREATE UNIQUE INDEX batches_order ON batches(seq_no);
        CREATE TABLE requests (
            batch_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            custom_id TEXT NOT NULL,
            model TEXT NOT NULL,
            encoding_format TEXT NOT NULL,
            texts TEXT NOT NULL,
            sort_key BIGINT NOT NULL,
            state TEXT NOT NULL,
            lease_id TEXT,
            vehicle_id TEXT,
            attempts BIGINT NOT NULL DEFAULT 0,
            vectors BYTEA,
            dim BIGINT,
            token_count BIGINT,
            error_status BIGINT,
            error_body TEXT,
            body BYTEA,
            finished_at DOUBLE PRECISION,
            PRIMARY KEY (batch_id, seq)
        );
        CREATE UNIQUE INDEX requests_custom_id ON requests(batch_id, custom_id);
        CREATE INDEX requests_queue ON requests(batch_id, state, sort_key, seq);
        CREATE INDEX requests_lease ON requests(lease_id);
        CREATE INDEX requests_vehicle ON requests(vehicle_id, state);
        CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            batch_id TEXT NOT NULL,
            vehicle_id TEXT NOT NULL,
            model TEXT NOT NULL,
            seqs TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            deadline DOUBLE PRECISION NOT NULL,
            state TEXT NOT NULL
        );
        CREATE INDEX leases_active ON leases(state, deadline);
        CREATE INDEX leases_batch ON leases(batch_id, state);
        CREATE TABLE vehicles (
            id TEXT PRIMARY KEY,
            hardware TEXT NOT NULL,
            models TEXT NOT NULL,
            registered_at DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL,
            status TEXT NOT NULL
        );
        """,
    ),
    Migration(
        2,
        "owner policy and consent: batch purpose and data region, lease energy and end reason, "
        "vehicle status reason, append-only owner_policies",
        # Existing batches had no purpose or region: they become ordinary work with no data
        # restriction, the same as a new batch that names neither.
        """
        ALTER TABLE batches ADD COLUMN purpose TEXT NOT NULL DEFAULT 'general';
        ALTER TABLE batches ADD COLUMN data_region TEXT NOT NULL DEFAULT 'global';
        ALTER TABLE leases ADD COLUMN energy_j REAL NOT NULL DEFAULT 0;
        ALTER TABLE leases ADD COLUMN end_reason TEXT;
        ALTER TABLE vehicles ADD COLUMN status_reason TEXT;
        CREATE TABLE owner_policies (
            vehicle_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            policy TEXT NOT NULL,
            actor TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (vehicle_id, version)
        );
        """,
        """
        ALTER TABLE batches ADD COLUMN purpose TEXT NOT NULL DEFAULT 'general';
        ALTER TABLE batches ADD COLUMN data_region TEXT NOT NULL DEFAULT 'global';
        ALTER TABLE leases ADD COLUMN energy_j DOUBLE PRECISION NOT NULL DEFAULT 0;
        ALTER TABLE leases ADD COLUMN end_reason TEXT;
        ALTER TABLE vehicles ADD COLUMN status_reason TEXT;
        CREATE TABLE owner_policies (
            vehicle_id TEXT NOT NULL,
            version BIGINT NOT NULL,
            policy TEXT NOT NULL,
            actor TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (vehicle_id, version)
        );
        """,
    ),
    Migration(
        3,
        "scale: O(1) request counts per batch, an index in lease order, batch claims, output "
        "files tied to their batch, liveness and policy-change indexes; drop unread columns",
        # ``requests_ready`` matches the lease order (longest first, then by seq) exactly, so
        # cutting a unit reads its rows straight off the index; ``requests_queue`` made SQLite
        # sort every pending request of the batch per lease (46 ms at 50,000 pending).
        """
        DROP INDEX requests_queue;
        CREATE INDEX requests_ready ON requests(batch_id, state, sort_key DESC, seq);
        ALTER TABLE requests DROP COLUMN attempts;
        ALTER TABLE requests DROP COLUMN finished_at;
        CREATE TABLE batch_counts (
            batch_id TEXT NOT NULL,
            shard INTEGER NOT NULL,
            pending INTEGER NOT NULL DEFAULT 0,
            leased INTEGER NOT NULL DEFAULT 0,
            done INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (batch_id, shard)
        );
        INSERT INTO batch_counts (batch_id, shard, pending, leased, done, failed)
            SELECT batch_id, 0, SUM(state = 'pending'), SUM(state = 'leased'),
                   SUM(state = 'done'), SUM(state = 'failed')
            FROM requests GROUP BY batch_id;
        CREATE TRIGGER requests_count_states AFTER UPDATE OF state ON requests
        WHEN OLD.state <> NEW.state
        BEGIN
            UPDATE batch_counts SET
                pending = pending + (NEW.state = 'pending') - (OLD.state = 'pending'),
                leased = leased + (NEW.state = 'leased') - (OLD.state = 'leased'),
                done = done + (NEW.state = 'done') - (OLD.state = 'done'),
                failed = failed + (NEW.state = 'failed') - (OLD.state = 'failed')
            WHERE batch_id = NEW.batch_id AND shard = 0;
        END;
        ALTER TABLE batches ADD COLUMN claim_owner TEXT;
        ALTER TABLE batches ADD COLUMN claim_until REAL;
        ALTER TABLE files ADD COLUMN batch_id TEXT;
        CREATE INDEX files_batch ON files(batch_id);
        CREATE INDEX vehicles_last_seen ON vehicles(last_seen);
        CREATE INDEX owner_policies_created ON owner_policies(created_at);
        """,
        # A statement-level trigger with transition tables: one upsert per UPDATE statement,
        # however many rows it changed, into the session's own shard (no hot counter row).
        """
        DROP INDEX requests_queue;
        CREATE INDEX requests_ready ON requests(batch_id, state, sort_key DESC, seq);
        ALTER TABLE requests DROP COLUMN attempts;
        ALTER TABLE requests DROP COLUMN finished_at;
        CREATE TABLE batch_counts (
            batch_id TEXT NOT NULL,
            shard BIGINT NOT NULL,
            pending BIGINT NOT NULL DEFAULT 0,
            leased BIGINT NOT NULL DEFAULT 0,
            done BIGINT NOT NULL DEFAULT 0,
            failed BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (batch_id, shard)
        );
        INSERT INTO batch_counts (batch_id, shard, pending, leased, done, failed)
            SELECT batch_id, 0, COUNT(*) FILTER (WHERE state = 'pending'),
                   COUNT(*) FILTER (WHERE state = 'leased'), COUNT(*) FILTER (WHERE state = 'done'),
                   COUNT(*) FILTER (WHERE state = 'failed')
            FROM requests GROUP BY batch_id;
        CREATE FUNCTION idlefleet_count_request_states() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO batch_counts AS c (batch_id, shard, pending, leased, done, failed)
            SELECT n.batch_id, pg_backend_pid() % 16,
                   SUM((n.state = 'pending')::int - (o.state = 'pending')::int),
                   SUM((n.state = 'leased')::int - (o.state = 'leased')::int),
                   SUM((n.state = 'done')::int - (o.state = 'done')::int),
                   SUM((n.state = 'failed')::int - (o.state = 'failed')::int)
            FROM new_rows n JOIN old_rows o ON o.batch_id = n.batch_id AND o.seq = n.seq
            WHERE o.state <> n.state
            GROUP BY n.batch_id
            ON CONFLICT (batch_id, shard) DO UPDATE SET
                pending = c.pending + EXCLUDED.pending,
                leased = c.leased + EXCLUDED.leased,
                done = c.done + EXCLUDED.done,
                failed = c.failed + EXCLUDED.failed;
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER requests_count_states AFTER UPDATE ON requests
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION idlefleet_count_request_states();
        ALTER TABLE batches ADD COLUMN claim_owner TEXT;
        ALTER TABLE batches ADD COLUMN claim_until DOUBLE PRECISION;
        ALTER TABLE files ADD COLUMN batch_id TEXT;
        CREATE INDEX files_batch ON files(batch_id);
        CREATE INDEX vehicles_last_seen ON vehicles(last_seen);
        CREATE INDEX owner_policies_created ON owner_policies(created_at);
        CREATE SEQUENCE batches_seq_no;
        SELECT setval('batches_seq_no', COALESCE((SELECT MAX(seq_no) FROM batches), 0) + 1, false);
        """,
    ),
    Migration(
        4,
        "hot path: count each vehicle's completed requests as they commit, drop the requests "
        "indexes on lease and vehicle that every lease and commit had to keep up",
        # Leases know their requests (leases.seqs), so requeueing and closing a lease go by
        # primary key; the per-vehicle count was the only reader of requests_vehicle. Each
        # request's two updates (leased, done) then touch one index fewer each, ~25% of a
        # lease-and-commit's time in SQLite.
        """
        ALTER TABLE vehicles ADD COLUMN completed INTEGER NOT NULL DEFAULT 0;
        UPDATE vehicles SET completed = (
            SELECT COUNT(*) FROM requests r WHERE r.vehicle_id = vehicles.id AND r.state = 'done'
        );
        DROP INDEX requests_lease;
        DROP INDEX requests_vehicle;
        """,
        """
        ALTER TABLE vehicles ADD COLUMN completed BIGINT NOT NULL DEFAULT 0;
        UPDATE vehicles SET completed = (
            SELECT COUNT(*) FROM requests r WHERE r.vehicle_id = vehicles.id AND r.state = 'done'
        );
        DROP INDEX requests_lease;
        DROP INDEX requests_vehicle;
        """,
    ),
    Migration(
        5,
        "count each request's failed attempts, so that one that fails on every car ends",
        "ALTER TABLE requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;",
        "ALTER TABLE requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;",
    ),
    Migration(
        6,
        "workload-neutral requests: texts becomes payload, encoding_format options, vectors "
        "result; drop dim and body",
        # An embedding's texts JSON is its payload and its float32 rows are its result, so the
        # rows keep their data. ``dim`` goes with the float32 rows' shape into the workload;
        # every row that had a pre-rendered ``body`` also has its vectors. A request that failed
        # validation had no texts ('[]', which validation refuses for a real one) and has no
        # payload now: JSON null, what the store writes for such a request from here on.
        """
        ALTER TABLE requests RENAME COLUMN texts TO payload;
        ALTER TABLE requests RENAME COLUMN encoding_format TO options;
        ALTER TABLE requests RENAME COLUMN vectors TO result;
        ALTER TABLE requests DROP COLUMN dim;
        ALTER TABLE requests DROP COLUMN body;
        UPDATE requests SET payload = 'null' WHERE payload = '[]' AND state = 'failed';
        """,
        """
        ALTER TABLE requests RENAME COLUMN texts TO payload;
        ALTER TABLE requests RENAME COLUMN encoding_format TO options;
        ALTER TABLE requests RENAME COLUMN vectors TO result;
        ALTER TABLE requests DROP COLUMN dim;
        ALTER TABLE requests DROP COLUMN body;
        UPDATE requests SET payload = 'null' WHERE payload = '[]' AND state = 'failed';
        """,
    ),
    Migration(
        7,
        "resumable requests: each keeps the progress its cars reported, for the next car",
        # Opaque bytes of the workload (an LLM generation's tokens so far), NULL until a car
        # reports some. Kept when a lease ends or a request goes back to the queue: that is
        # what the next car continues from. A request that finishes keeps it too; nothing
        # reads it then, and clearing it would add a column to every result commit.
        "ALTER TABLE requests ADD COLUMN progress BLOB;",
        "ALTER TABLE requests ADD COLUMN progress BYTEA;",
    ),
    Migration(
        8,
        "who may do what: API keys (hashed), car enrolments (nkeys), the principal that owns "
        "each file and batch",
        # A key is stored as the sha256 of its secret (keys are 256 random bits, so a plain
        # hash is as strong as a slow one and lets a replica look a key up by index). A file or
        # batch belongs to the principal of the key that made it; NULL for those made before
        # keys existed, which only an operator sees. A revoked car keeps its row, with the
        # time of revocation, until the operator enrols it again with a new key.
        """
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            secret_sha256 TEXT NOT NULL,
            role TEXT NOT NULL,
            principal TEXT NOT NULL,
            name TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL,
            requests_per_minute INTEGER,
            tokens_per_minute INTEGER,
            queued_requests INTEGER
        );
        CREATE TABLE enrolments (
            vehicle_id TEXT PRIMARY KEY,
            nkey TEXT NOT NULL,
            owner TEXT NOT NULL,
            enrolled_at REAL NOT NULL,
            revoked_at REAL,
            expires_at REAL
        );
        CREATE UNIQUE INDEX api_keys_secret ON api_keys(secret_sha256);
        CREATE UNIQUE INDEX enrolments_nkey ON enrolments(nkey);
        CREATE INDEX enrolments_owner ON enrolments(owner);
        ALTER TABLE files ADD COLUMN principal TEXT;
        ALTER TABLE batches ADD COLUMN principal TEXT;
        ALTER TABLE batches ADD COLUMN expected_requests INTEGER;
        CREATE INDEX batches_principal ON batches(principal, seq_no);
        """,
        """
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            secret_sha256 TEXT NOT NULL,
            role TEXT NOT NULL,
            principal TEXT NOT NULL,
            name TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION,
            requests_per_minute BIGINT,
            tokens_per_minute BIGINT,
            queued_requests BIGINT
        );
        CREATE TABLE enrolments (
            vehicle_id TEXT PRIMARY KEY,
            nkey TEXT NOT NULL,
            owner TEXT NOT NULL,
            enrolled_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION,
            expires_at DOUBLE PRECISION
        );
        CREATE UNIQUE INDEX api_keys_secret ON api_keys(secret_sha256);
        CREATE UNIQUE INDEX enrolments_nkey ON enrolments(nkey);
        CREATE INDEX enrolments_owner ON enrolments(owner);
        ALTER TABLE files ADD COLUMN principal TEXT;
        ALTER TABLE batches ADD COLUMN principal TEXT;
        ALTER TABLE batches ADD COLUMN expected_requests BIGINT;
        CREATE INDEX batches_principal ON batches(principal, seq_no);
        """,
    ),
    Migration(
        9,
        "verification: each car's trust record, and the verdicts on strict batches' results",
        # A trust row is written when a probe of the car's work is judged (a few percent of
        # its results), never on the hot path. ``verifications`` holds a verdict per result
        # (request and the car that made it) for batches that asked that nothing unverified
        # reach their output: the batch is finalised only when every done request has an
        # 'agree' for the car whose result it holds. ``coordinator_secrets``: what replicas
        # share and cars must not know (the key of the request numbers cars see).
        """
        CREATE TABLE vehicle_trust (
            vehicle_id TEXT PRIMARY KEY,
            streak INTEGER NOT NULL,
            agreed INTEGER NOT NULL,
            disagreed INTEGER NOT NULL,
            verified_through REAL NOT NULL,
            quarantined_at REAL,
            reason TEXT,
            updated_at REAL NOT NULL
        );
        CREATE INDEX vehicle_trust_quarantined ON vehicle_trust(quarantined_at);
        CREATE TABLE verifications (
            batch_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            vehicle_id TEXT NOT NULL,
            verdict TEXT NOT NULL,
            verifier_id TEXT,
            at REAL NOT NULL,
            PRIMARY KEY (batch_id, seq, vehicle_id)
        );
        CREATE TABLE coordinator_secrets (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
        """
        CREATE TABLE vehicle_trust (
            vehicle_id TEXT PRIMARY KEY,
            streak BIGINT NOT NULL,
            agreed BIGINT NOT NULL,
            disagreed BIGINT NOT NULL,
            verified_through DOUBLE PRECISION NOT NULL,
            quarantined_at DOUBLE PRECISION,
            reason TEXT,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX vehicle_trust_quarantined ON vehicle_trust(quarantined_at);
        CREATE TABLE verifications (
            batch_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            vehicle_id TEXT NOT NULL,
            verdict TEXT NOT NULL,
            verifier_id TEXT,
            at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (batch_id, seq, vehicle_id)
        );
        CREATE TABLE coordinator_secrets (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
    Migration(
        10,
        "ledger: double-entry, append-only entries and their postings, in micro-units",
        # Written when a batch is finalised (an entry per car that worked on it), when an
        # online request finishes, and when verification releases or reverses a car's
        # charges: never on the lease/commit path. ``settles`` is unique: a charge is settled
        # (released or reversed) once.
        """
        CREATE TABLE ledger_entries (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            at REAL NOT NULL,
            principal TEXT NOT NULL,
            vehicle_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            model TEXT NOT NULL,
            requests INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            energy_j REAL NOT NULL,
            electricity INTEGER NOT NULL,
            work_at REAL NOT NULL,
            batch_id TEXT,
            settles TEXT
        );
        CREATE UNIQUE INDEX ledger_entries_settles ON ledger_entries(settles);
        CREATE INDEX ledger_entries_vehicle ON ledger_entries(vehicle_id, kind, work_at);
        CREATE INDEX ledger_entries_owner ON ledger_entries(owner, at);
        CREATE INDEX ledger_entries_principal ON ledger_entries(principal, at);
        CREATE INDEX ledger_entries_batch ON ledger_entries(batch_id);
        CREATE TABLE ledger_postings (
            entry_id TEXT NOT NULL,
            account TEXT NOT NULL,
            amount INTEGER NOT NULL,
            PRIMARY KEY (entry_id, account)
        );
        CREATE INDEX ledger_postings_account ON ledger_postings(account);
        """,
        """
        CREATE TABLE ledger_entries (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            principal TEXT NOT NULL,
            vehicle_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            model TEXT NOT NULL,
            requests BIGINT NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            energy_j DOUBLE PRECISION NOT NULL,
            electricity BIGINT NOT NULL,
            work_at DOUBLE PRECISION NOT NULL,
            batch_id TEXT,
            settles TEXT
        );
        CREATE UNIQUE INDEX ledger_entries_settles ON ledger_entries(settles);
        CREATE INDEX ledger_entries_vehicle ON ledger_entries(vehicle_id, kind, work_at);
        CREATE INDEX ledger_entries_owner ON ledger_entries(owner, at);
        CREATE INDEX ledger_entries_principal ON ledger_entries(principal, at);
        CREATE INDEX ledger_entries_batch ON ledger_entries(batch_id);
        CREATE TABLE ledger_postings (
            entry_id TEXT NOT NULL,
            account TEXT NOT NULL,
            amount BIGINT NOT NULL,
            PRIMARY KEY (entry_id, account)
        );
        CREATE INDEX ledger_postings_account ON ledger_postings(account);
        """,
    ),
    Migration(
        11,
        "the API key a batch was made with, and the key each ledger entry is charged to",
        # Usage per API key (a customer's keys share one principal): NULL for batches and
        # entries made before keys were recorded.
        """
        ALTER TABLE batches ADD COLUMN api_key_id TEXT;
        ALTER TABLE ledger_entries ADD COLUMN api_key_id TEXT;
        """,
        """
        ALTER TABLE batches ADD COLUMN api_key_id TEXT;
        ALTER TABLE ledger_entries ADD COLUMN api_key_id TEXT;
        """,
    ),
    Migration(
        12,
        "when a finished batch's request rows were deleted (store/retention_sql.py)",
        # NULL until pruned; the partial index keeps each sweep's look-up to finished batches
        # not yet pruned, however many batches the store has served.
        """
        ALTER TABLE batches ADD COLUMN requests_pruned_at REAL;
        CREATE INDEX batches_unpruned ON batches(seq_no) WHERE requests_pruned_at IS NULL;
        """,
        """
        ALTER TABLE batches ADD COLUMN requests_pruned_at DOUBLE PRECISION;
        CREATE INDEX batches_unpruned ON batches(seq_no) WHERE requests_pruned_at IS NULL;
        """,
    ),
)
