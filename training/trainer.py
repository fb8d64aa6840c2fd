"""The fine-tuning loop (``aziza-admin train run``): LoRA (+ new token rows), checkpoints, resume, best.

- Data order is a pure function of (seed, step): micro-batch ``m`` of epoch ``e`` takes the ``m``-th slice
  of a permutation seeded by ``(seed, e)``. With the optimizer, scheduler and RNG states in the checkpoint,
  a resumed run computes the same losses as an uninterrupted one.
- A checkpoint (every ``checkpoint_every`` steps, at every new best validation loss, at the end) is a
  directory written beside the others and renamed into place: an interrupted write never replaces or
  corrupts an earlier one. It holds the adapter files (docs/adapters.md) and ``trainer_state.pt``.
- ``best.json`` names the checkpoint with the lowest validation loss (written atomically); the
  ``keep_checkpoints`` newest ones are kept, plus the best.
- Out of device memory: the step is abandoned, smaller batch sizes are tried on the same samples (forward
  and backward, no update) and the run stops with one line naming the batch size that fits.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training.dataset import Sample
from training.export import read_adapter_files, write_adapter_files
from training.losses import LossSums, loss_sums
from training.model import TrainModel, extension_of, lora_layers, trainable_parameters

if TYPE_CHECKING:
    from training.config import Config
    from training.tokenizer_ext import VocabExtension

STATE_FILE = "trainer_state.pt"
BEST_FILE = "best.json"
CHECKPOINTS = "checkpoints"


class TrainError(RuntimeError):
    """The run stops; one line."""


@dataclass
class StepRecord:
    step: int
    loss: float | None  # None for step 0 (the validation loss before training)
    lr: float
    val_loss: float | None = None
    seconds: float = 0.0


@dataclass
class RunResult:
    run_dir: str
    steps: int
    history: list[StepRecord] = field(default_factory=list)
    val_loss_first: float | None = None
    val_loss_last: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    best_checkpoint: str | None = None
    resumed_from: int | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def collate(samples: list[Sample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sample with moshi's zero token (-1: no input, no loss)."""
    T = max(s.frames for s in samples)
    codes = np.full((len(samples), samples[0].codes.shape[0], T), -1, dtype=np.int64)
    for i, s in enumerate(samples):
        codes[i, :, : s.frames] = s.codes
    loss_from = torch.tensor([s.prompt_frames for s in samples], dtype=torch.long)
    return torch.from_numpy(codes).to(device), loss_from.to(device)


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


