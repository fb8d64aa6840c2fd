"""Engine frames to 20 ms µ-law payloads (bridge/media/outbound.py's FrameToPackets): the same bytes, levels
and voicing as converting packet by packet with the codec's own functions."""

from __future__ import annotations

import audioop

import numpy as np
import pytest

from bridge.media.codecs import float32_to_pcm16, ulaw_encode
from bridge.media.fir_resample import FirResampler
from bridge.media.framing import PacketSplitter
from bridge.media.outbound import FrameToPackets
from bridge.media.turns import VOICED_RMS


def _per_packet(frames: list[np.ndarray]) -> list[tuple[list[bytes], list[int], bool]]:
    resampler, splitter = FirResampler(24000, 8000), PacketSplitter(160)
    out = []
    for pcm in frames:
        chunks = splitter.push(float32_to_pcm16(resampler.process(pcm)))
        scaled = pcm.astype(np.float32) / 32768.0
        voiced = float(np.dot(scaled, scaled)) > VOICED_RMS * VOICED_RMS * len(scaled)
        out.append(([ulaw_encode(c) for c in chunks], [audioop.rms(c.tobytes(), 2) for c in chunks], voiced))
    return out


@pytest.mark.parametrize("size", [1920, 1000, 3000])  # an engine frame; sizes that leave partial packets
def test_frames_convert_as_packet_by_packet(size: int) -> None:
    rng = np.random.default_rng(5)
    frames = [(rng.standard_normal(size) * amp).clip(-32768, 32767).astype(np.int16)
              for amp in [0.0, 50.0, 300.0, 3000.0, 40000.0] * 4]  # silence .. clipping
    to_packets = FrameToPackets()
    got = [to_packets.convert(pcm) for pcm in frames]
    expected = _per_packet(frames)
    assert [(p.payloads, p.levels, p.voiced) for p in got] == expected
    assert {len(payload) for p in got for payload in p.payloads} == {160}
    assert [p.voiced for p in got[:5]] == [False, False, False, True, True]
    if size == 1920:
        assert all(len(p.payloads) == 4 for p in got)  # every frame is 4 packets, none held back
