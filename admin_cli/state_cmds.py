"""aziza-admin commands for appliance state: personas, DIDs, call records, database, health, provisioning.

Every command reads the database URL from ``--database-url``, else the appliance config
(``AZIZA_DATABASE_URL`` / aziza.toml). Errors are one line on stderr and exit status 1 (click's
``ClickException``); listings print a table, or JSON with ``--json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
import psycopg

from admin_cli.settings import load_cli_settings
from bridge.config import Settings, masked_dump
from bridge.state import asterisk_render, migrate, repo
from bridge.state.models import StateError, parse_dtmf_actions
from bridge.state.voice import store_voice_prompt

F = TypeVar("F", bound=Callable[..., Any])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _settings() -> Settings:
    return load_cli_settings()


def database_option(func: F) -> F:
    return click.option(
        "--database-url",
        default=None,
        metavar="URL",
        help="PostgreSQL URL (default: AZIZA_DATABASE_URL or the config file).",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


@contextlib.contextmanager
def _db(database_url: str | None) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    url = database_url or _settings().database_url
    try:
        conn = repo.connect(url)
    except psycopg.Error as exc:
        raise click.ClickException(f"cannot connect to the database: {_one_line(exc)}") from None
    try:
        yield conn
    except StateError as exc:
        raise click.ClickException(str(exc)) from None
    except psycopg.errors.UndefinedTable:
        raise click.ClickException("the database has no schema yet: run `aziza-admin db migrate`") from None
    except psycopg.Error as exc:
        raise click.ClickException(f"database error: {_one_line(exc)}") from None
    finally:
        conn.close()


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _state_errors(func: F) -> F:
    """Turn StateError raised outside a database block (validation, voice files) into one clear line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StateError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


# --- personas ---------------------------------------------------------------------------------------------


@click.group()
def persona() -> None:
    """Personas: language, text prompt, voice prompt, LoRA adapter."""


def _voice(path: str | None, name: str) -> str | None:
    if path is None:
        return None
    return str(store_voice_prompt(Path(path), _settings().data_dir, name))


def _install_adapter(path: str | None, persona: str) -> str | None:
    if path is None:
        return None
    from admin_cli.adapters import install_adapter  # torch: only when an adapter is given

    return install_adapter(path, persona)


def _forget_voice(conn: psycopg.Connection[dict[str, Any]], path: str | None) -> None:
    """Remove a stored voice prompt that no persona uses any more (only inside data_dir/voices)."""
    if path is None:
        return
    voices = (_settings().data_dir / "voices").resolve()
    stored = Path(path).resolve()
    if stored.parent != voices:
        return
    if any(p.voice_prompt_path == path for p in repo.list_personas(conn)):
        return
    stored.unlink(missing_ok=True)


def sampling_options(func: F) -> F:
    """--temp / --top-k (audio codebooks) and --temp-text / --top-k-text: the persona's overrides of the
    engine's sampling (Moshi's defaults: 0.8 / 250 and 0.7 / 25); 0 temperature is greedy."""
    for flag, kind, what in (("--top-k-text", click.IntRange(1, 4096), "top-k of the text token"),
                             ("--temp-text", click.FloatRange(0, 10), "text temperature (0 = greedy)"),
                             ("--top-k", click.IntRange(1, 4096), "top-k of the audio codebooks"),
                             ("--temp", click.FloatRange(0, 10), "audio temperature (0 = greedy)")):
        func = click.option(flag, type=kind, default=None, help=f"Sampling: {what}.")(func)
    return func


@persona.command("create")
@click.argument("name")
@click.option("--language", required=True, help="en, ru or uz.")
@click.option("--text-prompt", default="", help="The persona's instructions.")
@click.option(
    "--text-prompt-file", type=click.File("r", encoding="utf-8"), help="Read the instructions from a file."
)
@click.option("--voice-prompt", type=click.Path(dir_okay=False), help="WAV: mono, 16-bit, >= 16 kHz, 1-30 s.")
@click.option("--lora", "lora_adapter", default=None, type=click.Path(file_okay=False),
              help="A LoRA adapter directory (docs/adapters.md): checked against engine.model, then "
                   "installed.")
