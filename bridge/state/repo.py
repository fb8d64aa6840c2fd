"""Personas, DIDs and call records in PostgreSQL: the synchronous side (aziza-admin, tests).

Every function takes an open ``psycopg.Connection`` and commits its own change; rule violations raise
``InvalidInput`` / ``NotFound`` / ``Conflict`` with a message for the operator. The bridge's async reads
live in ``bridge.state.db`` and share the row shapes defined here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bridge.state.models import (
    DEFAULT_DTMF_ACTIONS,
    CallEventRecord,
    CallRecord,
    Conflict,
    Did,
    InvalidInput,
    NotFound,
    Persona,
    check_language,
    check_persona_name,
    check_sampling,
    check_transfer_target,
    normalize_e164,
)

PERSONA_COLUMNS = (
    "p.id, p.name, p.language, p.text_prompt, p.voice_prompt_path, p.lora_adapter, p.is_default, "
    "p.created_at, p.updated_at, p.sampling"
)
DID_SELECT = (
    "SELECT d.number, p.name AS persona, d.enabled, d.transfer_target, d.dtmf_actions, "
    "d.created_at, d.updated_at FROM dids d JOIN personas p ON p.id = d.persona_id"
)
_UNSET: Any = object()


def persona_from_row(row: dict[str, Any]) -> Persona:
    return Persona(**{k: row[k] for k in Persona.__dataclass_fields__})


def did_from_row(row: dict[str, Any]) -> Did:
    return Did(**{k: row[k] for k in Did.__dataclass_fields__})


def connect(database_url: str) -> psycopg.Connection[dict[str, Any]]:
    # autocommit: reads hold no transaction open; every change runs in its own `conn.transaction()`.
    return psycopg.connect(database_url, connect_timeout=10, row_factory=dict_row, autocommit=True)


# --- personas ------------------------------------------------------------------------------------------


def create_persona(
    conn: psycopg.Connection[dict[str, Any]],
    name: str,
    language: str,
    text_prompt: str = "",
    voice_prompt_path: str | None = None,
    lora_adapter: str | None = None,
    make_default: bool = False,
    sampling: dict[str, Any] | None = None,
) -> Persona:
    check_persona_name(name)
    check_language(language)
    sampling = check_sampling(sampling or {})
    with conn.transaction():
        has_default = conn.execute("SELECT 1 FROM personas WHERE is_default").fetchone() is not None
        # The first persona becomes the default so an appliance always has one to fall back on.
        is_default = make_default or not has_default
        if is_default and has_default:
            conn.execute("UPDATE personas SET is_default = false, updated_at = now() WHERE is_default")
        try:
            conn.execute(
                "INSERT INTO personas (name, language, text_prompt, voice_prompt_path, lora_adapter, "
                "is_default, sampling) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (name, language, text_prompt, voice_prompt_path, lora_adapter, is_default, Jsonb(sampling)),
            )
        except errors.UniqueViolation as exc:
            if exc.diag.constraint_name == "personas_one_default":
                raise Conflict("another persona became the default at the same moment: try again") from None
            raise Conflict(f"persona {name!r} already exists") from None
    return get_persona(conn, name)


def get_persona(conn: psycopg.Connection[dict[str, Any]], name: str) -> Persona:
    row = conn.execute(f"SELECT {PERSONA_COLUMNS} FROM personas p WHERE p.name = %s", (name,)).fetchone()
    conn.commit()
    if row is None:
        raise NotFound(f"persona {name!r} does not exist")
    return persona_from_row(row)


def list_personas(conn: psycopg.Connection[dict[str, Any]]) -> list[Persona]:
    rows = conn.execute(f"SELECT {PERSONA_COLUMNS} FROM personas p ORDER BY p.name").fetchall()
    conn.commit()
    return [persona_from_row(r) for r in rows]


def update_persona(
    conn: psycopg.Connection[dict[str, Any]],
    name: str,
    *,
    language: str | None = None,
    text_prompt: str | None = None,
    voice_prompt_path: str | None = _UNSET,
    lora_adapter: str | None = _UNSET,
    sampling: dict[str, Any] | None = None,
) -> Persona:
    """``sampling`` is merged into the persona's (a None value removes that override)."""
    changes: dict[str, Any] = {}
    if language is not None:
        changes["language"] = check_language(language)
    if text_prompt is not None:
        changes["text_prompt"] = text_prompt
    if voice_prompt_path is not _UNSET:
        changes["voice_prompt_path"] = voice_prompt_path
    if lora_adapter is not _UNSET:
        changes["lora_adapter"] = lora_adapter
    if sampling:
        merged = {**get_persona(conn, name).sampling, **sampling}
        changes["sampling"] = Jsonb(check_sampling({k: v for k, v in merged.items() if v is not None}))
    if not changes:
        raise InvalidInput("nothing to update: give at least one option")
    assignments = ", ".join(f"{column} = %({column})s" for column in changes)  # names from the code above
    with conn.transaction():
        cur = conn.execute(
            f"UPDATE personas SET {assignments}, updated_at = now() WHERE name = %(name)s",
            {**changes, "name": name},
        )
        if cur.rowcount == 0:
            raise NotFound(f"persona {name!r} does not exist")
    return get_persona(conn, name)


