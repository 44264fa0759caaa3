"""When a run logs and evaluates, and how much of a time limit to keep for the end.

``train.eval_every`` and ``train.log_every`` of 0 (the defaults) pace both to the run: about
:data:`EVALS` evaluations and :data:`LOGS` train records across its planned length (the
nearest of its limits), so a 60 s run shows as much as a 3 hour one. An explicit value wins.

* Step and epoch limits pace on a fixed grid of the planned progress: the decisions depend
  only on the step, so a resumed run takes exactly the decisions of an uninterrupted one.
* A time limit paces evaluations in seconds of the agreed clock (rank 0's under torchrun,
  so every process decides alike), and never spends more than :data:`MAX_EVAL_SHARE` of the
  time evaluating: on a large validation split the evaluations are spaced further apart.
* :meth:`Pacer.reserve` is the time the end of a run needs (one more step, the final
  evaluation, sample and save), measured as the run goes: training stops that much before
  ``train.max_time``, so the whole run, final evaluation included, fits in it.
* :class:`RateMeter` is the speed a train record reports: characters per second of training
  since the last record.

Every input is a number all processes share, so every process takes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EVALS = 12  # evaluations across a paced run
LOGS = 50  # train records across a paced run
MAX_EVAL_SHARE = 0.2  # the most of a time limit spent evaluating
# Without any limit there is no length to pace to: fixed intervals, in steps.
UNLIMITED_EVAL_EVERY, UNLIMITED_LOG_EVERY = 500, 50


@dataclass
class Due:
    log: bool
    eval: bool


class Pacer:
    """Decides, before each step, whether the step is logged and followed by an evaluation.

    ``eval_every``/``log_every``: explicit intervals in steps (0: paced). ``max_steps``,
    ``max_time``, ``max_epochs``: the run's limits (0: none). ``steps_per_epoch``: of the
    batcher, so that an epoch limit paces like a step limit. ``step``, ``now``: where the run
    starts (a resumed run: its step and seconds so far).
    """

    def __init__(self, eval_every: int, log_every: int, max_steps: int, max_time: float,
                 max_epochs: float, steps_per_epoch: int, step: int = 0, now: float = 0.0):
        self.eval_every, self.log_every, self.max_time = eval_every, log_every, max_time
        # An epoch limit beyond any step count (1e308 epochs: the product is infinite) plans
        # as many steps as can be counted.
        epoch_steps = min(max_epochs * steps_per_epoch, float(2**62))
        planned = [n for n in (max_steps, math.ceil(epoch_steps)) if n > 0]
        self.planned_steps = min(planned) if planned else 0
        self.last_now = now
        self.last_due = Due(log=True, eval=False)  # the decision for the step being taken
        self.start_step, self.start_now = step, now
        # With sample_every not a multiple of the evaluations, a sample comes at the first
        # evaluation past each multiple of it (a plain step % sample_every test would wait
        # for their LCM).
        self.sampled_at = step
        self.eval_seconds: float | None = None  # the last evaluation's, with its checkpoints
        # This process's time evaluating (with checkpoints) and sampling, on the clock the
        # processes agree on; the rest of its time is training.
        self.eval_total = self.sample_total = 0.0
        self.evaluations = self.samples = 0
        # With a time limit: the planned progress at which the next evaluation is due.
        self.next_eval = (math.floor(self.progress(step, now) * EVALS) + 1) / EVALS

    def progress(self, step: int, now: float) -> float:
        """The fraction of the planned run done: the nearest limit wins."""
        fractions = [0.0]
        if self.planned_steps:
            fractions.append(step / self.planned_steps)
        if self.max_time:
            fractions.append(now / self.max_time)
        return max(fractions)

    def due(self, step: int, now: float) -> Due:
        """For the step that will be number ``step`` (1-based), starting at ``now`` seconds
        (both kept, as ``last_due`` and ``last_now``, for the step to read)."""
        self.last_due = self._due(step, now)
        return self.last_due

    def _due(self, step: int, now: float) -> Due:
        before, self.last_now = self.last_now, now
        if not (self.planned_steps or self.max_time):  # no length to pace to
            log_every = self.log_every or UNLIMITED_LOG_EVERY
            eval_every = self.eval_every or UNLIMITED_EVAL_EVERY
            return Due(step % log_every == 0, step % eval_every == 0)
        p, p_before = self.progress(step, now), self.progress(step - 1, before)
        if self.eval_every:
            evaluate = step % self.eval_every == 0
        elif self.max_time:
            evaluate = p >= self.next_eval
        else:  # steps or epochs only: a fixed grid, the same in a resumed run
            evaluate = math.floor(p * EVALS) > math.floor(p_before * EVALS)
        if self.log_every:
            return Due(step % self.log_every == 0, evaluate)
        # A paced log also comes with every evaluation, and at the first step.
        log = step == 1 or evaluate or math.floor(p * LOGS) > math.floor(p_before * LOGS)
        return Due(log, evaluate)

    def evaluated(self, step: int, now: float, seconds: float) -> None:
        """An evaluation ended at ``now`` after ``seconds``: the next one is due a twelfth of
        the run later, or later still so that evaluating takes at most MAX_EVAL_SHARE."""
        self.eval_seconds = seconds
        self.eval_total += seconds
        self.evaluations += 1
        if self.max_time:
            gap = max(1 / EVALS, seconds / (MAX_EVAL_SHARE * self.max_time))
            self.next_eval = self.progress(step, now) + gap

    def sample_due(self, step: int, sample_every: int, final: bool = False) -> bool:
        """After an evaluation at ``step``: whether a sample is due (``train.sample_every``
        steps, 0: at every evaluation); always at the end of a run (``final``)."""
        return (final or not sample_every
                or step // sample_every > self.sampled_at // sample_every)

    def sampled(self, seconds: float, step: int) -> None:
        """A sample at ``step`` took ``seconds``."""
        self.sample_total += seconds
        self.samples += 1
        self.sampled_at = step

    def training_seconds(self, now: float) -> float:
        """Seconds of training (not evaluating, saving or sampling) since the start."""
        return max(now - self.start_now - self.eval_total - self.sample_total, 1e-9)

    def reserve(self, step: int, now: float, chars_per_step: int, val_chars: int) -> float:
        """With a time limit: seconds to keep for the end of the run, from what things took
        so far: one more step, the final evaluation (as long as the last one; before the
        first, as long as training on the validation split would, which errs on the safe
        side: evaluation is faster) and the final sample."""
        steps = step - self.start_step
        if not (self.max_time and steps):
            return 0.0
        per_step = self.training_seconds(now) / steps
        final = self.eval_seconds if self.eval_seconds is not None else (
            per_step / chars_per_step * val_chars)
        return per_step + final + self.sample_total / max(self.samples, 1)

    def describe(self) -> str:
        """The plan, for the run's header."""
        if self.eval_every:
            evals = f"evaluate every {self.eval_every:,} steps"
        elif self.planned_steps or self.max_time:
            evals = f"evaluate about {EVALS} times"
        else:
            evals = f"evaluate every {UNLIMITED_EVAL_EVERY:,} steps"
        if self.log_every:
            logs = f"log every {self.log_every:,} steps"
        elif self.planned_steps or self.max_time:
            logs = f"log about {LOGS} times"
        else:
            logs = f"log every {UNLIMITED_LOG_EVERY:,} steps"
        return f"{evals}, {logs}"


class RateMeter:
    """Characters per second of training between train records: the time spent evaluating,
    saving and sampling is left out (:meth:`pause`). ``chars``, ``now``: where it starts
    (characters seen so far, a clock in seconds)."""

    def __init__(self, chars: int, now: float):
        self.first_chars = chars
        self.chars, self.since = chars, now

    def rate(self, chars: int, now: float) -> float:
        """The speed since the last reading (or the start), which starts the next."""
        rate = (chars - self.chars) / max(now - self.since, 1e-9)
        self.chars, self.since = chars, now
        return rate

    def pause(self, seconds: float) -> None:
        """``seconds`` of something other than training passed: not counted."""
        self.since += seconds

    def overall(self, chars: int, training_seconds: float) -> float:
        """The speed since the start, over ``training_seconds`` of training."""
        return (chars - self.first_chars) / training_seconds
