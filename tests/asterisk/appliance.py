"""The whole appliance against a real Asterisk, each part a real process the tests can stop and kill.

:class:`Appliance` follows the README's operator path: a config file (``aziza.toml``), ``aziza-admin db
migrate``, ``persona create``, ``did add --transfer-target``, the operator's ``extensions_local.conf`` /
``pjsip_local.conf``, ``provision asterisk --out ETC`` — then Asterisk (the build of
``provisioning/asterisk-build.sh``, started with its own ``asterisk.conf`` whose folders are this run's),
``aziza-engine --backend echo`` and ``aziza-bridge``. PostgreSQL (a database of its own) and Redis (a key
prefix of its own) are the real ones the rest of the suite uses.

Process control is synchronous (subprocess + polling with generous bounds: these wait for a state, they do
not measure); tests drive calls with SIPp from their own event loops.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import redis
from psycopg import sql

from bridge.startup import media_scheduling
from tests.conftest import PG_ADMIN_URL, REDIS_URL, _with_dbname

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEFAULT_PREFIX = Path("/var/cache/aziza/asterisk/prefix")
PREFIX = Path(os.environ.get("AZIZA_TEST_ASTERISK_PREFIX", str(DEFAULT_PREFIX)))
SOURCES = [Path(p) for p in filter(None, [os.environ.get("AZIZA_ASTERISK_SRC")])] + [
    REPO.parent / "shared" / "asterisk", Path("/work/shared/asterisk")]
TARBALLS = ("asterisk-22.10.1.tar.gz", "pjproject-2.17.tar.bz2")

DID_MAIN = "+15550001234"  # transfer target operators,100 (the operator answers)
DID_BUSY = "+15550002000"  # transfer target operators,101 (the operator there is busy)
SLOTS = 2  # capacity.slots: call 3 is refused
PHONE_USER, PHONE_PASSWORD = "desk1", "phone-" + secrets.token_hex(6)

T = TypeVar("T")


def missing_prerequisite() -> str | None:
    """Why the asterisk group cannot run here (None: it can)."""
    asterisk = PREFIX / "sbin" / "asterisk"
    if not asterisk.exists():
        sources = next((d for d in SOURCES if all((d / t).exists() for t in TARBALLS)), None)
        if sources is None:
            return (f"no Asterisk build at {PREFIX} and no sources (../shared/asterisk/{TARBALLS[0]}, "
                    f"{TARBALLS[1]} absent): these tests need a real Asterisk")
        return (f"no Asterisk build at {PREFIX}: run provisioning/asterisk-build.sh {sources / TARBALLS[0]} "
                f"{sources / TARBALLS[1]} --prefix {PREFIX} --no-service (.ci/run does)")
    for tool, package in (("sipp", "sip-tester"), ("dumpcap", "tshark"), ("espeak-ng", "espeak-ng")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if os.geteuid() != 0:
        return "SIPp's pcap play and dumpcap need root (raw sockets, capture on lo)"
    return None


def readme_local_files() -> dict[str, str]:
    """The operator files the README's walk-through writes (``cat >> /etc/asterisk/NAME <<'END'``)."""
    text = (REPO / "README.md").read_text()
    found = dict(re.findall(r"cat >> /etc/asterisk/(\S+) <<'END'\n(.*?\n)END\n", text, re.S))
    assert set(found) == {"pjsip_local.conf", "extensions_local.conf"}, f"README: {sorted(found)}"
    return found


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_udp_pair(host: str = "127.0.0.1") -> tuple[int, int]:
    """A SIP port and a media port (SIPp also binds media+2 for video) that are free right now."""
    for _ in range(200):
        base = 20000 + secrets.randbelow(20000) * 2
        ports = [base, base + 10, base + 12]
        try:
            with contextlib.ExitStack() as stack:
                for port in ports:
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    s.bind((host, port))
            return base, base + 10
        except OSError:
            continue
    raise RuntimeError("no free UDP ports")


