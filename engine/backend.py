"""The interface every engine backend implements (echo now, Moshi next).

A backend owns a fixed number of slots allocated once (static shapes). The server's scheduler owns the
sessions and calls the backend from ONE worker thread, never concurrently:

    prepare_persona(p)          may be slow (prefix computed once and cached); call before start_slot
    start_slot(slot, p, seed)   reset that slot's streaming state only; load the persona prefix into it;
                                seed its sampler; returns warnings (e.g. adapter unavailable: base weights)
    step({slot: pcm, ...})      one 80 ms tick for exactly the slots given (the others are frozen, not fed
                                fake audio); returns one StepOutput per slot given
    end_slot(slot)              the slot is free; its state may be left as is until the next start_slot

PCM crossing this interface is float32 in [-1, 1], shape (FRAME_SAMPLES,), 24 kHz mono.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engine.protocol import FRAME_SAMPLES, SAMPLE_RATE, PersonaParams

__all__ = ["FRAME_SAMPLES", "SAMPLE_RATE", "BackendError", "BatchBackend", "PersonaParams", "StepOutput"]


class BackendError(RuntimeError):
    """A backend failure that concerns one slot or one persona; the engine keeps serving the others."""


@dataclass(frozen=True)
class StepOutput:
    pcm: np.ndarray  # float32, shape (FRAME_SAMPLES,); silence when the model has nothing yet
    text: str = ""  # agent text decoded this tick (may be empty)


@runtime_checkable
class BatchBackend(Protocol):
    name: str
    num_slots: int
    sample_rate: int
    frame_samples: int

    def prepare_persona(self, persona: PersonaParams) -> None: ...

    def start_slot(self, slot: int, persona: PersonaParams, seed: int = 0) -> list[str]: ...

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]: ...

    def end_slot(self, slot: int) -> None: ...

    def close(self) -> None: ...
