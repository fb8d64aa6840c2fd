"""The engine honours the client's frame numbers: output n answers input n, and every input number that
gets no output (or a silence-fed one) is reported as a gap. Sans-IO on virtual time, then over the wire."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest

from engine.backend import StepOutput
from engine.config import EngineSettings
from engine.echo import EchoBackend
from engine.protocol import (
    FRAME_SAMPLES,
    SEQ_MOD,
    Gap,
    Open,
    decode_audio,
    decode_engine_control,
    encode_audio,
    encode_control,
    seq_after,
)
from engine.scheduler import BatchPlanner, SlotLease
from engine.server import run_engine


def frame(value: float) -> np.ndarray:
    return np.full(FRAME_SAMPLES, value, dtype=np.float32)


def step_all(planner: BatchPlanner, now: float) -> list[tuple[int, float, bool]]:
    """Take and complete batches until nothing is queued: (seq, the frame's value, filled) per output."""
    out = []
    while (batch := planner.take_batch(now)) is not None:
        outputs = {s: StepOutput(pcm=f) for s, f in batch.frames.items()}
        for d in planner.complete(batch, outputs).deliveries:
            out.append((d.seq, float(d.output.pcm[0]), d.filled))
    return out


def planner_with(lease: SlotLease, **kw: int) -> BatchPlanner:
    planner = BatchPlanner(2, window_s=0.0, **kw)
    planner.attach(lease)
    return planner


def test_output_n_answers_input_n_across_missing_frames() -> None:
    lease = SlotLease(0, 1)
    planner = planner_with(lease)
    got: list[tuple[int, float, bool]] = []
    gaps: list[Gap] = []
    for seq in (100, 101, 104, 105, 109):  # 102-103 and 106-108 never arrive
        gaps += planner.push(lease, frame(seq / 1000), now=seq * 0.08, seq=seq).gaps
        got += step_all(planner, seq * 0.08)
    assert [(s, round(v * 1000)) for s, v, _ in got] == [(s, s) for s in (100, 101, 104, 105, 109)]
    assert gaps == [Gap(102, 2, "missing", 0), Gap(106, 3, "missing", 0)]


def test_short_gaps_are_filled_with_silence_when_configured() -> None:
    lease = SlotLease(0, 1)
    planner = planner_with(lease, max_gap_fill=2, max_queue_frames=8)
    gaps: list[Gap] = []
    for seq in (0, 3, 7):  # 1-2 filled (2 <= 2), 4-6 not (3 > 2)
        gaps += planner.push(lease, frame(0.5), now=0.0, seq=seq).gaps
    got = step_all(planner, 0.0)
    assert [(s, filled) for s, _, filled in got] == [(0, False), (1, True), (2, True), (3, False), (7, False)]
    assert all(v == 0.0 for s, v, filled in got if filled)  # the model hears silence for them
    assert gaps == [Gap(1, 2, "missing", 2), Gap(4, 3, "missing", 0)]


def test_late_and_duplicate_frames_are_dropped_and_reported() -> None:
    lease = SlotLease(0, 1)
    planner = planner_with(lease)
    planner.push(lease, frame(0.1), now=0.0, seq=10)
    assert planner.push(lease, frame(0.2), now=0.0, seq=10).gaps == (Gap(10, 1, "late"),)
    assert planner.push(lease, frame(0.2), now=0.0, seq=9).gaps == (Gap(9, 1, "late"),)
    assert [s for s, _, _ in step_all(planner, 0.0)] == [10]


def test_overflow_drops_are_named_and_outputs_keep_their_numbers() -> None:
    lease = SlotLease(0, 1)
    planner = planner_with(lease, max_queue_frames=3)
    gaps: list[Gap] = []
    for seq in range(7):  # never stepped: 7 queued into 3
        gaps += planner.push(lease, frame(seq / 10), now=0.0, seq=seq).gaps
    assert gaps == [Gap(0, 1, "overflow"), Gap(1, 1, "overflow"), Gap(2, 1, "overflow"),
                    Gap(3, 1, "overflow")]
    assert [s for s, _, _ in step_all(planner, 0.0)] == [4, 5, 6]


def test_numbering_wraps_at_32_bits() -> None:
    lease = SlotLease(0, 1)
    planner = planner_with(lease)
    top = SEQ_MOD - 2
    gaps = []
    for seq in (top, top + 1, 1):  # SEQ_MOD - 2, SEQ_MOD - 1, (skip 0), 1
        gaps += planner.push(lease, frame(0.1), now=0.0, seq=seq % SEQ_MOD).gaps
    assert [s for s, _, _ in step_all(planner, 0.0)] == [top, top + 1, 1]
    assert gaps == [Gap(0, 1, "missing", 0)]
    assert seq_after(0, SEQ_MOD - 1) == 1 and seq_after(SEQ_MOD - 1, 0) == -1


def test_a_hold_re_anchors_the_numbering_without_a_gap() -> None:
    lease = SlotLease(0, 1)
    planner = planner_with(lease)
    planner.push(lease, frame(0.1), now=0.0, seq=5)
    step_all(planner, 0.0)
    planner.set_paused(lease, True)
    planner.set_paused(lease, False)
    assert planner.push(lease, frame(0.1), now=1.0, seq=50).gaps == ()  # a hold is not a loss
    assert [s for s, _, _ in step_all(planner, 1.0)] == [50]


@pytest.mark.parametrize("drop", [{3}, {3, 4, 5}, {0}, {9}])
async def test_over_the_wire_outputs_answer_their_inputs_with_drops(drop: set[int]) -> None:
    """Frames 0..9, the ones in ``drop`` never sent: every audio frame that comes back carries the number
    of the input it echoes (bit-exact) and the missing numbers are announced as gaps."""
    settings = EngineSettings(port=0, num_slots=1, batch_window_ms=0)
    async with run_engine(settings, backend=EchoBackend(1)) as url, \
            aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(encode_control(Open()))
        assert decode_engine_control((await ws.receive()).data).type == "ready"
        sent: dict[int, np.ndarray] = {}
        outputs: dict[int, np.ndarray] = {}
        gaps: list[Gap] = []
        for seq in range(10):
            if seq in drop:
                continue
            rng = np.random.default_rng(seq)
            sent[seq] = rng.integers(-20000, 20000, FRAME_SAMPLES).astype(np.int16)
            await ws.send_bytes(encode_audio(seq, sent[seq]))
            while seq not in outputs:  # one frame in flight: the engine never falls behind here
                msg = await ws.receive(timeout=5)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    audio = decode_audio(msg.data)
                    outputs[audio.seq] = audio.pcm
                else:
                    reply = decode_engine_control(msg.data)
                    assert isinstance(reply, Gap), reply
                    gaps.append(reply)
        assert sorted(outputs) == sorted(sent)
        for seq, pcm in outputs.items():
            np.testing.assert_array_equal(pcm, sent[seq])
        missing = sorted(g.first_seq + k for g in gaps for k in range(g.count))
        first = min(sent)
        assert missing == sorted(s for s in drop if s > first and s < max(sent))
        assert all(g.reason == "missing" for g in gaps)
