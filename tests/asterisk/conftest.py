"""Fixtures of the real-Asterisk group (marker ``asterisk``): one appliance for the whole group, started the
README's way, and helpers that place SIPp calls and capture what the caller receives.

Every test here is skipped, with the reason, when the Asterisk build (provisioning/asterisk-build.sh),
SIPp, dumpcap or espeak-ng is missing, or when not running as root.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.asterisk import media, sipp
from tests.asterisk.appliance import Appliance, free_udp_pair, missing_prerequisite, wait_for


@pytest.fixture(scope="session")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    reason = missing_prerequisite()
    if reason is not None:
        pytest.skip(reason)
    app = Appliance(tmp_path_factory.mktemp("appliance"))
    app.configure(operator_sip_port=free_udp_pair()[0], busy_sip_port=free_udp_pair()[0])
    try:
        app.provision()
        app.start()
        yield app
    finally:
        app.teardown()


@pytest.fixture
def app(appliance: Appliance) -> Iterator[Appliance]:
    """The appliance, whole and idle at the start of the test; at its end every call is over and Asterisk
    has no channel and no bridge left (issue 13: clean teardown after every hang-up)."""
    if appliance.asterisk.proc is None or appliance.asterisk.proc.poll() is not None:
        appliance.asterisk.start()
    if not appliance.engine.running():
        appliance.restart_engine()
    appliance.wait_bridge_connected(30)
    yield appliance
    wait_for(lambda: not appliance.live_calls(), 20, "no live calls in the bridge")
    wait_for(lambda: not appliance.asterisk.channels() and not appliance.asterisk.bridges(), 20,
             "Asterisk without channels and bridges")


_CALLER_IDS = itertools.count(7770000)
# Silence a caller sends first: the agent's media path is set up after the answer (bridge, externalMedia),
# and words spoken before it is up are not heard. Generous, so a loaded machine does not clip them.
LEAD_S = 1.5
# Share of an utterance's 0.5 s pieces that must come back (media.echo_check): a glitch on a loaded
# machine costs a piece, a wrong or missing stream costs them all.
ECHO_FOUND = 0.75


@dataclass
class Voices:
    caller: np.ndarray  # about 2.5 s
    other: np.ndarray  # a different sentence (the second half of a conversation)
    operator: np.ndarray


@pytest.fixture(scope="session")
def voices(tmp_path_factory: pytest.TempPathFactory, appliance: Appliance) -> Voices:
    work = tmp_path_factory.mktemp("voices")
    return Voices(
        caller=media.speech("Hello, I would like to check my order, please.", work),
        other=media.speech("My number is four five six, seven eight nine.", work),
        operator=media.speech("Operator speaking. How can I help you today?", work),
    )


class Capture:
    """dumpcap on loopback, UDP to/from one port, into a pcap file."""

    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.port = port
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["dumpcap", "-i", "lo", "-f", f"udp port {self.port}", "-w", str(self.path), "-P", "-q"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def watch() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                if "Capturing on" in line:
                    ready.set()

        threading.Thread(target=watch, daemon=True).start()
        if not ready.wait(30):
            self.stop()
            raise AssertionError("dumpcap did not start capturing")

    def stop(self) -> list[media.Datagram]:
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(0.3)  # the last packets in flight
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return list(media.read_pcap(self.path)) if self.path.exists() else []


@dataclass
class Caller:
    """One SIPp caller: its scenario, its media port's capture, its timeline's audio."""

    app: Appliance
    work: Path
    did: str
    timeline: media.Timeline
    scenario: str
    number: str  # the caller id SIPp sends (From), on the call record as ``caller``
    sip_port: int = 0
    media_port: int = 0
    ua: sipp.Sipp | None = None  # the SIPp run
    capture: Capture | None = None
    result: sipp.SippResult | None = None
    datagrams: list[media.Datagram] = field(default_factory=list)
    started_at: float = 0.0

    async def start(self) -> None:
        self.sip_port, self.media_port = free_udp_pair()
        pcap = self.work / "caller.pcap"
        self.timeline.write_pcap(pcap)
        self.capture = Capture(self.work / "received.pcap", self.media_port)
        await asyncio.to_thread(self.capture.start)
        self.ua = sipp.Sipp(self.work, "sipp", self.scenario.replace("__PCAP__", str(pcap)),
                              sip_port=self.sip_port, media_port=self.media_port,
                              target=f"127.0.0.1:{self.app.ports['sip']}", service=self.did, timeout_s=90)
        self.started_at = time.time()
        await self.ua.start()

    async def finish(self) -> sipp.SippResult:
        assert self.ua is not None and self.capture is not None
        self.result = await self.ua.wait()
        self.datagrams = await asyncio.to_thread(self.capture.stop)
        return self.result

    def received(self) -> media.RtpStream:
        return media.RtpStream.to_port(self.datagrams, self.media_port)

    def live(self) -> dict[str, Any] | None:
        """The bridge's live view of this call (None before StasisStart and after teardown)."""
        return next((c for c in self.app.live_calls() if c.get("caller") == self.number), None)

    async def wait_state(self, state: str = "active", within_s: float = 30) -> dict[str, Any]:
        """The live call once it is in ``state`` (the bound catches a hang, it measures nothing)."""
        def check() -> dict[str, Any] | None:
            live = self.live()
            return live if live is not None and live.get("state") == state else None

        return await asyncio.to_thread(wait_for, check, within_s, f"call from {self.number} {state}")

    def record(self) -> dict[str, Any]:
        """This call's record (from ``aziza-admin calls list/show``)."""
        rows = [r for r in self.app.latest_records(self.started_at, self.did)
                if r.get("caller") == self.number]
        assert len(rows) == 1, rows
        return self.app.call_record(str(rows[0]["id"]))

    def kill(self) -> None:
        if self.ua is not None:
            self.ua.kill()
        if self.capture is not None:
            self.capture.stop()


@pytest.fixture
async def callers(tmp_path: Path, app: Appliance) -> AsyncIterator[list[Caller]]:
    """Make callers with ``new_caller``; whatever a failing test leaves running is stopped."""
    made: list[Caller] = []
    yield made
    for caller in made:  # a failed test's leftovers: its SIPp and, through the bridge, its call
        caller.kill()
        live = caller.live()
        if live is not None:
            app.control("POST", f"/calls/{live['call_id']}/hangup", {})


def new_caller(made: list[Caller], app: Appliance, work: Path, did: str, timeline: media.Timeline, *,
               hangup_after_s: float | None = None, expect_bye_within_s: float | None = None) -> Caller:
    """A caller that hangs up after ``hangup_after_s``, waits for Asterisk's BYE, or (neither given)
    expects to be refused before an answer (486/503)."""
    folder = work / f"caller{len(made)}"
    folder.mkdir()
    number = f"1555{next(_CALLER_IDS):07d}"
    if hangup_after_s is None and expect_bye_within_s is None:
        scenario = sipp.refused(caller_id=number)
    else:
        scenario = sipp.caller(Path("__PCAP__"), hangup_after_s=hangup_after_s,
                               expect_bye_within_s=expect_bye_within_s, caller_id=number)
    caller = Caller(app, folder, did, timeline, scenario, number)
    made.append(caller)
    return caller
