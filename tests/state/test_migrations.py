from __future__ import annotations

import threading

import psycopg
import pytest

from bridge.state import migrate


def test_from_empty_then_rerun_is_a_no_op(fresh_database_url: str) -> None:
    with psycopg.connect(fresh_database_url) as conn:
        before = migrate.status(conn)
        assert before.applied == [] and [m.version for m in before.pending] == [1, 2]
        applied = migrate.migrate(conn)
        assert [m.version for m in applied] == [m.version for m in migrate.discover()]
        assert migrate.migrate(conn) == []
        after = migrate.status(conn)
        assert after.pending == [] and after.version == max(m.version for m in migrate.discover())
        assert after.modified == []
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"personas", "dids", "calls", "call_events", "schema_migrations"} <= tables


def test_two_concurrent_migrators_apply_each_migration_once(fresh_database_url: str) -> None:
    results: list[list[migrate.Migration]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate.migrate_url(fresh_database_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(len(r) for r in results) == [0, 0, len(migrate.discover())]


def test_failed_migration_leaves_nothing_applied(fresh_database_url: str) -> None:
    broken = [
        *migrate.discover(),
        migrate.Migration(9999, "broken", "CREATE TABLE half_done (x int); SELECT * FROM no_such_table;"),
    ]
    with psycopg.connect(fresh_database_url) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            migrate.migrate(conn, broken)
        st = migrate.status(conn, broken)
        assert [m.version for m in st.pending] == [9999]
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)


def test_changed_migration_file_is_reported(fresh_database_url: str) -> None:
    with psycopg.connect(fresh_database_url) as conn:
        migrate.migrate(conn)
        edited = [migrate.Migration(m.version, m.name, m.sql + "\n-- edited") for m in migrate.discover()]
        assert migrate.status(conn, edited).modified == [m.version for m in migrate.discover()]


def test_database_constraints_back_up_the_python_checks(migrated_fresh_database_url: str) -> None:
    with psycopg.connect(migrated_fresh_database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO personas (name, language, is_default) VALUES ('a', 'en', true)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO personas (name, language, is_default) VALUES ('b', 'en', true)")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO personas (name, language) VALUES ('c', 'fr')")
        pid = conn.execute("SELECT id FROM personas WHERE name = 'a'").fetchone()
        assert pid is not None
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO dids (number, persona_id) VALUES ('5550001234', %s)", (pid[0],))
        conn.execute("INSERT INTO dids (number, persona_id) VALUES ('+15550001234', %s)", (pid[0],))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("DELETE FROM personas WHERE name = 'a'")
