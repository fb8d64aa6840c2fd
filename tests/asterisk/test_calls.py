"""Calls from SIPp through a real Asterisk into the appliance: answer, echo, RTP, DTMF, '#', teardown.

Bounds here wait for a state (a hang fails, a slow machine does not); the numbers asserted are properties
of the streams (correlation, sequence numbers, timestamps, mean packet spacing), not latencies.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.asterisk import media
from tests.asterisk.appliance import DID_MAIN, Appliance
from tests.asterisk.conftest import ECHO_FOUND, LEAD_S, Caller, Voices, new_caller

pytestmark = pytest.mark.asterisk


async def test_answered_by_stasis_echo_rtp_dtmf_and_hash_hangs_up(
    app: Appliance, voices: Voices, callers: list[Caller], tmp_path: Path
) -> None:
    """Issue 13's first checks in one call: Stasis answers; the agent's audio (the echo engine returns the
    caller's) correlates with what was sent; the RTP Asterisk sends is well-formed; a digit reaches the
    engine; '#' makes Asterisk send the BYE (after the goodbye sound); nothing is left behind."""
    engine_log_before = len(app.engine.text())
    timeline = media.Timeline()
    timeline.add_silence(LEAD_S)
    timeline.add_audio(voices.caller)
    timeline.add_silence(1.0)
    timeline.add_dtmf("5")
    timeline.add_silence(0.6)
    timeline.add_dtmf("#")
    timeline.add_silence(6.0)  # the goodbye plays, then the BYE comes
    caller = new_caller(callers, app, tmp_path, DID_MAIN, timeline, expect_bye_within_s=30)
    await caller.start()
    live = await caller.wait_state("active")
    assert live["did"] == DID_MAIN and live["persona"] == app.persona  # routed by the DID table
    result = await caller.finish()
    assert result.returncode == 0, result.describe()
    assert 200 in result.received_statuses() and result.received_requests() == ["BYE"]  # Asterisk hung up

    record = await asyncio.to_thread(caller.record)
    assert record["answered_at"] and record["end_cause"] == "dtmf_hangup" and record["dtmf_digits"] == "5#"
    kinds = [e["kind"] for e in record["events"]]
    assert "media_up" in kinds and kinds.count("dtmf") == 2

    # The engine got the digit (its own log; '#' is the bridge's, it never reaches the engine).
    engine_log = app.engine.text()[engine_log_before:]
    assert "event 'dtmf'='5'" in engine_log and "'dtmf'='#'" not in engine_log

    stream = caller.received()
    audio = stream.audio()
    assert len(audio) > 100, f"only {len(audio)} RTP packets came back"
    echo = media.echo_check(voices.caller, stream.pcm())
    assert echo.found >= ECHO_FOUND, f"the caller's words in the agent's audio: {echo}"
    _check_rtp(audio)


def _check_rtp(audio: list[tuple[float, media.RtpPacket]]) -> None:
    """One SSRC, sequence numbers +1 with no gap, timestamps advancing 160 per 20 ms packet, and the
    stream paced at 20 ms on average (its timestamps span what its arrival times span)."""
    assert len({p.ssrc for _, p in audio}) == 1
    seq = np.array([p.sequence for _, p in audio])
    assert set(np.diff(seq) % 65536) == {1}, "sequence numbers skip or repeat"
    ts = np.array([p.timestamp for _, p in audio], dtype=np.int64)
    steps = np.diff(ts) % (1 << 32)
    assert np.all((steps > 0) & (steps < 8000)), f"timestamps jump: {sorted(set(steps.tolist()))[:8]}"
    # Asterisk restamps a frame only when it is more than 80 ms off schedule (a stalled machine).
    assert np.mean(steps == 160) > 0.95, f"timestamp steps {sorted(set(steps.tolist()))[:8]}"
    arrivals = np.array([t for t, _ in audio])
    span_s = arrivals[-1] - arrivals[0]
    mean_ms = span_s * 1000 / (len(audio) - 1)
    assert 18.0 < mean_ms < 22.0, f"mean packet spacing {mean_ms:.2f} ms"
    ts_span_s = int(ts[-1] - ts[0]) % (1 << 32) / 8000
    assert abs(ts_span_s - span_s) < 0.1 * span_s + 0.2, (
        f"timestamps span {ts_span_s:.2f} s, arrivals {span_s:.2f} s")
