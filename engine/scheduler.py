"""Slot table and frame scheduler of the engine.

Two sans-IO cores (no asyncio, the caller passes ``now``), tested with a virtual clock:

* :class:`SlotTable` — fixed slots allocated once; ``acquire()`` hands out ``(slot, generation)``; the
  generation of a slot increments on every acquire so an output of a finished call is recognisable.
* :class:`BatchPlanner` — per-slot bounded input queues and the batching rule: rounds start on a fixed grid
  of ``window_s`` (a queued frame waits for the next boundary, and a call whose frames come at a fixed
  phase waits the same time all call long), and the ready set is stepped (the others are simply absent from
  the batch). A call's round is the first boundary ``ROUND_MARGIN_S`` after its frames usually come, so a
  frame a little late still makes it, and one a little early waits for it; the call keeps that round until
  its phase leaves a hysteresis band (``aziza_engine_round_moves`` counts the moves). A round starts at once
  when every active slot is ready. A frame on time waits at most a window, ``ROUND_MARGIN_S`` and
  ``ROUND_HYSTERESIS_S`` (plus a step already in flight).

and a thin asyncio driver, :class:`FrameScheduler`, that runs the backend from ONE worker thread (a
single-thread executor: prepare/start/step/end are serialised, never two at once) and hands outputs to each
session's :class:`SessionSink`.

Backend failure contract: a slot missing from ``step``'s result failed alone (its session is closed with
``internal``); a BackendError with a ``slots`` list (rejected before any state changed) fails those slots
and the rest of the batch is stepped again; any other exception from ``step`` fails every slot of that
batch. The engine keeps running in every case.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from engine.backend import BackendError, BatchBackend, PersonaParams, StepOutput
from engine.metrics import EngineMetrics
from engine.protocol import FRAME_MS, FRAME_SAMPLES, SEQ_MOD, Gap, seq_after

log = logging.getLogger(__name__)

FRAME_S = FRAME_MS / 1000.0
DEFAULT_MAX_QUEUE_FRAMES = 4  # 320 ms of input per session before the oldest is dropped
PHASE_WEIGHT = 1 / 8  # a frame's weight in its call's phase (when its frames come: about the last 8 frames)
ROUND_MARGIN_S = 0.003  # a call's round starts at least this long after its frames usually come (jitter)
# A call keeps its round while its frames usually come at least ROUND_KEEP_MIN_S before it, and until an
# earlier round would leave ROUND_HYSTERESIS_S more than the margin: its phase must move by more than these
# before its round trip moves by a window.
ROUND_KEEP_MIN_S = 0.0015
ROUND_HYSTERESIS_S = 0.002
ROUND_MOVE_LATE, ROUND_MOVE_PHASE = "late", "phase"  # why a frame was stepped a window off its call's round


class SlotsFull(Exception):
    """Every slot is held: the open is refused and the table is unchanged."""


@dataclass(frozen=True)
class SlotLease:
    slot: int
    generation: int


class SlotTable:
    """Fixed slots, allocated once. Not thread-safe: used from the event loop only."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.total = num_slots
        self._generation = [0] * num_slots
        self._held = [False] * num_slots

    def acquire(self) -> SlotLease:
        for slot, held in enumerate(self._held):
            if not held:
                self._held[slot] = True
                self._generation[slot] += 1
                return SlotLease(slot, self._generation[slot])
        raise SlotsFull(f"all {self.total} slots are busy")

    def release(self, lease: SlotLease) -> bool:
        """Free the slot if ``lease`` still holds it; False (and nothing changes) for a stale lease."""
        if not self.holds(lease):
            return False
        self._held[lease.slot] = False
        return True

    def holds(self, lease: SlotLease) -> bool:
        return self._held[lease.slot] and self._generation[lease.slot] == lease.generation

    @property
    def busy(self) -> int:
        return sum(self._held)

    @property
    def free(self) -> int:
        return self.total - self.busy


_SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.float32)


@dataclass(frozen=True)
class _Queued:
    arrival: float
    seq: int  # the client's input frame number this frame answers
    pcm: np.ndarray  # float32
    filled: bool = False  # silence stepped in place of a missing input frame
    round_at: float = 0.0  # the round boundary it is stepped at (earlier when every active slot is ready)