@click.option("--default", "make_default", is_flag=True, help="Make it the default persona.")
@sampling_options
@database_option
@_state_errors
def persona_create(
    name: str,
    language: str,
    text_prompt: str,
    text_prompt_file: TextIO | None,
    voice_prompt: str | None,
    lora_adapter: str | None,
    make_default: bool,
    temp: float | None,
    top_k: int | None,
    temp_text: float | None,
    top_k_text: int | None,
    database_url: str | None,
) -> None:
    """Create persona NAME."""
    from bridge.state.models import check_language, check_persona_name

    if text_prompt_file is not None:
        if text_prompt:
            raise click.UsageError("give --text-prompt or --text-prompt-file, not both")
        text_prompt = text_prompt_file.read()
    check_persona_name(name)
    check_language(language)  # before copying the voice file
    with _db(database_url) as conn:
        if any(p.name == name for p in repo.list_personas(conn)):
            raise click.ClickException(f"persona {name!r} already exists")
        adapter_id = _install_adapter(lora_adapter, name)  # refused with one line before anything is stored
        voice = _voice(voice_prompt, name)
        sampling = {"temp": temp, "top_k": top_k, "temp_text": temp_text, "top_k_text": top_k_text}
        created = repo.create_persona(conn, name, language, text_prompt, voice, adapter_id, make_default,
                                      {k: v for k, v in sampling.items() if v is not None})
    click.echo(f"created persona {created.name}" + (" (default)" if created.is_default else ""))


@persona.command("list")
@json_option
@database_option
def persona_list(as_json: bool, database_url: str | None) -> None:
    """List personas."""
    with _db(database_url) as conn:
        personas = repo.list_personas(conn)
    if as_json:
        _print_json([p.to_json() for p in personas])
        return
    _table(
        [
            [
                p.name + (" *" if p.is_default else ""),
                p.language,
                p.voice_prompt_path or "-",
                p.lora_adapter or "-",
            ]
            for p in personas
        ],
        ["NAME (* default)", "LANG", "VOICE", "LORA"],
    )


@persona.command("show")
@click.argument("name")
@json_option
@database_option
def persona_show(name: str, as_json: bool, database_url: str | None) -> None:
    """Show persona NAME."""
    with _db(database_url) as conn:
        found = repo.get_persona(conn, name)
    if as_json:
        _print_json(found.to_json())
    else:
        for key, value in found.to_json().items():
            click.echo(f"{key}: {value}")


@persona.command("update")
@click.argument("name")
@click.option("--language", default=None)
@click.option("--text-prompt", default=None)
@click.option("--voice-prompt", type=click.Path(dir_okay=False), default=None)
@click.option("--no-voice-prompt", is_flag=True, help="Remove the voice prompt.")
@click.option("--lora", "lora_adapter", default=None, type=click.Path(file_okay=False),
              help="A LoRA adapter directory: checked against engine.model, then installed.")
