"""``aziza-admin loadtest --via sip``'s parts without Asterisk: the caller pcap (parsed back), the SIPp
scenario, the bridge's /metrics as the load test reads it, call outcomes from SIPp traces, and one clear
error for each missing prerequisite. The real run is tests/asterisk/test_loadtest_sip.py."""

from __future__ import annotations

import asyncio
import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from admin_cli import loadtest_sip
from admin_cli.loadtest import HistogramSnapshot, LoadTestError
from admin_cli.loadtest_sip import (
    caller_scenario,
    check_sip_prerequisites,
    classify,
    parse_bridge_metrics,
    pcmu_packets,
    ttfb_estimates_ms,
    write_rtp_pcap,
)
from admin_cli.main import cli
from bridge.media.codecs import ulaw_decode
from bridge.media.metrics import MediaStats
from bridge.media.prometheus import MediaMetrics
from bridge.media.rtp import parse_rtp
from tests.http_server import serve_on_loopback

TOKEN = "t" * 40


# -- the pcap ----------------------------------------------------------------------------------------------


def _read_pcap(path: Path) -> tuple[tuple[int, ...], list[tuple[float, bytes, bytes, bytes]]]:
    """The global header and each record's (time, Ethernet header, IPv4 header, UDP datagram)."""
    data = path.read_bytes()
    header = struct.unpack("<IHHiIII", data[:24])
    records = []
    offset = 24
    while offset < len(data):
        sec, usec, caplen, origlen = struct.unpack("<IIII", data[offset : offset + 16])
        assert caplen == origlen
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        records.append((sec + usec / 1e6, frame[:14], frame[14:34], frame[34:]))
    return header, records


def _ip_sum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_pcap_of_rtp_pcmu_parses_back(tmp_path: Path) -> None:
    t = np.arange(8000 + 50) / 8000  # 1 s and a bit: the last packet is padded
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    packets = pcmu_packets(pcm, ssrc=0xCAFEBABE, seq=65530, ts=0xFFFFFF00)
    path = tmp_path / "caller.pcap"
    write_rtp_pcap(path, packets, src_port=6000, dst_port=6002)

    (magic, major, minor, _, _, snaplen, linktype), records = _read_pcap(path)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1) and snaplen >= 65535
    assert len(records) == 51
    rtp = []
    for _, eth, ip, udp in records:
        assert eth[12:14] == b"\x08\x00"
        assert ip[0] == 0x45 and ip[9] == 17 and _ip_sum(ip) == 0xFFFF  # IPv4, UDP, checksum right
        assert struct.unpack("!H", ip[2:4])[0] == 20 + len(udp)
        src, dst, length, _ = struct.unpack("!HHHH", udp[:8])
        assert (src, dst, length) == (6000, 6002, len(udp))
        rtp.append(parse_rtp(udp[8:]))
    assert {p.payload_type for p in rtp} == {0} and {p.ssrc for p in rtp} == {0xCAFEBABE}
    assert {len(p.payload) for p in rtp} == {160}
    assert [p.marker for p in rtp] == [True] + [False] * 50
    assert [p.sequence for p in rtp] == [(65530 + k) & 0xFFFF for k in range(51)]  # wraps
    assert [p.timestamp for p in rtp] == [(0xFFFFFF00 + 160 * k) & 0xFFFFFFFF for k in range(51)]
    times = np.array([r[0] for r in records])
    assert times[0] == 0.0 and np.allclose(np.diff(times), 0.02, atol=2e-6)
    decoded = np.concatenate([ulaw_decode(p.payload) for p in rtp])
    assert np.all(decoded[len(pcm) :] == 0)
    error = decoded[: len(pcm)].astype(np.float64) - pcm
    assert np.sqrt(np.mean(error**2)) < 0.05 * np.sqrt(np.mean(pcm.astype(np.float64) ** 2))


# -- the scenario ------------------------------------------------------------------------------------------


