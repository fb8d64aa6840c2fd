"""Fixtures every area shares: a real PostgreSQL database and a real Redis, never mocks.

Each pytest session gets its own fresh database (created from AZIZA_TEST_PG_ADMIN_URL, dropped at the
end) and each test its own Redis key prefix, so runs never see each other's data.
Area fixtures live in tests/<area>/fixtures.py and are imported by the tests that need them.
"""

from __future__ import annotations

import os
import uuid

# One torch/OpenMP thread per test process: OpenMP's spinning workers collapse on a busy 2-core machine
# (a persona test measured 63 s with 2 threads beside another process, 5 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg import sql

PG_ADMIN_URL = os.environ.get("AZIZA_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("AZIZA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _with_dbname(url: str, dbname: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{dbname}"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this pytest session."""
    name = f"aziza_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_dbname(PG_ADMIN_URL, name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def fresh_database_url() -> Iterator[str]:
    """A fresh, empty database for one test (migrations from empty, etc.)."""
    name = f"aziza_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_dbname(PG_ADMIN_URL, name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A unique key prefix for one test; its keys are deleted afterwards."""
    prefix = f"aziza-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
