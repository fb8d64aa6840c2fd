"""``aziza-admin loadtest --via sip``: real calls, SIPp through a running Asterisk into the running bridge.

Per call: the caller's turns (``caller_turns``: speech then silence) as a libpcap file of RTP/PCMU packets,
and one SIPp process (its own SIP and media ports) that dials ``DID@target`` with PCMU + telephone-event,
plays the pcap after the 200/ACK (``play_pcap_audio``), waits the call's length for a BYE from Asterisk
(one that comes is an early hang-up: the call was dropped) and then hangs up itself. Calls start spread
over one second, or, with ``--ramp``, one per step while the last step stayed stable (as ``--via rtp``).

The numbers come from the running bridge's ``/metrics`` (with the control token, as every aziza-admin
command that talks to the bridge), scraped every 1-2 s: ``aziza_active_sessions`` (concurrency),
``aziza_ttfb_seconds`` (a histogram: each scrape's new turns are its bucket deltas; an interval with one
new turn gives its exact value from the sum, more than one are spread over their buckets, so percentiles
come from buckets), ``aziza_turns_total`` and ``aziza_turns_unanswered_total``; and the engine's
``/metrics`` (``--engine-url``, else the bridge's ``bridge.engine_url``) for ticks, batch and GPU. The bridge
has no per-call numbers: each turn is given to the call whose pending turn ended first, so per-call splits
are approximate while run totals and percentiles are the bridge's own.

Ctrl-C hangs our calls up through the bridge (Asterisk sends the BYEs), kills any SIPp left after a grace
and returns what was measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import shutil
import socket
import struct
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import click
import numpy as np
import numpy.typing as npt
from prometheus_client.parser import text_string_to_metric_families

from admin_cli.loadtest import (
    QUICK_RAMP_STEP_S,
    RAMP_STEP_S,
    EngineMetrics,
    HistogramSnapshot,
    LoadTestError,
    Options,
    _config,
    _Progress,
    fetch_metrics,
    metrics_url,
    parse_engine_metrics,
    record_engine_interval,
    record_engine_totals,
)
from admin_cli.loadtest_legs import SAMPLE_RATE, caller_turns, load_caller_speech
from admin_cli.loadtest_report import CallResult, RunData
from admin_cli.procs import end_process, tree_cpu_s
from admin_cli.sipp_scenarios import ACK_2XX, ACK_ERROR, BYE_OK, INVITE, OUR_BYE, scenario
from bridge.media.codecs import ulaw_encode
from bridge.media.rtp import PT_PCMU, RtpPacket, build_rtp

FRAME = 160  # 20 ms of PCMU
#: Silence before the first turn: the agent's media path (bridge, externalMedia) is set up after the
#: answer, and words spoken before it is up are not heard.
LEAD_S = 1.0
SCRAPE_EVERY_S = 2.0
QUICK_SCRAPE_EVERY_S = 1.0
#: Seconds SIPp may run past its call's length (answer, BYE transaction) before it counts as hung.
SIPP_MARGIN_S = 30.0
STOP_GRACE_S = 10.0  # after Ctrl-C: Asterisk's BYEs come, then what is left is killed
TTFB_NOTE = (
    "bridge /metrics aziza_ttfb_seconds bucket deltas per scrape: exact when a scrape interval holds one "
    "turn, else spread over its buckets (percentiles from buckets); per-call splits are approximate"
)


# -- the caller's audio as a pcap --------------------------------------------------------------------------


def pcmu_packets(
    pcm: npt.NDArray[np.int16], *, ssrc: int, seq: int = 0, ts: int = 0
) -> list[tuple[float, bytes]]:
    """``pcm`` (8 kHz) as RTP/PCMU datagrams, one per 20 ms (the last padded), with their send times: one
    SSRC, continuous sequence numbers and timestamps, marker on the first, as a phone sends them."""
    frames = -(-len(pcm) // FRAME)
    padded = np.zeros(frames * FRAME, dtype=np.int16)
    padded[: len(pcm)] = pcm
    out = []
    for k in range(frames):
        packet = RtpPacket(
            payload_type=PT_PCMU,
            sequence=(seq + k) & 0xFFFF,
            timestamp=(ts + k * FRAME) & 0xFFFFFFFF,
            ssrc=ssrc,
            payload=ulaw_encode(padded[k * FRAME : (k + 1) * FRAME]),
            marker=k == 0,
        )
        out.append((k * FRAME / SAMPLE_RATE, build_rtp(packet)))
    return out


def write_rtp_pcap(
    path: Path, packets: list[tuple[float, bytes]], src_port: int = 6000, dst_port: int = 6002
) -> None:
    """libpcap (microseconds, Ethernet/IPv4/UDP), what SIPp's ``play_pcap_audio`` reads: it keeps the
    packets' timing and payload and rewrites addresses and ports, so those here are placeholders."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # LINKTYPE_ETHERNET
    loopback = bytes([127, 0, 0, 1])
    for t, datagram in packets:
        udp = struct.pack("!HHHH", src_port, dst_port, 8 + len(datagram), 0) + datagram  # no UDP checksum
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, loopback, loopback)
        ip = header[:10] + struct.pack("!H", _ip_checksum(header)) + header[12:]
        frame = bytes(12) + b"\x08\x00" + ip + udp  # zero MACs, IPv4
        sec = int(t)
        usec = round((t - sec) * 1e6)
        out.append(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# -- the SIPp scenario -------------------------------------------------------------------------------------

# INVITE; refused (486/503: ACKed) or answered; after the ACK the pcap plays; the call's length waiting for a
# BYE from Asterisk (one that comes ends the call early: dropped, or our Ctrl-C); then our own BYE.
_SCENARIO = scenario("loadtest-caller", (
    INVITE
    + '  <recv response="486" optional="true" next="refused"/>\n'
    + '  <recv response="503" optional="true" next="refused"/>\n'
    + '  <recv response="200" rtd="true"/>\n'
    + ACK_2XX
    + '  <nop><action><exec play_pcap_audio="__PCAP__"/></action></nop>\n'
    + '  <recv request="BYE" timeout="__CALL_MS__" ontimeout="hangup"/>\n'
    + BYE_OK
    + '  <nop next="end"/>\n  <label id="hangup"/>\n'
    + OUR_BYE
    + '  <nop next="end"/>\n  <label id="refused"/>\n'
    + ACK_ERROR
    + '  <label id="end"/>\n'
))


def caller_scenario(pcap: Path, call_s: float, caller_id: str) -> str:
    """The UAC scenario of one call (see the module docstring); a 486/503 ends it refused (ACKed)."""
    if not caller_id.isalnum():
        raise ValueError(f"caller id must be letters and digits, got {caller_id!r}")
    return (
        _SCENARIO.replace("__PCAP__", str(pcap))
        .replace("__CALL_MS__", str(max(1, round(call_s * 1000))))
        .replace("__CALLER__", caller_id)
    )


def classify(returncode: int | None, messages: str, ended_by_us: bool) -> tuple[str, str | None]:
    """A finished SIPp call's outcome from its exit status and message trace (``-trace_msg``):
    (outcome, end reason). ``ended_by_us``: the run's stop (Ctrl-C) ended it, which is no error."""
    statuses = [int(code) for code in _received_first_lines(messages, "SIP/2.0 ")]
    refusal = next((code for code in statuses if code in (486, 503)), None)
    if refusal is not None and 200 not in statuses:
        return "refused", f"SIP {refusal}"
    if ended_by_us:
        return "ok", "ended by the run's stop"
    if any(r.startswith("BYE ") for r in _received_first_lines(messages, "")):
        return "dropped", "Asterisk hung up before the call's end"
    if returncode != 0:
        after = f" after SIP {statuses[-1]}" if statuses else ""
        return "dropped", f"SIPp exited with {returncode}{after}"
    return "ok", "caller hung up"


def _received_first_lines(messages: str, prefix: str) -> list[str]:
    """The first line of every message SIPp logged as received (``-trace_msg``), after ``prefix``."""
    found = []
    lines = messages.splitlines()
    for i, line in enumerate(lines):
        if "message received" not in line:
            continue
        first = next((candidate.strip() for candidate in lines[i + 1 :] if candidate.strip()), "")
        if prefix and first.startswith(prefix):
            found.append(first[len(prefix) : len(prefix) + 3])
        elif not prefix and not first.startswith("SIP/2.0"):
            found.append(first)
    return found


# -- the bridge's /metrics ---------------------------------------------------------------------------------


@dataclass
class BridgeMetrics:
    active_sessions: float | None
    ttfb: HistogramSnapshot
    turns: float
    unanswered: float


def parse_bridge_metrics(text: str) -> BridgeMetrics:
    ttfb = HistogramSnapshot()
    active: float | None = None
    turns = unanswered = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aziza_active_sessions":
                active = sample.value
            elif sample.name == "aziza_turns_total":
                turns = sample.value
            elif sample.name == "aziza_turns_unanswered_total":
                unanswered = sample.value
            elif family.name == "aziza_ttfb_seconds":
                ttfb.take(sample)
    if ttfb.buckets and not ttfb.count:
        ttfb.count = ttfb.buckets.get(float("inf"), 0.0)
    return BridgeMetrics(active, ttfb, turns, unanswered)


def ttfb_estimates_ms(delta: HistogramSnapshot) -> list[float]:
    """The TTFB values (ms) of one scrape interval's new turns, from its bucket deltas: exact (the sum) when
    there is one; else each bucket's turns spread evenly over it (the top bucket's at its lower bound)."""
    count = round(delta.count)
    if count <= 0:
        return []
    if count == 1 and delta.total > 0:
        return [round(delta.total * 1000.0, 2)]
    values: list[float] = []
    lower, below = 0.0, 0.0
    for bound in sorted(delta.buckets):
        n = round(delta.buckets[bound] - below)
        for k in range(max(0, n)):
            value = lower if bound == float("inf") else lower + (bound - lower) * (k + 0.5) / n
            values.append(round(value * 1000.0, 2))
        lower, below = bound, delta.buckets[bound]
    return values


# -- prerequisites -----------------------------------------------------------------------------------------


def _bridge_access(bridge_url: str | None) -> tuple[str, str]:
    """The bridge's URL and control token, found as ``aziza-admin calls ...`` finds them."""
    from admin_cli.call_control import _bridge_url, _token

    try:
        return _bridge_url(bridge_url), _token(None)
    except click.ClickException as exc:
        raise LoadTestError(exc.message) from None


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":") if ":" in target else (target, "", "5060")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LoadTestError(f"--sip-target must be HOST:PORT (Asterisk's SIP address), got {target!r}")
    return host.strip("[]"), int(port)


