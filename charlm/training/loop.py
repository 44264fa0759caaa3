"""The training loop: :meth:`Loop.fit` reads top to bottom, and each thing it does is one
method: the stopping rules (:meth:`Loop.stop_reason`), one optimizer step with the NaN guard
(:meth:`Loop.train_step`), logging, evaluation, checkpoints and samples.

The loop holds little of its own: what a resume restores is the :class:`TrainState`
(:mod:`charlm.training.state`); the checkpoint policy and its bookkeeping are the
:class:`~charlm.training.saver.Saver`'s; when to log, evaluate and sample, and the time a
limit keeps for the end, the :class:`~charlm.training.pacing.Pacer`'s; the speed, the
:class:`~charlm.training.pacing.RateMeter`'s; non-finite steps, the :class:`NanGuard`'s. The
training step itself is :func:`~charlm.training.step.optimizer_step`, which automatic sizing
times too. Everything the user sees goes to monitors (:mod:`charlm.training.monitors`).

Under torchrun every process runs this loop; the decisions that end it (limits, signals, a
non-finite loss) are taken by all processes together, and only rank 0 reports and writes.

Over 300 lines: the loop with the step, evaluation, checkpoint policy and samples it calls,
each a short method, which read best in the order they run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from charlm.evaluate import mean_loss
from charlm.model.network import detach_state
from charlm.sampling.sampler import generate
from charlm.signals import StopSignals
from charlm.training import step as one_step
from charlm.training.distributed import Dist
from charlm.training.monitors import Monitor
from charlm.training.pacing import Pacer, RateMeter
from charlm.training.saver import Saver
from charlm.training.schedule import lr_at, planned_progress
from charlm.training.state import TrainState
from charlm.training.step import Setup
from charlm.units import bits

if TYPE_CHECKING:
    pass

# With train.on_nan = "skip", this many non-finite steps in a row end training anyway: the
# run has diverged and skipping only burns time.
MAX_SKIPS_IN_ROW = 20


def steps(first: int, last: int) -> str:
    """A range of steps, as the summary names it: "step 7" or "steps 5-6"."""
    return f"steps {first:,}-{last:,}" if first < last else f"step {last:,}"


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class NanGuard:
    """What to do after a step with a non-finite loss or gradient: with ``on_nan = "skip"``,
    drop it while the weights are finite, up to MAX_SKIPS_IN_ROW in a row; else stop."""

    def __init__(self, on_nan: str, max_in_row: int = MAX_SKIPS_IN_ROW):
        self.on_nan, self.max_in_row = on_nan, max_in_row
        self.in_row = 0  # non-finite steps in a row
        self.skipped = 0  # steps dropped in this process's run
        self.nan_step = 0  # the step at which training diverged (0: it has not)

    def ok(self) -> None:
        """A finite step."""
        self.in_row = 0

    def skip(self, step: int, weights_finite: Callable[[], bool]) -> bool:
        """Step ``step`` was not finite: True to drop it and go on, False to stop (and
        ``nan_step`` says where). ``weights_finite`` is asked only when skipping is allowed."""
        self.in_row += 1
        if self.on_nan == "skip" and self.in_row <= self.max_in_row and weights_finite():
            self.skipped += 1
            return True
        self.nan_step = step
        return False

    def diverged(self, step: int) -> None:
        """The weights or the validation loss are not finite at ``step``."""
        self.nan_step = step

    def note(self) -> str:
        """For the run's notes: the steps dropped, if any."""
        if not self.skipped:
            return ""
        return f"skipped {self.skipped:,} step(s) with a non-finite loss (train.on_nan=skip)"


@dataclass
class Readings:
    """What the loop last measured, for its records and the run's summary."""

    lr: float = 0.0  # of the last step
    grad_norm: torch.Tensor | None = None  # of the last step, on the device
    last_train: float = math.nan  # the mean training loss of the last train record
    train_from: str = ""  # the steps the last train record covers, e.g. "steps 951-1,000"
    log_from: int = 0  # the step before the first of the current log interval
    last_val: float = math.nan  # the last evaluation's loss
    now: float = 0.0  # seconds of the run at the last stopping check (rank 0's clock)


