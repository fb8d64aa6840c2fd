"""`aziza-admin provision asterisk --reload`: apply freshly written files to the running Asterisk through
ARI (``PUT /asterisk/modules/{moduleName}``) and check it took them.

Each step that fails raises :class:`ReloadError` with one line saying what Asterisk said; the files are
already written by then (atomically), so nothing is ever half-applied on disk.
"""

from __future__ import annotations

from bridge.ari.client import AriClient
from bridge.ari.errors import AriError, AriUnauthorized, AriUnavailable
from bridge.ari.models import AriEventError
from bridge.config import Settings
from bridge.redact import mask_url
from bridge.state import dialplan
from bridge.state.asterisk_render import MODULE_OF, endpoint_names

# Always reloaded: they also read the operator's include files, whose changes provisioning cannot see.
ALWAYS = {"res_pjsip.so": "pjsip_local.conf", "pbx_config.so": "extensions_local.conf"}


class ReloadError(Exception):
    """One line for the operator."""


def plan_reload(changed: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(module, why) in reload order, and notes for files no module reload applies."""
    reasons: dict[str, list[str]] = {}
    notes = []
    for name in changed:
        module = MODULE_OF.get(name)
        if module is None:
            notes.append(f"{name} changed: restart Asterisk to apply it (its HTTP server carries ARI)")
            continue
        reasons.setdefault(module, []).append(f"{name} changed")
    for module, local in ALWAYS.items():
        reasons.setdefault(module, []).append(f"re-reading {local}")
    # res_ari last: a changed ari.conf may change the credentials this very session uses.
    order = sorted(reasons, key=lambda m: m == "res_ari.so")
    return [(m, ", ".join(reasons[m])) for m in order], notes


async def reload_asterisk(settings: Settings, changed: list[str], local: dict[str, str]) -> list[str]:
    """Reload the modules of the changed files; the lines to print. Raises ReloadError. ``local``: the
    operator's include files (their endpoints must be in Asterisk after the reload too)."""
    steps, notes = plan_reload(changed)
    where = mask_url(settings.ari.url)
    lines: list[str] = []
    async with AriClient(settings.ari, timeout_s=15.0) as ari:
        try:
            info = await ari.asterisk_info()
        except AriUnavailable as exc:
            raise ReloadError(
                f"Asterisk is not running (ARI at {where} unreachable: {exc.message}); the files are "
                "written and Asterisk reads them when it starts") from None
        except AriUnauthorized:
            raise ReloadError(
                f"ARI at {where} refused user {settings.ari.username!r}: Asterisk is not running with this "
                "ari.conf yet (a first install or a changed password needs an Asterisk restart)") from None
        except (AriError, AriEventError) as exc:
            raise ReloadError(f"ARI at {where}: {exc}") from None
        version = info.get("system", {}).get("version", "?") if isinstance(info.get("system"), dict) else "?"
        lines.append(f"Asterisk {version} at {where}")
        for module, why in steps:
            try:
                await ari.reload_module(module)
            except AriError as exc:
                raise ReloadError(
                    f"Asterisk did not reload {module} ({why}): {exc.message} (HTTP {exc.status or '-'}); "
                    "its log says why (e.g. asterisk -rx 'core show settings' for the log path)") from None
            lines.append(f"reloaded {module} ({why})")
        if any(module == "res_pjsip.so" for module, _ in steps):
            try:
                present = {str(e.get("resource")) for e in await ari.list_endpoints("PJSIP")}
            except (AriError, AriEventError) as exc:
                raise ReloadError(f"cannot list Asterisk's PJSIP endpoints after the reload: {exc}") from None
            expected = endpoint_names(settings)
            expected += dialplan.sections_of_type(local.get("pjsip_local.conf", ""), "endpoint")
            missing = [name for name in expected if name not in present]
            if missing:
                raise ReloadError(
                    f"Asterisk did not take the PJSIP configuration: endpoint(s) {', '.join(missing)} "
                    "missing after the reload (see asterisk -rx 'pjsip show endpoints' and Asterisk's log)")
    return lines + notes
