"""Caller turns and time to first byte (TTFB), sans-IO: the caller's speech is segmented into turns on the
80 ms frames the bridge sends to the engine, and each turn's TTFB is measured on the frames it plays back.

Definition (the one the load test, ``/metrics`` and ``calls live`` report):

* A **caller turn** is a run of voiced input frames (RMS above :data:`VOICED_RMS`) of at least
  ``min_turn_frames``, ended by ``end_silence_frames`` unvoiced ones (a 320 ms pause by default; shorter
  pauses are inside a turn).
* Its **end** is its last voiced frame N and the instant that frame was complete at the bridge (its last
  packet's arrival, the socket-level time, so the network and jitter buffer are inside the figure).
* Its **TTFB** is from that instant to when the first voiced agent frame numbered N or later left the bridge
  as RTP (output frame n answers input frame n: the engine protocol numbers them so).

For the echo engine that is the path's round trip for the turn's last syllable; for a speech model it is the
response time. An agent already talking over the caller answers at once: its TTFB is the path's alone. A turn
with no voiced answer before the next turn begins (or within ``answer_timeout_s``) counts as unanswered.

Everything is fed the times its caller read; nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import numpy.typing as npt

#: Voiced threshold on an 80 ms frame's RMS (24 kHz, full scale 1.0), input and output alike: -40 dBFS, well
#: above a line's idle noise, below speech.
VOICED_RMS = 0.01
#: Quiet threshold on a 20 ms slot's 16-bit RMS (about -35 dBFS): a slot this quiet may be cut unheard to
#: win back delay, the input's packets (``inbound.py``) and the output's slots (``outbound.py``) alike.
QUIET_RMS = 580


def is_voiced(samples: npt.NDArray[np.float32], full_scale: float = 1.0) -> bool:
    """Whether a frame's RMS is above ``VOICED_RMS`` (``samples`` as floats; ``full_scale``: 32768.0 for
    16-bit values): the one rule for input and output frames."""
    threshold = VOICED_RMS * full_scale
    return float(np.dot(samples, samples)) > threshold * threshold * len(samples)


@dataclass
class TurnStats:
    """One call's turns: counts and each answered turn's TTFB (ms, in order)."""

    turns: int = 0
    unanswered: int = 0
    ttfb_ms: list[float] = field(default_factory=list)

    @property
    def last_ttfb_ms(self) -> float | None:
        return self.ttfb_ms[-1] if self.ttfb_ms else None


@dataclass
class _Turn:
    last_voiced_seq: int
    ended_at: float  # when its last voiced frame was complete at the bridge


class TurnTracker:
    """See the module docstring."""

    MAX_TTFB_SAMPLES: ClassVar[int] = 4096  # per call: a turn every few seconds fills it in hours

    def __init__(
        self,
        *,
        min_turn_frames: int = 2,
        end_silence_frames: int = 4,
        answer_timeout_s: float = 10.0,
        recent_outputs: int = 128,
        stats: TurnStats | None = None,
    ) -> None:
        if min_turn_frames < 1 or end_silence_frames < 1:
            raise ValueError("min_turn_frames and end_silence_frames must be >= 1")
        self.min_turn_frames = min_turn_frames
        self.end_silence_frames = end_silence_frames
        self.answer_timeout_s = answer_timeout_s
        self.stats = stats if stats is not None else TurnStats()
        self._voiced_run = 0  # voiced frames in the current run (the turn being spoken)
        self._silent_run = 0  # unvoiced frames since the last voiced one
        self._last_voiced: tuple[int, float] | None = None  # (seq, completed at) of the last voiced input
        self._waiting: _Turn | None = None  # an ended turn whose answer has not been played yet
        # Voiced output frames played recently (seq, first packet sent at): the answer to a turn may have
        # left before its end was known (the end is only known end_silence_frames later).
        self._voiced_played: deque[tuple[int, float]] = deque(maxlen=recent_outputs)

    # -- input: the frames sent to the engine ---------------------------------------------------------------

    def input_frame(self, seq: int, voiced: bool, completed_at: float) -> None:
        """Input frame ``seq`` (voiced or not) was complete at ``completed_at`` and went to the engine."""
        self._expire(completed_at)
        if voiced:
            if self._voiced_run == 0 and self._waiting is not None:
                self._unanswered()  # a new turn began before the last one was answered
            self._voiced_run += 1
            self._silent_run = 0
            self._last_voiced = (seq, completed_at)
            return
        if self._voiced_run == 0:
            return
        self._silent_run += 1
        if self._silent_run < self.end_silence_frames:
            return
        run, last = self._voiced_run, self._last_voiced
        self._voiced_run = self._silent_run = 0
        if run < self.min_turn_frames or last is None:
            return  # a click or a cough, not a turn
        self.stats.turns += 1
        self._waiting = _Turn(last_voiced_seq=last[0], ended_at=last[1])
        for out_seq, sent_at in self._voiced_played:
            if out_seq >= last[0]:
                self._answered(sent_at)
                break

    # -- output: the engine's frames as they leave as RTP ---------------------------------------------------

    def output_played(self, seq: int, voiced: bool, sent_at: float) -> None:
        """Output frame ``seq``'s first packet left at ``sent_at``; ``voiced``: it carries agent speech."""
        if not voiced:
            return
        self._voiced_played.append((seq, sent_at))
        turn = self._waiting
        if turn is not None and seq >= turn.last_voiced_seq:
            self._answered(sent_at)

    def _answered(self, sent_at: float) -> None:
        turn = self._waiting
        assert turn is not None
        self._waiting = None
        if len(self.stats.ttfb_ms) < self.MAX_TTFB_SAMPLES:
            self.stats.ttfb_ms.append(max(0.0, (sent_at - turn.ended_at) * 1000.0))

    def _unanswered(self) -> None:
        self._waiting = None
        self.stats.unanswered += 1

    def _expire(self, now: float) -> None:
        turn = self._waiting
        if turn is not None and now - turn.ended_at > self.answer_timeout_s:
            self._unanswered()

    def finish(self) -> None:
        """The call ended: a turn still waiting for its answer is unanswered."""
        if self._waiting is not None:
            self._unanswered()