def check_sip_prerequisites(bridge_url: str | None, sip_target: str, did: str | None) -> None:
    """One clear error for each thing ``--via sip`` cannot run without."""
    if shutil.which("sipp") is None:
        raise LoadTestError("SIPp is not installed: apt-get install sip-tester")
    if os.geteuid() != 0:
        raise LoadTestError("--via sip needs root: SIPp plays the callers' audio (pcap) through raw sockets")
    if not did:
        raise LoadTestError("--via sip needs --did: the number to dial (a DID routed to the aziza app)")
    split_target(sip_target)
    url, token = _bridge_access(bridge_url)
    request = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            parse_bridge_metrics(response.read().decode())
    except urllib.error.HTTPError as exc:
        raise LoadTestError(f"the bridge at {url} refused /metrics (HTTP {exc.code}: {exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LoadTestError(f"the bridge at {url} is unreachable ({reason})") from None
    except ValueError as exc:
        raise LoadTestError(f"the bridge at {url} answered /metrics with no metrics ({exc})") from None


# -- whose CPU ---------------------------------------------------------------------------------------------


def listening_pid(port: int, *, udp: bool = False) -> int | None:
    """The process with a socket bound to ``port`` (TCP listening, or UDP), from /proc; None if not found
    (another host, or not ours to see)."""
    inodes: set[str] = set()
    for name in ("udp", "udp6") if udp else ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and int(cols[1].rsplit(":", 1)[1], 16) == port and (udp or cols[3] == "0A"):
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def _local_port(url: str) -> int | None:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1", socket.gethostname()):
        return None
    with contextlib.suppress(ValueError):
        return parts.port or {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(parts.scheme)
    return None


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class _SipCall:
    result: CallResult
    caller_id: str
    folder: Path
    turn_ends: list[float]  # when its turns should end, seconds from the run's start
    proc: asyncio.subprocess.Process | None = None
    hung_up_by_us: bool = False
    turns_given: int = 0  # turns and TTFB values of the bridge's that were given to this call
    ttfb_given: int = 0

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class SipRun:
    """One ``--via sip`` run: see the module docstring."""

    def __init__(self, opts: Options, stop: asyncio.Event, work: Path) -> None:
        assert opts.sip is not None
        self.opts = opts
        self.stop = stop
        self.work = work
        self.calls: list[_SipCall] = []
        self.notes: dict[str, str] = {}
        self.data = RunData(config=_config(opts), started_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self.host, self.port = split_target(str(opts.sip["target"]))
        self.did = str(opts.sip["did"])
        self.bridge_url, token = _bridge_access(opts.sip.get("bridge_url"))
        self.headers = {"Authorization": f"Bearer {token}"}
        self.engine_url = opts.engine_url or self._configured_engine()
        self.speech = load_caller_speech(str(opts.audio) if opts.audio else None)
        self.run_tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.ports_taken: set[int] = set()
        self.t0 = time.monotonic()
        self.up_on_bridge: float | None = None
        self.unanswered = 0
        self.http: aiohttp.ClientSession  # the run's, set in run()

    def _configured_engine(self) -> str | None:
        from admin_cli.settings import load_cli_settings

        try:
            return load_cli_settings().bridge.engines()[0]
        except click.ClickException as exc:
            self.notes["engine"] = f"no engine metrics: {exc.message}"
            return None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> RunData:
        async with aiohttp.ClientSession() as http:
            self.http = http
            bridge0 = await self._bridge_metrics()
            if bridge0 is None:
                raise LoadTestError(f"the bridge at {self.bridge_url} stopped answering /metrics")
            engine0 = await self._engine_metrics()
            if self.engine_url is not None and engine0 is None:
                self.notes["engine"] = f"no engine metrics: {self.engine_url} did not answer /metrics"
            pids = self._pids()
            # Process trees: the bridge's media runs in its media workers (bridge.media_workers).
            cpu0 = {name: tree_cpu_s(pid) for name, pid in pids.items()}
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            try:
                await self._drive(bridge0, engine0)
            finally:
                await self._end_calls()
            wall = self.now()
            self.data.wall_s = wall
            children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu: dict[str, float | None] = {}
            for name in ("bridge", "engine", "asterisk"):
                before = cpu0.get(name)
                after = tree_cpu_s(pids[name]) if name in pids else None
                if before is not None and after is not None:
                    cpu[name] = round(100.0 * (after - before) / wall, 1)
                else:
                    cpu[name] = None
                    self.notes[f"cpu_{name}"] = f"{name}'s process was not found on this machine"
            sipp_s = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
            cpu["callers"] = round(100.0 * sipp_s / wall, 1)
            self.data.cpu_percent = cpu
        self._finish()
        return self.data

    def _pids(self) -> dict[str, int]:
        found = {
            "bridge": (_local_port(self.bridge_url), False),
            "engine": (_local_port(self.engine_url) if self.engine_url else None, False),
            "asterisk": (self.port if self.host in ("127.0.0.1", "localhost", "::1") else None, True),
        }
        pids = {}
        for name, (port, udp) in found.items():
            pid = listening_pid(port, udp=udp) if port else None
            if pid is not None:
                pids[name] = pid
        return pids

    async def _bridge_metrics(self) -> BridgeMetrics | None:
        try:
            async with self.http.get(
                self.bridge_url + "/metrics", headers=self.headers, timeout=aiohttp.ClientTimeout(total=3)
            ) as response:
                response.raise_for_status()
                return parse_bridge_metrics(await response.text())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None  # one missed scrape is a gap in the plot, not an error of the run

    async def _engine_metrics(self) -> EngineMetrics | None:
        if self.engine_url is None:
            return None
        try:
            return parse_engine_metrics(await fetch_metrics(*metrics_url(self.engine_url)))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, LoadTestError):
            return None

    async def _drive(self, bridge0: BridgeMetrics, engine0: EngineMetrics | None) -> None:
        opts = self.opts
        total = opts.seconds
        progress = _Progress(total)
        scrape_every = QUICK_SCRAPE_EVERY_S if opts.quick else SCRAPE_EVERY_S
        ramp_step = QUICK_RAMP_STEP_S if opts.quick else RAMP_STEP_S
        bridge, engine, engine_first = bridge0, engine0, engine0
        self.t0 = time.monotonic()
        if not opts.ramp:
            for k in range(opts.calls):  # start times spread over a second: calls do not arrive in lockstep
                await self._sleep_until(k / opts.calls)
                if self.stop.is_set():
                    break
                await self._add_call(total - self.now())
        next_ramp, ramp_open = 0.0, True
        next_scrape = 0.0
        while not self.stop.is_set() and (self.now() < total or any(c.up for c in self.calls)):
            t = self.now()
            if t > total + SIPP_MARGIN_S:
                break  # SIPp that outlives its call by this much is hung: _end_calls ends it
            if opts.ramp and ramp_open and t >= next_ramp and t < total - 2 and len(self.calls) < opts.calls:
                if self.calls and not self._last_step_stable(next_ramp - ramp_step, next_ramp):
                    ramp_open = False  # p95 passed the threshold or errors appeared: no more calls
                else:
                    await self._add_call(total - t)
                next_ramp += ramp_step
            if t >= next_scrape:
                next_scrape += scrape_every
                bridge, engine = await self._scrape(t, bridge, engine)
            self._reap(t)
            up = int(self.up_on_bridge) if self.up_on_bridge is not None else sum(c.up for c in self.calls)
            turns = sum(c.result.turns for c in self.calls)
            progress.show(min(t, total), up, opts.calls, turns, self._p95(), self._errors())
            await self._sleep_until(min(t + 0.5, next_scrape))
        self._reap(self.now())  # calls that ended since the last pass end now, not at the final scrape
        self.data.interrupted = self.stop.is_set()
        progress.done()
        if self.data.interrupted:
            await self._hang_up_ours()
        await self._wait_calls(STOP_GRACE_S if self.data.interrupted else 5.0)
        await asyncio.sleep(0.5)  # the bridge counts the last turns as the calls end
        bridge, engine = await self._scrape(self.now(), bridge, engine)
        self._reap(self.now())
        if engine_first is not None and engine is not None:
            record_engine_totals(self.data, engine_first, engine)

    async def _sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

    def _free_ports(self) -> tuple[int, int]:
        """A SIP port and a media port (SIPp also binds media+1..+3 for RTCP and video), free now."""
        for _ in range(500):
            base = 50000 + random.randrange(7000) * 2
            ports = [base, base + 10, base + 11, base + 12, base + 13]
            if self.ports_taken.intersection(ports):
                continue
            try:
                with contextlib.ExitStack() as stack:
                    for port in ports:
                        s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                        s.bind(("0.0.0.0", port))
            except OSError:
                continue
            self.ports_taken.update(ports)
            return base, base + 10
        raise LoadTestError("no free UDP ports for SIPp")

    def _local_ip(self) -> str:
        """This machine's address towards Asterisk (what SIPp binds and puts in its SDP)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((self.host, self.port))
                return str(s.getsockname()[0])
            except OSError as exc:
                raise LoadTestError(f"no route to the SIP target {self.host}:{self.port}: {exc}") from None

    async def _add_call(self, seconds: float) -> None:
        i = len(self.calls)
        started = self.now()
        folder = self.work / f"call{i}"
        folder.mkdir(parents=True, exist_ok=True)
        audio = caller_turns(self.speech, max(1.0, seconds - LEAD_S), self.opts.seed + i)
        pcm = np.concatenate([np.zeros(int(LEAD_S * SAMPLE_RATE), dtype=np.int16), audio.pcm])
        pcap = folder / "caller.pcap"
        rng = random.Random(self.opts.seed + i)
        write_rtp_pcap(
            pcap,
            pcmu_packets(pcm, ssrc=rng.getrandbits(32), seq=rng.randrange(1 << 16), ts=rng.getrandbits(32)),
        )
        caller_id = f"1999{self.run_tag}{i:04d}"
        scenario = folder / "caller.xml"
        scenario.write_text(caller_scenario(pcap, seconds, caller_id))
        call = _SipCall(
            CallResult(id=i, started_t=round(started, 3)),
            caller_id,
            folder,
            [started + LEAD_S + end for _, end in audio.turns],
        )
        self.calls.append(call)
        sip_port, media_port = self._free_ports()
        local_ip = self._local_ip()
        args = [
            "sipp", "-sf", str(scenario), "-i", local_ip, "-p", str(sip_port), "-mi", local_ip,
            "-mp", str(media_port), "-m", "1", "-nostdin", "-f", "60",
            "-timeout", f"{round(seconds + SIPP_MARGIN_S)}s", "-timeout_error",
            "-trace_msg", "-message_file", str(folder / "messages.log"),
            "-trace_err", "-error_file", str(folder / "errors.log"),
            "-s", self.did, "-r", "1", f"{self.host}:{self.port}",
        ]  # fmt: skip
        # SIPp's screen goes to a file: a pipe nobody reads would fill and stall it.
        out = os.open(folder / "sipp.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            call.proc = await asyncio.create_subprocess_exec(
                *args, cwd=folder, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )
        except OSError as exc:
            call.result.outcome, call.result.end_reason = "dropped", f"SIPp did not start: {exc}"
            call.result.ended_t = round(self.now(), 3)
        finally:
            os.close(out)

    def _reap(self, t: float) -> None:
        for call in self.calls:
            if call.proc is not None and call.proc.returncode is not None and call.result.ended_t is None:
                call.result.ended_t = round(t, 3)
                self._classify(call)

    def _classify(self, call: _SipCall) -> None:
        assert call.proc is not None
        messages = _read(call.folder / "messages.log")
        outcome, reason = classify(call.proc.returncode, messages, call.hung_up_by_us)
        if outcome == "dropped" and call.proc.returncode != 0:
            errors = (_read(call.folder / "errors.log") or _read(call.folder / "sipp.out")).strip()
            if errors:
                reason = f"{reason}: {errors.splitlines()[-1][:200]}"
        call.result.outcome, call.result.end_reason = outcome, reason

    async def _scrape(
        self, t: float, bridge: BridgeMetrics, engine: EngineMetrics | None
    ) -> tuple[BridgeMetrics, EngineMetrics | None]:
        current = await self._bridge_metrics()
        if current is not None:
            self.up_on_bridge = current.active_sessions
            if current.active_sessions is not None:
                self.data.concurrency.append((round(t, 3), int(current.active_sessions)))
            values = ttfb_estimates_ms(current.ttfb.minus(bridge.ttfb)) if self.calls else []
            for value in values:
                self.data.ttfb_events.append((round(t, 3), value))
                self._give(t, "ttfb_given").result.ttfb_ms.append(value)
            for _ in range(max(0, round(current.turns - bridge.turns)) if self.calls else 0):
                self._give(t, "turns_given").result.turns += 1
            for _ in range(max(0, round(current.unanswered - bridge.unanswered))):
                self.unanswered += 1
                if self.calls:  # to the call with the most turns not yet answered nor counted unanswered
                    target = max(self.calls, key=_unexplained_turns)
                    target.result.unanswered += 1
            bridge = current
        newer = await self._engine_metrics()
        if newer is not None and engine is not None:
            record_engine_interval(self.data, engine, newer, t)
        return bridge, newer if newer is not None else engine

    def _give(self, t: float, counter: str) -> _SipCall:
        """One of the bridge's turns (or TTFB values) to the call whose next pending turn ended first; a
        turn nobody expected goes to the call up with the fewest (the bridge cannot say whose it was)."""
        pending = [
            (c.turn_ends[getattr(c, counter)], k)
            for k, c in enumerate(self.calls)
            if getattr(c, counter) < len(c.turn_ends) and c.turn_ends[getattr(c, counter)] <= t + 1.0
        ]
        if pending:
            call = self.calls[min(pending)[1]]
        else:
            call = min(self.calls, key=lambda c: (not c.up, getattr(c, counter)))
        setattr(call, counter, getattr(call, counter) + 1)
        return call

    def _p95(self) -> float | None:
        values = [v for _, v in self.data.ttfb_events]
        return float(np.percentile(values, 95)) if values else None

    def _errors(self) -> int:
        return sum(1 for c in self.calls if c.result.outcome != "ok") + self.unanswered

    def _last_step_stable(self, lo: float, hi: float) -> bool:
        if self._errors():
            return False
        ttfb = [v for t, v in self.data.ttfb_events if lo <= t < hi]
        return not ttfb or float(np.percentile(ttfb, 95)) <= self.opts.thresholds.ttfb_p95_ms

    async def _hang_up_ours(self) -> None:
        """Ctrl-C: the bridge hangs our answered calls up (Asterisk sends each its BYE)."""
        ours = {c.caller_id: c for c in self.calls if c.up}
        try:
            async with self.http.get(
                self.bridge_url + "/calls", headers=self.headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                live = (await response.json()).get("calls", [])
            for entry in live:
                call = ours.get(str(entry.get("caller")))
                if call is None:
                    continue
                call.hung_up_by_us = True
                async with self.http.post(
                    f"{self.bridge_url}/calls/{entry['call_id']}/hangup",
                    json={},
                    headers=self.headers,
                    timeout=aiohttp.ClientTimeout(total=5),
                ):
                    pass
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            pass  # SIPp is killed after the grace: Asterisk ends those calls on its own RTP timeout

    async def _wait_calls(self, grace_s: float) -> None:
        procs = [c.proc for c in self.calls if c.up and c.proc is not None]
        if procs:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=grace_s)

    async def _end_calls(self) -> None:
        for call in self.calls:
            if call.up:
                call.hung_up_by_us = call.hung_up_by_us or self.stop.is_set()
                await end_process(call.proc)
        self._reap(self.now())

    def _finish(self) -> None:
        for call in self.calls:
            if call.result.ended_t is None:
                call.result.ended_t = round(self.data.wall_s, 3)
            self.data.calls.append(call.result)
        self.data.config.update(
            {
                "engine_url": self.engine_url or "none (no engine metrics)",
                "bridge_url": self.bridge_url,
                "sip_target": f"{self.host}:{self.port}",
                "did": self.did,
                "ttfb_source": TTFB_NOTE,
                "concurrency_source": "bridge /metrics aziza_active_sessions",
                **({"notes": dict(self.notes)} if self.notes else {}),
            }
        )


def _unexplained_turns(call: _SipCall) -> int:
    return call.result.turns - len(call.result.ttfb_ms) - call.result.unanswered


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def run_sip(opts: Options, stop: asyncio.Event) -> RunData:
    """One ``--via sip`` run (the bridge, Asterisk and the engine are the running ones)."""
    with tempfile.TemporaryDirectory(prefix="aziza-loadtest-sip-") as work:
        return await SipRun(opts, stop, Path(work)).run()
