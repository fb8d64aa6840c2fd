"""Low-delay streaming resampler for the call path: rational L/M polyphase FIR, sans-IO.

Why not soxr's ``ResampleStream`` here: fed 20 ms chunks it works in internal blocks, so it holds back
40–60 ms per direction (HQ, measured) and releases output in bursts — 80 ms engine frames then leave every
60/60/120 ms instead of every 80 ms, and the output pacer has to absorb a frame of jitter. For a phone call
that is 100+ ms of mouth-to-ear delay. The ratios here are small integers (8k→24k = 3/1, 24k→8k = 1/3,
16k→24k = 3/2), for which one Kaiser-windowed sinc low-pass (cutoff just under the lower Nyquist) gives
telephone-band fidelity with a fixed group delay of ``(taps - 1) / 2`` samples at the intermediate rate
(3 ms for 8k↔24k), and every chunk of ``k × M`` input samples yields exactly ``k × L`` output samples.
"""

from __future__ import annotations

from math import gcd

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]


def _lowpass(cutoff: float, taps: int, beta: float) -> npt.NDArray[np.float64]:
    """Kaiser-windowed sinc, cutoff as a fraction of the sample rate, unity DC gain."""
    n = np.arange(taps) - (taps - 1) / 2.0
    h = 2.0 * cutoff * np.sinc(2.0 * cutoff * n) * np.kaiser(taps, beta)
    return h / h.sum()