@dataclass
class _SlotState:
    generation: int
    queue: deque[_Queued] = field(default_factory=deque)
    paused: bool = False
    next_seq: int | None = None  # the input number expected next (None: the next frame anchors)
    dropped: int = 0
    lagging: bool = False
    last_lag_report: float = -math.inf
    expected: float | None = None  # when its next frame should come (its frames' phase, smoothed)
    next_round: float | None = None  # its next frame's round if its frames keep their round (last + 80 ms)


@dataclass(frozen=True)
class PushResult:
    dropped: int  # oldest frames dropped by this push (the session is behind)
    lag_frames: int | None  # report ``lag{behind_frames}`` to the session now, or None
    gaps: tuple[Gap, ...] = ()  # input numbers that will get no (or a silence-fed) output: tell the client
    round_move: str | None = None  # ROUND_MOVE_LATE / ROUND_MOVE_PHASE: this frame is a window off its round


@dataclass(frozen=True)
class Batch:
    frames: dict[int, np.ndarray]  # slot -> float32 frame: exactly the slots to step
    generations: dict[int, int]
    oldest_arrival: float
    taken_at: float
    seqs: dict[int, tuple[int, bool]] = field(default_factory=dict)  # slot -> (input number, filled)


@dataclass(frozen=True)
class Delivery:
    slot: int
    generation: int
    seq: int  # the input frame number this output answers
    output: StepOutput
    filled: bool = False  # the input was missing: the model heard silence


@dataclass(frozen=True)
class BatchResult:
    deliveries: list[Delivery]
    failed: list[SlotLease]  # slots the backend returned nothing for: their sessions must be closed
    stale: int  # outputs dropped because their slot has moved on to another call