@click.option("--no-lora", is_flag=True, help="Remove the LoRA adapter.")
@sampling_options
@click.option("--engine-sampling", is_flag=True, help="Drop the persona's sampling overrides.")
@database_option
@_state_errors
def persona_update(
    name: str,
    language: str | None,
    text_prompt: str | None,
    voice_prompt: str | None,
    no_voice_prompt: bool,
    lora_adapter: str | None,
    no_lora: bool,
    temp: float | None,
    top_k: int | None,
    temp_text: float | None,
    top_k_text: int | None,
    engine_sampling: bool,
    database_url: str | None,
) -> None:
    """Change persona NAME."""
    kwargs: dict[str, Any] = {"language": language, "text_prompt": text_prompt}
    given = {"temp": temp, "top_k": top_k, "temp_text": temp_text, "top_k_text": top_k_text}
    if engine_sampling:
        kwargs["sampling"] = {key: None for key in given}  # None removes the override
    if any(v is not None for v in given.values()):
        chosen = {k: v for k, v in given.items() if v is not None}
        kwargs["sampling"] = {**kwargs.get("sampling", {}), **chosen}
    with _db(database_url) as conn:
        old = repo.get_persona(conn, name)  # not found: error before copying
        old_voice, old_adapter = old.voice_prompt_path, old.lora_adapter
        if lora_adapter is not None:
            lora_adapter = _install_adapter(lora_adapter, name)
        if voice_prompt is not None:
            kwargs["voice_prompt_path"] = _voice(voice_prompt, name)
        elif no_voice_prompt:
            kwargs["voice_prompt_path"] = None
        if lora_adapter is not None:
            kwargs["lora_adapter"] = lora_adapter
        elif no_lora:
            kwargs["lora_adapter"] = None
        repo.update_persona(conn, name, **kwargs)
        if "voice_prompt_path" in kwargs and kwargs["voice_prompt_path"] != old_voice:
            _forget_voice(conn, old_voice)
        if "lora_adapter" in kwargs and kwargs["lora_adapter"] != old_adapter:
            from admin_cli.adapters import forget_adapter

            forget_adapter(old_adapter, any(p.lora_adapter == old_adapter for p in repo.list_personas(conn)))
    click.echo(f"updated persona {name}")


@persona.command("delete")
@click.argument("name")
@database_option
def persona_delete(name: str, database_url: str | None) -> None:
    """Delete persona NAME (refused while a DID uses it)."""
    with _db(database_url) as conn:
        old_voice = repo.get_persona(conn, name).voice_prompt_path
        repo.delete_persona(conn, name)
        _forget_voice(conn, old_voice)
    click.echo(f"deleted persona {name}")


@persona.command("set-default")
@click.argument("name")
@database_option
def persona_set_default(name: str, database_url: str | None) -> None:
    """Make NAME the default persona (unknown and disabled DIDs use it)."""
    with _db(database_url) as conn:
        repo.set_default_persona(conn, name)
    click.echo(f"default persona is now {name}")


# --- DIDs -------------------------------------------------------------------------------------------------


@click.group()
def did() -> None:
    """DIDs: E.164 numbers routed to a persona."""


@did.command("add")
@click.argument("number")
@click.option("--persona", "persona_name", required=True)
@click.option("--disabled", is_flag=True, help="Add it disabled (not routed).")
@click.option("--transfer-target", default=None, help="Dialplan [context,]exten[,priority] or sip: URI.")
@click.option(
    "--dtmf", multiple=True, metavar="DIGIT=ACTION", help="transfer|hangup|hold|engine (repeatable)."
)
@database_option
@_state_errors
def did_add(
    number: str,
    persona_name: str,
    disabled: bool,
    transfer_target: str | None,
    dtmf: tuple[str, ...],
    database_url: str | None,
) -> None:
    """Add DID NUMBER, in E.164 form like +15550001234."""
    actions = parse_dtmf_actions(dtmf) if dtmf else None
    with _db(database_url) as conn:
        added = repo.add_did(
            conn,
            number,
            persona_name,
            enabled=not disabled,
            transfer_target=transfer_target,
            dtmf_actions=actions,
        )
    click.echo(f"added DID {added.number} -> {added.persona}")


@did.command("list")
@json_option
@database_option
def did_list(as_json: bool, database_url: str | None) -> None:
    """List DIDs."""
    with _db(database_url) as conn:
        dids = repo.list_dids(conn)
    if as_json:
        _print_json([d.to_json() for d in dids])
        return
    _table(
        [[d.number, d.persona, "yes" if d.enabled else "no", d.transfer_target or "-"] for d in dids],
        ["NUMBER", "PERSONA", "ENABLED", "TRANSFER"],
    )