def set_default_persona(conn: psycopg.Connection[dict[str, Any]], name: str) -> Persona:
    with conn.transaction():
        if conn.execute("SELECT 1 FROM personas WHERE name = %s FOR UPDATE", (name,)).fetchone() is None:
            raise NotFound(f"persona {name!r} does not exist")
        conn.execute("UPDATE personas SET is_default = false, updated_at = now() WHERE is_default")
        conn.execute("UPDATE personas SET is_default = true, updated_at = now() WHERE name = %s", (name,))
    return get_persona(conn, name)


def delete_persona(conn: psycopg.Connection[dict[str, Any]], name: str) -> None:
    with conn.transaction():
        row = conn.execute(
            "SELECT id, is_default FROM personas WHERE name = %s FOR UPDATE", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"persona {name!r} does not exist")
        users = conn.execute(
            "SELECT number FROM dids WHERE persona_id = %s ORDER BY number", (row["id"],)
        ).fetchall()
        if users:
            numbers = ", ".join(u["number"] for u in users)
            raise Conflict(f"persona {name!r} is used by DIDs {numbers}: move or remove them first")
        others = conn.execute("SELECT count(*) AS n FROM personas WHERE name <> %s", (name,)).fetchone()
        if row["is_default"] and others and others["n"] > 0:
            raise Conflict(f"persona {name!r} is the default: make another persona the default first")
        conn.execute("DELETE FROM personas WHERE id = %s", (row["id"],))


def default_persona(conn: psycopg.Connection[dict[str, Any]]) -> Persona | None:
    row = conn.execute(f"SELECT {PERSONA_COLUMNS} FROM personas p WHERE p.is_default").fetchone()
    conn.commit()
    return persona_from_row(row) if row else None


# --- DIDs ------------------------------------------------------------------------------------------------