class BatchPlanner:
    """Sans-IO batching core. Every method takes ``now`` (seconds, monotonic) where time matters."""

    def __init__(
        self,
        num_slots: int,
        window_s: float,
        max_queue_frames: int = DEFAULT_MAX_QUEUE_FRAMES,
        lag_report_interval_s: float = 1.0,
        max_gap_fill: int = 0,
    ) -> None:
        if max_queue_frames < 1:
            raise ValueError("max_queue_frames must be >= 1")
        if max_gap_fill < 0:
            raise ValueError("max_gap_fill must be >= 0")
        self.num_slots = num_slots
        self.window_s = window_s
        self.max_queue_frames = max_queue_frames
        self.lag_report_interval_s = lag_report_interval_s
        self.max_gap_fill = max_gap_fill
        self._slots: dict[int, _SlotState] = {}
        # Frames stepped a window earlier or later than their call's previous one: each moves that call's
        # round trip by a window, which its bridge must follow (aziza_engine_round_moves).
        self.round_moves = {ROUND_MOVE_LATE: 0, ROUND_MOVE_PHASE: 0}

    # -- sessions ----------------------------------------------------------------------------------------

    def attach(self, lease: SlotLease) -> None:
        self._slots[lease.slot] = _SlotState(generation=lease.generation)

    def detach(self, lease: SlotLease) -> None:
        state = self._slots.get(lease.slot)
        if state is not None and state.generation == lease.generation:
            del self._slots[lease.slot]

    def _state(self, lease: SlotLease) -> _SlotState:
        state = self._slots.get(lease.slot)
        if state is None or state.generation != lease.generation:
            raise KeyError(f"slot {lease.slot} generation {lease.generation} is not attached")
        return state

    def set_paused(self, lease: SlotLease, paused: bool) -> None:
        """Hold: a paused slot is never stepped; what it had queued is discarded (stale once resumed), and
        numbering re-anchors on the first frame after the hold (a hold is not a loss)."""
        state = self._state(lease)
        state.paused = paused
        state.queue.clear()
        state.lagging = False
        state.next_seq = None
        state.expected = None
        state.next_round = None

    def push(self, lease: SlotLease, pcm: np.ndarray, now: float, seq: int | None = None) -> PushResult:
        """Queue input frame ``seq`` (None: the next number). Frames pushed while paused are discarded (hold
        consumes nothing); a frame numbered before one already taken is dropped as late; numbers skipped
        open a gap, up to ``max_gap_fill`` of them stepped as silence."""
        state = self._state(lease)
        if state.paused:
            return PushResult(dropped=0, lag_frames=None)
        if seq is None:
            seq = state.next_seq if state.next_seq is not None else 0
        seq %= SEQ_MOD
        gaps: list[Gap] = []
        round_at, move = self._round_for(state, now)
        if state.next_seq is not None:
            ahead = seq_after(seq, state.next_seq)
            if ahead < 0:
                return PushResult(dropped=0, lag_frames=None, gaps=(Gap(seq, 1, "late"),), round_move=move)
            if ahead > 0:
                fill = ahead if ahead <= self.max_gap_fill else 0
                gaps.append(Gap(state.next_seq, ahead, "missing", filled=fill))
                for k in range(fill):
                    fill_seq = (state.next_seq + k) % SEQ_MOD
                    state.queue.append(_Queued(now, fill_seq, _SILENCE, filled=True, round_at=round_at))
        state.queue.append(_Queued(now, seq, pcm, round_at=round_at))
        state.next_seq = (seq + 1) % SEQ_MOD
        dropped = 0
        while len(state.queue) > self.max_queue_frames:
            lost = state.queue.popleft()
            dropped += 1
            _extend_gap(gaps, lost.seq)
        state.dropped += dropped
        lag: int | None = None
        if len(state.queue) >= self.max_queue_frames:
            state.lagging = True
            if now - state.last_lag_report >= self.lag_report_interval_s:
                state.last_lag_report = now
                lag = len(state.queue) - 1 + dropped
        return PushResult(dropped=dropped, lag_frames=lag, gaps=tuple(gaps), round_move=move)

    # -- scheduling --------------------------------------------------------------------------------------

    def _ready(self) -> list[int]:
        return [slot for slot, s in self._slots.items() if s.queue and not s.paused]

    def _all_active(self, ready: list[int]) -> bool:
        """Whether ``ready`` is every slot not on hold: then the round starts at once."""
        return len(ready) == sum(1 for s in self._slots.values() if not s.paused)

    def next_step_at(self, now: float) -> float | None:
        """When the next step should start: None when nothing is queued, ``now`` or earlier when due."""
        ready = self._ready()
        if not ready:
            return None
        heads = [self._slots[slot].queue[0] for slot in ready]
        if self._all_active(ready):
            return min(now, min(head.arrival for head in heads))
        return min(head.round_at for head in heads)

    def round_after(self, arrival: float) -> float:
        """The first round boundary at or after ``arrival``: boundaries lie on a fixed grid of ``window_s``
        on the clock, not ``window_s`` after whichever frame came first. A call's frames come at a fixed
        phase, so each call then waits the same time for its round all call long. Counted from the first
        frame of each round, the rounds followed the order in which calls' frames happened to arrive: a
        call's wait (and its echo's round trip) changed by up to a window during a call, and a bridge had
        to shift its output timeline to follow (``bench media --calls 20 --seconds 60 --engine-window-ms
        20``, two runs each: the round trip at the end within 5 ms of the start on 14 and 18 of 20 calls,
        up to 9 ms off; on this grid 20 of 20, within 2.2 ms)."""
        window = self.window_s
        if window <= 0.0:
            return arrival
        return math.ceil(arrival / window - 1e-9) * window

    def _round_for(self, state: _SlotState, now: float) -> tuple[float, str | None]:
        """The round of a frame arriving at ``now``: the first boundary ``ROUND_MARGIN_S`` or more after
        the time the call's frames usually come (their phase, a slow average: one frame's jitter does not
        move it). Chosen from the frame's own arrival, a call whose frames come close to a boundary, some
        just before it and some just after, waited almost nothing and a whole window by turns, and its
        round trip jumped by a window at every turn; and a call whose phase wobbled by a millisecond about
        that threshold moved between two rounds by turns (20 calls on a real Asterisk, 60 s: up to 54
        such moves, and calls whose round trip stepped by 20 ms for seconds at a time, each time the bridge's
        output followed). So a call keeps its round within a hysteresis band (``ROUND_KEEP_MIN_S``,
        ``ROUND_HYSTERESIS_S``). A frame later than its round takes the next one. Also returns why the frame
        is a window off its call's round, if it is."""
        if self.window_s <= 0.0:
            return now, None  # no rounds: each frame is stepped as it comes
        expected = state.expected
        if expected is None or abs(now - expected) > FRAME_S / 2:
            expected = now  # the first frame, or after a hold or a stall: the phase starts here
        else:
            expected += (now - expected) * PHASE_WEIGHT
        state.expected = expected + FRAME_S
        round_at = self.round_after(expected + ROUND_MARGIN_S)
        kept = state.next_round
        band = self.window_s + ROUND_MARGIN_S + ROUND_HYSTERESIS_S
        if kept is not None and ROUND_KEEP_MIN_S <= kept - expected < band:
            # The call's round, while its phase wobbles about a boundary's threshold; and while it fits, a
            # frame that comes after the round started is late, alone (below). (Asked only of rounds not yet
            # started, a frame 3.3 ms late for a round 3.2 ms after its call's phase moved the call a window
            # later for good, its phase having moved 0.4 ms: a real Asterisk call's round trip, 20 ms longer
            # from 6.8 s to its end.)
            round_at = kept
        late = round_at < now
        if late:
            round_at = self.round_after(now)
        move = None
        if kept is not None and abs(round_at - kept) >= self.window_s / 2:
            # This frame waits a window more or less than the call's last one: it came after its round, or
            # the call's phase crossed a boundary.
            move = ROUND_MOVE_LATE if late else ROUND_MOVE_PHASE
            self.round_moves[move] += 1
        # (A late frame is one frame: the call's round stays where it was for the next.)
        state.next_round = (kept if late and kept is not None else round_at) + FRAME_S
        return round_at, move

    def take_batch(self, now: float) -> Batch | None:
        """Pop one frame from every ready slot (the exec mask is the key set of ``frames``)."""
        ready = self._ready()
        if not ready:
            return None
        everyone = self._all_active(ready)
        frames: dict[int, np.ndarray] = {}
        generations: dict[int, int] = {}
        seqs: dict[int, tuple[int, bool]] = {}
        oldest = math.inf
        for slot in sorted(ready):
            state = self._slots[slot]
            if not everyone and state.queue[0].round_at > now + 1e-9:
                continue  # its round is a later one
            item = state.queue.popleft()
            oldest = min(oldest, item.arrival)
            frames[slot] = item.pcm
            generations[slot] = state.generation
            seqs[slot] = (item.seq, item.filled)
            if len(state.queue) <= 1:
                state.lagging = False
        if not frames:
            return None
        return Batch(frames=frames, generations=generations, oldest_arrival=oldest, taken_at=now, seqs=seqs)

    def complete(self, batch: Batch, outputs: dict[int, StepOutput]) -> BatchResult:
        """Match a step's outputs to sessions; outputs for a slot now held by another call are discarded."""
        deliveries: list[Delivery] = []
        failed: list[SlotLease] = []
        stale = 0
        for slot, generation in batch.generations.items():
            state = self._slots.get(slot)
            if state is None or state.generation != generation:
                stale += 1
                continue
            out = outputs.get(slot)
            if out is None:
                failed.append(SlotLease(slot, generation))
                continue
            seq, filled = batch.seqs[slot]
            deliveries.append(Delivery(slot, generation, seq, out, filled))
        return BatchResult(deliveries, failed, stale)

    def fail_all(self, batch: Batch) -> list[SlotLease]:
        """The step raised: every slot of the batch that still belongs to its call failed."""
        return [
            SlotLease(slot, gen) for slot, gen in batch.generations.items()
            if (s := self._slots.get(slot)) is not None and s.generation == gen
        ]

    @property
    def lagging(self) -> int:
        return sum(1 for s in self._slots.values() if s.lagging)

    def total_queued(self) -> int:
        return sum(len(s.queue) for s in self._slots.values())

    def dropped(self, lease: SlotLease) -> int:
        """Input frames this session has lost to the queue bound so far."""
        return self._state(lease).dropped

    def queued(self, lease: SlotLease) -> int:
        return len(self._state(lease).queue)


