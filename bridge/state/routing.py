"""DID -> persona routing for the call controller, cached, and never failing a call over the database.

Order of answers: a fresh cache entry; the database; when the database cannot answer, the last answer
for that DID however old; else the built-in default persona. Unknown or disabled DIDs get the default
persona (``source="default"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psycopg

from bridge.call_deps import CallRoute
from bridge.state.db import StateDB
from bridge.state.models import DEFAULT_DTMF_ACTIONS, Persona
from engine.protocol import PersonaParams

log = logging.getLogger(__name__)

BUILTIN_PERSONA = PersonaParams()


def persona_params(persona: Persona) -> PersonaParams:
    """What the engine gets: asset ids (file names under the shared data_dir), never paths."""
    return PersonaParams(
        name=persona.name,
        language=persona.language,
        text_prompt=persona.text_prompt,
        voice_prompt_id=Path(persona.voice_prompt_path).name if persona.voice_prompt_path else None,
        adapter_id=persona.lora_adapter,
        temp=persona.sampling.get("temp"),
        top_k=persona.sampling.get("top_k"),
        temp_text=persona.sampling.get("temp_text"),
        top_k_text=persona.sampling.get("top_k_text"),
    )


class RouteResolver:
    def __init__(
        self, db: StateDB, cache_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._db = db
        self._ttl_s = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, CallRoute]] = {}

    async def resolve(self, did: str) -> CallRoute:
        cached = self._cache.get(did)
        if cached is not None and self._clock() - cached[0] < self._ttl_s:
            return replace(cached[1], source="cache")
        try:
            route = await self._from_db(did)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("route lookup for %s: database unavailable (%s)", did, exc)
            if cached is not None:
                return replace(cached[1], source="cache")
            return CallRoute(did, BUILTIN_PERSONA, None, dict(DEFAULT_DTMF_ACTIONS), "default")
        self._cache[did] = (self._clock(), route)
        return route

    def invalidate(self, did: str | None = None) -> None:
        if did is None:
            self._cache.clear()
        else:
            self._cache.pop(did, None)

    async def _from_db(self, did: str) -> CallRoute:
        found = await self._db.did_route(did)
        if found is not None and found.did.enabled:
            return CallRoute(
                did,
                persona_params(found.persona),
                found.did.transfer_target,
                dict(found.did.dtmf_actions),
                "db",
            )
        default = await self._db.default_persona()
        persona = persona_params(default) if default else BUILTIN_PERSONA
        return CallRoute(did, persona, None, dict(DEFAULT_DTMF_ACTIONS), "default")
