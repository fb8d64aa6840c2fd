"""Versioned schema migrations: numbered SQL files in ``bridge/state/migrations/`` applied once each.

Each file runs in its own transaction together with its ``schema_migrations`` row, so a failed migration
leaves nothing half-done. A session advisory lock serialises concurrent migrators (two installers, or a
bridge and the CLI): the second one waits, then finds nothing pending.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import tuple_row

# Arbitrary, fixed: "aziza" in ASCII. Every migrator takes the same lock.
ADVISORY_LOCK_KEY = 0x617A697A61
_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclass(frozen=True)
class MigrationStatus:
    applied: list[AppliedMigration]
    pending: list[Migration]
    # Applied migrations whose file changed since (or vanished): worth a warning, never re-run.
    modified: list[int]

    @property
    def version(self) -> int:
        return max((m.version for m in self.applied), default=0)


def discover() -> list[Migration]:
    """The migrations shipped with this package, in order."""
    found = []
    for entry in resources.files("bridge.state").joinpath("migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


def _applied(conn: psycopg.Connection[Any]) -> list[AppliedMigration]:
    cur = conn.cursor(row_factory=tuple_row)  # whatever row factory the caller's connection uses
    exists = cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    rows = cur.execute(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    ).fetchall()
    return [AppliedMigration(*row) for row in rows]


def status(conn: psycopg.Connection[Any], migrations: list[Migration] | None = None) -> MigrationStatus:
    migrations = discover() if migrations is None else migrations
    applied = _applied(conn)
    if not conn.autocommit:
        conn.rollback()  # leave no transaction open on the caller's connection
    done = {m.version: m for m in applied}
    by_version = {m.version: m for m in migrations}
    modified = [v for v, a in done.items() if v not in by_version or by_version[v].checksum != a.checksum]
    pending = [m for m in migrations if m.version not in done]
    return MigrationStatus(applied, pending, sorted(modified))


def migrate(conn: psycopg.Connection[Any], migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply every pending migration; returns those applied now (empty when up to date)."""
    migrations = discover() if migrations is None else migrations
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
    try:
        conn.execute(_CREATE_TABLE)
        done = {a.version for a in _applied(conn)}
        applied_now = []
        for migration in migrations:
            if migration.version in done:
                continue
            with conn.transaction():
                conn.execute(migration.sql.encode())  # bytes: run as a script, several statements
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            applied_now.append(migration)
        return applied_now
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


def migrate_url(database_url: str) -> list[Migration]:
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        return migrate(conn)
