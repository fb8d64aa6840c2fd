"""SIPp (Debian ``sip-tester``, 3.6.1) as the callers and the operator: scenario files written at test time,
each SIPp run an asyncio subprocess with its own SIP and media ports and its message trace kept.

Scenarios (``caller``): INVITE with PCMU + telephone-event, then after the 200 play the call's pcap and
either hang up (``hangup_after_s``) or wait for Asterisk's BYE (``expect_bye``). ``refused``: the INVITE
must end in 486 or 503 without ever being answered. ``operator``: answer after ringing, play its own
speech, take the BYE. ``busy``: answer every INVITE with 486.
``register``: REGISTER with digest authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from admin_cli.sipp_scenarios import ACK_2XX, ACK_ERROR, INVITE, OUR_BYE, TAKE_BYE, scenario


def caller(pcap: Path, *, hangup_after_s: float | None = None, expect_bye_within_s: float | None = None,
           caller_id: str = "15557770001") -> str:
    """Call, play ``pcap``, then hang up after ``hangup_after_s`` or take a BYE within
    ``expect_bye_within_s`` (a BYE that never comes fails the run)."""
    if (hangup_after_s is None) == (expect_bye_within_s is None):
        raise ValueError("either hangup_after_s or expect_bye_within_s")
    body = INVITE + '  <recv response="200" rtd="true"/>\n' + ACK_2XX
    body += f'  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>\n'
    if hangup_after_s is not None:
        body += f'  <pause milliseconds="{round(hangup_after_s * 1000)}"/>\n' + OUR_BYE
    else:
        assert expect_bye_within_s is not None
        body += TAKE_BYE.replace("__BYE_TIMEOUT_MS__", str(round(expect_bye_within_s * 1000)))
    return _scenario("caller", body.replace("__CALLER__", caller_id))


def refused(caller_id: str = "15557770002") -> str:
    """The INVITE must be refused with 486 or 503 (never answered); the ACK reuses the INVITE's Via."""
    body = INVITE + """
  <recv response="486" optional="true" next="refused"/>
  <recv response="503" next="refused"/>
  <label id="refused"/>""" + ACK_ERROR
    return _scenario("refused", body.replace("__CALLER__", caller_id))


_UAS_INVITE = """
  <recv request="INVITE" crlf="true"/>
  <send>
    <![CDATA[
      SIP/2.0 100 Trying
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
"""


def operator(pcap: Path, *, ring_s: float = 0.5) -> str:
    """Ring, answer, play ``pcap`` (the operator's own voice), and stay until the other side's BYE."""
    body = _UAS_INVITE + f"""
  <send>
    <![CDATA[
      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:operator@[local_ip]:[local_port]>
      Content-Length: 0
    ]]>
  </send>
  <pause milliseconds="{round(ring_s * 1000)}"/>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:operator@[local_ip]:[local_port]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=- 2 2 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
      a=ptime:20
      a=sendrecv
    ]]>
  </send>
  <recv request="ACK" rtd="true" crlf="true"/>
  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>
"""
    body += TAKE_BYE.replace("__BYE_TIMEOUT_MS__", "60000")
    return _scenario("operator", body)


def busy() -> str:
    body = _UAS_INVITE + """
  <send>
    <![CDATA[
      SIP/2.0 486 Busy Here
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag02[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <recv request="ACK" crlf="true"/>
"""
    return _scenario("busy", body)


def register(username: str, password: str) -> str:
    msg = """
  <send retrans="500">
    <![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:__USER__@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag03[call_number]
      To: <sip:__USER__@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: __CSEQ__ REGISTER
      Contact: <sip:__USER__@[local_ip]:[local_port]>
      Expires: 120
      Max-Forwards: 70
      __AUTH__
      Content-Length: 0
    ]]>
  </send>
"""
    first = msg.replace("__CSEQ__", "1").replace("      __AUTH__\n", "")
    second = msg.replace("__CSEQ__", "2").replace("__AUTH__", f"[authentication username={username} "
                                                             f"password={password}]")
    body = (first + '  <recv response="401" auth="true"/>\n' + second + '  <recv response="200"/>\n')
    return _scenario("register", body.replace("__USER__", username))


def _scenario(name: str, body: str) -> str:
    return scenario(name, body)


@dataclass
class SippResult:
    returncode: int
    messages: str  # the -trace_msg log: every SIP message sent and received
    errors: str
    output: str

    def received_statuses(self) -> list[int]:
        """Status codes of the responses SIPp received, in order."""
        return [int(m) for m in re.findall(r"received.*?\n\s*SIP/2\.0 (\d{3})", self.messages)]

    def received_requests(self) -> list[str]:
        return re.findall(r"received.*?\n\s*([A-Z]+) sip:", self.messages)

    def describe(self) -> str:
        return (f"sipp exit {self.returncode}\n--- errors ---\n{self.errors[-3000:]}\n"
                f"--- messages ---\n{self.messages[-6000:]}\n--- output ---\n{self.output[-2000:]}")


class Sipp:
    """One SIPp run: a client (``target`` = Asterisk's SIP address) or a server (``target`` None)."""

    def __init__(self, work: Path, name: str, scenario_xml: str, *, sip_port: int, media_port: int,
                 target: str | None = None, service: str = "s", timeout_s: float = 60.0,
                 local_ip: str = "127.0.0.1") -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.scenario = self.dir / f"{name}.xml"
        self.scenario.write_text(scenario_xml)
        self.sip_port = sip_port
        self.media_port = media_port
        self.target = target
        self.service = service
        self.timeout_s = timeout_s
        self.local_ip = local_ip
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        args = ["sipp", "-sf", str(self.scenario), "-i", self.local_ip, "-p", str(self.sip_port),
                "-mi", self.local_ip, "-mp", str(self.media_port), "-m", "1", "-nostdin",
                "-timeout", f"{round(self.timeout_s)}s", "-timeout_error",
                "-trace_msg", "-message_file", str(self.dir / "messages.log"),
                "-trace_err", "-error_file", str(self.dir / "errors.log")]
        if self.target is not None:
            args += ["-s", self.service, "-r", "1", self.target]
        self.proc = await asyncio.create_subprocess_exec(
            *args, cwd=self.dir, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)

    async def wait(self) -> SippResult:
        assert self.proc is not None
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), self.timeout_s + 30)
        except TimeoutError:
            self.kill()
            out, _ = await self.proc.communicate()
        return SippResult(self.proc.returncode if self.proc.returncode is not None else -1,
                          _read(self.dir / "messages.log"), _read(self.dir / "errors.log"),
                          out.decode(errors="replace"))

    async def run(self) -> SippResult:
        await self.start()
        return await self.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