class Loop:
    def __init__(self, run: Setup, state: TrainState, run_dir: Path, monitors: Monitor,
                 resumed: bool, stop_at_step: int = 0):
        tc = run.cfg.train
        self.run, self.state, self.monitors = run, state, monitors
        self.stop_at_step = stop_at_step
        self.dmodel = run.dist.wrap(run.model)  # DDP under torchrun, else the model itself
        self.saver = Saver(run_dir, tc.keep_last, main=run.dist.rank == 0,
                           saved_step=state.step if resumed else -1)
        self.guard = NanGuard(tc.on_nan, MAX_SKIPS_IN_ROW)
        self.pacer = Pacer(tc.eval_every, tc.log_every, tc.max_steps, tc.max_time, tc.max_epochs,
                           run.batcher.steps_per_epoch, state.step, state.elapsed)
        self.started = time.perf_counter()
        self.meter = RateMeter(state.chars_seen, self.started)
        self.readings = Readings(log_from=state.step - state.loss_count)

    # What the loop works with, named for short.
    @property
    def tc(self):
        return self.run.cfg.train

    @property
    def dist(self) -> Dist:
        return self.run.dist

    @property
    def main(self) -> bool:
        """Rank 0: the process that reports and writes."""
        return self.run.dist.rank == 0

    # What the run's result reads.
    @property
    def last_val(self) -> float:
        return self.readings.last_val

    @property
    def nan_step(self) -> int:
        return self.guard.nan_step

    @property
    def save_seconds(self) -> float:
        """Seconds the training thread spent on checkpoints (copies and waits)."""
        return self.saver.blocked

    def elapsed(self) -> float:
        return self.state.elapsed + time.perf_counter() - self.started

    def fit(self) -> str:
        """Train until a limit, a signal, the patience or a non-finite loss stops it; returns
        why ("max_steps", "max_time", "max_epochs", "stop_at_step", "interrupted",
        "patience" or "nan")."""
        s, tc = self.state, self.tc
        self.run.model.train()
        # The signals are handled until the writer thread has written the last files: a
        # second signal then waits for the file being written, never leaving it half-written.
        with StopSignals(announce=self.main) as signals, self.saver.writing():
            while not (stopped := self.stop_reason(signals)):
                due = self.pacer.due(s.step + 1, self.readings.now)
                outcome = self.train_step()
                if outcome == "nan":
                    stopped = "nan"
                    break
                if outcome == "skipped":
                    continue
                if due.log:
                    self.log()
                if due.eval:
                    if not self.evaluate_and_save():
                        stopped = "nan"
                        break
                    self.sample()
                    if tc.patience and s.evals_since_best >= tc.patience:
                        stopped = "patience"
                        break
            # A run that ends (not a pause or an interrupt, which resume mid-interval) ends
            # with a train record of its last steps, its final evaluation and a sample.
            ends = stopped not in ("nan", "interrupted", "stop_at_step")
            if ends and s.loss_count:
                self.log()
            stopped = self.finish(stopped)
            if ends and stopped != "nan" and self.pacer.sampled_at != s.step:
                self.sample(final=True)
            return stopped

    def recent_train(self) -> tuple[float, str]:
        """The train loss a summary reports, and its steps: the last train record's or, when
        stopped before the first, the mean of the steps so far (over all processes)."""
        s, r = self.state, self.readings
        if not (s.loss_count and math.isnan(r.last_train)):
            return r.last_train, r.train_from
        loss = float(self.dist.mean(s.loss_sum / s.loss_count))
        return loss, steps(s.step - s.loss_count + 1, s.step)

    def train_speed(self) -> float:
        """Characters per second of training in this process (evaluations not counted)."""
        return self.meter.overall(self.state.chars_seen, self.pacer.training_seconds(self.elapsed()))

    def stop_reason(self, signals: StopSignals) -> str:
        """The stopping rules, checked before every step: why to stop, or "" to go on."""
        tc, s, dist = self.tc, self.state, self.dist
        # Clocks differ between processes: they follow rank 0's, so that all stop at the
        # same step and use the same learning rate.
        now = dist.agree(self.elapsed()) if tc.max_time else self.elapsed()
        self.readings.now = now
        if tc.max_steps and s.step >= tc.max_steps:
            return "max_steps"
        # A time limit keeps time for the final evaluation, save and sample.
        reserve = self.pacer.reserve(s.step, now, tc.batch_size * tc.seq_len * dist.world,
                                     len(self.run.val_ids))
        if tc.max_time and now + reserve >= tc.max_time:
            return "max_time"
        if tc.max_epochs and self.run.batcher.progress >= tc.max_epochs:
            return "max_epochs"
        if self.stop_at_step and s.step >= self.stop_at_step:
            return "stop_at_step"
        if dist.any(signals.signum != 0):
            return "interrupted"
        return ""

    def train_step(self) -> str:
        """One optimizer step on the next batch; returns "ok", "skipped" or "nan". On an
        accelerator the NaN guard syncs only at a logged step (the pacer's ``last_due``) or
        skipping."""
        run, s, tc, r = self.run, self.state, self.tc, self.readings
        B, T = tc.batch_size, tc.seq_len
        if run.batcher.new_epoch or s.carried is None:
            s.carried = run.model.init_state(B)
        x, y = run.batcher.next()  # (B, T)
        r.lr = lr_at(s.step, planned_progress(s.step, r.now, run.batcher.progress, tc), tc)
        for group in run.optimizer.param_groups:
            group["lr"] = r.lr
        done = one_step.optimizer_step(run.model, run.optimizer, run.scaler, run.amp, x, y, s.carried,
                              tc.grad_clip, forward=self.dmodel, check=self.finite)
        r.grad_norm = done.grad_norm
        if not done.taken:
            return self.skip_or_stop()
        self.guard.ok()
        s.carried = detach_state(done.state)
        s.step += 1
        s.chars_seen += B * T * self.dist.world
        s.loss_sum += done.loss.detach()
        s.loss_count += 1
        self.monitors.on_step(s.step)
        return "ok"

    def finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the step may go on: the loss and gradient are finite on every process, or
        not checked at this step (on an accelerator, between logged steps, with on_nan=stop:
        a sync per step would cost more than the few steps a late stop loses)."""
        run = self.run
        if not (run.device.type == "cpu" or self.tc.on_nan == "skip" or self.pacer.last_due.log):
            return True
        # Both are >= 0, so the sum is finite exactly when both are. Under fp16 the scaler
        # itself skips steps with inf gradients, so only the loss is watched there.
        watched = loss.detach() if run.scaler.is_enabled() else loss.detach() + grad_norm.detach()
        return self.dist.all_finite(watched)

    def skip_or_stop(self) -> str:
        """After a non-finite loss or gradient, as the NaN guard says: drop the step
        (train.on_nan = "skip", while the weights are finite) or stop."""
        s = self.state
        if not self.guard.skip(s.step + 1, lambda: weights_finite(self.run.model)):
            return "nan"
        self.run.optimizer.zero_grad(set_to_none=True)
        s.carried = None  # the new state may hold NaN: restart the streams from zero
        self.monitors.on_note(f"skipped a non-finite loss at step {s.step + 1}")
        s.step += 1
        return "skipped"

    def log(self) -> None:
        """The mean training loss of the interval (over all processes) and the speed."""
        s, r = self.state, self.readings
        r.last_train = float(self.dist.mean(s.loss_sum / s.loss_count))
        rate = self.meter.rate(s.chars_seen, time.perf_counter())
        r.train_from, r.log_from = steps(r.log_from + 1, s.step), s.step
        s.loss_sum.zero_()
        s.loss_count = 0
        if self.main:
            self.monitors.on_train_log({
                "kind": "train", "step": s.step, "epoch": round(self.run.batcher.progress, 6),
                "chars": s.chars_seen, "lr": r.lr, "loss": r.last_train,
                "bpc": bits(r.last_train), "grad_norm": float(r.grad_norm),
                "elapsed": round(self.elapsed(), 3), "chars_per_sec": round(rate, 1),
                "save_seconds": round(self.save_seconds, 3),  # so far, on the training thread
            })

    def evaluate_and_save(self) -> bool:
        """Evaluate on the whole validation split and write the checkpoints; False (nothing
        written) when the loss is not finite, so diverged weights never replace the last
        good checkpoint."""
        run, s, tc, dist, r = self.run, self.state, self.tc, self.dist, self.readings
        started = time.perf_counter()
        r.last_val = mean_loss(run.model, run.val_ids, tc.eval_streams, tc.eval_seq_len,
                               run.amp, dist.rank, dist.world, dist.all_reduce_sum)
        if not math.isfinite(r.last_val):
            self.guard.diverged(s.step)
            return False
        improved = r.last_val < s.best_val_loss
        if improved:
            s.best_val_loss, s.evals_since_best = r.last_val, 0
        else:
            s.evals_since_best += 1
        if self.main:
            self.monitors.on_eval({
                "kind": "eval", "step": s.step, "epoch": round(run.batcher.progress, 6),
                "chars": s.chars_seen, "val_loss": r.last_val, "val_bpc": bits(r.last_val),
                "best": improved, "elapsed": round(self.elapsed(), 3),
            })
        self.save_checkpoints(evaluated=True, improved=improved)
        self.pacer.evaluated(s.step, self.elapsed(), self.agreed_seconds(started))
        # The speed of the next train record is of training alone.
        self.meter.pause(time.perf_counter() - started)
        return True

    def agreed_seconds(self, started: float) -> float:
        """Seconds since ``started`` (perf_counter), rank 0's with a time limit."""
        seconds = time.perf_counter() - started
        return self.dist.agree(seconds) if self.tc.max_time else seconds

    def save_checkpoints(self, evaluated: bool, improved: bool = False) -> None:
        """The checkpoints after an evaluation (``evaluated``; ``improved``: a new best), at
        a pause or an interrupt, as the checkpoint policy says (:class:`Saver`)."""
        names = self.saver.save(self.run, self.state, self.elapsed(), evaluated, improved)
        if names:
            self.monitors.on_saved(self.state.step, names)

    def sample(self, final: bool = False) -> None:
        """After an evaluation, when train.sample_every says so, and at the end of a run
        (``final``): the model's continuation of the start of the training text, with the
        run's seed (so samples are comparable)."""
        run, tc, step = self.run, self.tc, self.state.step
        if not (tc.sample_chars and self.pacer.sample_due(step, tc.sample_every, final)):
            return
        started = time.perf_counter()
        if self.main:
            text = generate(run.model.eval(), run.vocab,
                            run.vocab.encode(run.sample_seed).tolist(), tc.sample_chars,
                            temperature=0.8, random_seed=tc.seed)[0]
            run.model.train()
            self.monitors.on_sample(step, self.readings.last_val, run.sample_seed + text)
        self.pacer.sampled(self.agreed_seconds(started), step)
        self.meter.pause(time.perf_counter() - started)

    def finish(self, stopped: str) -> str:
        """After the loop: last.pt (and best.pt) describe the end of training, unless it
        diverged. Returns why training stopped ("nan" if the final weights are not finite)."""
        s, notes = self.state, self.run.notes
        if stopped == "patience":
            evals = "1 evaluation" if self.tc.patience == 1 else f"{self.tc.patience} evaluations"
            notes.append(f"early stopping: no new best in {evals}")
        if self.guard.note():
            notes.append(self.guard.note())
        policy = self.saver.policy
        if policy.saved(s.step) or stopped == "nan":
            return stopped
        policy.finish()  # the last evaluation writes last.pt whatever it cost
        if stopped not in ("interrupted", "stop_at_step") and not policy.evaluated(s.step):
            return stopped if self.evaluate_and_save() else "nan"
        if not weights_finite(self.run.model):
            self.guard.diverged(s.step)
            return "nan"
        self.save_checkpoints(evaluated=False)
        return stopped