@did.command("show")
@click.argument("number")
@json_option
@database_option
def did_show(number: str, as_json: bool, database_url: str | None) -> None:
    """Show DID NUMBER."""
    with _db(database_url) as conn:
        found = repo.get_did(conn, number)
    if as_json:
        _print_json(found.to_json())
    else:
        for key, value in found.to_json().items():
            click.echo(f"{key}: {value}")


@did.command("update")
@click.argument("number")
@click.option("--persona", "persona_name", default=None)
@click.option("--enable/--disable", "enabled", default=None)
@click.option("--transfer-target", default=None)
@click.option("--no-transfer-target", is_flag=True)
@click.option("--dtmf", multiple=True, metavar="DIGIT=ACTION", help="Replaces the whole DTMF map.")
@database_option
@_state_errors
def did_update(
    number: str,
    persona_name: str | None,
    enabled: bool | None,
    transfer_target: str | None,
    no_transfer_target: bool,
    dtmf: tuple[str, ...],
    database_url: str | None,
) -> None:
    """Change DID NUMBER."""
    kwargs: dict[str, Any] = {"persona": persona_name, "enabled": enabled}
    if transfer_target is not None:
        kwargs["transfer_target"] = transfer_target
    elif no_transfer_target:
        kwargs["transfer_target"] = None
    if dtmf:
        kwargs["dtmf_actions"] = parse_dtmf_actions(dtmf)
    with _db(database_url) as conn:
        updated = repo.update_did(conn, number, **kwargs)
    click.echo(f"updated DID {updated.number}")


@did.command("remove")
@click.argument("number")
@database_option
def did_remove(number: str, database_url: str | None) -> None:
    """Remove DID NUMBER."""
    with _db(database_url) as conn:
        repo.remove_did(conn, number)
    click.echo(f"removed DID {number}")


# --- calls --------------------------------------------------------------------------------------------------


@click.command("list")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
@click.option("--did", "did_number", default=None)
@click.option(
    "--since", type=click.DateTime(), default=None, help="Only calls started at or after this time."
)
@json_option
@database_option
def calls_list(
    limit: int, did_number: str | None, since: datetime | None, as_json: bool, database_url: str | None
) -> None:
    """Recent call records, newest first."""
    with _db(database_url) as conn:
        calls = repo.list_calls(conn, limit=limit, did=did_number, since=since)
    if as_json:
        _print_json([c.to_json() for c in calls])
        return
    _table(
        [
            [
                c.id,
                c.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                c.did or "-",
                c.caller or "-",
                c.persona or "-",
                "refused" if c.refused else (c.end_cause or ("live" if c.ended_at is None else "-")),
            ]
            for c in calls
        ],
        ["ID", "STARTED", "DID", "CALLER", "PERSONA", "END"],
    )


