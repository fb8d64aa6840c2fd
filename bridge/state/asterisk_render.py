"""Render the Asterisk configuration (``asterisk_conf/*.conf.tmpl``) from settings and the DID table.

Rendering is a pure function (settings + DIDs -> file texts); writing puts every file in the target
directory as a temporary file first and only then renames them all over the old ones (``os.replace``), so
Asterisk never reads a half-written file, and reports a unified diff per file. Files are 0640 and, where
the group exists, group ``asterisk`` (Asterisk runs as that user; ari.conf holds a password).

The rendered pjsip.conf and extensions.conf ``#include`` the operator's own ``pjsip_local.conf`` and
``extensions_local.conf`` (created empty once, never overwritten): that is where the contexts that
transfer targets name, and the endpoints they dial, live. Every DID's transfer target is checked against
the rendered dialplan plus those files before anything is written.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Literal
from urllib.parse import urlsplit

from bridge.config import Settings
from bridge.state import dialplan
from bridge.state.models import Did, InvalidInput

CONF_FILES = ("pjsip.conf", "extensions.conf", "ari.conf", "http.conf", "rtp.conf", "musiconhold.conf")
# The operator's files the rendered ones #include: created once with this text, never overwritten.
LOCAL_FILES = {
    "pjsip_local.conf": (
        "; Your own PJSIP objects, included by the rendered pjsip.conf (provisioning never touches this\n"
        "; file). For example the operator phone that a transfer target dials:\n"
        ";   [operator]\n;   type=endpoint\n;   context=aziza-inbound\n;   disallow=all\n;   allow=ulaw\n"
        ";   aors=operator\n;   [operator]\n;   type=aor\n;   contact=sip:operator@192.0.2.10:5060\n"
    ),
    "extensions_local.conf": (
        "; Your own dialplan, included by the rendered extensions.conf (provisioning never touches this\n"
        "; file). A DID's transfer target \"operators,100\" needs, for example:\n"
        ";   [operators]\n;   exten => 100,1,Dial(PJSIP/operator,30)\n;    same => n,Hangup()\n"
    ),
}
ASTERISK_GROUP = "asterisk"
# Which module reads which file (`--reload` reloads the modules of the files that changed).
MODULE_OF = {
    "pjsip.conf": "res_pjsip.so", "pjsip_local.conf": "res_pjsip.so",
    "extensions.conf": "pbx_config.so", "extensions_local.conf": "pbx_config.so",
    "ari.conf": "res_ari.so", "rtp.conf": "res_rtp_asterisk.so", "musiconhold.conf": "res_musiconhold.so",
    # http.conf belongs to the core HTTP server, which also carries ARI: a restart applies it.
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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


_ENDPOINT_OPTIONS = (
    "transport=transport-udp\ncontext=aziza-inbound\ndisallow=all\nallow={codecs}\ndirect_media=no\n"
    "rtp_symmetric=yes\nforce_rport=yes\nrewrite_contact=yes\ndtmf_mode=rfc4733\n"
)


def _trunks(hosts: list[str], codecs: str) -> str:
    """An endpoint per trunk. A host or address is matched and can be dialled (its AOR has a contact); a
    CIDR range (198.51.100.0/24) can only be matched (``identify match``), so it gets no contact."""
    parts = []
    for index, host in enumerate(hosts, start=1):
        host = _value(host, "trunk host").strip()
        name = f"trunk{index}"
        endpoint = f"[{name}]\ntype=endpoint\n" + _ENDPOINT_OPTIONS.format(codecs=codecs)
        identify = f"[{name}-identify]\ntype=identify\nendpoint={name}\nmatch={host}\n"
        if "/" in host:
            try:
                network = ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise InvalidInput(f"asterisk.trunk_hosts: {host!r} is not an address range (CIDR)") from None
            identify = identify.replace(f"match={host}", f"match={network.with_prefixlen}")
            parts.append(f"; {host}: a range, matched only (calls from it; nothing dials it)\n"
                         f"{endpoint}\n{identify}")
            continue
        if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", host):
            raise InvalidInput(f"asterisk.trunk_hosts: {host!r} is not an address, host name or CIDR")
        parts.append(f"{endpoint}aors={name}-aor\n\n[{name}-aor]\ntype=aor\ncontact=sip:{host}\n\n{identify}")
    return "\n".join(parts) if parts else (
        "; (no trunks: set asterisk.trunk_hosts, or asterisk.test_phone_username/password for a phone)\n")


def _phone(username: str | None, password: str | None, codecs: str) -> str:
    """One phone that registers with digest auth; its calls land in aziza-inbound like a trunk's."""
    if username is None or password is None:
        return "; (no test phone: asterisk.test_phone_username/password)\n"
    if not _NAME.match(username):
        raise InvalidInput(f"asterisk.test_phone_username {username!r}: letters, digits, '_', '.', '-' only")
    if username.startswith("trunk"):
        raise InvalidInput(f"asterisk.test_phone_username {username!r}: 'trunk…' names are the trunks'")
    secret = _value(password, "test phone password")
    return (
        f"; The test phone (asterisk.test_phone_username): registers as {username}, digest auth.\n"
        f"[{username}]\ntype=endpoint\n" + _ENDPOINT_OPTIONS.format(codecs=codecs)
        + f"auth={username}-auth\naors={username}\n\n"
        f"[{username}-auth]\ntype=auth\nauth_type=userpass\nusername={username}\npassword={secret}\n\n"
        f"[{username}]\ntype=aor\nmax_contacts=1\nremove_existing=yes\n"
    )


