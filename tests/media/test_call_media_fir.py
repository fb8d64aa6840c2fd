"""The call path's low-delay resampler (regular output, streaming = one-shot, fixed delay) and the media
clock's sleep.
(Speech fidelity of the FIR path is in test_pesq.py.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bridge.media.fir_resample import FirResampler
from bridge.media.media_clock import COALESCE_S, MediaClock


@pytest.mark.parametrize(("in_rate", "out_rate", "chunk", "out_chunk"),
                         [(8000, 24000, 160, 480), (24000, 8000, 1920, 640), (16000, 24000, 320, 480)])
def test_every_chunk_gives_the_same_output_size(
    in_rate: int, out_rate: int, chunk: int, out_chunk: int
) -> None:
    resampler = FirResampler(in_rate, out_rate)
    rng = np.random.default_rng(1)
    sizes = {len(resampler.process(rng.integers(-3000, 3000, chunk).astype(np.int16))) for _ in range(50)}
    assert sizes == {out_chunk}  # no bursts: an 80 ms frame every 80 ms


def test_streaming_in_random_chunks_equals_one_shot() -> None:
    rng = np.random.default_rng(2)
    signal = rng.standard_normal(24000).astype(np.float32) * 0.1
    whole = FirResampler(24000, 8000).process(signal)
    streamed = FirResampler(24000, 8000)
    parts, pos = [], 0
    while pos < len(signal):
        n = int(rng.integers(1, 700))
        parts.append(streamed.process(signal[pos : pos + n]))
        pos += n
    assert np.allclose(np.concatenate(parts), whole, atol=1e-6)


def test_delay_is_fixed_and_tone_passes() -> None:
    resampler = FirResampler(8000, 24000)
    t = np.arange(8000) / 8000
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32) * 0.5
    out = np.concatenate([resampler.process(tone[i : i + 160]) for i in range(0, 8000, 160)])
    t24 = np.arange(len(out)) / 24000 - resampler.delay_s
    expected = np.sin(2 * np.pi * 1000 * t24) * 0.5
    assert resampler.delay_s == pytest.approx(0.003, abs=1e-4)
    assert np.max(np.abs(out[500:] - expected[500:])) < 0.01
    # 3.9 kHz+ aliases of an 8 kHz stream must be gone: a 3.5 kHz tone keeps >90 % of its level
    tone35 = np.sin(2 * np.pi * 3500 * t).astype(np.float32)
    out35 = FirResampler(8000, 24000).process(tone35)
    assert 0.9 < np.max(np.abs(out35[300:])) < 1.1


# Chunk sizes: mixed (the general forms), and steady (the fast paths' preallocated blocks) broken by sizes
# that leave them and come back (a decimation phase that is not 0, a new chunk size).
MIXED = [1, 7, 160, 641, 1920, 3] * 100
STEADY_BROKEN = [1920] * 4 + [641, 1] + [1920] * 3 + [160] * 6 + [7, 2] + [480] * 3 + [1920] * 4


@pytest.mark.parametrize("sizes", [MIXED, STEADY_BROKEN], ids=["mixed", "steady-broken"])
@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 24000), (24000, 8000), (16000, 24000)])
def test_output_equals_the_plain_filter_it_stands_for(in_rate: int, out_rate: int, sizes: list[int]) -> None:
    # The polyphase products compute exactly this: zero-stuff by `up`, filter with the low-pass, keep every
    # `down`-th sample, streamed in chunks of any size from a zero state.
    resampler = FirResampler(in_rate, out_rate)
    up, down, taps = resampler.up, resampler.down, resampler._h.astype(np.float64)
    signal = np.random.default_rng(3).standard_normal(sum(sizes) if sizes is STEADY_BROKEN else 4800) * 0.2
    stuffed = np.zeros(len(signal) * up)
    stuffed[::up] = signal
    reference = np.convolve(stuffed, taps)[: len(stuffed)][::down]
    out, pos, chunks = [], 0, iter(sizes)
    while pos < len(signal):
        n = next(chunks)
        out.append(resampler.process(signal[pos : pos + n].astype(np.float32)))
        pos += n
    got = np.concatenate(out)
    assert len(got) == len(reference)
    assert np.max(np.abs(got - reference)) < 1e-5


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        FirResampler(8000, 44100)  # not a small ratio
    with pytest.raises(ValueError):
        FirResampler(8000, 24000).process(np.zeros((2, 160), dtype=np.int16))
    with pytest.raises(ValueError):
        FirResampler(8000, 24000).process(np.zeros(160, dtype=np.int32))


async def test_media_clock_sleeps_until_a_deadline_never_early() -> None:
    clock = MediaClock()
    clock.acquire()
    try:
        deadline = time.monotonic() + 0.03
        await clock.sleep_until(deadline)
        assert time.monotonic() >= deadline - COALESCE_S  # never early (but for the coalescing window)
        start = time.monotonic()
        await clock.sleep_until(start - 1)  # a past deadline returns at once
        sleeper = asyncio.create_task(clock.sleep_until(time.monotonic() + 5.0))
        await asyncio.sleep(0.01)
        sleeper.cancel()  # a cancelled sleep leaves nothing armed behind
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        clock.run_due()
        assert all(entry[-1].cancelled for entry in clock._heap)
    finally:
        clock.release()


def test_histogram_percentiles_and_merge() -> None:
    from bridge.media.metrics import Histogram

    a, b = Histogram(), Histogram()
    for ms in range(100):  # 0..99 ms
        a.add(float(ms))
    b.add(500.0)
    b.add(-3.0)  # clamped to 0
    b.add(5000.0)  # beyond the range: counted in the last bucket, max kept exactly
    a.merge(b)
    assert a.count == 103
    assert a.percentile(50) == pytest.approx(50.05, abs=0.1)
    assert a.percentile(100) == 5000.0
    assert a.summary()["max"] == 5000.0
    assert Histogram().percentile(99) == 0.0
    with pytest.raises(ValueError):
        a.merge(Histogram(max_ms=10))


def test_histogram_buckets_in_use_bound_merges_and_scrapes_exactly() -> None:
    """Merge and the Prometheus scrape add only each histogram's buckets up to its largest value: the same
    counts as adding every bucket, the overflow bucket included."""
    import numpy as np

    from bridge.media.metrics import Histogram
    from bridge.media.prometheus import LATENCY_BUCKETS_S, _histogram

    empty, small, edge, over = Histogram(), Histogram(), Histogram(), Histogram()
    for ms in (0.0, 0.049, 0.05, 3.0, 4.999):
        small.add(ms)
    edge.add(15.0)  # on a Prometheus bound
    over.add(2.0)
    over.add(5000.0)  # the overflow bucket
    assert (empty.used_buckets(), small.used_buckets(), edge.used_buckets()) == (0, 100, 301)
    assert over.used_buckets() == len(over.raw_counts)
    naive = sum(np.asarray(h.raw_counts) for h in (empty, small, edge, over))
    merged = Histogram()
    for h in (empty, small, edge, over):
        merged.merge(h)
    assert np.array_equal(merged.raw_counts, naive) and merged.count == 8
    family = _histogram("x_seconds", "x", [empty, small, edge, over], LATENCY_BUCKETS_S)
    cumulative = np.cumsum(naive)
    expected = [int(cumulative[round(b * 1000 / Histogram.BUCKET_MS) - 1]) for b in LATENCY_BUCKETS_S]
    got = [s.value for s in family.samples if s.name == "x_seconds_bucket"]
    assert got == [*expected, 8]
    assert _histogram("y_seconds", "y", [empty, small], LATENCY_BUCKETS_S).samples[0].value == 3  # ≤ 1 ms
