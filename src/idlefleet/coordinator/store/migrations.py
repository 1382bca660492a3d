"""Schema migrations for the SQL backends, applied in order and recorded in the database.

A migration is never edited once released: a schema change is a new entry at the end. The SQL
is kept to what SQLite and PostgreSQL both accept (BLOB/bytea aside, which a backend maps).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


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
    ),
)
