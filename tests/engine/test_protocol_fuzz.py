"""Slow fuzz of the engine protocol: 10^5 cases each (``AZIZA_TEST_FUZZ_CASES`` overrides), 0 uncaught
exceptions. Control messages: arbitrary JSON shaped like real ones (right types, wrong types, extra and
missing fields, deep nesting) and arbitrary text; audio frames: arbitrary bytes. Every input decodes or
raises ``ProtocolError``, nothing else."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.protocol import (
    ProtocolError,
    decode_audio,
    decode_client_control,
    decode_engine_control,
)

CASES = int(os.environ.get("AZIZA_TEST_FUZZ_CASES", "100000"))
FUZZ = settings(max_examples=CASES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
types = st.sampled_from(["open", "event", "pause", "resume", "close", "ready", "text", "gap", "error", "lag",
                         "closed", "", "OPEN"]) | st.text(max_size=8)
field_names = st.sampled_from(["persona", "call_id", "seed", "name", "value", "session_id", "slot",
                               "generation", "seq", "text", "code", "message", "reason", "first_seq",
                               "count", "filled", "warnings", "behind_frames", "sample_rate"])
persona_names = st.sampled_from(["name", "language", "text_prompt", "voice_prompt_id", "adapter_id", "temp",
                                 "top_k", "temp_text", "top_k_text", "voice_prompt_path", "x"])
personas = st.dictionaries(persona_names, values, max_size=6) | values


def _message(kind: str, body: dict[str, object], persona: object) -> dict[str, object]:
    return {"type": kind, **body, **({"persona": persona} if persona is not None else {})}


messages = st.builds(_message, types, st.dictionaries(field_names, values, max_size=5), st.none() | personas)


def _decode_all(raw: str | bytes) -> None:
    for decode in (decode_client_control, decode_engine_control):
        try:
            decode(raw)
        except ProtocolError:
            pass


@pytest.mark.slow
@FUZZ
@given(messages)
def test_fuzz_structured_control_messages(msg: dict[str, object]) -> None:
    _decode_all(json.dumps(msg, allow_nan=True))


@pytest.mark.slow
@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_fuzz_arbitrary_control_text(raw: str | bytes) -> None:
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            return  # a WebSocket text frame is valid UTF-8 by definition
    _decode_all(raw)


@pytest.mark.slow
@FUZZ
@given(st.binary(max_size=4000))
def test_fuzz_audio_frames(raw: bytes) -> None:
    try:
        decode_audio(raw)
    except ProtocolError:
        pass
