"""Signed, expiring talk links for the browser channel (sans-IO).

``aziza-admin talk-link --persona NAME --ttl 10m`` signs ``{"v":1,"persona":NAME,"exp":T,"nonce":N}``;
``/ws/talk`` verifies it. A token is ``base64url(payload) "." base64url(HMAC-SHA256(key, payload))``.

The stdlib's ``hmac`` (not itsdangerous): the format is ten lines, the comparison is
``hmac.compare_digest``, and the appliance gains no dependency for it. The key is derived from the
control token (``HMAC(control_token, "aziza talk-link v1")``), so only whoever can read the token file
(root, group aziza) can make links, and rotating that file revokes every link.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

VERSION = 1
MAX_TTL_S = 24 * 3600
MAX_TOKEN_CHARS = 2048
_KEY_LABEL = b"aziza talk-link v1"
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class BadTalkToken(ValueError):
    """Refused: ``code`` is ``bad_token`` or ``expired`` (sent to the browser as an error)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TalkGrant:
    persona: str
    expires_at: float
    nonce: str


def talk_key(control_token: str) -> bytes:
    return hmac.new(control_token.encode(), _KEY_LABEL, hashlib.sha256).digest()


def parse_ttl(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``1d`` or plain seconds; 1 s .. 24 h. Raises ValueError."""
    m = _TTL.match(text)
    if not m:
        raise ValueError(f"bad duration {text!r}: use e.g. 90s, 10m, 2h")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not 1 <= seconds <= MAX_TTL_S:
        raise ValueError(f"duration {text!r} must be between 1 s and {MAX_TTL_S // 3600} h")
    return seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, persona: str, ttl_s: float, *, now: Callable[[], float] = time.time) -> str:
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl must be within (0, {MAX_TTL_S}] seconds")
    payload = {"v": VERSION, "persona": persona, "exp": int(now() + ttl_s), "nonce": secrets.token_hex(8)}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{body}.{_b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def verify(key: bytes, token: str, *, now: Callable[[], float] = time.time) -> TalkGrant:
    """The grant in ``token``, or :class:`BadTalkToken`; the signature is checked before any parsing."""
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise BadTalkToken("bad_token", "malformed talk token")
    body, sig = token.split(".")
    expected = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        raise BadTalkToken("bad_token", "talk token signature does not match")
    try:
        payload = json.loads(_unb64(body))
    except (ValueError, binascii.Error):  # only we sign, so this means a key shared with a buggy signer
        raise BadTalkToken("bad_token", "talk token payload unreadable") from None
    if (
        not isinstance(payload, dict)
        or payload.get("v") != VERSION
        or not isinstance(payload.get("persona"), str)
        or not isinstance(payload.get("exp"), int)
        or isinstance(payload.get("exp"), bool)
    ):
        raise BadTalkToken("bad_token", "talk token payload invalid")
    if payload["exp"] <= now():
        raise BadTalkToken("expired", "talk link expired: ask for a new one (aziza-admin talk-link)")
    return TalkGrant(payload["persona"], float(payload["exp"]), str(payload.get("nonce", "")))
