"""``aziza-admin model pull`` against a local stand-in of the Hugging Face hub (HF_ENDPOINT), then verify.

The stand-in serves the two endpoints ``snapshot_download`` uses: the repo info (commit sha + file list)
and ``resolve/<rev>/<file>`` with the commit and ETag headers the client checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

import pytest
from aiohttp import web

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

from engine.moshi.loader import verify_model
from engine.moshi.tiny import write_tiny_model
from tests.http_server import serve_on_loopback

COMMIT = "a" * 40
REPO = "aziza-test/tiny-moshi"


def fake_hub(files: dict[str, bytes], broken: set[str]) -> web.Application:
    async def repo_info(request: web.Request) -> web.Response:
        if f"{request.match_info['owner']}/{request.match_info['name']}" != REPO:
            return web.json_response({"error": "Repository not found"}, status=404)
        return web.json_response({"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]})

    async def resolve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"]
        if name not in files:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        body = files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                   "Content-Length": str(len(body))}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        if name in broken:  # the connection drops mid-file
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            request.transport.close()  # type: ignore[union-attr]
            return response
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", repo_info)
    app.router.add_route("*", "/{owner}/{name}/resolve/{rev}/{path:.+}", resolve)
    return app


async def pull(tmp_path: Path, files: dict[str, bytes], broken: set[str], target: Path) -> tuple[int, str]:
    async with serve_on_loopback(fake_hub(files, broken)) as port:
        env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "hub"),
                   HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "admin_cli.main", "model", "pull", REPO, "--dir", str(target), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_pull_then_verify(tmp_path: Path) -> None:
    source = write_tiny_model(tmp_path / "source", seed=2)
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file() and p.name != "checksums.sha256"}
    code, out = await pull(tmp_path, files, set(), tmp_path / "pulled")
    assert code == 0, out
    assert f"{REPO} -> " in out
    for name, body in files.items():
        assert (tmp_path / "pulled" / name).read_bytes() == body, name
    report = verify_model(tmp_path / "pulled")
    assert report.ok, report.problems
    assert report.files_hashed == 3


async def test_pull_with_a_dropped_connection_fails_cleanly(tmp_path: Path) -> None:
    source = write_tiny_model(tmp_path / "source", seed=2)
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file() and p.name != "checksums.sha256"}
    code, out = await pull(tmp_path, files, {"model.safetensors"}, tmp_path / "pulled")
    assert code == 1, out
    assert "cannot download" in out and "Traceback" not in out
