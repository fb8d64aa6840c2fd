"""EchoBackend: the BatchBackend used when there are no model weights (tests, demos, load tests).

Per slot a FIFO of input frames: output frame k is input frame k - delay_frames (silence before). It keeps
the slot semantics of a real backend: ``start_slot`` resets only its slot, slots absent from ``step`` are
frozen (their FIFO does not advance), and no text is produced (an echo has nothing to say).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from engine.backend import FRAME_SAMPLES, SAMPLE_RATE, BackendError, PersonaParams, StepOutput


class EchoBackend:
    name = "echo"
    sample_rate = SAMPLE_RATE
    frame_samples = FRAME_SAMPLES

    def __init__(self, num_slots: int, delay_frames: int = 0) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        if delay_frames < 0:
            raise ValueError("delay_frames must be >= 0")
        self.num_slots = num_slots
        self.delay_frames = delay_frames
        self._fifos: list[deque[np.ndarray]] = [self._fresh_fifo() for _ in range(num_slots)]
        self.steps_per_slot = [0] * num_slots  # how many ticks each slot took part in (tests read it)

    def _fresh_fifo(self) -> deque[np.ndarray]:
        silence = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        return deque(silence for _ in range(self.delay_frames))

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise BackendError(f"slot {slot} out of range 0..{self.num_slots - 1}")

    def prepare_persona(self, persona: PersonaParams) -> None:
        """Nothing to precompute for an echo."""

    def start_slot(self, slot: int, persona: PersonaParams, seed: int = 0) -> list[str]:
        self._check_slot(slot)
        self._fifos[slot] = self._fresh_fifo()
        self.steps_per_slot[slot] = 0
        return []

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        for slot, pcm in frames.items():
            self._check_slot(slot)
            if pcm.shape != (FRAME_SAMPLES,):
                raise BackendError(f"slot {slot}: frame shape {pcm.shape}, expected ({FRAME_SAMPLES},)")
        outputs: dict[int, StepOutput] = {}
        for slot, pcm in frames.items():
            fifo = self._fifos[slot]
            fifo.append(np.asarray(pcm, dtype=np.float32).copy())
            outputs[slot] = StepOutput(pcm=fifo.popleft())
            self.steps_per_slot[slot] += 1
        return outputs

    def end_slot(self, slot: int) -> None:
        self._check_slot(slot)

    def close(self) -> None:
        self._fifos = [self._fresh_fifo() for _ in range(self.num_slots)]