def _extend_gap(gaps: list[Gap], seq: int) -> None:
    """Record input ``seq`` dropped for overflow, merging runs of consecutive numbers into one gap."""
    last = gaps[-1] if gaps else None
    if last is not None and last.reason == "overflow" and (last.first_seq + last.count) % SEQ_MOD == seq:
        gaps[-1] = Gap(last.first_seq, last.count + 1, "overflow")
    else:
        gaps.append(Gap(seq, 1, "overflow"))


class SessionSink(Protocol):
    """How the scheduler talks back to one session (called on the event loop, must not block)."""

    def on_output(self, delivery: Delivery) -> None: ...

    def on_failed(self, message: str) -> None: ...


class OpenFailed(Exception):
    """An open failed after a slot was acquired (the slot is released). ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _rejected_slots(exc: Exception, batch: Batch) -> set[int]:
    """Slots a BackendError says it rejected *without changing state* (its ``slots`` attribute, as
    engine.moshi's BadFrameError has); empty when the failure cannot be pinned on a strict subset."""
    slots = getattr(exc, "slots", None)
    if not isinstance(exc, BackendError) or not isinstance(slots, list | tuple | set):
        return set()
    bad = {s for s in slots if s in batch.frames}
    return bad if bad and bad != set(batch.frames) and len(bad) == len(set(slots)) else set()


class FrameScheduler:
    """Runs the backend for all sessions: one driver task, one worker thread."""

    def __init__(
        self,
        backend: BatchBackend,
        *,
        batch_window_s: float,
        max_queue_frames: int = DEFAULT_MAX_QUEUE_FRAMES,
        metrics: EngineMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        inline_backend: bool = False,
        max_gap_fill: int = 0,
    ) -> None:
        self.backend = backend
        # A backend whose calls take microseconds (echo) runs on the loop: the worker thread's two hand-offs
        # per tick (GIL switches, a self-pipe wake-up) cost more than the step, and jitter under CPU load.
        self.inline_backend = inline_backend
        self.table = SlotTable(backend.num_slots)
        self.planner = BatchPlanner(backend.num_slots, batch_window_s, max_queue_frames,
                                    max_gap_fill=max_gap_fill)
        self.metrics = metrics or EngineMetrics(backend.num_slots)
        self.metrics.watch_queue(self.planner.total_queued)
        self._clock = clock
        self._sinks: dict[int, tuple[int, SessionSink]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aziza-backend")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        self.step_seconds_total = 0.0
        self.start_warnings: dict[int, list[str]] = {}  # slot -> warnings of its current call's start

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="aziza-engine-scheduler")

    async def stop(self) -> None:
        """Stop ticking, wait for a step in flight, close the backend and the worker thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await self._in_worker(self.backend.close)
        except Exception:
            log.exception("backend close failed")
        self._executor.shutdown(wait=True)

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.inline_backend:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- sessions ----------------------------------------------------------------------------------------

    async def open_session(self, persona: PersonaParams, sink: SessionSink, seed: int = 0) -> SlotLease:
        """Acquire a slot, prepare the persona and start the slot (worker thread) with sampling ``seed``.
        Raises SlotsFull (table unchanged) or OpenFailed (slot released again). What the start warned
        about (e.g. an adapter that could not load) is in ``start_warnings[lease.slot]``."""
        lease = self.table.acquire()  # SlotsFull propagates before anything changed
        self.metrics.slots_busy.set(self.table.busy)
        try:
            try:
                await self._in_worker(self.backend.prepare_persona, persona)
            except Exception as exc:
                self.metrics.backend_failures.labels("prepare_persona").inc()
                persona_problem = isinstance(exc, BackendError | LookupError | OSError)
                code = "unknown_persona" if persona_problem else "internal"
                raise OpenFailed(code, f"persona {persona.name!r} could not be prepared: {exc}") from exc
            try:
                warnings = await self._in_worker(self.backend.start_slot, lease.slot, persona, seed)
                self.start_warnings[lease.slot] = list(warnings or ())
            except Exception as exc:
                self.metrics.backend_failures.labels("start_slot").inc()
                raise OpenFailed("internal", f"slot {lease.slot} failed to start: {exc}") from exc
        except BaseException:
            # Also on cancellation (client gone while preparing): the slot must come back.
            self.table.release(lease)
            self.metrics.slots_busy.set(self.table.busy)
            raise
        self.planner.attach(lease)
        self._sinks[lease.slot] = (lease.generation, sink)
        return lease

    async def close_session(self, lease: SlotLease) -> None:
        """Free the slot. Idempotent; a step in flight for it is discarded by the generation check."""
        if not self.table.holds(lease):
            return
        self.planner.detach(lease)
        self._sinks.pop(lease.slot, None)
        self.start_warnings.pop(lease.slot, None)
        self.table.release(lease)
        self.metrics.slots_busy.set(self.table.busy)
        self.metrics.lagging_sessions.set(self.planner.lagging)
        try:
            await asyncio.shield(self._in_worker(self.backend.end_slot, lease.slot))
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.backend_failures.labels("end_slot").inc()
            log.exception("end_slot(%d) failed", lease.slot)

    def push(self, lease: SlotLease, pcm: np.ndarray, seq: int | None = None) -> PushResult:
        result = self.planner.push(lease, pcm, self._clock(), seq)
        self.metrics.frames_in.inc()
        if result.round_move is not None:
            self.metrics.round_moves.labels(result.round_move).inc()
        if result.dropped:
            self.metrics.input_dropped.inc(result.dropped)
        if result.lag_frames is not None:
            self.metrics.lag_reports.inc()
        self.metrics.lagging_sessions.set(self.planner.lagging)
        self._wake.set()
        return result

    def set_paused(self, lease: SlotLease, paused: bool) -> None:
        self.planner.set_paused(lease, paused)
        self._wake.set()  # a paused slot no longer holds back a round

    async def send_event(self, lease: SlotLease, name: str, value: str) -> bool:
        """Forward an event (e.g. dtmf) to the backend if it takes events; False when it does not."""
        on_event = getattr(self.backend, "on_event", None)
        if on_event is None:
            return False
        await self._in_worker(on_event, lease.slot, name, value)
        return True

    # -- the tick loop -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock()
            due = self.planner.next_step_at(now)
            if due is None:
                await self._wake.wait()
                continue
            if due > now:
                try:
                    async with asyncio.timeout(due - now):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            batch = self.planner.take_batch(now)
            if batch is not None:
                try:
                    await self._step(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the loop must outlive any bug in one tick
                    log.exception("scheduler tick failed")

    async def _step(self, batch: Batch) -> None:
        self.metrics.batch_wait_seconds.observe(max(0.0, batch.taken_at - batch.oldest_arrival))
        self.metrics.batch_size.observe(len(batch.frames))
        started = self._clock()
        try:
            outputs = await self._in_worker(self.backend.step, batch.frames)
        except Exception as exc:
            self.metrics.backend_failures.labels("step").inc()
            bad = _rejected_slots(exc, batch)
            if not bad:
                log.exception("backend step failed for slots %s", sorted(batch.frames))
                for lease in self.planner.fail_all(batch):
                    self._fail(lease, f"backend step failed: {exc}")
                return
            # The backend refused some slots' frames before touching any state: fail only those and
            # step the rest (once).
            log.warning("backend rejected slots %s: %s", sorted(bad), exc)
            for slot in bad:
                self._fail(SlotLease(slot, batch.generations[slot]), f"backend rejected the frame: {exc}")
            batch = Batch({s: f for s, f in batch.frames.items() if s not in bad},
                          {s: g for s, g in batch.generations.items() if s not in bad},
                          batch.oldest_arrival, batch.taken_at,
                          {s: q for s, q in batch.seqs.items() if s not in bad})
            await self._step(batch)
            return
        elapsed = self._clock() - started
        self.ticks += 1
        self.step_seconds_total += elapsed
        self.metrics.ticks.inc()
        self.metrics.step_seconds.observe(elapsed)
        if elapsed > FRAME_S:
            self.metrics.step_overruns.inc()
            log.warning("backend step took %.1f ms for %d slots (> %d ms)", elapsed * 1e3, len(batch.frames),
                        FRAME_MS)
        if not isinstance(outputs, dict):
            for lease in self.planner.fail_all(batch):
                self._fail(lease, f"backend step returned {type(outputs).__name__}, not a dict")
            return
        result = self.planner.complete(batch, outputs)
        self.metrics.lagging_sessions.set(self.planner.lagging)
        if result.stale:
            self.metrics.stale_outputs.inc(result.stale)
        for lease in result.failed:
            self._fail(lease, f"backend returned no output for slot {lease.slot}")
        for delivery in result.deliveries:
            entry = self._sinks.get(delivery.slot)
            if entry is None or entry[0] != delivery.generation:
                self.metrics.stale_outputs.inc()
                continue
            self.metrics.frames_out.inc()
            entry[1].on_output(delivery)

    def _fail(self, lease: SlotLease, message: str) -> None:
        entry = self._sinks.get(lease.slot)
        self.planner.detach(lease)  # no more steps for it; the session's own close frees the slot
        if entry is not None and entry[0] == lease.generation:
            entry[1].on_failed(message)

    # -- introspection -----------------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        return self.table.busy

    @property
    def lagging(self) -> int:
        return self.planner.lagging