@click.command("show")
@click.argument("call_id")
@json_option
@database_option
def calls_show(call_id: str, as_json: bool, database_url: str | None) -> None:
    """One call record with its lifecycle events."""
    with _db(database_url) as conn:
        call = repo.get_call(conn, call_id)
    data = call.to_json()
    if as_json:
        _print_json(data)
        return
    events = data.pop("events")
    for key, value in data.items():
        click.echo(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    for event in events:
        click.echo(f"  {event['at']}  {event['kind']}  {json.dumps(event['data'])}")


@click.command("live")
@click.option("--once", is_flag=True, help="Print the live calls and exit (do not follow events).")
@click.option(
    "--watch", "watch_s", type=click.FloatRange(min=0.5), default=None, metavar="SECONDS",
    help="Redraw the table every SECONDS until Ctrl-C, instead of following events.",
)
@json_option
def calls_live(once: bool, watch_s: float | None, as_json: bool) -> None:
    """Live calls from Redis: channel, DID, caller, persona, language, duration, current latency in ms
    (median round trip inside the bridge, last 2 s) and the last caller turn's TTFB in ms; then follow
    call events until Ctrl-C.

    With --json: {"live": [...]}, each call's raw fields plus duration_s, then one event per line (with
    --watch: one {"live": [...]} line per redraw)."""
    if once and watch_s is not None:
        raise click.UsageError("give --once or --watch, not both")
    try:
        asyncio.run(_calls_live(_settings(), once, watch_s, as_json))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop was up
        pass


def _show_live(calls: list[dict[str, str]], as_json: bool) -> None:
    from admin_cli.live_view import LIVE_HEADERS, in_start_order, live_json, live_row

    now = time.time()
    calls = in_start_order(calls)
    if as_json:
        click.echo(json.dumps({"live": [live_json(c, now) for c in calls]}))
        return
    click.echo(f"{len(calls)} live call(s) at {datetime.fromtimestamp(now):%H:%M:%S}")
    if calls:
        _table([live_row(c, now) for c in calls], LIVE_HEADERS)


async def _calls_live(settings: Settings, once: bool, watch_s: float | None, as_json: bool) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from bridge.state.live import LiveCalls

    # Ctrl-C (or SIGTERM) sets a flag the loops below check, rather than cancelling them: redis-py can turn a
    # cancellation that lands in a read into a reconnect, and the command would then never end.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (RuntimeError, ValueError):  # not the main thread (a test's CliRunner): Ctrl-C as before
            break
    client = aioredis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=5)
    try:
        live = LiveCalls(client, settings.redis_prefix)
        _show_live(await live.list_live(), as_json)
        if once:
            return
        if watch_s is not None:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(watch_s):
                        await stop.wait()
                if stop.is_set():
                    break
                try:
                    calls = await live.list_live()
                except RedisError as exc:  # a Redis restart should not end the operator's watch
                    click.echo(f"redis: {_one_line(exc)} (retrying)", err=True)
                    continue
                if not as_json:
                    click.clear()  # a no-op unless stdout is a terminal
                _show_live(calls, as_json)
            return
        async for event in live.events(stop):
            if as_json:
                click.echo(event.to_json())
            else:
                stamp = datetime.fromtimestamp(event.at).strftime("%H:%M:%S")
                click.echo(f"{stamp}  {event.call_id}  {event.kind}  {json.dumps(event.data)}")
    except RedisError as exc:
        if stop.is_set():
            return  # interrupted mid-read: the error is the interruption's
        raise click.ClickException(f"redis: {_one_line(exc)}") from None
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await client.aclose()


# --- database -----------------------------------------------------------------------------------------------


@click.group()
def db() -> None:
    """Database schema."""


@db.command("migrate")
@database_option
def db_migrate(database_url: str | None) -> None:
    """Apply pending migrations (safe to re-run)."""
    with _db(database_url) as conn:
        applied = migrate.migrate(conn)
    if not applied:
        click.echo("database is up to date")
    for m in applied:
        click.echo(f"applied {m.version:04d}_{m.name}")


@db.command("status")
@json_option
@database_option
def db_status(as_json: bool, database_url: str | None) -> None:
    """Applied and pending migrations."""
    with _db(database_url) as conn:
        st = migrate.status(conn)
    if as_json:
        _print_json(
            {
                "version": st.version,
                "applied": [
                    {"version": a.version, "name": a.name, "applied_at": a.applied_at} for a in st.applied
                ],
                "pending": [{"version": p.version, "name": p.name} for p in st.pending],
                "modified": st.modified,
            }
        )
        return
    for a in st.applied:
        click.echo(f"applied  {a.version:04d}_{a.name}  {a.applied_at:%Y-%m-%d %H:%M:%S}")
    for p in st.pending:
        click.echo(f"pending  {p.version:04d}_{p.name}")
    for v in st.modified:
        click.echo(f"warning: applied migration {v:04d} differs from the shipped file", err=True)
    click.echo(f"schema version {st.version}, {len(st.pending)} pending")


# --- health, config, provisioning --------------------------------------------------------------------------