def _windows(
    base: npt.NDArray[np.float32], start: int, rows: int, width: int, row_step: int, step: int
) -> npt.NDArray[np.float32]:
    """A read-only strided view of ``base`` from sample ``start``: row r is ``width`` samples from
    ``start + r * row_step / step``. The ndarray constructor, not ``as_strided``: its Python wrapper (array
    interface, a dummy object) cost 3 µs of a frame's ~30, and this runs twice per frame per call."""
    if rows > 0 and start + (rows - 1) * (row_step // step) + width > len(base):
        raise ValueError("window outside the buffer")  # (the constructor checks too: a clear message)
    view: npt.NDArray[np.float32] = np.ndarray(
        (rows, width), np.float32, base, start * step, (row_step, step)
    )
    view.flags.writeable = False
    return view


class _BlockProduct:
    """One fast path's steady chunks, each as ONE matrix product over non-overlapping input blocks.

    The input is cut in rows of ``block`` samples; output row r is the ``keep // block + 1`` consecutive
    input rows ending at row r (the history rows first), flattened, times one banded matrix that holds the
    taps at every output's offset. A row of windows per output sample (the obvious form) made numpy copy a
    window matrix 145 taps wide per frame (371 KB for 24k->8k), which was most of the product's time and
    evicted the cache for the calls around it; this form reads each sample once and shares one small
    matrix (12-37 KB) between all calls, for about 3x the multiplications by zero (measured on the 2-core VM
    per 80 ms frame: 24k->8k 20.3 -> 5.2 us, 8k->24k 15.4 -> 4.2 us; the same output within 1e-7)."""

    def __init__(
        self, matrix: Float32Array, block: int, keep: int, history: Float32Array, n: int
    ) -> None:
        self.matrix, self.keep, self.n = matrix, keep, n
        self.buf: Float32Array = np.zeros(keep + n, dtype=np.float32)
        self.buf[keep - len(history) : keep] = history
        step = self.buf.strides[0]
        self.rows = _windows(self.buf, 0, n // block, keep + block, block * step, step)

    def run(self, x: Float32Array) -> Float32Array:
        self.buf[self.keep :] = x
        out: Float32Array = np.dot(self.rows, self.matrix).ravel()
        self.buf[: self.keep] = self.buf[self.n :]  # (numpy copies overlapping slices safely)
        return out

    def history(self, size: int) -> Float32Array:
        """The last ``size`` input samples (``size`` ≤ ``keep``), for a path that takes the stream over."""
        return self.buf[self.keep - size : self.keep].copy()


# The banded matrices, one per (direction, ratio, taps, block): shared by every call's resampler.
_MATRICES: dict[tuple[int, int, int, bytes], Float32Array] = {}
DOWN_BLOCK_OUT = 32  # decimation: output samples per block row (96 input samples for 24k -> 8k)
UP_BLOCK_IN = 16  # interpolation: input samples per block row (48 output samples for 8k -> 24k)


def _decimation_matrix(taps: Float32Array, down: int, block: int, keep: int) -> Float32Array:
    """y[q] of a row = sum_k taps[k] * row[keep - (len(taps) - 1) + down * q + k], q < block // down."""
    key = (0, down, block, taps.tobytes())
    matrix = _MATRICES.get(key)
    if matrix is None:
        n_taps, outs = len(taps), block // down
        matrix = np.zeros((keep + block, outs), dtype=np.float32)
        for q in range(outs):
            first = keep - (n_taps - 1) + down * q
            matrix[first : first + n_taps, q] = taps
        _MATRICES[key] = matrix
    return matrix


def _interpolation_matrix(by_phase: Float32Array, up: int, block: int, keep: int) -> Float32Array:
    """y[up * q + p] of a row = sum_i by_phase[i, p] * row[keep - (width - 1) + q + i], q < block."""
    key = (1, up, block, by_phase.tobytes())
    matrix = _MATRICES.get(key)
    if matrix is None:
        width = by_phase.shape[0]
        matrix = np.zeros((keep + block, up * block), dtype=np.float32)
        for q in range(block):
            first = keep - (width - 1) + q
            matrix[first : first + width, up * q : up * q + up] = by_phase
        _MATRICES[key] = matrix
    return matrix


def _history_rows(history: int, block: int) -> int:
    """Whole blocks of history that hold ``history`` samples."""
    return -(-history // block) * block


class FirResampler:
    """Streaming ``in_rate`` → ``out_rate`` for small rational ratios (int16 or float in, float32 out in
    [-1, 1] scale)."""

    def __init__(self, in_rate: int, out_rate: int, *, taps_per_phase: int = 48, beta: float = 8.0) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"rates must be positive, got {in_rate} -> {out_rate}")
        g = gcd(in_rate, out_rate)
        self.in_rate, self.out_rate = in_rate, out_rate
        self.up, self.down = out_rate // g, in_rate // g
        if self.up > 12 or self.down > 12:
            raise ValueError(f"{in_rate} -> {out_rate} is not a small rational ratio")
        factor = max(self.up, self.down)
        taps = taps_per_phase * factor + 1
        # Cutoff 0.975 × the lower Nyquist, as a fraction of the intermediate rate in_rate × up.
        cutoff = 0.975 * 0.5 / factor
        self._h = (_lowpass(cutoff, taps, beta) * self.up).astype(np.float32)
        # the last taps-1 samples at the intermediate rate
        self._state: npt.NDArray[np.float32] = np.zeros(taps - 1, dtype=np.float32)
        self._phase = 0  # index (intermediate rate) of the next output sample within the next block
        # Polyphase fast paths skip the multiplications by zero (interpolation) and the outputs thrown away
        # (decimation): 3x less work for the 8k<->24k call path than the general form. Each is one matrix
        # product over a strided window view of the input: np.convolve computes its dot products one output
        # sample at a time, and at 640 outputs of 49 taps that call overhead cost more than the sums (measured
        # on the 2-core VM per 80 ms frame: 48 -> 31 us 8k->24k, 59 -> 38 us 24k->8k; output within 2e-7).
        self._up_taps: npt.NDArray[np.float32] | None = None
        self._down_taps: npt.NDArray[np.float32] | None = None
        self._block = 0  # the fast path's block (input samples per row): steady chunks are whole blocks
        self._keep = 0  # ...and the whole blocks of history it keeps
        self._matrix: Float32Array | None = None
        self._up_history: Float32Array = np.zeros(0, dtype=np.float32)  # (interpolation: the last inputs)
        if self.down == 1:
            # column p holds phase p's taps h[p], h[p + up], ... newest-sample last, zero-padded at the
            # front to the longest phase: y[j*up + p] = window_j . column_p, window_j = x[j-K+1 .. j]
            phases = [self._h[p :: self.up] for p in range(self.up)]
            width = max(len(h) for h in phases)
            by_phase = np.zeros((width, self.up), dtype=np.float32)
            for p, hp in enumerate(phases):
                by_phase[width - len(hp) :, p] = hp[::-1]
            self._up_taps = by_phase
            self._block = UP_BLOCK_IN
            self._keep = _history_rows(width - 1, self._block)
            self._matrix = _interpolation_matrix(by_phase, self.up, self._block, self._keep)
            self._up_history = np.zeros(width - 1, dtype=np.float32)
        elif self.up == 1:
            self._down_taps = np.ascontiguousarray(self._h[::-1])  # (symmetric; reversed for the record)
            self._block = DOWN_BLOCK_OUT * self.down
            self._keep = _history_rows(taps - 1, self._block)
            self._matrix = _decimation_matrix(self._down_taps, self.down, self._block, self._keep)
        self._fast: _BlockProduct | None = None  # (made for the first steady chunk size)
        self.samples_in = 0
        self.samples_out = 0

    @property
    def delay_samples(self) -> float:
        """Group delay in output samples (fixed: the filter is linear-phase)."""
        return (len(self._h) - 1) / 2.0 / self.down

    @property
    def delay_s(self) -> float:
        return self.delay_samples / self.out_rate

    def process(self, chunk: npt.ArrayLike) -> Float32Array:
        arr = np.asarray(chunk)
        if arr.ndim != 1:
            raise ValueError(f"audio must be 1-D, got shape {arr.shape}")
        x: Float32Array
        if arr.dtype == np.float32:
            x = arr
        elif arr.dtype == np.int16:
            x = arr.astype(np.float32) * np.float32(1.0 / 32768.0)
        elif np.issubdtype(arr.dtype, np.floating):
            x = np.asarray(arr, dtype=np.float32)
        else:
            raise ValueError(f"audio must be int16 or float, got {arr.dtype}")
        self.samples_in += len(x)
        if self._up_taps is not None:
            return self._interpolate(x, self._up_taps)
        if self._down_taps is not None:
            return self._decimate(x, self._down_taps)
        stuffed: Float32Array
        if self.up > 1:
            stuffed = np.zeros(len(x) * self.up, dtype=np.float32)
            stuffed[:: self.up] = x
        else:
            stuffed = x
        block = np.concatenate([self._state, stuffed])
        n_taps = len(self._h)
        # The filter is symmetric, so convolution equals correlation; keep every `down`-th output.
        full = np.convolve(block, self._h, mode="valid")  # one output per intermediate-rate input sample
        out = full[self._phase :: self.down]
        kept = len(range(self._phase, len(stuffed), self.down))
        self._phase = (self._phase + kept * self.down) - len(stuffed)
        self._state = block[len(block) - (n_taps - 1) :].copy()
        self.samples_out += len(out)
        return out.astype(np.float32, copy=False)

    def _steady(self, n: int) -> _BlockProduct | None:
        """The block product for chunks of ``n`` samples, or None (not whole blocks: the general forms)."""
        fast = self._fast
        if fast is not None and fast.n == n:
            return fast
        matrix = self._matrix
        if matrix is None or n == 0 or n % self._block:
            if fast is not None:
                self._take_over(fast)
            return None
        if fast is not None:
            self._take_over(fast)
        history = self._up_history if self._up_taps is not None else self._state
        fast = self._fast = _BlockProduct(matrix, self._block, self._keep, history, n)
        return fast

    def _take_over(self, fast: _BlockProduct) -> None:
        """The block product's history back to the general forms (a chunk of another size came)."""
        if self._up_taps is not None:
            self._up_history = fast.history(len(self._up_history))
        else:
            self._state = fast.history(len(self._state))
        self._fast = None

    def _interpolate(self, x: Float32Array, taps: npt.NDArray[np.float32]) -> Float32Array:
        """down == 1: y[j*up + p] = sum_i h[p + i*up] * x[j - i], as (windows of x) @ (taps by phase)."""
        n = len(x)
        fast = self._steady(n)
        out: Float32Array
        if fast is not None:
            out = fast.run(x)
        else:
            width = taps.shape[0]
            block = np.concatenate([self._up_history, x])
            step = block.strides[0]
            out = np.dot(_windows(block, 0, n, width, step, step), taps).ravel()
            self._up_history = block[len(block) - (width - 1) :].copy()
        self.samples_out += len(out)
        return out

    def _decimate(self, x: Float32Array, taps: npt.NDArray[np.float32]) -> Float32Array:
        """up == 1: only the kept outputs: y[j] = sum_k h[k] * block[phase + j*down + n_taps - 1 - k]."""
        n_taps, n = len(taps), len(x)
        fast = self._steady(n) if self._phase == 0 else None
        if fast is not None:  # (whole blocks from decimation phase 0: the call path's frames)
            kept = fast.run(x)
            self.samples_out += len(kept)
            return kept
        if self._fast is not None:  # (a phase that is not 0: the general form takes the history over)
            self._take_over(self._fast)
        block = np.concatenate([self._state, x])
        count = len(range(self._phase, len(x), self.down))
        step = block.strides[0]
        windows = _windows(block, self._phase, count, n_taps, step * self.down, step)
        out: Float32Array = np.dot(windows, taps) if count else np.zeros(0, dtype=np.float32)
        self._phase = self._phase + count * self.down - len(x)
        self._state = block[len(block) - (n_taps - 1) :].copy()
        self.samples_out += len(out)
        return out

    def flush(self) -> Float32Array:
        """Push the filter's tail out (end of stream) and reset."""
        tail = self.process(np.zeros(int(np.ceil(len(self._h) / self.up)) + 1, dtype=np.float32))
        self._state = np.zeros_like(self._state)
        self._fast = None  # (the next chunk starts from a zero history)
        if self._up_taps is not None:
            self._up_history = np.zeros_like(self._up_history)
        self._phase = 0
        return tail
