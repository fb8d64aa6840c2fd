"""Capacity and hold through a real Asterisk: call N+1 is refused before any answer; hold plays music on
hold (the very file Asterisk's default class plays) and unhold brings the agent back."""

from __future__ import annotations

import asyncio
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr

from tests.asterisk import media
from tests.asterisk.appliance import DID_MAIN, PREFIX, SLOTS, Appliance
from tests.asterisk.conftest import ECHO_FOUND, Caller, Voices, new_caller

pytestmark = pytest.mark.asterisk


async def test_call_n_plus_one_is_refused_before_answer(
    app: Appliance, voices: Voices, callers: list[Caller], tmp_path: Path
) -> None:
    holding = []
    for _ in range(SLOTS):
        timeline = media.Timeline()
        timeline.add_audio(voices.caller)
        timeline.add_silence(30.0)
        caller = new_caller(callers, app, tmp_path, DID_MAIN, timeline, expect_bye_within_s=60)
        await caller.start()
        await caller.wait_state("active")
        holding.append(caller)
    assert app.health()["state"]["capacity"]["in_use"] == SLOTS
    extra = new_caller(callers, app, tmp_path, DID_MAIN, media.Timeline())  # expects 486/503
    await extra.start()
    refused = await extra.finish()
    assert refused.returncode == 0, refused.describe()
    statuses = refused.received_statuses()
    assert 200 not in statuses and 180 not in statuses and statuses[-1] == 486, statuses  # ari.refuse_reason
    assert not [d for d in extra.datagrams if d.dst_port == extra.media_port]  # no media: never answered
    record = await asyncio.to_thread(extra.record)
    assert record["refused"] is True and record["answered_at"] is None
    assert record["end_cause"] == "capacity_full"
    # The house empties: the bridge hangs both up (BYE to each), and the slots are free again.
    for caller in holding:
        status, _ = app.control("POST", f"/calls/{caller.live()['call_id']}/hangup", {})  # type: ignore[index]
        assert status == 200
    for caller in holding:
        result = await caller.finish()
        assert result.returncode == 0 and result.received_requests() == ["BYE"], result.describe()
    assert app.health()["state"]["capacity"]["in_use"] == 0


def _moh_audio() -> np.ndarray:
    """The first file of Asterisk's default MOH class (mode=files, sort=alpha), as 8 kHz int16."""
    first = sorted((PREFIX / "var" / "lib" / "asterisk" / "moh").resolve().glob("*.wav"))[0]
    with wave.open(str(first)) as w:
        pcm = np.frombuffer(w.readframes(w.getframerate() * 60), dtype=np.int16)
        rate = w.getframerate()
    return pcm if rate == 8000 else soxr.resample(pcm.astype(np.float32), rate, 8000).astype(np.int16)


async def test_hold_plays_music_on_hold_and_unhold_resumes_the_agent(
    app: Appliance, voices: Voices, callers: list[Caller], tmp_path: Path
) -> None:
    timeline = media.Timeline()
    for _ in range(6):  # the caller talks all along
        timeline.add_audio(voices.caller)
        timeline.add_silence(0.2)
        timeline.add_audio(voices.other)
        timeline.add_silence(0.2)
    caller = new_caller(callers, app, tmp_path, DID_MAIN, timeline, hangup_after_s=16.0)
    await caller.start()
    call_id = (await caller.wait_state("active"))["call_id"]
    await asyncio.sleep(4.0)
    # Each phase's window lies between the command's return and the next command's request.
    hold_asked = time.time()
    held = await asyncio.to_thread(app.admin, "calls", "hold", str(call_id))
    held_at = time.time()
    assert "state held" in held.stdout
    await asyncio.sleep(4.0)
    unhold_asked = time.time()
    resumed = await asyncio.to_thread(app.admin, "calls", "unhold", str(call_id))
    unheld_at = time.time()
    assert "state active" in resumed.stdout
    result = await caller.finish()
    assert result.returncode == 0, result.describe()

    stream = caller.received()
    sent = timeline.pcm()
    moh = _moh_audio()
    # Windows well inside each phase (the echo path adds about half a second).
    before = stream.pcm(hold_asked - 2.3, hold_asked - 0.2)
    during = stream.pcm(held_at + 1.0, unhold_asked - 0.2)
    after = stream.pcm(unheld_at + 1.2, unheld_at + 3.2)
    for name, window in (("before", before), ("during", during), ("after", after)):
        assert len(window) > 8000, f"{name} hold: only {len(window)} samples came back"
    # Each window's pieces, looked for in what could have produced them.
    assert (echo := media.echo_check(before, sent)).found >= ECHO_FOUND, f"the agent before the hold: {echo}"
    assert (music := media.echo_check(during, moh)).found >= ECHO_FOUND, f"music on hold while held: {music}"
    assert (echo := media.echo_check(during, sent)).found == 0, f"the agent was not paused: {echo}"
    assert (echo := media.echo_check(after, sent)).found >= ECHO_FOUND, f"the agent after unhold: {echo}"
    record = await asyncio.to_thread(caller.record)
    holds = [(e["kind"], e["data"].get("by")) for e in record["events"] if e["kind"] in ("hold", "unhold")]
    assert holds == [("hold", "operator"), ("unhold", "operator")]
