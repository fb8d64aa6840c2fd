"""Appliance state records (personas, DIDs, call records) and the input rules they obey.

Validation lives here, in plain functions, so the CLI, the bridge and the tests share one set of rules and
one wording of every error. The database enforces the same rules again (CHECK constraints) as a backstop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

LANGUAGES = ("en", "ru", "uz")
DEFAULT_DTMF_ACTIONS: dict[str, str] = {"0": "transfer", "#": "hangup"}
# What a DTMF digit can do; digits not in a DID's map go to the engine as events.
DTMF_ACTIONS = ("transfer", "hangup", "hold", "engine")
DTMF_DIGITS = "0123456789*#ABCD"

_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Dialplan target "exten", "context,exten" or "context,exten,priority".
_DIALPLAN_TARGET = re.compile(r"^[A-Za-z0-9_+*#.-]+(,[A-Za-z0-9_+*#.-]+){0,2}$")
_SIP_URI = re.compile(r"^sips?:[^\s;,]+$")


class StateError(Exception):
    """A request on appliance state that cannot be done; the message is one line for the operator."""


class InvalidInput(StateError):
    pass


class NotFound(StateError):
    pass


class Conflict(StateError):
    pass


def normalize_e164(number: str) -> str:
    """``+1 (555) 000-1234`` -> ``+15550001234``; anything that is not E.164 is a clear InvalidInput."""
    compact = re.sub(r"[\s().-]", "", number)
    if not _E164.match(compact):
        raise InvalidInput(
            f"{number!r} is not an E.164 number: expected '+' then 2 to 15 digits, the first not 0 "
            "(e.g. +15550001234)"
        )
    return compact


def check_persona_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            f"persona name {name!r} is invalid: 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def check_language(language: str) -> str:
    if language not in LANGUAGES:
        raise InvalidInput(f"language {language!r} is not supported: choose one of {', '.join(LANGUAGES)}")
    return language


def check_transfer_target(target: str) -> str:
    """A dialplan target (``[context,]exten[,priority]``) or a SIP URI (``sip:op@pbx.example``)."""
    if not (_DIALPLAN_TARGET.match(target) or _SIP_URI.match(target)):
        raise InvalidInput(
            f"transfer target {target!r} is neither a dialplan target ([context,]exten[,priority]) "
            "nor a SIP URI (sip:user@host)"
        )
    return target


def parse_dtmf_actions(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["0=transfer", "#=hangup"]`` -> ``{"0": "transfer", "#": "hangup"}``."""
    actions: dict[str, str] = {}
    for pair in pairs:
        digit, sep, action = pair.partition("=")
        digit, action = digit.strip().upper(), action.strip().lower()
        if not sep or len(digit) != 1 or digit not in DTMF_DIGITS:
            raise InvalidInput(f"DTMF mapping {pair!r} must be DIGIT=ACTION with DIGIT one of {DTMF_DIGITS}")
        if action not in DTMF_ACTIONS:
            raise InvalidInput(f"DTMF action {action!r} is unknown: choose one of {', '.join(DTMF_ACTIONS)}")
        actions[digit] = action
    return actions


SAMPLING_KEYS = {"temp": float, "top_k": int, "temp_text": float, "top_k_text": int}


def check_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """A persona's sampling overrides: temperatures in [0, 10] (0 = greedy), top-k in [1, 4096]."""
    out: dict[str, Any] = {}
    for key, value in sampling.items():
        kind = SAMPLING_KEYS.get(key)
        if kind is None:
            raise InvalidInput(f"sampling setting {key!r} is unknown: choose from {', '.join(SAMPLING_KEYS)}")
        if value is None:
            continue
        if kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
                raise InvalidInput(f"{key} = {value!r}: an integer from 1 to 4096 is required")
        elif not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 10:
            raise InvalidInput(f"{key} = {value!r}: a number from 0 (greedy) to 10 is required")
        out[key] = kind(value)
    return out


@dataclass(frozen=True)
class Persona:
    id: int
    name: str
    language: str
    text_prompt: str
    voice_prompt_path: str | None
    lora_adapter: str | None
    is_default: bool
    created_at: datetime
    updated_at: datetime
    sampling: dict[str, Any] = field(default_factory=dict)  # overrides of the engine's sampling

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "language": self.language,
            "text_prompt": self.text_prompt,
            "voice_prompt_path": self.voice_prompt_path,
            "lora_adapter": self.lora_adapter,
            "sampling": dict(self.sampling),
            "is_default": self.is_default,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class Did:
    number: str
    persona: str
    enabled: bool
    transfer_target: str | None
    dtmf_actions: dict[str, str]
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "persona": self.persona,
            "enabled": self.enabled,
            "transfer_target": self.transfer_target,
            "dtmf_actions": self.dtmf_actions,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class CallEventRecord:
    at: datetime
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class CallRecord:
    id: str
    did: str | None
    caller: str | None
    persona: str | None
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime | None
    end_cause: str | None
    refused: bool
    latency_summary: dict[str, Any] | None
    transcript: str | None
    dtmf_digits: str
    engine_url: str | None = None
    engine_seed: int | None = None  # the sampling seed: replays the call on the same engine and inputs
    warnings: list[str] = field(default_factory=list)
    events: list[CallEventRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id,
            "did": self.did,
            "caller": self.caller,
            "persona": self.persona,
            "started_at": iso(self.started_at),
            "answered_at": iso(self.answered_at),
            "ended_at": iso(self.ended_at),
            "end_cause": self.end_cause,
            "refused": self.refused,
            "latency_summary": self.latency_summary,
            "transcript": self.transcript,
            "dtmf_digits": self.dtmf_digits,
            "engine_url": self.engine_url,
            "engine_seed": self.engine_seed,
            "warnings": list(self.warnings),
            "events": [{"at": e.at.isoformat(), "kind": e.kind, "data": e.data} for e in self.events],
        }