def test_caller_scenario(tmp_path: Path) -> None:
    pcap = tmp_path / "call0" / "caller.pcap"
    xml = caller_scenario(pcap, 12.345, "19990001")
    root = ET.fromstring(xml.split("\n", 2)[2])  # past the XML declaration and DOCTYPE
    steps = list(root)
    invite = steps[0].text or ""
    assert steps[0].tag == "send" and invite.strip().startswith("INVITE sip:[service]@")
    assert "m=audio [media_port] RTP/AVP 0 101" in invite
    assert "a=rtpmap:0 PCMU/8000" in invite and "a=rtpmap:101 telephone-event/8000" in invite
    assert "<sip:19990001@" in invite
    recvs = [s.attrib for s in steps if s.tag == "recv"]
    assert {"response": "486", "optional": "true", "next": "refused"} in recvs
    assert {"response": "503", "optional": "true", "next": "refused"} in recvs
    plays = [a.attrib for a in root.iter("exec")]
    assert plays == [{"play_pcap_audio": str(pcap)}]
    bye_wait = next(s for s in recvs if s.get("request") == "BYE")
    assert bye_wait == {"request": "BYE", "timeout": "12345", "ontimeout": "hangup"}
    labels = {s.attrib["id"] for s in steps if s.tag == "label"}
    targets = {s.attrib[k] for s in steps for k in ("next", "ontimeout") if k in s.attrib}
    assert targets <= labels == {"hangup", "refused", "end"}
    sent = [(s.text or "").strip().split(" ", 1)[0] for s in steps if s.tag == "send"]
    assert sent == ["INVITE", "ACK", "SIP/2.0", "BYE", "ACK"]  # ACK, their BYE's 200, our BYE, refused ACK
    # The play starts after the ACK for the 200: Asterisk has the call's media address by then.
    order = [s.tag for s in steps]
    assert order.index("nop") > sent.index("ACK")
    with pytest.raises(ValueError):
        caller_scenario(pcap, 1.0, 'x"/><exec command="rm')


def _trace(*first_lines: tuple[str, str]) -> str:
    """A -trace_msg log: (direction, first line) per message."""
    out = []
    for direction, line in first_lines:
        out.append(f"----------------------------------------------- 2026-01-01\nUDP message {direction} "
                   f"[300] bytes :\n\n{line}\nVia: SIP/2.0/UDP 127.0.0.1\n\n")
    return "".join(out)


def test_outcomes_from_sipp_traces() -> None:
    invite = ("sent", "INVITE sip:100@127.0.0.1:5060 SIP/2.0")
    ok = _trace(invite, ("received", "SIP/2.0 100 Trying"), ("received", "SIP/2.0 200 OK"),
                ("sent", "BYE sip:100@127.0.0.1:5060 SIP/2.0"), ("received", "SIP/2.0 200 OK"))
    assert classify(0, ok, False)[0] == "ok"
    busy = _trace(invite, ("received", "SIP/2.0 486 Busy Here"), ("sent", "ACK sip:100@x SIP/2.0"))
    assert classify(0, busy, False) == ("refused", "SIP 486")
    full = _trace(invite, ("received", "SIP/2.0 503 Service Unavailable"))
    assert classify(1, full, False) == ("refused", "SIP 503")
    early = _trace(invite, ("received", "SIP/2.0 200 OK"), ("received", "BYE sip:c@127.0.0.1:5062 SIP/2.0"))
    assert classify(0, early, False)[0] == "dropped"
    assert classify(0, early, True)[0] == "ok"  # our Ctrl-C made the bridge hang up
    assert classify(1, _trace(invite, ("received", "SIP/2.0 404 Not Found")), False) == (
        "dropped",
        "SIPp exited with 1 after SIP 404",
    )
    assert classify(-9, "", False)[0] == "dropped"


# -- the bridge's /metrics ---------------------------------------------------------------------------------


def test_bridge_metrics_from_the_real_collector() -> None:
    metrics = MediaMetrics()
    registry = CollectorRegistry()
    registry.register(metrics)
    stats = MediaStats()
    stats.turns.turns, stats.turns.unanswered = 5, 1
    stats.turns.ttfb_ms.extend([55.0, 90.0, 110.0, 400.0])

    class Inbound:
        lost_packets = 0

    metrics.call_started(stats, Inbound())
    parsed = parse_bridge_metrics(generate_latest(registry).decode())
    assert parsed.active_sessions == 1 and parsed.turns == 5 and parsed.unanswered == 1
    assert parsed.ttfb.count == 4 and parsed.ttfb.total == pytest.approx(0.655)
    assert parsed.ttfb.buckets[0.06] == 1 and parsed.ttfb.buckets[0.12] == 3 and parsed.ttfb.buckets[0.5] == 4
    metrics.call_ended(stats)  # the call's numbers move to the ended totals: nothing is counted twice
    after = parse_bridge_metrics(generate_latest(registry).decode())
    assert after.active_sessions == 0 and after.turns == 5 and after.ttfb.count == 4


