"""The callers of ``aziza-admin loadtest --via rtp``: simulated Asterisk legs in a process of their own, so
the bridge's CPU and pacing are measured beside them, not inside them.

JSON lines on stdin/stdout. In: a config line, ``{"audio_path": str | null, "seed": int}`` (null: the bundled
speech sample), then commands:

* ``{"op": "add", "calls": [{"id": i, "seconds": s}]}`` -> ``{"ports": [leg port per call]}``: every leg is
  built (its turns and their packets, ~0.1 s of CPU for 10 minutes) before any leg sends, so building one
  never delays another's packets
* ``{"op": "start", "calls": [{"id": i, "port": bridge port}]}`` -> ``{"ok": true}`` (they start sending)
* ``{"op": "report"}`` -> ``{"legs": {id: summary}}`` (so far; a finished leg's is final)
* ``{"op": "stop"}`` -> the final report, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bridge.media.assets import load_speech_8k
from bridge.media.audio_file import AudioFileError, read_pcm16
from bridge.media.simleg import SimLeg
from bridge.startup import freeze_startup_heap

SAMPLE_RATE = 8000
#: Realistic turns: a caller talks for a while, then listens (the agent's turn).
SPEECH_S = (1.5, 4.0)
SILENCE_S = (2.0, 3.5)
#: Each leg's audio ends with this much silence, so that its last turn is answered before the hang-up.
TAIL_SILENCE_S = 1.5


@dataclass(frozen=True)
class CallerAudio:
    """One caller's audio (8 kHz int16) and its turns, (start, end) seconds from the call's first packet."""

    pcm: npt.NDArray[np.int16]
    turns: list[tuple[float, float]]


def load_caller_speech(path: str | None) -> npt.NDArray[np.int16]:
    """The callers' speech at 8 kHz: the bundled sample, or any audio file (AudioFileError names the
    problem: unreadable, too short, silent)."""
    if path is None:
        return load_speech_8k()
    pcm = read_pcm16(path, rate=SAMPLE_RATE)
    if len(pcm) < SAMPLE_RATE // 4:
        raise AudioFileError(f"{path}: {len(pcm) / SAMPLE_RATE:.2f} s of audio; callers need at least 0.25 s")
    if float(np.sqrt(np.mean(np.square(pcm.astype(np.float64))))) < 30.0:
        raise AudioFileError(f"{path}: the audio is silent (RMS below -60 dBFS); callers need speech")
    return pcm


def caller_turns(speech: npt.NDArray[np.int16], seconds: float, seed: int) -> CallerAudio:
    """``seconds`` of turns: a stretch of ``speech`` (taken on from where the last turn stopped, wrapping),
    then silence, repeated; lengths drawn per call from ``seed``. The last ``TAIL_SILENCE_S`` is silence."""
    if len(speech) < SAMPLE_RATE // 4:
        raise ValueError("the caller audio is shorter than 0.25 s")
    rng = random.Random(seed)
    total = max(1, int(seconds * SAMPLE_RATE))
    out = np.zeros(total, dtype=np.int16)
    turns: list[tuple[float, float]] = []
    pos = rng.randrange(len(speech))  # calls start at different places in the sample
    t = int(rng.uniform(0.0, 0.5) * SAMPLE_RATE)
    speak_until = total - int(TAIL_SILENCE_S * SAMPLE_RATE)
    while t < speak_until:
        n = min(int(rng.uniform(*SPEECH_S) * SAMPLE_RATE), speak_until - t)
        if n < SAMPLE_RATE // 2:
            break
        idx = (pos + np.arange(n)) % len(speech)
        out[t : t + n] = speech[idx]
        pos = (pos + n) % len(speech)
        turns.append((t / SAMPLE_RATE, (t + n) / SAMPLE_RATE))
        t += n + int(rng.uniform(*SILENCE_S) * SAMPLE_RATE)
    return CallerAudio(out, turns)


def _leg_report(leg: SimLeg, done: bool) -> dict[str, Any]:
    received = leg.received_audio_8k() if done else np.zeros(0, dtype=np.int16)
    level = float(np.sqrt(np.mean(np.square(received.astype(np.float64))))) if len(received) else 0.0
    jitter = leg.pacing_jitter_ms
    return {
        "done": done,
        "packets_sent": leg.packets_sent,
        "packets_received": leg.packets_received,
        "sequence_gaps": leg.sequence_gaps if done else 0,
        "timestamp_errors": leg.timestamp_errors if done else 0,
        "pacing_p50_ms": round(float(np.percentile(jitter, 50)), 3) if len(jitter) else None,
        "pacing_p99_ms": round(float(np.percentile(jitter, 99)), 3) if len(jitter) else None,
        "received_rms": round(level, 1),
    }


class Legs:
    def __init__(self, speech: npt.NDArray[np.int16], seed: int) -> None:
        self.speech = speech
        self.seed = seed
        self.legs: dict[int, SimLeg] = {}
        self.audio: dict[int, CallerAudio] = {}
        self.seconds: dict[int, float] = {}
        self.runs: dict[int, asyncio.Task[None]] = {}

    async def add(self, calls: list[dict[str, Any]]) -> list[int]:
        ports = []
        for call in calls:
            i = int(call["id"])
            audio = caller_turns(self.speech, float(call["seconds"]), self.seed + i)
            leg = SimLeg(None, audio.pcm, seed=self.seed + i)
            self.legs[i], self.audio[i], self.seconds[i] = leg, audio, float(call["seconds"])
            ports.append((await leg.bind())[1])
        return ports

    def start(self, calls: list[dict[str, Any]]) -> None:
        for call in calls:
            i = int(call["id"])
            self.legs[i].set_remote(("127.0.0.1", int(call["port"])))
            self.runs[i] = asyncio.create_task(self.legs[i].run(self.seconds[i], tail_s=0.3))

    def report(self) -> dict[str, Any]:
        return {
            str(i): {**_leg_report(leg, self._done(i)), "turns": len(self.audio[i].turns)}
            for i, leg in self.legs.items()
        }

    def _done(self, i: int) -> bool:
        run = self.runs.get(i)
        return run is not None and run.done()

    async def stop(self) -> dict[str, Any]:
        for leg in self.legs.values():
            leg.stop()
        for run in self.runs.values():
            with contextlib.suppress(Exception):
                await run
        report = {
            str(i): {**_leg_report(leg, True), "turns": len(self.audio[i].turns)}
            for i, leg in self.legs.items()
        }
        for leg in self.legs.values():
            leg.close()
        return report


async def _main() -> None:
    reader = asyncio.StreamReader(limit=1 << 24)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    legs = Legs(load_caller_speech(config.get("audio_path")), int(config.get("seed", 0)))
    freeze_startup_heap()
    cpu0 = time.process_time()

    def say(message: Any) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            command = json.loads(line)
            op = command.get("op")
            if op == "add":
                say({"ports": await legs.add(command["calls"])})
            elif op == "start":
                legs.start(command["calls"])
                say({"ok": True})
            elif op == "report":
                say({"legs": legs.report()})
            elif op == "stop":
                say({"legs": await legs.stop(), "cpu_s": time.process_time() - cpu0})
                return
    finally:
        for leg in legs.legs.values():
            leg.close()


if __name__ == "__main__":
    asyncio.run(_main())
