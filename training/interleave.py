"""The agent's text as one token per 80 ms frame, Moshi's inner-monologue layout.

A word's tokens start at the frame its audio starts in, one per frame; PAD fills frames with no text, and
the frame just before a word's first token becomes EPAD (end of padding), as in Moshi's training data. When
words come faster than one token per frame the tokens queue up and shift later (never dropped); tokens
still queued at the end of the audio mean the text does not fit (a counted skip reason).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from training.align import WordSpan

FRAME_RATE = 12.5  # Mimi frames per second (80 ms)


@dataclass(frozen=True)
class TextStream:
    tokens: np.ndarray  # int64 (frames,)
    overflow: int  # tokens that did not fit before the last frame
    max_shift_frames: int  # how far the queue pushed a token past its word's start


def text_stream(spans: Sequence[WordSpan], frames: int, encode_word: Callable[[str], list[int]],
                pad_id: int, epad_id: int, frame_rate: float = FRAME_RATE) -> TextStream:
    tokens = np.full(frames, pad_id, dtype=np.int64)
    queue: deque[tuple[int, int]] = deque()  # (token, frame its word starts in)
    order = sorted(spans, key=lambda s: s.start)
    i = 0
    max_shift = 0
    for t in range(frames):
        while i < len(order) and order[i].start * frame_rate < t + 1:
            start_frame = int(order[i].start * frame_rate)
            queue.extend((tok, start_frame) for tok in encode_word(order[i].word))
            i += 1
        if queue:
            token, start_frame = queue.popleft()
            if t > 0 and tokens[t - 1] == pad_id:
                tokens[t - 1] = epad_id
            tokens[t] = token
            max_shift = max(max_shift, t - start_frame)
    overflow = len(queue) + sum(len(encode_word(s.word)) for s in order[i:])
    return TextStream(tokens=tokens, overflow=overflow, max_shift_frames=max_shift)
