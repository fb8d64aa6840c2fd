"""ARI call-control benchmark (prints numbers; not a test).

    .venv/bin/python -m tests.ari.bench [--calls 20] [--events 20000] [--live 10] [--json] [--standin-media]

Runs the fake Asterisk and the whole bridge in ONE process (one event loop, so the fake's own work is
included in every number). With the real engine server and CallMedia available (default), each call
is real: echo engine, UDP RTP both ways, Redis-free in-memory capacity and records.

* stasis_to_first_rtp_ms: fake emits StasisStart -> first RTP packet from the bridge reaches the leg's
  socket (kernel receive timestamp);
* stasis_to_media_up_ms: StasisStart -> bridge has answered, bridged, opened the engine and media;
* teardown_ms: fake emits the caller's hang-up -> the last DELETE (bridge, media channel) arrives;
* over_websocket_events_per_s: ChannelDtmfReceived events sent by the fake over the WebSocket to
  ``--live`` calls, until every digit has been handled by its call (stand-in engine sessions count
  them); the fake's own sending is in this number (same loop);
* controller_only_events_per_s: the same events parsed from JSON and handed straight to the controller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import numpy as np

from bridge.ari.models import parse_event
from bridge.call_deps import CallDeps, CallRoute
from tests.ari.harness import eventually, fake_and_bridge
from tests.ari.standins import StandinDeps, standin_deps

DID = "+15550001234"


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


async def _real_deps(sd: StandinDeps, engine_url: str) -> CallDeps:
    from bridge.config import BridgeSettings
    from bridge.wiring import engine_opener, media_factory

    return CallDeps(sd.routes, sd.capacity, sd.sink, engine_opener(engine_url),
                    media_factory(BridgeSettings(rtp_port_min=30000, rtp_port_max=30999)))


async def bench_call_cycle(calls: int, standin_media: bool) -> dict[str, Any]:
    sd = standin_deps(slots=calls + 1, routes={DID: CallRoute(did=DID)})
    engine_ctx: Any = None
    deps = sd.deps()
    if not standin_media:
        from engine.config import EngineSettings
        from engine.server import run_engine

        engine_ctx = run_engine(EngineSettings(port=0, num_slots=calls + 1))
        engine_url = await engine_ctx.__aenter__()
        deps = await _real_deps(sd, engine_url)
    first_rtp: list[float] = []
    media_up: list[float] = []
    teardown: list[float] = []
    try:
        from bridge.media.assets import load_speech_8k

        speech = load_speech_8k()
    except ImportError:
        speech = np.zeros(8000, dtype=np.int16)
    try:
        async with fake_and_bridge(deps, speech_8k=speech) as (fake, svc):
            for _ in range(calls):
                caller = await fake.originate_call(DID)
                await eventually(lambda c=caller: c in sd.sink.answered_calls, what="answered")  # type: ignore[misc]
                leg = await eventually(lambda c=caller: fake.leg_for(c), what="leg")  # type: ignore[misc]
                await eventually(lambda lg=leg: lg.packets_received > 0, what="first RTP back")  # type: ignore[misc]
                first_rtp.append((leg.received[0].arrival - fake.stasis_start_wall[caller]) * 1000)
                call = svc.controller.get(caller)
                media_up.append((call.timeline["media_up"] - call.timeline["stasis_start"]) * 1000)
                hung_up_at = time.time()
                await fake.hangup_caller(caller)
                await eventually(lambda c=caller: c in sd.sink.ended_calls, what="ended")  # type: ignore[misc]
                last_delete = max(fake.deleted_at[call.bridge_id], fake.deleted_at[call.media_channel_id])
                teardown.append((last_delete - hung_up_at) * 1000)
    finally:
        if engine_ctx is not None:
            await engine_ctx.__aexit__(None, None, None)
    return {
        "calls": calls,
        "media": "standin-udp-echo" if standin_media else "real CallMedia + echo engine",
        "stasis_to_first_rtp_ms_p50": _pct(first_rtp, 50),
        "stasis_to_first_rtp_ms_max": _pct(first_rtp, 100),
        "stasis_to_media_up_ms_p50": _pct(media_up, 50),
        "stasis_to_media_up_ms_max": _pct(media_up, 100),
        "teardown_ms_p50": _pct(teardown, 50),
        "teardown_ms_max": _pct(teardown, 100),
    }


async def bench_events(events: int, live: int) -> dict[str, Any]:
    sd = standin_deps(slots=live)
    route = CallRoute(did=DID, dtmf_actions={})  # every digit goes to the engine session
    sd.routes.routes[DID] = route
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        callers = [await fake.originate_call(DID) for _ in range(live)]
        await eventually(lambda: len(sd.sink.answered_calls) == live, what="calls up")
        start = time.perf_counter()
        for i in range(events):
            await fake.send_dtmf(callers[i % live], "5")
        sent = time.perf_counter()
        await eventually(lambda: sum(len(e.events) for e in sd.engines) == events, within_s=120,
                         what="all events handled")
        done = time.perf_counter()
        # The controller alone: the same events, parsed from JSON, handed straight to it (no socket, no fake).
        raw = [json.dumps({"type": "ChannelDtmfReceived", "application": "aziza", "timestamp": "t",
                           "digit": "7", "duration_ms": 100, "channel": fake.channel(c).to_json()})
               for c in callers]
        before = sum(len(e.events) for e in sd.engines)
        direct_start = time.perf_counter()
        for i in range(events):
            await svc.controller.handle_event(parse_event(json.loads(raw[i % live])))
            if i % 500 == 499:
                await asyncio.sleep(0)  # let the calls' tasks run, as the socket reader would
        await eventually(lambda: sum(len(e.events) for e in sd.engines) == before + events, within_s=120,
                         what="direct events handled")
        direct_done = time.perf_counter()
    return {
        "controller_only_events_per_s": round(events / (direct_done - direct_start)),
        "events": events,
        "live_calls": live,
        "over_websocket_events_per_s": round(events / (done - start)),
        "send_s": round(sent - start, 3),
        "total_s": round(done - start, 3),
        "handled_by_controller": svc.controller.events_handled,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out = {"cycle": await bench_call_cycle(args.calls, args.standin_media)}
    out["events"] = await bench_events(args.events, args.live)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--live", type=int, default=10)
    parser.add_argument("--standin-media", action="store_true", help="UDP echo instead of engine+CallMedia")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for section, values in result.items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"  {key:32s} {value}")


if __name__ == "__main__":
    main()