def wait_for(predicate: Callable[[], T | None], within_s: float, what: str, every_s: float = 0.1) -> T:
    """Poll until truthy; the bound only catches a hang (it is not a measurement)."""
    deadline = time.monotonic() + within_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class Asterisk:
    """Asterisk with its own folders, run in the foreground (``-f``) as a child process."""

    def __init__(self, root: Path, prefix: Path = PREFIX) -> None:
        self.root = root
        self.prefix = prefix
        self.etc = root / "etc"
        self.log_dir = root / "log"
        self.run_dir = root / "run"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        for folder in (self.etc, self.log_dir, self.run_dir, root / "lib", root / "spool"):
            folder.mkdir(parents=True, exist_ok=True)
        data = prefix / "var" / "lib" / "asterisk"  # sounds/en and moh: links to Debian's packages
        # The operator's files (asterisk-build.sh writes these on a system install).
        (self.etc / "asterisk.conf").write_text(
            "[directories]\n"
            f"astetcdir => {self.etc}\nastmoddir => {prefix}/lib/asterisk/modules\n"
            f"astvarlibdir => {root}/lib\nastdbdir => {root}/lib\nastkeydir => {root}/lib\n"
            f"astdatadir => {data}\nastagidir => {data}/agi-bin\nastspooldir => {root}/spool\n"
            f"astrundir => {self.run_dir}\nastlogdir => {self.log_dir}\nastsbindir => {prefix}/sbin\n\n"
            "[options]\nmaxfiles = 4096\n")
        (self.etc / "modules.conf").write_text("[modules]\nautoload=yes\n")
        (self.etc / "logger.conf").write_text(
            "[general]\n[logfiles]\nmessages.log => notice,warning,error,verbose(3),dtmf\n")

    @property
    def binary(self) -> str:
        return str(self.prefix / "sbin" / "asterisk")

    def cli(self, command: str, timeout_s: float = 20.0) -> str:
        done = subprocess.run([self.binary, "-C", str(self.etc / "asterisk.conf"), "-rx", command],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        return done.stdout + done.stderr

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        out = open(self.log_dir / "console.log", "ab")
        self.proc = subprocess.Popen(
            # -p: real-time (SCHED_RR 10), as the appliance's unit runs it (provisioning/asterisk-build.sh)
            [self.binary, "-C", str(self.etc / "asterisk.conf"), "-f", "-n", "-p"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.starts += 1
        wait_for(lambda: self._booted() or self._died(), 60, "Asterisk fully booted")

    def _booted(self) -> bool:
        return (self.proc is not None and self.proc.poll() is None
                and "fully booted" in self.cli("core waitfullybooted", 10).lower())

    def _died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Asterisk exited with {self.proc.returncode}:\n{self.tail()}")
        return False

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.send_signal(signal.SIGKILL)
        else:
            self.cli("core stop now")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def tail(self, lines: int = 60) -> str:
        log = self.log_dir / "messages.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def channels(self) -> list[str]:
        out = self.cli("core show channels concise")
        return [line for line in out.splitlines() if "!" in line]

    def bridges(self) -> list[str]:
        out = self.cli("bridge show all")
        return [line for line in out.splitlines()[1:] if line.strip() and "Bridge-ID" not in line
                and not line.startswith("No bridges")]


@dataclass
class Service:
    """A Python entry point (aziza-engine, aziza-bridge) as a child process with its log in a file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    realtime_priority: int = 0  # SCHED_RR for it (bridge/startup.py); 0: as it sets its own

    def start(self) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([str(BIN / self.name), *self.args], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        if self.realtime_priority:
            media_scheduling(self.realtime_priority, self.proc.pid)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, kill: bool = False) -> None:
        if not self.running():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Appliance:
    root: Path
    asterisk: Asterisk = field(init=False)
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    database_url: str = ""
    redis_prefix: str = ""
    token: str = ""
    persona: str = ""
    engine: Service = field(init=False)
    bridge: Service = field(init=False)
    walkthrough: list[str] = field(default_factory=list)  # the aziza-admin commands run, for the report

    def __post_init__(self) -> None:
        self.asterisk = Asterisk(self.root / "asterisk")

    # ---- the operator's path ---------------------------------------------------------------------------

    def admin(self, *args: str, check: bool = True,
              timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        self.walkthrough.append("aziza-admin " + " ".join(args))
        done = subprocess.run([str(BIN / "aziza-admin"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        if check and done.returncode != 0:
            raise AssertionError(
                f"aziza-admin {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}")
        return done

    def configure(self, operator_sip_port: int, busy_sip_port: int) -> None:
        base = 40000 + secrets.randbelow(190) * 100
        self.ports = {
            "sip": free_port(socket.SOCK_DGRAM), "ari": free_port(), "bridge_http": free_port(),
            "engine": free_port(), "ast_rtp_min": base, "ast_rtp_max": base + 49,
            "bridge_rtp_min": base + 50, "bridge_rtp_max": base + 99,
            "operator": operator_sip_port, "busy": busy_sip_port,
        }
        self.redis_prefix = f"aziza-ast-{uuid.uuid4().hex[:8]}"
        name = f"aziza_test_ast_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.database_url = _with_dbname(PG_ADMIN_URL, name)
        token_file = self.root / "control.token"
        self.token = secrets.token_urlsafe(32)
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o640)
        p = self.ports
        config = self.root / "aziza.toml"
        config.write_text(f"""
database_url = "{self.database_url}"
redis_url = "{REDIS_URL}"
redis_prefix = "{self.redis_prefix}"
data_dir = "{self.root / 'data'}"

[bridge]
http_port = {p['bridge_http']}
engine_url = "ws://127.0.0.1:{p['engine']}/session"
rtp_port_min = {p['bridge_rtp_min']}
rtp_port_max = {p['bridge_rtp_max']}
control_token_file = "{token_file}"
media_workers = 2  # as the installer writes it (one per core): every call's media in a worker process

[ari]
url = "http://127.0.0.1:{p['ari']}"
password = "{secrets.token_hex(8)}"
goodbye_sound = "sound:goodbye"
transfer_timeout_s = 15

[capacity]
slots = {SLOTS}

[asterisk]
config_dir = "{self.asterisk.etc}"
sip_bind_host = "127.0.0.1"
sip_port = {p['sip']}
trunk_hosts = ["127.0.0.1/32"]
test_phone_username = "{PHONE_USER}"
test_phone_password = "{PHONE_PASSWORD}"
rtp_port_min = {p['ast_rtp_min']}
rtp_port_max = {p['ast_rtp_max']}
""")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AZIZA_")}
        self.env.update({"AZIZA_CONFIG": str(config), "PYTHONUNBUFFERED": "1"})
        self.engine = Service("aziza-engine", ["--backend", "echo", "--host", "127.0.0.1", "--port",
                                               str(p["engine"]), "--slots", str(SLOTS + 2)],
                              # The echo engine stands for a GPU engine with cores of its own: real-time just
                              # below the media, as bench media runs it (its late rounds moved calls' phase).
                              self.env, self.root / "engine.log", realtime_priority=4)
        self.bridge = Service("aziza-bridge", [], self.env, self.root / "bridge.log")

    def provision(self) -> None:
        """The README, in order: schema, persona, DIDs, the operator's local files, rendered config."""
        self.admin("db", "migrate")
        self.persona = f"ast-{uuid.uuid4().hex[:6]}"
        self.admin("persona", "create", self.persona, "--language", "en", "--text-prompt",
                   "You are a helpful agent.")
        self.admin("did", "add", DID_MAIN, "--persona", self.persona, "--transfer-target", "operators,100")
        # Refused while the dialplan has no [operators] (the README's example used to drop callers).
        refused = self.admin("provision", "asterisk", "--quiet", check=False)
        assert refused.returncode == 1 and "no context [operators]" in refused.stderr, refused.stderr
        assert not (self.asterisk.etc / "extensions.conf").exists()
        self.admin("did", "add", DID_BUSY, "--persona", self.persona, "--transfer-target", "operators,101")
        p = self.ports
        # The README's own operator files (its operator's address made this run's), plus a busy desk.
        readme = readme_local_files()
        (self.asterisk.etc / "pjsip_local.conf").write_text(
            readme["pjsip_local.conf"].replace("192.0.2.10:5060", f"127.0.0.1:{p['operator']}")
            + "\n[busydesk]\ntype=endpoint\ncontext=aziza-inbound\ndisallow=all\nallow=ulaw\naors=busydesk\n"
            f"[busydesk]\ntype=aor\ncontact=sip:busy@127.0.0.1:{p['busy']}\n")
        (self.asterisk.etc / "extensions_local.conf").write_text(
            readme["extensions_local.conf"] + "exten => 101,1,Dial(PJSIP/busydesk,20)\n same => n,Hangup()\n")
        out = self.admin("provision", "asterisk", "--quiet").stdout
        assert "pjsip.conf: created" in out and "extensions.conf: created" in out, out

    def start(self) -> None:
        self.asterisk.start()
        self.engine.start()
        wait_for(lambda: self._engine_up() or self._crashed(self.engine), 60, "engine /health")
        self.bridge.start()
        self.wait_bridge_connected(60)

    def _crashed(self, service: Service) -> bool:
        if not service.running():
            raise AssertionError(f"{service.name} exited:\n{service.text()[-4000:]}")
        return False

    def _engine_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['engine']}/health", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def engine_up(self) -> bool:
        return self._engine_up()

    def restart_engine(self) -> None:
        self.engine.start()
        wait_for(lambda: self._engine_up() or self._crashed(self.engine), 60, "engine back")

    def stop(self) -> None:
        self.bridge.stop()
        self.engine.stop()
        self.asterisk.stop()
        with contextlib.suppress(psycopg.Error), psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            name = self.database_url.rpartition("/")[2]
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def teardown(self) -> None:
        """Stop everything and leave nothing of this run behind: its database (:meth:`stop`) and its Redis
        keys."""
        self.stop()
        client = redis.Redis.from_url(REDIS_URL)
        with contextlib.suppress(redis.RedisError):
            keys = list(client.scan_iter(match=f"{self.redis_prefix}*"))
            if keys:
                client.delete(*keys)
        client.close()

    # ---- the bridge's control API ---------------------------------------------------------------------

    def control(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout_s: float = 10) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['bridge_http']}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def health(self) -> dict[str, Any]:
        try:
            return self.control("GET", "/health", timeout_s=3)[1]
        except (OSError, urllib.error.URLError, ValueError):
            return {}

    def wait_bridge_connected(self, within_s: float) -> float:
        started = time.monotonic()
        wait_for(lambda: self.health().get("ari_connected") or self._crashed(self.bridge), within_s,
                 "the bridge connected to ARI")
        return time.monotonic() - started

    def live_calls(self) -> list[dict[str, Any]]:
        return list(self.control("GET", "/calls")[1].get("calls", []))

    def call_record(self, call_id: str) -> dict[str, Any]:
        return dict(json.loads(self.admin("calls", "show", call_id, "--json").stdout))

    def latest_records(self, since: float, did: str | None = None) -> list[dict[str, Any]]:
        """Call records started after ``since`` (epoch seconds), newest first."""
        args = ["calls", "list", "--json", "--limit", "50"] + (["--did", did] if did else [])
        rows = json.loads(self.admin(*args).stdout)
        out = []
        for row in rows:
            started = row.get("started_at")
            if started and _epoch(started) >= since - 1:
                out.append(row)
        return out


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
