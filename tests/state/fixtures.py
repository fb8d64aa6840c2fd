"""State fixtures other areas import: ``from tests.state.fixtures import migrated_database_url, ...``.

Built on tests/conftest.py's real PostgreSQL (``database_url``) and Redis (``redis_url``, ``redis_prefix``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.state import migrate, repo
from bridge.state.models import Persona


@pytest.fixture(scope="session")
def migrated_database_url(database_url: str) -> str:
    """The session database with every migration applied."""
    migrate.migrate_url(database_url)
    return database_url


@pytest.fixture
def migrated_fresh_database_url(fresh_database_url: str) -> str:
    """A per-test database with every migration applied (tests that need an empty, isolated schema)."""
    migrate.migrate_url(fresh_database_url)
    return fresh_database_url


@pytest.fixture
def seeded_persona(migrated_database_url: str) -> Iterator[Persona]:
    """A persona named uniquely for this test (removed afterwards with any DIDs that use it)."""
    import uuid

    name = f"p-{uuid.uuid4().hex[:8]}"
    with repo.connect(migrated_database_url) as conn:
        persona = repo.create_persona(conn, name, "en", "You are a helpful test persona.")
    yield persona
    with repo.connect(migrated_database_url) as conn:
        conn.execute("DELETE FROM dids WHERE persona_id = %s", (persona.id,))
        conn.execute("DELETE FROM personas WHERE id = %s", (persona.id,))


@pytest.fixture
def state_settings(migrated_database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test database, the test Redis prefix and a temporary data dir."""
    return Settings(
        database_url=migrated_database_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        data_dir=tmp_path / "data",
    )


def empty_config(folder: Path) -> str:
    """An empty aziza.toml in ``folder`` for AZIZA_CONFIG (which must name an existing file), so a test
    sees only its own AZIZA_* variables and the defaults, never the host's /etc/aziza/aziza.toml."""
    path = folder / "aziza-empty.toml"
    path.write_text("")
    return str(path)


def write_wav(
    path: Path, *, seconds: float = 2.0, rate: int = 24000, channels: int = 1, width: int = 2
) -> Path:
    """A WAV of silence with the given shape (valid voice prompt by default)."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(b"\0" * int(seconds * rate) * channels * width)
    return path


class TcpProxy:
    """A real loopback TCP proxy in front of a server, which a test can cut and restore.

    Cut: every open connection is aborted and new ones are closed at once, as if the server died.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cut_off = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def server_address(database_url: str) -> tuple[str, int]:
    """host, port of a PostgreSQL URL (for putting a TcpProxy in front of it)."""
    import psycopg

    info = psycopg.conninfo.conninfo_to_dict(database_url)
    return str(info.get("host") or "127.0.0.1"), int(str(info.get("port") or 5432))


def proxied_url(database_url: str, port: int) -> str:
    """The same database URL with host:port replaced by the proxy's."""
    scheme, rest = database_url.split("://", 1)
    userinfo, _, hostpath = rest.rpartition("@")
    _, _, dbname = hostpath.partition("/")
    prefix = f"{userinfo}@" if userinfo else ""
    return f"{scheme}://{prefix}127.0.0.1:{port}/{dbname}"


class RedisServer:
    """A redis-server process of a test's own, on a free loopback port, which the test may stop and start
    (the shared Redis on 6379 is never restarted or flushed). Snapshots only on request: ``stop(save=True)``
    writes dump.rdb, which the next ``start()`` loads; ``stop(save=False)`` restarts it empty."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = int(s.getsockname()[1])
        self.proc = await asyncio.create_subprocess_exec(
            exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.folder), "--dbfilename", "dump.rdb", "--daemonize", "no",
            "--loglevel", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            for _ in range(200):  # up to ~10 s on a loaded machine
                if self.proc.returncode is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited")
                try:
                    if await client.ping():
                        return
                except Exception:  # not listening yet (redis-py raises its own ConnectionError)
                    await asyncio.sleep(0.05)
            raise RuntimeError("redis-server did not come up")
        finally:
            await client.aclose()

    async def stop(self, *, save: bool) -> None:
        """``SHUTDOWN SAVE`` (data kept for the next start) or ``NOSAVE`` (the next start is empty)."""
        if self.proc is None:
            return
        import redis.asyncio as aioredis

        dump = self.folder / "dump.rdb"
        if not save:
            dump.unlink(missing_ok=True)
        client = aioredis.from_url(self.url)
        with contextlib.suppress(Exception):  # the connection drops as the server exits
            await client.shutdown(save=save, nosave=not save)
        await client.aclose()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None
        if save:
            assert dump.exists(), "SHUTDOWN SAVE wrote no dump.rdb"

    async def restart(self, *, keep_data: bool, down_s: float) -> None:
        await self.stop(save=keep_data)
        await asyncio.sleep(down_s)
        await self.start()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()
