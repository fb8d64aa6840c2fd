"""Transfers through a real Asterisk: '0' reaches a second SIPp (the operator) who answers and is heard; a
busy operator or a missing extension brings the caller back to the agent, with the failure on the record."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.asterisk import media, sipp
from tests.asterisk.appliance import DID_BUSY, DID_MAIN, Appliance, free_udp_pair
from tests.asterisk.conftest import ECHO_FOUND, LEAD_S, Caller, Voices, new_caller

pytestmark = pytest.mark.asterisk


def _events(record: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    events = record["events"]
    assert isinstance(events, list)
    return [e["data"] for e in events if e["kind"] == kind]


async def test_zero_transfers_to_the_operator_who_answers(
    app: Appliance, voices: Voices, callers: list[Caller], tmp_path: Path
) -> None:
    op_work = tmp_path / "operator"
    op_work.mkdir()
    op_timeline = media.Timeline(ssrc=0x0FE1)
    op_timeline.add_silence(LEAD_S)
    op_timeline.add_audio(voices.operator)
    op_timeline.add_silence(1.0)
    op_timeline.write_pcap(op_work / "operator.pcap")
    operator = sipp.Sipp(op_work, "operator", sipp.operator(op_work / "operator.pcap"),
                         sip_port=app.ports["operator"], media_port=free_udp_pair()[1], timeout_s=90)
    await operator.start()
    try:
        timeline = media.Timeline()
        timeline.add_silence(LEAD_S)
        timeline.add_audio(voices.caller)
        timeline.add_silence(0.5)
        timeline.add_dtmf("0")
        timeline.add_silence(11.0)  # ringing, then the operator's words (margin for a loaded machine)
        caller = new_caller(callers, app, tmp_path, DID_MAIN, timeline, hangup_after_s=timeline.duration_s)
        await caller.start()
        await caller.wait_state("active")
        transferred = await caller.wait_state("transferred", 40)
        assert transferred["transferred_to"] == "operators,100"
        # The agent is gone and its slot free while caller and operator talk.
        assert app.health()["state"]["capacity"]["in_use"] == 0
        result = await caller.finish()
        op_result = await operator.wait()
    finally:
        operator.kill()
    assert result.returncode == 0, result.describe()
    assert op_result.returncode == 0, op_result.describe()
    # answered; the caller's hang-up reached it
    assert op_result.received_requests() == ["INVITE", "ACK", "BYE"]

    record = await asyncio.to_thread(caller.record)
    assert record["end_cause"] == "transferred" and record["dtmf_digits"] == "0"
    assert _events(record, "transfer") == [{"target": "operators,100", "outcome": "answered"}]
    assert not _events(record, "transfer_failed")
    # What the caller heard: first the agent (its own words echoed), then the operator's voice.
    heard = caller.received().pcm()
    assert (echo := media.echo_check(voices.caller, heard)).found >= ECHO_FOUND, f"the agent: {echo}"
    assert (voice := media.echo_check(voices.operator, heard)).found >= ECHO_FOUND, f"the operator: {voice}"


async def test_busy_operator_and_missing_extension_bring_the_caller_back(
    app: Appliance, voices: Voices, callers: list[Caller], tmp_path: Path
) -> None:
    busy_work = tmp_path / "busy"
    busy_work.mkdir()
    busy = sipp.Sipp(busy_work, "busy", sipp.busy(), sip_port=app.ports["busy"],
                     media_port=free_udp_pair()[1], timeout_s=90)
    await busy.start()
    try:
        # The caller talks throughout; '0' early (the DID's target rings a busy desk).
        timeline = media.Timeline()
        timeline.add_silence(LEAD_S)
        timeline.add_audio(voices.caller)
        timeline.add_dtmf("0")
        for _ in range(4):
            timeline.add_audio(voices.other)
            timeline.add_silence(0.3)
        caller = new_caller(callers, app, tmp_path, DID_BUSY, timeline, hangup_after_s=timeline.duration_s)
        await caller.start()
        call_id = str((await caller.wait_state("active"))["call_id"])
        busy_result = await busy.wait()
        assert busy_result.returncode == 0 and busy_result.received_requests() == ["INVITE", "ACK"]
        # Then the operator asks for a transfer to an extension that does not exist.
        done = await asyncio.to_thread(app.admin, "calls", "transfer", call_id, "nowhere,404", check=False)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            f"Error: transfer of call {call_id} to nowhere,404 failed: invalid_extension; "
            "the caller is back with the agent"]
        back_at = time.time()
        live = caller.live()
        assert live is not None and live["state"] == "active"
        result = await caller.finish()
    finally:
        busy.kill()
    assert result.returncode == 0, result.describe()
    record = await asyncio.to_thread(caller.record)
    assert record["end_cause"] == "caller_hangup" and record["dtmf_digits"] == "0"
    assert _events(record, "transfer_failed") == [
        {"target": "operators,101", "outcome": "failed", "reason": "busy"},
        {"target": "nowhere,404", "outcome": "failed", "reason": "invalid_extension"}]
    assert not _events(record, "transfer")
    # Back with the agent: what the caller said after both failures comes back as the echo.
    stream = caller.received()
    after = stream.pcm(since=back_at + 1.0)
    assert len(after) > 8000 * 2, "no audio after the failed transfers"
    echo = media.echo_check(after[: 8000 * 3], timeline.pcm())
    assert echo.found >= ECHO_FOUND, f"after the failures, the agent: {echo}"
