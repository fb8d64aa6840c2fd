"""The bridge's async reads of appliance state (a small psycopg_pool pool).

The pool is opened without waiting, so a bridge starts even while PostgreSQL is down; every read raises
``psycopg.Error`` (``PoolTimeout`` included) when the database cannot answer, and callers such as
``RouteResolver`` decide what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bridge.state.models import Did, Persona
from bridge.state.repo import DID_SELECT, PERSONA_COLUMNS, did_from_row, persona_from_row


@dataclass(frozen=True)
class DidWithPersona:
    did: Did
    persona: Persona


class StateDB:
    def __init__(
        self, database_url: str, *, min_size: int = 1, max_size: int = 4, timeout_s: float = 2.0
    ) -> None:
        self.timeout_s = timeout_s
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            database_url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            open=False,
            kwargs={"row_factory": dict_row, "autocommit": True, "connect_timeout": max(1, int(timeout_s))},
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> StateDB:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def did_route(self, number: str) -> DidWithPersona | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"{DID_SELECT} WHERE d.number = %s", (number,))
            did_row = await cur.fetchone()
            if did_row is None:
                return None
            cur = await conn.execute(
                f"SELECT {PERSONA_COLUMNS} FROM personas p "
                "JOIN dids d ON d.persona_id = p.id WHERE d.number = %s",
                (number,),
            )
            persona_row = await cur.fetchone()
        if persona_row is None:
            return None
        return DidWithPersona(did_from_row(did_row), persona_from_row(persona_row))

    async def persona_by_name(self, name: str) -> Persona | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"SELECT {PERSONA_COLUMNS} FROM personas p WHERE p.name = %s", (name,))
            row = await cur.fetchone()
        return persona_from_row(row) if row else None

    async def default_persona(self) -> Persona | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"SELECT {PERSONA_COLUMNS} FROM personas p WHERE p.is_default")
            row = await cur.fetchone()
        return persona_from_row(row) if row else None
