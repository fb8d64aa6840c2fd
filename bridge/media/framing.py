"""Re-chunking audio between the 20 ms RTP world and the engine's 80 ms frames, sans-IO."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Moshi's frame: 80 ms at 24 kHz.
ENGINE_FRAME_SAMPLES = 1920
#: One 20 ms G.711 packet at 8 kHz.
PACKET_SAMPLES_8K = 160


class _Accumulator:
    """Collects 1-D chunks of ``dtype`` and hands out complete blocks of ``block`` samples."""

    def __init__(self, block: int, dtype: type[np.generic]) -> None:
        if block <= 0:
            raise ValueError(f"block size must be > 0, got {block}")
        self.block = block
        self.dtype = np.dtype(dtype)
        self._buf = np.zeros(block, dtype=self.dtype)
        self._fill = 0

    @property
    def pending(self) -> int:
        """Samples held towards the next block."""
        return self._fill

    def _push(self, chunk: npt.ArrayLike) -> list[npt.NDArray[np.generic]]:
        data = np.asarray(chunk)
        if data.ndim != 1:
            raise ValueError(f"audio must be 1-D, got shape {data.shape}")
        if data.dtype != self.dtype:
            raise ValueError(f"audio must be {self.dtype}, got {data.dtype}")
        out: list[npt.NDArray[np.generic]] = []
        pos = 0
        while pos < len(data):
            take = min(self.block - self._fill, len(data) - pos)
            self._buf[self._fill : self._fill + take] = data[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.block:
                out.append(self._buf.copy())
                self._fill = 0
        return out

    def reset(self) -> None:
        self._fill = 0

    def _flush(self) -> npt.NDArray[np.generic] | None:
        """The partial block zero-padded to a full one, or ``None`` if nothing is pending."""
        if self._fill == 0:
            return None
        block = np.zeros(self.block, dtype=self.dtype)
        block[: self._fill] = self._buf[: self._fill]
        self._fill = 0
        return block


class FrameAccumulator(_Accumulator):
    """24 kHz float32 chunks of any size in, complete 80 ms engine frames (float32, 1920 samples) out."""

    def __init__(self, frame_samples: int = ENGINE_FRAME_SAMPLES) -> None:
        super().__init__(frame_samples, np.float32)

    def push(self, chunk: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        return self._push(chunk)  # type: ignore[return-value]

    def flush(self) -> npt.NDArray[np.float32] | None:
        return self._flush()  # type: ignore[return-value]


class PacketSplitter(_Accumulator):
    """8 kHz int16 chunks of any size in, complete 20 ms packets (int16, 160 samples) out."""

    def __init__(self, samples_per_packet: int = PACKET_SAMPLES_8K) -> None:
        super().__init__(samples_per_packet, np.int16)

    def push(self, chunk: npt.NDArray[np.int16]) -> list[npt.NDArray[np.int16]]:
        return self._push(chunk)  # type: ignore[return-value]

    def flush(self) -> npt.NDArray[np.int16] | None:
        return self._flush()  # type: ignore[return-value]