def _persona_id(conn: psycopg.Connection[dict[str, Any]], name: str) -> int:
    row = conn.execute("SELECT id FROM personas WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise NotFound(f"persona {name!r} does not exist")
    return int(row["id"])


def add_did(
    conn: psycopg.Connection[dict[str, Any]],
    number: str,
    persona: str,
    *,
    enabled: bool = True,
    transfer_target: str | None = None,
    dtmf_actions: dict[str, str] | None = None,
) -> Did:
    number = normalize_e164(number)
    if transfer_target is not None:
        check_transfer_target(transfer_target)
    actions = DEFAULT_DTMF_ACTIONS if dtmf_actions is None else dtmf_actions
    with conn.transaction():
        persona_id = _persona_id(conn, persona)
        try:
            conn.execute(
                "INSERT INTO dids (number, persona_id, enabled, transfer_target, dtmf_actions) "
                "VALUES (%s, %s, %s, %s, %s)",
                (number, persona_id, enabled, transfer_target, Jsonb(actions)),
            )
        except errors.UniqueViolation:
            raise Conflict(f"DID {number} already exists") from None
    return get_did(conn, number)


def get_did(conn: psycopg.Connection[dict[str, Any]], number: str) -> Did:
    number = normalize_e164(number)
    row = conn.execute(f"{DID_SELECT} WHERE d.number = %s", (number,)).fetchone()
    conn.commit()
    if row is None:
        raise NotFound(f"DID {number} does not exist")
    return did_from_row(row)


def list_dids(conn: psycopg.Connection[dict[str, Any]], *, enabled_only: bool = False) -> list[Did]:
    where = " WHERE d.enabled" if enabled_only else ""
    rows = conn.execute(f"{DID_SELECT}{where} ORDER BY d.number").fetchall()
    conn.commit()
    return [did_from_row(r) for r in rows]


def update_did(
    conn: psycopg.Connection[dict[str, Any]],
    number: str,
    *,
    persona: str | None = None,
    enabled: bool | None = None,
    transfer_target: str | None = _UNSET,
    dtmf_actions: dict[str, str] | None = None,
) -> Did:
    number = normalize_e164(number)
    changes: dict[str, Any] = {}
    with conn.transaction():
        if persona is not None:
            changes["persona_id"] = _persona_id(conn, persona)
        if enabled is not None:
            changes["enabled"] = enabled
        if transfer_target is not _UNSET:
            changes["transfer_target"] = (
                None if transfer_target is None else check_transfer_target(transfer_target)
            )
        if dtmf_actions is not None:
            changes["dtmf_actions"] = Jsonb(dtmf_actions)
        if not changes:
            raise InvalidInput("nothing to update: give at least one option")
        assignments = ", ".join(f"{column} = %({column})s" for column in changes)
        cur = conn.execute(
            f"UPDATE dids SET {assignments}, updated_at = now() WHERE number = %(number)s",
            {**changes, "number": number},
        )
        if cur.rowcount == 0:
            raise NotFound(f"DID {number} does not exist")
    return get_did(conn, number)


def remove_did(conn: psycopg.Connection[dict[str, Any]], number: str) -> None:
    number = normalize_e164(number)
    with conn.transaction():
        if conn.execute("DELETE FROM dids WHERE number = %s", (number,)).rowcount == 0:
            raise NotFound(f"DID {number} does not exist")


# --- call records ----------------------------------------------------------------------------------------

_CALL_COLUMNS = (
    "id, did, caller, persona, started_at, answered_at, ended_at, end_cause, refused, latency_summary, "
    "transcript, dtmf_digits, engine_url, engine_seed, warnings"
)


def list_calls(
    conn: psycopg.Connection[dict[str, Any]],
    *,
    limit: int = 50,
    did: str | None = None,
    since: datetime | None = None,
) -> list[CallRecord]:
    clauses: list[str] = []
    params: list[Any] = []
    if did is not None:
        clauses.append("did = %s")
        params.append(normalize_e164(did))
    if since is not None:
        clauses.append("started_at >= %s")
        params.append(since)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT {_CALL_COLUMNS} FROM calls{where} ORDER BY started_at DESC LIMIT %s",
        (*params, limit),
    ).fetchall()
    conn.commit()
    return [CallRecord(**row) for row in rows]


def get_call(conn: psycopg.Connection[dict[str, Any]], call_id: str) -> CallRecord:
    row = conn.execute(f"SELECT {_CALL_COLUMNS} FROM calls WHERE id = %s", (call_id,)).fetchone()
    if row is None:
        conn.commit()
        raise NotFound(f"call {call_id!r} does not exist")
    events = conn.execute(
        "SELECT at, kind, data FROM call_events WHERE call_id = %s ORDER BY at, id", (call_id,)
    ).fetchall()
    conn.commit()
    return CallRecord(**row, events=[CallEventRecord(**e) for e in events])