@click.command()
@json_option
@database_option
def health(as_json: bool, database_url: str | None) -> None:
    """Database, Redis, capacity and engine; exit status 1 when not healthy."""
    from bridge.state.health import check_health

    settings = _settings()
    if database_url:
        settings = settings.model_copy(update={"database_url": database_url})
    report = asyncio.run(check_health(settings))
    if as_json:
        _print_json(report)
    else:
        for part in ("database", "redis", "capacity", "engine"):
            click.echo(f"{part}: {json.dumps(report[part], default=str)}")
        click.echo("ok" if report["ok"] else "NOT OK")
    if not report["ok"]:
        sys.exit(1)


@click.group()
def config() -> None:
    """The effective configuration."""


@config.command("show")
@click.option("--show-secrets", is_flag=True, help="Print passwords too.")
def config_show(show_secrets: bool) -> None:
    """Print the effective settings (env + config file + defaults) as JSON, secrets masked."""
    from bridge.redact import mask_value
    from engine.config import EngineConfigError, load_engine_config

    settings = _settings()
    data = settings.model_dump(mode="json") if show_secrets else masked_dump(settings)
    try:  # the [engine] table, as aziza-engine reads it
        engine = load_engine_config().engine.model_dump(mode="json")
    except EngineConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    data["engine"] = engine if show_secrets else mask_value("", engine)
    _print_json(data)


@click.group()
def provision() -> None:
    """Render configuration for other services."""


@provision.command("asterisk")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Target directory (default: asterisk.config_dir).",
)
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@click.option(
    "--templates",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Template directory (default: the checkout's asterisk_conf/).",
)
@click.option("--quiet", is_flag=True, help="Only the summary, no diffs.")
@click.option(
    "--reload", "reload_asterisk", is_flag=True,
    help="Then reload the running Asterisk through ARI (PUT /asterisk/modules/{name}) and check it took "
    "the files.",
)
@database_option
@_state_errors
def provision_asterisk(
    out_dir: Path | None, dry_run: bool, templates: Path | None, quiet: bool, reload_asterisk: bool,
    database_url: str | None,
) -> None:
    """Render pjsip/extensions/ari/http/rtp/musiconhold.conf from the DID table, atomically.

    The rendered pjsip.conf and extensions.conf include pjsip_local.conf and extensions_local.conf
    (created once, never overwritten) for your own endpoints and dialplan. Every DID's transfer target
    must exist in that dialplan, or nothing is written. Files are 0640, group asterisk."""
    settings = _settings()
    with _db(database_url) as conn:
        dids = repo.list_dids(conn, enabled_only=True)
    files = asterisk_render.render(settings, dids, templates)
    target = out_dir or settings.asterisk.config_dir
    local = asterisk_render.read_local_files(target)
    asterisk_render.check_syntax(files, local)
    asterisk_render.check_transfer_targets(dids, files, local)
    changes = asterisk_render.write(target, files, dry_run=dry_run)
    if not quiet:
        for change in changes:
            if change.diff:
                click.echo(change.diff, nl=False)
    for change in changes:
        would = "would be " if dry_run and change.status != "unchanged" else ""
        click.echo(f"{change.name}: {would}{change.status}")
    if all(c.status == "unchanged" for c in changes):
        click.echo("unchanged")
    if not asterisk_render.endpoint_names(settings):
        click.echo("warning: no SIP endpoint rendered: set asterisk.trunk_hosts (your SIP trunk's address or "
                   "range) or asterisk.test_phone_username/password", err=True)
    written = any(c.status != "unchanged" for c in changes)
    if written and not dry_run and asterisk_render.asterisk_gid() is None:
        click.echo(f"warning: no group {asterisk_render.ASTERISK_GROUP!r} here: the files are 0640 and only "
                   "an Asterisk running as their owner can read them", err=True)
    if reload_asterisk and not dry_run:
        from admin_cli.asterisk_reload import ReloadError
        from admin_cli.asterisk_reload import reload_asterisk as do_reload

        changed = [c.name for c in changes if c.status != "unchanged"]
        try:
            lines = asyncio.run(do_reload(settings, changed, local))
        except ReloadError as exc:
            raise click.ClickException(str(exc)) from None
        for line in lines:
            click.echo(line)