def test_ttfb_from_bucket_deltas() -> None:
    before = HistogramSnapshot({0.1: 2, 0.2: 3, float("inf"): 3}, 0.3, 3)
    one = HistogramSnapshot({0.1: 2, 0.2: 4, float("inf"): 4}, 0.3 + 0.1375, 4)
    assert ttfb_estimates_ms(one.minus(before)) == [137.5]  # one new turn: its exact value, from the sum
    later = HistogramSnapshot({0.1: 4, 0.2: 6, float("inf"): 7}, 1.0, 7)
    # two new turns in (0, 100] ms spread over that bucket, one in (100, 200], one past the last bound (at it)
    assert ttfb_estimates_ms(later.minus(before)) == [25.0, 75.0, 150.0, 200.0]
    assert ttfb_estimates_ms(before.minus(before)) == []


# -- prerequisites -----------------------------------------------------------------------------------------


def _fake_sipp(folder: Path) -> str:
    folder.mkdir(exist_ok=True)
    sipp = folder / "sipp"
    sipp.write_text("#!/bin/sh\nexit 0\n")
    sipp.chmod(0o755)
    return str(folder)


@pytest.fixture
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "control.token"
    path.write_text(TOKEN + "\n")
    monkeypatch.delenv("AZIZA_CONFIG", raising=False)
    monkeypatch.setenv("AZIZA_BRIDGE__CONTROL_TOKEN_FILE", str(path))
    return path


def test_sipp_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LoadTestError, match=r"SIPp is not installed: apt-get install sip-tester"):
        check_sip_prerequisites("http://127.0.0.1:9", "127.0.0.1:5060", "100")


def test_not_root_and_no_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _fake_sipp(tmp_path / "bin"))
    monkeypatch.setattr(loadtest_sip.os, "geteuid", lambda: 1000)
    with pytest.raises(LoadTestError, match="needs root"):
        check_sip_prerequisites("http://127.0.0.1:9", "127.0.0.1:5060", "100")
    monkeypatch.setattr(loadtest_sip.os, "geteuid", lambda: 0)
    with pytest.raises(LoadTestError, match="needs --did"):
        check_sip_prerequisites("http://127.0.0.1:9", "127.0.0.1:5060", None)
    with pytest.raises(LoadTestError, match="--sip-target must be HOST:PORT"):
        check_sip_prerequisites("http://127.0.0.1:9", "127.0.0.1:port", "100")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed when this returns: nothing listens there


def test_unreachable_bridge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_file: Path) -> None:
    monkeypatch.setenv("PATH", _fake_sipp(tmp_path / "bin"))
    monkeypatch.setattr(loadtest_sip.os, "geteuid", lambda: 0)
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(LoadTestError, match=rf"the bridge at {url} is unreachable"):
        check_sip_prerequisites(url, "127.0.0.1:5060", "100")


def test_no_control_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _fake_sipp(tmp_path / "bin"))
    monkeypatch.setattr(loadtest_sip.os, "geteuid", lambda: 0)
    monkeypatch.delenv("AZIZA_CONFIG", raising=False)
    monkeypatch.setenv("AZIZA_BRIDGE__CONTROL_TOKEN_FILE", str(tmp_path / "missing.token"))
    with pytest.raises(LoadTestError, match=r"control token: .*missing\.token does not exist"):
        check_sip_prerequisites("http://127.0.0.1:9", "127.0.0.1:5060", "100")


async def test_reachable_bridge_gets_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_file: Path
) -> None:
    monkeypatch.setenv("PATH", _fake_sipp(tmp_path / "bin"))
    monkeypatch.setattr(loadtest_sip.os, "geteuid", lambda: 0)
    seen: list[str] = []

    async def metrics(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.Response(status=401)
        return web.Response(text="aziza_active_sessions 0.0\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with serve_on_loopback(app) as port:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(check_sip_prerequisites, url, "127.0.0.1:5060", "100")
        await asyncio.to_thread(token_file.write_text, "w" * 40 + "\n")
        with pytest.raises(LoadTestError, match=r"refused /metrics \(HTTP 401"):
            await asyncio.to_thread(check_sip_prerequisites, url, "127.0.0.1:5060", "100")
    assert seen == [f"Bearer {TOKEN}", f"Bearer {'w' * 40}"]


def test_command_says_sipp_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(
        cli, ["loadtest", "--via", "sip", "--quick", "--seconds", "5", "--did", "100", "--report",
              str(tmp_path / "report")],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "SIPp is not installed: apt-get install sip-tester" in result.output
    assert os.listdir(tmp_path / "report") == []  # nothing ran
