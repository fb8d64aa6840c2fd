"""Re-chunking 24 kHz audio into 80 ms frames and 8 kHz audio into 20 ms packets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.media.framing import FrameAccumulator, PacketSplitter


@given(st.lists(st.integers(0, 5000), max_size=30))
def test_frames_are_the_stream_cut_in_order(sizes: list[int]) -> None:
    acc = FrameAccumulator()
    total = sum(sizes)
    stream = np.arange(total, dtype=np.float32)
    frames, pos = [], 0
    for size in sizes:
        frames += acc.push(stream[pos : pos + size])
        pos += size
    assert all(f.shape == (1920,) and f.dtype == np.float32 for f in frames)
    assert len(frames) == total // 1920 and acc.pending == total % 1920
    if frames:
        np.testing.assert_array_equal(np.concatenate(frames), stream[: len(frames) * 1920])


def test_frames_do_not_alias_the_internal_buffer() -> None:
    acc = FrameAccumulator(4)
    first = acc.push(np.ones(4, dtype=np.float32))[0]
    acc.push(np.zeros(4, dtype=np.float32))
    assert first.tolist() == [1, 1, 1, 1]


def test_packet_splitter_and_flush() -> None:
    split = PacketSplitter()
    pcm = np.arange(500, dtype=np.int16)
    packets = split.push(pcm)
    assert [len(p) for p in packets] == [160, 160, 160]
    assert split.pending == 20
    tail = split.flush()
    assert tail is not None and tail[:20].tolist() == list(range(480, 500)) and not tail[20:].any()
    assert split.flush() is None


def test_wrong_dtype_or_shape_is_rejected_and_loses_nothing() -> None:
    split = PacketSplitter()
    split.push(np.ones(100, dtype=np.int16))
    with pytest.raises(ValueError):
        split.push(np.ones(100, dtype=np.float32))
    with pytest.raises(ValueError):
        split.push(np.ones((10, 2), dtype=np.int16))
    assert split.pending == 100
    assert len(split.push(np.ones(60, dtype=np.int16))) == 1
