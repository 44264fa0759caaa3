"""The training loop: :meth:`Loop.fit` reads top to bottom, and each thing it does is one
method: the stopping rules (:meth:`Loop.stop_reason`), one optimizer step with the NaN guard
(:meth:`Loop.train_step`), logging, evaluation, the checkpoint policy
(:meth:`Loop.save_checkpoints`) and samples. When to log and evaluate, and the time a limit
keeps for the end, is :mod:`charlm.training.pacing`. Everything the user sees goes to monitors
(:mod:`charlm.training.monitors`); what a resume restores lives in :mod:`charlm.training.state`.

Under torchrun every process runs this loop; the decisions that end it (limits, signals, a
non-finite loss) are taken by all processes together, and only rank 0 reports and writes.

Over 300 lines: the loop with the step, evaluation, checkpoint policy and samples it calls,
each a short method, which read best in the order they run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from charlm.config import Config
from charlm.data.batching import Batcher
from charlm.data.vocab import Vocab
from charlm.device import AmpPlan
from charlm.evaluate import mean_loss
from charlm.model.network import CharRNN, detach_state
from charlm.sampling.sampler import generate
from charlm.signals import StopSignals
from charlm.storage import checkpoint
from charlm.training.distributed import Dist
from charlm.training.monitors import Monitor
from charlm.training.pacing import Due, Pacer
from charlm.training.saver import CheckpointWriter, detached_copy
from charlm.training.schedule import lr_at, planned_progress
from charlm.training.sizing import Choice
from charlm.training.state import TrainState, snapshot
from charlm.units import bits

# With train.on_nan = "skip", this many non-finite steps in a row end training anyway: the
# run has diverged and skipping only burns time.
MAX_SKIPS_IN_ROW = 20
CHEAP_SAVE = 0.02  # seconds: a checkpoint that copies faster is written at every evaluation


@dataclass
class Setup:
    """What the loop works with, made once by :func:`charlm.training.setup.setup` on every process."""

    cfg: Config
    dist: Dist
    device: torch.device
    precision: str
    source_info: dict[str, Any]  # name, size, sha256 and path of the training text
    chars: int  # characters of text, training and validation
    vocab: Vocab
    val_ids: torch.Tensor
    batcher: Batcher
    model: CharRNN
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Any  # the autocast context of the precision
    plan: AmpPlan  # what the precision means here (autocast dtype, recurrent dtype, scaling)
    sample_seed: str  # samples continue the start of the training text
    notes: list[str]
    vocab_growth: list[dict[str, Any]]  # --grow-vocab records, kept through fine-tuning
    sizing: Choice | None = None  # what automatic sizing chose, when it ran


def steps(first: int, last: int) -> str:
    """A range of steps, as the summary names it: "step 7" or "steps 5-6"."""
    return f"steps {first:,}-{last:,}" if first < last else f"step {last:,}"


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class Loop:
    def __init__(self, run: Setup, state: TrainState, run_dir: Path, monitors: Monitor,
                 resumed: bool, stop_at_step: int = 0):
        self.run, self.state, self.run_dir, self.monitors = run, state, run_dir, monitors
        self.tc, self.dist, self.main = run.cfg.train, run.dist, run.dist.rank == 0
        self.stop_at_step = stop_at_step
        self.dmodel = run.dist.wrap(run.model)  # DDP under torchrun, else the model itself
        self.last_train = self.last_val = math.nan
        self.lr, self.grad_norm, self.now = 0.0, None, 0.0
        self.skipped = self.skips_in_row = self.nan_step = 0
        self.saved_step = state.step if resumed else -1  # the step last.pt holds
        # last.pt (with the optimizer state) is written at an evaluation when copying it last
        # cost under CHEAP_SAVE or under 1% of the time since then: at every evaluation for the
        # models a CPU trains, every few for a GPU's (copying configs/gpu.toml's optimizer
        # state takes tens of milliseconds).
        self.full_at, self.full_cost, self.finishing = -math.inf, 0.0, False
        self.evaluated_step = -1
        self.writer = CheckpointWriter() if self.main else None
        # With sample_every not a multiple of eval_every, sample at the first evaluation past
        # each multiple of it (a plain step % sample_every test would wait for their LCM).
        self.sampled_at = state.step
        self.started = time.perf_counter()
        self.rate_t, self.rate_chars = self.started, state.chars_seen
        tc = self.tc
        self.pacer = Pacer(tc.eval_every, tc.log_every, tc.max_steps, tc.max_time, tc.max_epochs,
                           run.batcher.steps_per_epoch, state.step, state.elapsed)
        self.first_chars = state.chars_seen
        self.train_from = ""  # the steps the last train record covers, e.g. "steps 951-1,000"
        self.log_from = state.step - state.loss_count
        self.due = Due(log=True, eval=False)  # what the pacer decided for the next step

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
        with StopSignals(announce=self.main) as signals, self.checkpoint_writer():
            while not (stopped := self.stop_reason(signals)):
                due = self.due = self.pacer.due(s.step + 1, self.now)
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
            if ends and stopped != "nan" and self.sampled_at != s.step:
                self.sample(final=True)
            return stopped

    def recent_train(self) -> tuple[float, str]:
        """The train loss a summary reports, and its steps: the last train record's or, when
        stopped before the first, the mean of the steps so far (over all processes)."""
        s = self.state
        if not (s.loss_count and math.isnan(self.last_train)):
            return self.last_train, self.train_from
        loss = float(self.dist.mean(s.loss_sum / s.loss_count))
        return loss, steps(s.step - s.loss_count + 1, s.step)

    def train_speed(self) -> float:
        """Characters per second of training in this process (evaluations not counted)."""
        return (self.state.chars_seen - self.first_chars) / self.pacer.training_seconds(self.elapsed())

    def stop_reason(self, signals: StopSignals) -> str:
        """The stopping rules, checked before every step: why to stop, or "" to go on."""
        tc, s, dist = self.tc, self.state, self.dist
        # Clocks differ between processes: they follow rank 0's, so that all stop at the
        # same step and use the same learning rate.
        self.now = dist.agree(self.elapsed()) if tc.max_time else self.elapsed()
        if tc.max_steps and s.step >= tc.max_steps:
            return "max_steps"
        # A time limit keeps time for the final evaluation, save and sample.
        reserve = self.pacer.reserve(s.step, self.now, tc.batch_size * tc.seq_len * dist.world,
                                     len(self.run.val_ids))
        if tc.max_time and self.now + reserve >= tc.max_time:
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
        accelerator the NaN guard syncs only at a logged step (``self.due``) or skipping."""
        run, s, tc, dist = self.run, self.state, self.tc, self.dist
        B, T = tc.batch_size, tc.seq_len
        if run.batcher.new_epoch or s.carried is None:
            s.carried = run.model.init_state(B)
        x, y = run.batcher.next()  # (B, T)
        self.lr = lr_at(s.step, planned_progress(s.step, self.now, run.batcher.progress, tc), tc)
        for group in run.optimizer.param_groups:
            group["lr"] = self.lr
        with run.amp:
            logits, new_state = self.dmodel(x, s.carried)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(
            run.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf
        )
        check_now = run.device.type == "cpu" or tc.on_nan == "skip" or self.due.log
        # Both are >= 0, so the sum is finite exactly when both are. Under fp16 the scaler
        # itself skips steps with inf gradients, so only the loss is watched there.
        watched = loss.detach() if run.scaler.is_enabled() else loss.detach() + self.grad_norm.detach()
        if check_now and not dist.all_finite(watched):
            return self.skip_or_stop()
        self.skips_in_row = 0
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        s.carried = detach_state(new_state)
        s.step += 1
        s.chars_seen += B * T * dist.world
        s.loss_sum += loss.detach()
        s.loss_count += 1
        self.monitors.on_step(s.step)
        return "ok"

    def skip_or_stop(self) -> str:
        """The NaN guard, after a non-finite loss or gradient: drop the step (train.on_nan =
        "skip", while the weights are finite) or stop."""
        s, tc = self.state, self.tc
        self.skips_in_row += 1
        if (tc.on_nan == "skip" and self.skips_in_row <= MAX_SKIPS_IN_ROW
                and weights_finite(self.run.model)):
            self.run.optimizer.zero_grad(set_to_none=True)
            s.carried = None  # the new state may hold NaN: restart the streams from zero
            self.skipped += 1
            self.monitors.on_note(f"skipped a non-finite loss at step {s.step + 1}")
            s.step += 1
            return "skipped"
        self.nan_step = s.step + 1
        return "nan"

    def log(self) -> None:
        """The mean training loss of the interval (over all processes) and the speed."""
        s = self.state
        self.last_train = float(self.dist.mean(s.loss_sum / s.loss_count))
        now = time.perf_counter()
        rate = (s.chars_seen - self.rate_chars) / max(now - self.rate_t, 1e-9)
        self.rate_t, self.rate_chars = now, s.chars_seen
        self.train_from, self.log_from = steps(self.log_from + 1, s.step), s.step
        s.loss_sum.zero_()
        s.loss_count = 0
        if self.main:
            self.monitors.on_train_log({
                "kind": "train", "step": s.step, "epoch": round(self.run.batcher.progress, 6),
                "chars": s.chars_seen, "lr": self.lr, "loss": self.last_train,
                "bpc": bits(self.last_train), "grad_norm": float(self.grad_norm),
                "elapsed": round(self.elapsed(), 3), "chars_per_sec": round(rate, 1),
                "save_seconds": round(self.save_seconds, 3),  # so far, on the training thread
            })

    def evaluate_and_save(self) -> bool:
        """Evaluate on the whole validation split and write the checkpoints; False (nothing
        written) when the loss is not finite, so diverged weights never replace the last
        good checkpoint."""
        run, s, tc, dist = self.run, self.state, self.tc, self.dist
        started = time.perf_counter()
        self.last_val = mean_loss(run.model, run.val_ids, tc.eval_streams, tc.eval_seq_len,
                                  run.amp, dist.rank, dist.world, dist.all_reduce_sum)
        if not math.isfinite(self.last_val):
            self.nan_step = s.step
            return False
        improved = self.last_val < s.best_val_loss
        if improved:
            s.best_val_loss, s.evals_since_best = self.last_val, 0
        else:
            s.evals_since_best += 1
        if self.main:
            self.monitors.on_eval({
                "kind": "eval", "step": s.step, "epoch": round(run.batcher.progress, 6),
                "chars": s.chars_seen, "val_loss": self.last_val, "val_bpc": bits(self.last_val),
                "best": improved, "elapsed": round(self.elapsed(), 3),
            })
        self.save_checkpoints(evaluated=True, improved=improved)
        self.pacer.evaluated(s.step, self.elapsed(), self.agreed_seconds(started))
        # The speed of the next train record is of training alone.
        self.rate_t += time.perf_counter() - started
        return True

    def agreed_seconds(self, started: float) -> float:
        """Seconds since ``started`` (perf_counter), rank 0's with a time limit."""
        seconds = time.perf_counter() - started
        return self.dist.agree(seconds) if self.tc.max_time else seconds

    def save_checkpoints(self, evaluated: bool, improved: bool = False) -> None:
        """The checkpoint policy. After an evaluation: best.pt (the weights and training
        state, without the optimizer state) when the validation loss improved; last.pt (all
        of it, for resuming) when due (see ``full_at``), and always at the end of training;
        step-NNNNNNNN.pt with last.pt, keeping the newest train.keep_last. At a pause or an
        interrupt between evaluations: last.pt. Every process takes part in the snapshot;
        rank 0 copies it and hands it to the writer thread, which writes each file
        atomically, so the training thread pays only for the copy."""
        run, step, dist = self.run, self.state.step, self.dist
        started, now = time.perf_counter(), self.elapsed()
        keep = self.tc.keep_last if evaluated else 0
        due = (self.finishing or not evaluated
               or self.full_cost <= max(0.01 * (now - self.full_at), CHEAP_SAVE))
        full = bool(dist.agree(float(due)))  # rank 0 measured: every process decides alike
        if evaluated:
            self.evaluated_step = step
        if not (full or improved):
            return
        train_state = snapshot(self.state, run.batcher, run.model, dist, now)
        if run.scaler.is_enabled():  # fp16: resume at the same loss scale
            train_state["scaler"] = run.scaler.state_dict()
        if full:
            self.saved_step = step
        if not self.main:
            return
        ckpt = detached_copy(checkpoint.make_checkpoint(
            run.model, run.cfg, run.vocab,
            **({"optimizer": run.optimizer.state_dict()} if full else {}),
            train_file=run.source_info, vocab_growth=run.vocab_growth, train_state=train_state,
        ), clone_cpu=run.device.type == "cpu")
        files = {}
        if improved:
            files[self.run_dir / "best.pt"] = {k: v for k, v in ckpt.items() if k != "optimizer"}
        if full:
            files[self.run_dir / "last.pt"] = ckpt
            if keep:
                files[self.run_dir / f"step-{step:08d}.pt"] = ckpt
        self.writer.submit(files, prune=(self.run_dir, keep) if keep else None, started=started)
        if full:
            self.full_at, self.full_cost = now, time.perf_counter() - started
        self.monitors.on_saved(step, [path.name for path in files])

    @contextmanager
    def checkpoint_writer(self) -> Iterator[None]:
        """Wait for the writer thread to finish the files it holds, also when training fails
        (they are good checkpoints); a writer error is raised unless another is on its way."""
        try:
            yield
        except BaseException:
            if self.writer is not None:
                with suppress(BaseException):
                    self.writer.close()
            raise
        if self.writer is not None:
            self.writer.close()

    @property
    def save_seconds(self) -> float:
        """Seconds the training thread spent on checkpoints (copies and waits)."""
        return self.writer.blocked if self.writer is not None else 0.0

    def sample(self, final: bool = False) -> None:
        """After an evaluation, when train.sample_every says so, and at the end of a run
        (``final``): the model's continuation of the start of the training text, with the
        run's seed (so samples are comparable)."""
        run, tc, step = self.run, self.tc, self.state.step
        due = (final or not tc.sample_every
               or step // tc.sample_every > self.sampled_at // tc.sample_every)
        if not (tc.sample_chars and due):
            return
        self.sampled_at = step
        started = time.perf_counter()
        if self.main:
            text = generate(run.model.eval(), run.vocab,
                            run.vocab.encode(run.sample_seed).tolist(), tc.sample_chars,
                            temperature=0.8, random_seed=tc.seed)[0]
            run.model.train()
            self.monitors.on_sample(step, self.last_val, run.sample_seed + text)
        self.pacer.sampled(self.agreed_seconds(started))
        self.rate_t += time.perf_counter() - started

    def finish(self, stopped: str) -> str:
        """After the loop: last.pt (and best.pt) describe the end of training, unless it
        diverged. Returns why training stopped ("nan" if the final weights are not finite)."""
        s, notes = self.state, self.run.notes
        if stopped == "patience":
            evals = "1 evaluation" if self.tc.patience == 1 else f"{self.tc.patience} evaluations"
            notes.append(f"early stopping: no new best in {evals}")
        if self.skipped:
            notes.append(f"skipped {self.skipped:,} step(s) with a non-finite loss (train.on_nan=skip)")
        if self.saved_step == s.step or stopped == "nan":
            return stopped
        self.finishing = True  # the last evaluation writes last.pt whatever it cost
        if stopped not in ("interrupted", "stop_at_step") and self.evaluated_step != s.step:
            return stopped if self.evaluate_and_save() else "nan"
        if not weights_finite(self.run.model):
            self.nan_step = s.step
            return "nan"
        self.save_checkpoints(evaluated=False)
        return stopped
