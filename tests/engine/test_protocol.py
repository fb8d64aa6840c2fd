"""engine/protocol.py: every message round-trips; garbage raises ProtocolError with the right code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.protocol import (
    AUDIO_FRAME_BYTES,
    AUDIO_KIND,
    ERROR_CODES,
    FRAME_SAMPLES,
    Close,
    Closed,
    Error,
    Event,
    Lag,
    Open,
    Pause,
    PersonaParams,
    ProtocolError,
    Ready,
    Resume,
    Text,
    decode_audio,
    decode_client_control,
    decode_engine_control,
    encode_audio,
    encode_control,
    float_to_int16,
    int16_to_float,
)

CLIENT_MESSAGES = [
    Open(PersonaParams(name="ru-support", language="ru", text_prompt="Be kind"), call_id="c-1"),
    Open(),
    Event("dtmf", "5"),
    Pause(),
    Resume(),
    Close(),
]
ENGINE_MESSAGES = [Ready("s1", 3, 7), Text(12, "hello"), Error("full", "no slot"), Lag(4), Closed("shutdown")]


@pytest.mark.parametrize("msg", CLIENT_MESSAGES, ids=lambda m: m.type)
def test_client_messages_round_trip(msg: object) -> None:
    assert decode_client_control(encode_control(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize("msg", ENGINE_MESSAGES, ids=lambda m: m.type)
def test_engine_messages_round_trip(msg: object) -> None:
    assert decode_engine_control(encode_control(msg)) == msg  # type: ignore[arg-type]


def test_engine_types_are_not_client_types() -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_client_control(encode_control(Ready("s", 0, 1)))
    assert exc.value.code == "bad_message"


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        '"open"',
        "{}",
        '{"type": "nope"}',
        '{"type": 5}',
        '{"type": "open", "persona": "x"}',
        '{"type": "open", "persona": {"name": "a", "bogus": 1}}',
        '{"type": "open", "call_id": 5}',
        '{"type": "event"}',
        '{"type": "event", "name": 3}',
        '{"type": "close", "extra": true}',
        b"\xff\xfe\x00garbage",
    ],
)
def test_garbage_control_is_bad_message(raw: str | bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_client_control(raw)
    assert exc.value.code == "bad_message"
    assert exc.value.code in ERROR_CODES


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
@settings(max_examples=300, deadline=None)
def test_arbitrary_input_never_escapes_protocol_error(raw: str | bytes) -> None:
    for decode in (decode_client_control, decode_engine_control):
        try:
            decode(raw)
        except ProtocolError as exc:
            assert exc.code == "bad_message"


@given(st.dictionaries(st.sampled_from(["type", "name", "value", "seq", "text", "persona", "call_id"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=5), st.booleans(),
                                 st.sampled_from(["open", "event", "text", "close"]))))
@settings(max_examples=300, deadline=None)
def test_arbitrary_json_objects_decode_or_raise_cleanly(obj: dict[str, object]) -> None:
    for decode in (decode_client_control, decode_engine_control):
        try:
            decode(json.dumps(obj))
        except ProtocolError as exc:
            assert exc.code == "bad_message"


def test_audio_round_trip_is_bit_exact() -> None:
    pcm = np.random.default_rng(1).integers(-32768, 32768, FRAME_SAMPLES).astype(np.int16)
    data = encode_audio(41, pcm)
    assert len(data) == AUDIO_FRAME_BYTES
    frame = decode_audio(data)
    assert frame.seq == 41
    np.testing.assert_array_equal(frame.pcm, pcm)


def test_float_conversion_round_trips_int16_exactly() -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    np.testing.assert_array_equal(float_to_int16(int16_to_float(pcm)), pcm)
    assert float_to_int16(np.array([1.5, -1.5]))[0] == 32767  # clipped, not wrapped
    assert float_to_int16(np.array([1.5, -1.5]))[1] == -32768


def test_sequence_number_wraps_at_32_bits() -> None:
    frame = decode_audio(encode_audio(2**32 + 5, np.zeros(FRAME_SAMPLES, np.int16)))
    assert frame.seq == 5


@pytest.mark.parametrize(
    "size", [0, 1, 5, AUDIO_FRAME_BYTES - 1, AUDIO_FRAME_BYTES + 1, 2 * AUDIO_FRAME_BYTES]
)
def test_wrong_size_frame_is_bad_frame(size: int) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_audio(bytes([AUDIO_KIND]) + bytes(max(0, size - 1)))
    assert exc.value.code == "bad_frame"


def test_wrong_kind_frame_is_bad_frame() -> None:
    data = bytearray(encode_audio(0, np.zeros(FRAME_SAMPLES, np.int16)))
    data[0] = 0x7F
    with pytest.raises(ProtocolError) as exc:
        decode_audio(bytes(data))
    assert exc.value.code == "bad_frame"


def test_encode_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError):
        encode_audio(0, np.zeros(FRAME_SAMPLES - 1, np.int16))


# --- limits and types, checked before the parser recurses (issue: engine protocol hardening) ---------------

from engine.protocol import MAX_CONTROL_BYTES, MAX_JSON_DEPTH, Gap, clip_for_log  # noqa: E402


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 50, 100_000])
def test_deep_json_is_refused_before_parsing(depth: int) -> None:
    raw = '{"type": "open", "persona": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(ProtocolError) as exc:
        decode_client_control(raw[:MAX_CONTROL_BYTES])
    assert exc.value.code == "bad_message"


def test_oversized_control_message_is_refused() -> None:
    huge = json.dumps({"type": "open", "persona": {"text_prompt": "x" * MAX_CONTROL_BYTES}})
    with pytest.raises(ProtocolError, match="limit"):
        decode_client_control(huge)


@pytest.mark.parametrize(
    "persona, field",
    [
        ({"name": 5}, "persona.name"),
        ({"language": ""}, "persona.language"),
        ({"text_prompt": ["a"]}, "persona.text_prompt"),
        ({"voice_prompt_id": "../../etc/passwd"}, "persona.voice_prompt_id"),
        ({"voice_prompt_id": "/abs/voice.wav"}, "persona.voice_prompt_id"),
        ({"adapter_id": "a/b"}, "persona.adapter_id"),
        ({"adapter_id": ".hidden"}, "persona.adapter_id"),
        ({"temp": True}, "persona.temp"),
        ({"temp": float("nan")}, "persona.temp"),
        ({"top_k": 0}, "persona.top_k"),
        ({"top_k_text": 2.5}, "persona.top_k_text"),
        ({"voice_prompt_path": "/etc/passwd"}, "unknown field"),
        ({"lora_path": "/x"}, "unknown field"),
    ],
)
def test_persona_fields_are_typed_and_never_paths(persona: dict[str, object], field: str) -> None:
    raw = json.dumps({"type": "open", "persona": persona}, allow_nan=True)
    with pytest.raises(ProtocolError) as exc:
        decode_client_control(raw)
    assert exc.value.code == "bad_message" and field in exc.value.message


def test_seed_and_gap_round_trip_and_are_checked() -> None:
    assert decode_client_control(encode_control(Open(seed=2**62))) == Open(seed=2**62)
    for bad in (-1, 2**63, "7", True):
        with pytest.raises(ProtocolError, match="seed"):
            decode_client_control(json.dumps({"type": "open", "seed": bad}))
    gap = Gap(first_seq=7, count=2, reason="missing", filled=1)
    assert decode_engine_control(encode_control(gap)) == gap
    with pytest.raises(ProtocolError, match="reason"):
        decode_engine_control(json.dumps({"type": "gap", "first_seq": 1, "count": 1, "reason": "why"}))


def test_client_strings_are_clipped_for_logs() -> None:
    clipped = clip_for_log("x" * 65536)
    assert len(clipped) < 120 and clipped.endswith("(65538 chars)")
    assert clip_for_log("short") == "'short'"