class Trainer:
    def __init__(self, config: Config, tm: TrainModel, train: list[Sample], val: list[Sample],
                 vocab: VocabExtension | None, tokenizer_file: Path | None) -> None:
        if not train:
            raise TrainError("no training samples (build the dataset first: aziza-admin train dataset)")
        if not val:
            raise TrainError("no validation samples: set data.val_fraction > 0 or give rows "
                             "\"split\": \"val\"")
        self.config, self.tm = config, tm
        self.train_set = sorted(train, key=lambda s: s.sample_id)
        self.val_set = sorted(val, key=lambda s: s.sample_id)[: config.train.max_val_samples]
        self.vocab, self.tokenizer_file = vocab, tokenizer_file
        self.run_dir = config.run_path
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        t = config.train
        lora, rows = trainable_parameters(tm.lm)
        groups = [{"params": lora, "lr": t.lr}]
        if rows:
            groups.append({"params": rows, "lr": t.lr * t.embedding_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.schedule))
        self.history: list[StepRecord] = []
        self.best: dict[str, Any] | None = None
        self.step = 0
        # a test seam: the function computing one micro-batch's loss sums (fault injection for OOM tests)
        self.batch_loss: Callable[[list[Sample]], LossSums] = self._batch_loss

    # -- data ---------------------------------------------------------------------------------------------

    def micro_batch(self, index: int) -> list[Sample]:
        n, bs = len(self.train_set), self.config.train.batch_size
        if n <= bs:
            perm = np.random.default_rng([self.config.seed, index]).permutation(n)
            return [self.train_set[i] for i in perm]
        per_epoch = n // bs
        epoch, within = divmod(index, per_epoch)
        perm = np.random.default_rng([self.config.seed, epoch]).permutation(n)
        return [self.train_set[i] for i in perm[within * bs: (within + 1) * bs]]

    # -- loss -----------------------------------------------------------------------------------------------

    def _batch_loss(self, samples: list[Sample]) -> LossSums:
        codes, loss_from = collate(samples, self.tm.device)
        t = self.config.train
        return loss_sums(self.tm.lm, codes, loss_from, t.text_padding_weight, t.first_codebook_weight)

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.tm.lm.eval()
        bs = self.config.train.batch_size
        total: LossSums | None = None
        for i in range(0, len(self.val_set), bs):
            sums = self.batch_loss(self.val_set[i: i + bs])
            total = sums if total is None else total + sums
        assert total is not None
        return float(total.value())

    def _train_step(self) -> float:
        t = self.config.train
        lm = self.tm.lm
        lm.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(t.grad_accum):
            batch = self.micro_batch(self.step * t.grad_accum + a)
            oom = False
            try:
                loss = self.batch_loss(batch).value() / t.grad_accum
                loss.backward()
            except Exception as exc:
                if not is_oom(exc):
                    raise
                oom = True  # handled outside the except block: its traceback holds the failed step's memory
            if oom:
                self._out_of_memory(batch)
            total += float(loss.detach())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return total

    def _out_of_memory(self, batch: list[Sample]) -> None:
        """Find the largest smaller batch that runs forward and backward, then stop with one line."""
        t = self.config.train
        self.optimizer.zero_grad(set_to_none=True)
        peak = _peak_text(self.tm.device)
        _empty_cache(self.tm.device)
        fits = 0
        size = len(batch) // 2
        while size >= 1:
            failed = False
            try:
                self.batch_loss(batch[:size]).value().backward()
            except Exception as probe:
                if not is_oom(probe):
                    raise
                failed = True
            self.optimizer.zero_grad(set_to_none=True)
            _empty_cache(self.tm.device)
            if not failed:
                fits = size
                break
            size //= 2
        where = f"out of {self.tm.device.type.upper()} memory at step {self.step + 1} with " \
                f"train.batch_size={t.batch_size}{peak}"
        if fits:
            accum = t.grad_accum * -(-t.batch_size // fits)
            raise TrainError(f"{where}: train.batch_size={fits} fits (train.grad_accum={accum} keeps the "
                             f"effective batch); checkpoints so far are intact") from None
        raise TrainError(f"{where}: even train.batch_size=1 does not fit: lower data.max_seconds or enable "
                         "train.gradient_checkpointing; checkpoints so far are intact") from None

    # -- checkpoints ----------------------------------------------------------------------------------------

    def _adapter_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        layers = lora_layers(self.tm.lm, self.tm.targets)
        return {name: (a.detach(), b.detach()) for name, (a, b) in layers.items()}

    def base_identity(self) -> dict[str, Any]:
        from engine.moshi.lora import base_identity

        return base_identity(self.tm.files.config, self.tm.lm_sha256)

    def save_checkpoint(self) -> Path:
        name = f"step-{self.step:06d}"
        final = self.ckpt_dir / name
        staging = self.ckpt_dir / f".{name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            lora = self.config.lora
            write_adapter_files(staging, self._adapter_weights(), rank=lora.rank, alpha=lora.alpha,
                                base=self.base_identity(), extension=extension_of(self.tm.lm),
                                vocab=self.vocab.as_block() if self.vocab else None,
                                tokenizer=self.tokenizer_file, lora_dropout=lora.dropout)
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                     "rng_python": random.getstate(), "history": [asdict(h) for h in self.history],
                     "best": self.best, "config": self.config.model_dump(mode="json")}
            torch.save(state, staging / STATE_FILE)
            _fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # never leave a half-written checkpoint behind
            raise
        if final.exists():  # a rerun of the same step: the new one replaces it only once complete
            old = self.ckpt_dir / f".{name}.old-{os.getpid()}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
        _fsync_dir(self.ckpt_dir)
        return final

    def _write_best(self) -> None:
        assert self.best is not None
        tmp = self.run_dir / f".{BEST_FILE}.tmp"
        tmp.write_text(json.dumps(self.best, indent=1) + "\n")
        tmp.replace(self.run_dir / BEST_FILE)

    def _prune(self) -> None:
        keep = self.config.train.keep_checkpoints
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
        best = self.best["checkpoint"] if self.best else None
        for path in done[:-keep]:
            if path.name != best:
                shutil.rmtree(path, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / STATE_FILE).is_file())
        return done[-1] if done else None

    def resume(self, path: Path) -> None:
        files = read_adapter_files(path)
        layers = lora_layers(self.tm.lm, self.tm.targets)
        if set(files.weights) != set(layers):
            raise TrainError(f"{path}: its LoRA modules differ from lora.targets")
        with torch.no_grad():
            for name, (a, b) in layers.items():
                a.copy_(files.weights[name][0])
                b.copy_(files.weights[name][1])
            ext = extension_of(self.tm.lm)
            if (ext is None) != (files.extension is None):
                raise TrainError(f"{path}: vocabulary extension present in one of checkpoint and config only")
            if ext is not None and files.extension is not None:
                for field_name in ("text_emb", "text_linear", "depformer_text_emb"):
                    getattr(ext, field_name).copy_(getattr(files.extension, field_name))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        random.setstate(state["rng_python"])
        self.history = [StepRecord(**h) for h in state["history"]]
        self.best = state["best"]
        self.step = int(state["step"])

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self, resume: bool = False, stop_after: int | None = None,
            log: Callable[[str], None] | None = None) -> RunResult:
        """Train to ``train.max_steps`` (or ``stop_after`` steps this call: tests interrupt runs with it)."""
        t0 = time.perf_counter()
        t = self.config.train
        result = RunResult(run_dir=str(self.run_dir), steps=0)
        latest = self.latest_checkpoint()
        if latest is not None and not resume:
            raise TrainError(f"{self.run_dir} already holds checkpoints (latest {latest.name}): pass "
                             "--resume to continue, or use a new run_dir")
        if resume:
            if latest is None:
                raise TrainError(f"--resume: no checkpoint under {self.ckpt_dir}")
            self.resume(latest)
            result.resumed_from = self.step
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.ckpt_dir.glob(".step-*.partial-*"):  # left by a killed run: never a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        if self.step == 0:
            first = self.validation_loss()
            self.history.append(StepRecord(step=0, loss=None, lr=0.0, val_loss=first))
            if log:
                log(f"step 0: val_loss {first:.4f}")
        end = t.max_steps if stop_after is None else min(t.max_steps, self.step + stop_after)
        while self.step < end:
            s0 = time.perf_counter()
            lr = float(self.scheduler.get_last_lr()[0])
            loss = self._train_step()
            if not math.isfinite(loss):
                raise TrainError(f"step {self.step + 1}: the loss is {loss} (lower train.lr); checkpoints so "
                                 "far are intact")
            self.step += 1
            record = StepRecord(step=self.step, loss=loss, lr=lr, seconds=time.perf_counter() - s0)
            last = self.step == t.max_steps
            new_best = False
            if self.step % t.eval_every == 0 or last:
                val_loss = self.validation_loss()
                record.val_loss = val_loss
                if self.best is None or val_loss < self.best["val_loss"]:
                    self.best = {"step": self.step, "val_loss": val_loss,
                                 "checkpoint": f"step-{self.step:06d}"}
                    new_best = True
            self.history.append(record)
            if log:
                shown = f" val_loss {record.val_loss:.4f}" if record.val_loss is not None else ""
                log(f"step {self.step}: loss {loss:.4f} lr {lr:.2e}{shown}")
            if new_best or last or self.step % t.checkpoint_every == 0:
                self.save_checkpoint()
                if new_best:
                    self._write_best()
                self._prune()
        vals = [h.val_loss for h in self.history if h.val_loss is not None]
        result.steps = self.step
        result.history = list(self.history)
        result.val_loss_first = vals[0] if vals else None
        result.val_loss_last = vals[-1] if vals else None
        if self.best:
            result.best_step, result.best_val_loss = self.best["step"], self.best["val_loss"]
            result.best_checkpoint = str(self.ckpt_dir / self.best["checkpoint"])
        result.seconds = time.perf_counter() - t0
        return result


def _peak_text(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return f" (peak {peak:.1f} GiB of {total:.1f} GiB)"


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir() if path.is_dir() else []:
        if child.is_file():
            with child.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def best_checkpoint(run_dir: Path) -> Path:
    try:
        best = json.loads((run_dir / BEST_FILE).read_text())
    except FileNotFoundError:
        raise TrainError(f"{run_dir}: no {BEST_FILE} (train first: aziza-admin train run)") from None
    path = run_dir / CHECKPOINTS / str(best["checkpoint"])
    if not path.is_dir():
        raise TrainError(f"{run_dir}: the best checkpoint {best['checkpoint']} is missing")
    return path
