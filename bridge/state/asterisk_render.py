"""Render the Asterisk configuration (``asterisk_conf/*.conf.tmpl``) from settings and the DID table.

Rendering is a pure function (settings + DIDs -> file texts); writing puts every file in the target
directory as a temporary file first and only then renames them all over the old ones (``os.replace``), so
Asterisk never reads a half-written file, and reports a unified diff per file.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Literal
from urllib.parse import urlsplit

from bridge.config import Settings
from bridge.state.models import Did, InvalidInput

CONF_FILES = ("pjsip.conf", "extensions.conf", "ari.conf", "http.conf", "rtp.conf", "musiconhold.conf")
# Where templates are looked for: a checkout's asterisk_conf/, then where system_install.sh puts them.
TEMPLATE_DIRS = (
    Path(__file__).resolve().parents[2] / "asterisk_conf",
    Path("/usr/share/aziza/asterisk_conf"),
)


@dataclass(frozen=True)
class FileChange:
    name: str
    status: Literal["created", "changed", "unchanged"]
    diff: str


def find_template_dir(explicit: Path | None = None) -> Path:
    candidates = (
        [explicit]
        if explicit
        else [Path(p) for p in filter(None, [os.environ.get("AZIZA_ASTERISK_TEMPLATES")])]
    )
    candidates += [] if explicit else list(TEMPLATE_DIRS)
    for directory in candidates:
        if (directory / "extensions.conf.tmpl").is_file():
            return directory
    raise InvalidInput(f"Asterisk templates not found in {', '.join(str(c) for c in candidates)}")


def _value(text: str, what: str) -> str:
    """A value safe on one config line: no line breaks; ';' (comment start) escaped as Asterisk reads it."""
    if "\n" in text or "\r" in text or not text.strip():
        raise InvalidInput(f"{what} {text!r} cannot be written to an Asterisk config line")
    return text.replace(";", r"\;")


def _routes(dids: list[Did], app: str) -> str:
    blocks = []
    for did in sorted((d for d in dids if d.enabled), key=lambda d: d.number):
        digits = did.number.lstrip("+")
        blocks.append(
            f"; {did.number} -> persona {did.persona}\n"
            f"exten => {did.number},1,NoOp(Aziza DID {did.number})\n"
            f" same => n,Stasis({app},{did.number})\n"
            " same => n,Hangup()\n"
            # Trunks that send the number without '+' reach the same route.
            f"exten => {digits},1,Goto(aziza-inbound,{did.number},1)\n"
        )
    return "\n".join(blocks) if blocks else "; (no enabled DIDs)\n"


def _trunks(hosts: list[str], codecs: str) -> str:
    parts = []
    for index, host in enumerate(hosts, start=1):
        host = _value(host, "trunk host")
        name = f"trunk{index}"
        parts.append(
            f"[{name}]\ntype=endpoint\ntransport=transport-udp\ncontext=aziza-inbound\n"
            f"disallow=all\nallow={codecs}\ndirect_media=no\nrtp_symmetric=yes\nforce_rport=yes\n"
            f"rewrite_contact=yes\ndtmf_mode=rfc4733\naors={name}-aor\n\n"
            f"[{name}-aor]\ntype=aor\ncontact=sip:{host}\n\n"
            f"[{name}-identify]\ntype=identify\nendpoint={name}\nmatch={host}\n"
        )
    return "\n".join(parts) if parts else "; (no trunks configured)\n"


def render(settings: Settings, dids: list[Did], template_dir: Path | None = None) -> dict[str, str]:
    """File name -> rendered text, for every file in CONF_FILES."""
    ast = settings.asterisk
    bridge = settings.bridge
    if ast.rtp_port_min > ast.rtp_port_max:
        raise InvalidInput("asterisk.rtp_port_min is above asterisk.rtp_port_max")
    if ast.rtp_port_min <= bridge.rtp_port_max and bridge.rtp_port_min <= ast.rtp_port_max:
        raise InvalidInput(
            f"Asterisk RTP ports {ast.rtp_port_min}-{ast.rtp_port_max} overlap the bridge's "
            f"{bridge.rtp_port_min}-{bridge.rtp_port_max}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", settings.ari.app):
        raise InvalidInput(f"ARI app name {settings.ari.app!r}: letters, digits, '_' and '-' only")
    ari_url = urlsplit(settings.ari.url)
    nat = ""
    if ast.external_address:
        address = _value(ast.external_address, "external address")
        nat = f"external_media_address={address}\nexternal_signaling_address={address}\n"
    values = {
        "sip_bind": f"{_value(ast.sip_bind_host, 'SIP bind host')}:{ast.sip_port}",
        "nat_lines": nat,
        "trunks": _trunks(ast.trunk_hosts, ",".join(_value(c, "codec") for c in ast.codecs)),
        "app": _value(settings.ari.app, "ARI app"),
        "routes": _routes(dids, _value(settings.ari.app, "ARI app")),
        "username": _value(settings.ari.username, "ARI user"),
        "password": _value(settings.ari.password, "ARI password"),
        "bind_host": ari_url.hostname or "127.0.0.1",
        "bind_port": str(ari_url.port or 8088),
        "rtp_start": str(ast.rtp_port_min),
        "rtp_end": str(ast.rtp_port_max),
        "bridge_rtp_range": f"{bridge.rtp_port_min}-{bridge.rtp_port_max}",
        "moh_class": _value(settings.ari.moh_class, "MOH class"),
    }
    directory = find_template_dir(template_dir)
    rendered = {}
    for name in CONF_FILES:
        template = Template((directory / f"{name}.tmpl").read_text(encoding="utf-8"))
        try:
            rendered[name] = template.substitute(values).rstrip("\n") + "\n"
        except (KeyError, ValueError) as exc:
            raise InvalidInput(f"template {name}.tmpl: bad placeholder {exc}") from None
    return rendered


def plan(out_dir: Path, files: dict[str, str]) -> list[FileChange]:
    changes = []
    for name, text in files.items():
        path = out_dir / name
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        if old == text:
            changes.append(FileChange(name, "unchanged", ""))
            continue
        diff = "".join(
            difflib.unified_diff(
                (old or "").splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"a/{name}" if old is not None else "/dev/null",
                tofile=f"b/{name}",
            )
        )
        changes.append(FileChange(name, "created" if old is None else "changed", diff))
    return changes


def write(out_dir: Path, files: dict[str, str], dry_run: bool = False) -> list[FileChange]:
    """Write the changed files into ``out_dir``: all temp files first, then the renames."""
    changes = plan(out_dir, files)
    if dry_run:
        return changes
    to_write = [c.name for c in changes if c.status != "unchanged"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        temps: list[tuple[str, Path]] = []
        try:
            for name in to_write:
                fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
                temps.append((name, Path(tmp_name)))
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(files[name])
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp_name, 0o640)
            for name, tmp in temps:
                os.replace(tmp, out_dir / name)
        finally:
            for _, tmp in temps:
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot write Asterisk config into {out_dir}: {exc.strerror or exc}") from None
    return changes
