"""EchoBackend: delay, per-slot reset, frozen slots untouched."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backend import BackendError, BatchBackend, PersonaParams
from engine.echo import EchoBackend
from engine.protocol import FRAME_SAMPLES


def frame(value: float) -> np.ndarray:
    return np.full(FRAME_SAMPLES, value, dtype=np.float32)


def test_is_a_batch_backend() -> None:
    assert isinstance(EchoBackend(2), BatchBackend)


def test_zero_delay_echoes_the_same_tick() -> None:
    b = EchoBackend(1)
    out = b.step({0: frame(0.25)})
    np.testing.assert_array_equal(out[0].pcm, frame(0.25))
    assert out[0].text == ""


def test_delay_gives_silence_first_then_input() -> None:
    b = EchoBackend(1, delay_frames=2)
    outs = [b.step({0: frame(v)})[0].pcm for v in (0.1, 0.2, 0.3, 0.4)]
    np.testing.assert_array_equal(outs[0], frame(0))
    np.testing.assert_array_equal(outs[1], frame(0))
    np.testing.assert_array_equal(outs[2], frame(0.1))
    np.testing.assert_array_equal(outs[3], frame(0.2))


def test_frozen_slot_does_not_advance() -> None:
    b = EchoBackend(2, delay_frames=1)
    b.step({0: frame(0.1), 1: frame(0.5)})
    for v in (0.2, 0.3, 0.4):  # slot 1 frozen for three ticks
        out = b.step({0: frame(v)})
        assert set(out) == {0}
    out = b.step({0: frame(0.6), 1: frame(0.7)})
    np.testing.assert_array_equal(out[1].pcm, frame(0.5))  # exactly where it stopped
    np.testing.assert_array_equal(out[0].pcm, frame(0.4))


def test_start_slot_resets_only_that_slot() -> None:
    b = EchoBackend(2, delay_frames=1)
    b.step({0: frame(0.1), 1: frame(0.2)})
    b.start_slot(1, PersonaParams())
    out = b.step({0: frame(0.3), 1: frame(0.4)})
    np.testing.assert_array_equal(out[0].pcm, frame(0.1))
    np.testing.assert_array_equal(out[1].pcm, frame(0))  # the previous call's audio is gone


def test_output_does_not_alias_input() -> None:
    b = EchoBackend(1)
    x = frame(0.1)
    out = b.step({0: x})
    x[:] = 0.9
    assert out[0].pcm[0] == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [{5: frame(0)}, {-1: frame(0)}, {0: np.zeros(10, np.float32)}])
def test_bad_step_raises_backend_error(bad: dict[int, np.ndarray]) -> None:
    with pytest.raises(BackendError):
        EchoBackend(2).step(bad)


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        EchoBackend(0)
    with pytest.raises(ValueError):
        EchoBackend(1, delay_frames=-1)
