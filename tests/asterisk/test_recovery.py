"""Failures under a real Asterisk: Asterisk restarted mid-call (gracefully and with kill -9) and the engine
killed mid-call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.asterisk import media
from tests.asterisk.appliance import DID_MAIN, Appliance, wait_for
from tests.asterisk.conftest import ECHO_FOUND, LEAD_S, Caller, Voices, new_caller

pytestmark = pytest.mark.asterisk

RECONNECT_WITHIN_S = 3.0  # issue 13: new calls within 3 s of Asterisk being back


async def _short_call(
    app: Appliance, voices: Voices, callers: list[Caller], work: Path, lead_s: float = LEAD_S
) -> Caller:
    timeline = media.Timeline()
    timeline.add_silence(lead_s)
    timeline.add_audio(voices.caller)
    timeline.add_silence(0.5)
    caller = new_caller(callers, app, work, DID_MAIN, timeline, hangup_after_s=timeline.duration_s)
    await caller.start()
    result = await caller.finish()
    assert result.returncode == 0 and 200 in result.received_statuses(), result.describe()
    return caller


@pytest.mark.parametrize("how", ["graceful", "kill -9"])
async def test_asterisk_restart_mid_call_then_new_calls_within_3_s(
    how: str, app: Appliance, voices: Voices, callers: list[Caller], tmp_path: Path
) -> None:
    timeline = media.Timeline()
    timeline.add_audio(voices.caller)
    timeline.add_silence(30.0)
    doomed = new_caller(callers, app, tmp_path, DID_MAIN, timeline, hangup_after_s=30.0)
    await doomed.start()
    await doomed.wait_state("active")
    await asyncio.to_thread(app.asterisk.stop, kill=how == "kill -9")
    doomed.kill()  # its dialog died with Asterisk
    await asyncio.to_thread(wait_for, lambda: not app.health().get("ari_connected"), 30, "the bridge noticed")
    await asyncio.to_thread(app.asterisk.start)  # returns once Asterisk is fully booted
    reconnect_s = await asyncio.to_thread(app.wait_bridge_connected, 30)
    assert reconnect_s <= RECONNECT_WITHIN_S, f"reconnected {reconnect_s:.1f} s after Asterisk was up"
    # The call that was up when Asterisk went: ended on the record, nothing of it left in the bridge.
    await asyncio.to_thread(wait_for, lambda: doomed.live() is None, 20, "the lost call forgotten")
    record = await asyncio.to_thread(doomed.record)
    assert record["ended_at"] is not None and record["answered_at"] is not None
    # And a new call is answered and echoed. (Its caller waits twice the usual lead before speaking: in one
    # run on a slow machine, the first two 0.5 s pieces of the first call after a kill -9 restart came back
    # degraded, 0.58 and 0.40, the rest whole, as when a call's first words come before its media path is
    # up. This test judges the recovery; a call's first seconds have tests of their own.)
    fresh = await _short_call(app, voices, callers, tmp_path, lead_s=2 * LEAD_S)
    echo = media.echo_check(voices.caller, fresh.received().pcm())
    assert echo.found >= ECHO_FOUND, str(echo)


async def test_engine_killed_bye_then_503_until_it_is_back(
    app: Appliance, voices: Voices, callers: list[Caller], tmp_path: Path
) -> None:
    timeline = media.Timeline()
    timeline.add_audio(voices.caller)
    timeline.add_silence(30.0)
    caller = new_caller(callers, app, tmp_path, DID_MAIN, timeline, expect_bye_within_s=60)
    await caller.start()
    await caller.wait_state("active")
    await asyncio.to_thread(app.engine.stop, kill=True)  # SIGKILL: no goodbye from the engine
    result = await caller.finish()
    assert result.returncode == 0 and result.received_requests() == ["BYE"], result.describe()
    record = await asyncio.to_thread(caller.record)
    assert str(record["end_cause"]).startswith("media:"), record["end_cause"]
    # While it is down, calls are refused before answer with 503 (congestion), not answered into silence.
    for _ in range(2):
        refused = new_caller(callers, app, tmp_path, DID_MAIN, media.Timeline())
        await refused.start()
        outcome = await refused.finish()
        assert outcome.returncode == 0, outcome.describe()
        assert outcome.received_statuses()[-1] == 503 and 200 not in outcome.received_statuses()
        assert (await asyncio.to_thread(refused.record))["end_cause"] == "engine_unavailable"
    started = time.monotonic()
    await asyncio.to_thread(app.restart_engine)
    assert time.monotonic() - started < 60
    fresh = await _short_call(app, voices, callers, tmp_path)
    echo = media.echo_check(voices.caller, fresh.received().pcm())
    assert echo.found >= ECHO_FOUND, str(echo)