def endpoint_names(settings: Settings) -> list[str]:
    """The PJSIP endpoints the rendered pjsip.conf defines (`--reload` checks Asterisk has them)."""
    names = [f"trunk{i}" for i in range(1, len(settings.asterisk.trunk_hosts) + 1)]
    if settings.asterisk.test_phone_username:
        names.append(settings.asterisk.test_phone_username)
    return names


def check_syntax(files: dict[str, str], local: dict[str, str]) -> None:
    """Refuse what Asterisk's parser would reject (it would keep its old configuration on reload)."""
    for name, text in [*files.items(), *local.items()]:
        problems = dialplan.syntax_errors(text, name)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InvalidInput(f"{problems[0]}{more}: Asterisk would reject or skip it; fix the file first")


def check_transfer_targets(dids: list[Did], files: dict[str, str], read_local: dict[str, str]) -> None:
    """Every enabled DID's dialplan transfer target must exist in the rendered extensions.conf plus the
    operator's includes (``read_local``: file name -> text); a sip: URI is dialled as given."""
    contexts = dialplan.parse(files.get("extensions.conf", ""), read_local.get)
    for did in sorted(dids, key=lambda d: d.number):
        target = (did.transfer_target or "").strip()
        if not did.enabled or not target or target.lower().startswith(("sip:", "sips:")):
            continue
        parts = target.split(",")
        context, extension = ("aziza-inbound", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        if len(parts) == 3 and parts[2] != "1":
            raise InvalidInput(f"DID {did.number}: transfer target {target!r}: a transfer starts at "
                               f"priority 1, not {parts[2]}")
        if context not in contexts:
            raise InvalidInput(
                f"DID {did.number}: transfer target {target!r}: no context [{context}] in the dialplan; "
                f"define it in extensions_local.conf ([{context}] exten => {extension},1,Dial(PJSIP/...)) "
                "or change the target (aziza-admin did update --transfer-target)")
        if not dialplan.find(contexts, context, extension):
            raise InvalidInput(
                f"DID {did.number}: transfer target {target!r}: context [{context}] has no extension "
                f"{extension}; add it in extensions_local.conf or change the target")


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
    codecs = ",".join(_value(c, "codec") for c in ast.codecs)
    nat = ""
    if ast.external_address:
        address = _value(ast.external_address, "external address")
        nat = f"external_media_address={address}\nexternal_signaling_address={address}\n"
    values = {
        "sip_bind": f"{_value(ast.sip_bind_host, 'SIP bind host')}:{ast.sip_port}",
        "nat_lines": nat,
        "trunks": _trunks(ast.trunk_hosts, codecs),
        "phone": _phone(ast.test_phone_username, ast.test_phone_password, codecs),
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


def read_local_files(out_dir: Path) -> dict[str, str]:
    """The operator's include files as they are now (absent ones: the text they will be created with)."""
    found = {}
    for name, initial in LOCAL_FILES.items():
        path = out_dir / name
        try:
            found[name] = path.read_text(encoding="utf-8") if path.is_file() else initial
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    return found


def asterisk_gid() -> int | None:
    try:
        return grp.getgrnam(ASTERISK_GROUP).gr_gid
    except KeyError:
        return None


def _permit(path: Path, gid: int | None) -> None:
    """0640, group asterisk when it exists (Asterisk reads; nobody else does: ari.conf has a password)."""
    os.chmod(path, 0o640)
    if gid is not None and os.stat(path).st_gid != gid:
        os.chown(path, -1, gid)


def write(out_dir: Path, files: dict[str, str], dry_run: bool = False) -> list[FileChange]:
    """Write the changed files into ``out_dir``: all temp files first, then the renames. The operator's
    include files are created (empty but for a comment) when missing, never changed."""
    changes = plan(out_dir, files)
    if dry_run:
        return changes
    to_write = [c.name for c in changes if c.status != "unchanged"]
    gid = asterisk_gid()
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
                _permit(Path(tmp_name), gid)
            for name, initial in LOCAL_FILES.items():
                local = out_dir / name
                if not local.exists():  # before the renames: an #include must never point at nothing
                    with open(local, "x", encoding="utf-8") as handle:
                        handle.write(initial)
                    _permit(local, gid)
            for name, tmp in temps:
                os.replace(tmp, out_dir / name)
        finally:
            for _, tmp in temps:
                tmp.unlink(missing_ok=True)
        for name in files:  # files left unchanged by an older version may still be root-only
            _permit(out_dir / name, gid)
    except OSError as exc:
        raise InvalidInput(f"cannot write Asterisk config into {out_dir}: {exc.strerror or exc}") from None
    return changes
