"""Automatic sizing: the model, batch, window, learning rate and dropout expected to give the
lowest validation loss by the end of a time budget, on this device, for this text.

How it decides (``--size auto``, when a run has a time budget and no shape was given):

1. :func:`measure` times a few training steps of each candidate shape in :data:`LADDER` on
   this device, in the run's precision (the loop's own step,
   :func:`charlm.training.step.optimizer_step`, with the real model, optimizer, autocast and
   gradient scaler; random characters, as speed does not depend on them). That takes a few
   seconds, counted inside the budget.
2. Each candidate would see ``chars/s x seconds it trains`` characters: the seconds left,
   less its evaluations (:func:`training_seconds`: the run evaluates the validation split
   about twelve times, which costs a slow model a larger share). :func:`predicted_loss`
   turns that, the text's size and the candidate's size into an expected validation loss with
   a law fitted to sweeps (``benchmarks/sizing/``: the sweep runs and the fitting script,
   which writes the fitted numbers to ``sizing_rule.json``, read by :class:`Rule`):

       loss = E + A / (g N)^alpha + B / C_eff^beta

   ``N`` is the number of parameters (``g`` what a parameter of the cell is worth: 1 for an
   LSTM, fitted for a GRU), ``C_eff`` the characters seen, discounted once they
   repeat: past one epoch a repeated character is worth less, the more so the more epochs
   (``R``, larger with dropout, which also slows learning a little). ``E`` is the text's own
   entropy; it is the same for every candidate, so the choice does not depend on it.
3. :func:`choose` takes the candidate and dropout with the lowest prediction (ties to the
   smaller one) and the candidate's learning rate (:func:`learning_rate`). Candidates
   predicted within :data:`NEAR` (0.01 nats) of the best are timed a second time first.

The choice is a pure function of the measured speeds (inject them to test it), and the run
records it in ``config.toml`` with ``size = "fixed"``, so a rerun from that file or a resume
trains the same shape.

Over 300 lines: one decision, read in order: the candidates and their timing, the fitted law,
the choice, and what the front ends set around it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from charlm.config import Config, ModelConfig
from charlm.device import amp_plan, autocast, synchronize
from charlm.errors import CharlmError
from charlm.evaluate import loss_sums
from charlm.model.cells import CELLS
from charlm.model.network import build_model, parameter_shapes
from charlm.training import step as one_step
from charlm.training.pacing import EVALS, MAX_EVAL_SHARE
from charlm.training.schedule import make_optimizer

# The schedule the sweeps ran with (configs/cpu.toml's), set with the chosen shape.
SCHEDULE = {"train.warmup_steps": 50, "train.min_lr_ratio": 0.05}

# The fields a shape sets; giving any of them (an option, a config file, --set) turns
# automatic sizing off.
SHAPE_KEYS = ("model.cell", "model.hidden_size", "model.num_layers", "model.embed_size",
              "train.batch_size", "train.seq_len")


@dataclass(frozen=True)
class Shape:
    cell: str
    hidden_size: int
    num_layers: int
    embed_size: int
    batch_size: int
    seq_len: int

    @property
    def name(self) -> str:
        """``lstm512``, ``lstm2x1024``: how sweeps and records refer to it."""
        layers = f"{self.num_layers}x" if self.num_layers > 1 else ""
        return f"{self.cell}{layers}{self.hidden_size}"

    def describe(self) -> str:
        """``LSTM 2x1024, batch 128 x 128``: for the run header."""
        layers = f"{self.num_layers}x" if self.num_layers > 1 else ""
        return (f"{self.cell.upper()} {layers}{self.hidden_size}, "
                f"batch {self.batch_size} x {self.seq_len}")

    def model_config(self, dropout: float = 0.0) -> ModelConfig:
        return ModelConfig(cell=self.cell, embed_size=self.embed_size, hidden_size=self.hidden_size,
                           num_layers=self.num_layers, dropout=dropout)

    def parameters(self, vocab_size: int) -> int:
        """Parameters of this shape's model over a vocabulary of ``vocab_size``."""
        shapes = parameter_shapes(vocab_size, self.model_config())
        return sum(math.prod(shape) for shape in shapes.values())


def _shape(cell: str, hidden: int, layers: int = 1, batch: int = 32, seq: int = 64) -> Shape:
    return Shape(cell, hidden, layers, 64 if hidden <= 512 else 128, batch, seq)


# From small to large. GRU and LSTM both: on CPUs with native bf16, autocast runs an LSTM in
# bf16 but leaves a GRU in fp32, so which is faster depends on the machine. Up to the sizes
# the sweeps measured (one layer, 1,024 units): the law, fitted there, misjudged a 2-layer
# LSTM of 13M parameters (docs/sizing.md).
LADDER: tuple[Shape, ...] = (
    _shape("gru", 256), _shape("lstm", 256),
    _shape("gru", 384), _shape("lstm", 384),
    _shape("gru", 512), _shape("lstm", 512),
    _shape("gru", 768, batch=64), _shape("lstm", 768, batch=64),
    _shape("gru", 1024, batch=64), _shape("lstm", 1024, batch=64),
)


def learning_rate(shape: Shape) -> float:
    """Peak learning rate: 4e-3 (``configs/cpu.toml``'s, swept at 180 s) up to 512 units,
    then falling as 1/sqrt(width), to 2.8e-3 at 1024 (``configs/gpu.toml`` uses 2e-3 for 3x1024)."""
    return round(4e-3 * min(1.0, (512 / shape.hidden_size) ** 0.5), 5)


def train_flops_per_char(cfg: ModelConfig, vocab_size: int) -> float:
    """Matrix arithmetic of one training character: forward + backward = 3x forward."""
    gates = CELLS[cfg.cell].gates
    forward = 0
    for k in range(cfg.num_layers):
        inputs = cfg.embed_size if k == 0 else cfg.hidden_size
        forward += 2 * gates * cfg.hidden_size * (inputs + cfg.hidden_size)
    forward += 2 * cfg.hidden_size * vocab_size
    return 3.0 * forward


def train_flops(shape: Shape, vocab_size: int) -> float:
    return train_flops_per_char(shape.model_config(), vocab_size)


@dataclass(frozen=True)
class Speed:
    """What :func:`measure` times, in characters per second."""

    train: float  # training steps without dropout
    dropout: float  # with dropout (its masks cost a GRU 768 17% here); ``train`` if not timed
    evaluate: float  # evaluation: forward only, long windows, many streams

    def eval_seconds(self, val_chars: int) -> float:
        """Seconds a run spends evaluating ``val_chars`` about EVALS times."""
        return EVALS * val_chars / self.evaluate


def measure(shape: Shape, vocab_size: int, device: torch.device, precision: str,
            seconds: float = 0.4, min_steps: int = 3, dropout: bool = False,
            eval_streams: int = 64) -> Speed:
    """Chars/s of ``shape`` here: the training loop's own step
    (:func:`charlm.training.step.optimizer_step`) of the real model, optimizer, autocast,
    gradient scaler and clipping, on random characters, after one untimed step; at least
    ``min_steps`` steps and ``seconds`` seconds are timed, and the median step counts (a
    virtual machine's first touches of new memory and a neighbour's burst make single steps
    slow). With ``dropout``, the steps are timed again (half as long) with dropout on.
    Evaluation is timed once, with the run's own :func:`charlm.evaluate.loss_sums` on
    ``eval_streams`` streams (the faster of two passes)."""
    def train_speed(p: float, seconds: float) -> tuple[float, torch.nn.Module]:
        model = build_model(vocab_size, shape.model_config(p)).to(device)
        ids = torch.randint(0, vocab_size, (B, T + 1), device=device)
        opt = make_optimizer(model, tc, device)
        scaler = torch.amp.GradScaler(device.type, enabled=plan.loss_scaling)
        x, y = ids[:, :-1], ids[:, 1:]

        def step() -> None:  # from a fresh state, as at the start of an epoch
            one_step.optimizer_step(model, opt, scaler, cast, x, y, model.init_state(B),
                                tc.grad_clip)

        step()
        synchronize(device)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_steps or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - t)
        return B * T / statistics.median(times), model

    def eval_speed(model: torch.nn.Module) -> float:
        ids = torch.randint(0, vocab_size, (eval_streams * 64 + 1,), device=device)
        spans = []
        for _ in range(2):
            t = time.perf_counter()
            loss_sums(model, ids, eval_streams, 64, cast)
            synchronize(device)
            spans.append(time.perf_counter() - t)
        return eval_streams * 64 / min(spans)

    plan = amp_plan(precision, device, shape.cell)
    cast = autocast(device, precision)  # the context the run's own steps enter
    tc = Config().train  # the default optimizer settings and clipping
    B, T = shape.batch_size, shape.seq_len
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # the run's own random streams stay as they were
        train, model = train_speed(0.0, seconds)
        evaluate = eval_speed(model)
        dropped = train_speed(0.1, seconds / 2)[0] if dropout else train
    return Speed(train, dropped, evaluate)


# ------------------------------------------------------------------------------ the rule
RULE_FILE = Path(__file__).with_name("sizing_rule.json")
MIN_STEPS = 200  # a shape that cannot take this many steps in the budget is not a candidate
MEASURE_SHARE = 0.05  # of the budget, at most, spent measuring (after the first two shapes)
# Shapes predicted within this of the best are timed a second time (:func:`size`): the
# run-to-run noise of a final loss, where a few seconds' timing noise can swap the order.
# (Giving such a near-tie to the smaller shape was tried and cost 0.011-0.016 at 600 s and
# 1,800 s: docs/sizing.md.)
NEAR = 0.01


# The choices of dropout: 0 to 0.25, the range the sweeps measured (the law would take more
# where nothing measured backs it).
DROPOUTS = tuple(round(0.05 * k, 2) for k in range(6))
# Dropout hurt models of 0.35 and 0.55 parameters per character of text (docs/sizing.md, how
# configs/cpu.toml was chosen: dropout 0.1 cost 0.02-0.03), where the law, which has no term
# for capacity, would give them some; it helped one of 0.72 (LSTM 384 on tiny Shakespeare at
# 14 epochs, 0.05 better with 0.1) and every one above. Below this they get none; above it the
# law's own dropout terms decide. (1.0 until an LSTM 512 at 0.82 trained without dropout on
# the docstrings and lost 0.044 to the same shape with it: docs/sizing.md.)
DROPOUT_FROM = 0.6


def training_seconds(seconds: float, eval_seconds: float) -> float:
    """Of a run of ``seconds``, those it trains: the rest goes to its evaluations, which
    would take ``eval_seconds`` but at most MAX_EVAL_SHARE of the time
    (:class:`charlm.training.pacing.Pacer`'s plan)."""
    return max(seconds * (1.0 - MAX_EVAL_SHARE), seconds - eval_seconds)


@dataclass(frozen=True)
class Rule:
    """The fitted law (see the module docstring and ``benchmarks/sizing/fit.py``, which
    writes it)."""

    A: float
    alpha: float
    B: float
    beta: float
    R: float  # how many epochs' worth repeated data is at most worth, without dropout
    rho: float  # dropout d multiplies R by (1 + rho d)
    kappa: float  # and each character's worth by (1 - kappa d)
    gru: float  # what a GRU parameter is worth, in LSTM parameters

    def worth(self, cell: str) -> float:
        return self.gru if cell == "gru" else 1.0

    @classmethod
    def load(cls, path: Path = RULE_FILE) -> Rule:
        data = json.loads(path.read_text())
        return cls(**{f.name: float(data[f.name]) for f in fields(cls)})


def effective_chars(chars: float, text_chars: float, dropout: float, rule: Rule) -> float:
    """Characters seen, discounted once they repeat (Muennighoff et al. 2023, "Scaling
    data-constrained language models"): past the first epoch each further one is worth less,
    and all of them together at most ``R`` epochs; dropout slows learning (``kappa``) and
    delays the saturation (``rho``)."""
    u = 1.0 - rule.kappa * dropout
    epochs = chars / text_chars
    if epochs <= 1.0:
        return u * chars
    R = rule.R * (1.0 + rule.rho * dropout)
    return u * text_chars * (1.0 + R * (1.0 - math.exp(-(epochs - 1.0) / R)))


def predicted_loss(params: float, chars: float, text_chars: float, dropout: float,
                   rule: Rule, cell: str = "lstm") -> float:
    """Expected validation loss above the text's own entropy (which every candidate shares)."""
    c = max(effective_chars(chars, text_chars, dropout, rule), 1.0)
    return rule.A / (rule.worth(cell) * params)**rule.alpha + rule.B / c**rule.beta


def takes_dropout(params: float, text_chars: float) -> bool:
    return params >= DROPOUT_FROM * text_chars


def best_dropout(params: float, chars: float, text_chars: float, rule: Rule,
                 cell: str = "lstm", dropped_chars: float | None = None) -> tuple[float, float]:
    """(dropout, predicted loss): the dropout in DROPOUTS the law likes best, the smallest
    on a tie; none for a model under DROPOUT_FROM parameters per character of text.
    ``dropped_chars``: the characters it trains on with dropout (fewer: dropout is slower)."""
    choices = DROPOUTS if takes_dropout(params, text_chars) else (0.0,)
    dropped = chars if dropped_chars is None else dropped_chars
    return min(((predicted_loss(params, dropped if d else chars, text_chars, d, rule, cell), d)
                for d in choices), key=lambda ld: (round(ld[0], 9), ld[1]))[::-1]


@dataclass(frozen=True)
class Choice:
    shape: Shape
    lr: float
    dropout: float
    speed: float  # measured chars/s
    chars: float  # expected characters of training
    epochs: float
    predicted: float  # loss above the text's entropy
    seconds: float  # the budget: measuring, then training for the rest
    measured: tuple[tuple[str, float], ...] = ()  # (shape, chars/s) of every shape timed
    measure_seconds: float = 0.0

    def reason(self) -> str:
        """For the run header: the choice and why."""
        return (f"{self.shape.describe()}, lr {self.lr:g}, dropout {self.dropout:g}: "
                f"{_k(self.speed)} chars/s here, about {self.epochs:.1f} epochs in "
                f"{self.seconds:g} s (timed {len(self.measured)} shapes in "
                f"{self.measure_seconds:.1f} s)")


def _k(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:,.0f}"


def candidates(text_chars: int) -> list[Shape]:
    """The shapes whose batch fits in the text's training split."""
    return [s for s in LADDER if s.batch_size * s.seq_len + 1 <= text_chars]


def predictions(speeds: dict[Shape, Speed], seconds: float, text_chars: int, vocab_size: int,
                rule: Rule, measure_seconds: float = 0.0, *, val_chars: int) -> list[Choice]:
    """Each measured shape that can take :data:`MIN_STEPS` steps in a run of ``seconds``, with
    its best dropout and predicted loss."""
    out = []
    for shape, speed in speeds.items():
        train = training_seconds(seconds, speed.eval_seconds(val_chars))
        chars, dropped = speed.train * train, speed.dropout * train
        if chars < MIN_STEPS * shape.batch_size * shape.seq_len:
            continue
        dropout, loss = best_dropout(shape.parameters(vocab_size), chars, text_chars, rule,
                                     shape.cell, dropped)
        if dropout:
            chars = dropped
        out.append(Choice(shape, learning_rate(shape), dropout, chars / train, chars,
                          chars / text_chars, loss, seconds,
                          tuple((s.name, v.train) for s, v in speeds.items()), measure_seconds))
    return out


def choose(speeds: dict[Shape, Speed], seconds: float, text_chars: int, vocab_size: int,
           rule: Rule, measure_seconds: float = 0.0, *, val_chars: int) -> Choice | None:
    """The measured shape with the lowest predicted loss after a run of ``seconds``, the
    smaller on a tie (``None`` when none can take :data:`MIN_STEPS` steps). Pure: the same
    speeds give the same choice, in any order."""
    found = predictions(speeds, seconds, text_chars, vocab_size, rule, measure_seconds,
                        val_chars=val_chars)
    return min(found, key=lambda c: (round(c.predicted, 9), c.shape.parameters(vocab_size)),
               default=None)


def smallest_budget(speeds: dict[Shape, Speed], measure_seconds: float, val_chars: int) -> float:
    """The shortest budget in which some measured shape takes MIN_STEPS steps (the inverse
    of :func:`training_seconds`)."""
    def run(shape: Shape, speed: Speed) -> float:
        need = MIN_STEPS * shape.batch_size * shape.seq_len / speed.train
        return min(need / (1.0 - MAX_EVAL_SHARE), need + speed.eval_seconds(val_chars))
    return math.ceil(measure_seconds + min(run(s, v) for s, v in speeds.items()))


def size(budget: float, text_chars: int, vocab_size: int, device: torch.device,
         precision: str, rule: Rule | None = None, timer=time.perf_counter, *,
         val_chars: int, eval_streams: int = 64) -> Choice:
    """Time the candidates here and choose (the module docstring has the method). Shapes are
    timed from small to large, and the timing stops once two in a row are predicted worse
    than the best so far, or at MEASURE_SHARE of the budget; then those predicted within
    NEAR of the best are timed again, the faster timing kept. The time spent is counted in
    the budget. Raises :class:`CharlmError` naming the smallest workable budget when no shape
    fits in ``budget``."""
    rule = rule or Rule.load()
    shapes = candidates(text_chars)
    if not shapes:
        raise CharlmError(f"the text is too short for automatic sizing ({text_chars:,} training "
                          "characters); give a shape (--batch-size, --seq-len) or --size fixed")
    start = timer()
    speeds: dict[Shape, Speed] = {}

    def timed(shape: Shape) -> Speed:
        try:
            return measure(shape, vocab_size, device, precision, eval_streams=eval_streams,
                           dropout=takes_dropout(shape.parameters(vocab_size), text_chars))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    worse = 0
    for shape in shapes:
        used = timer() - start
        allowance = max(MEASURE_SHARE * budget - used, 1.0)
        if len(speeds) >= 2 and used > MEASURE_SHARE * budget:
            break
        if speeds:  # a shape whose few timed steps alone would overrun, at the best
            # arithmetic rate reached so far: stop (the ladder only grows from here)
            rate = max(v.train * train_flops(s, vocab_size) for s, v in speeds.items())
            guess = rate / train_flops(shape, vocab_size)
            if 4 * shape.batch_size * shape.seq_len / guess > allowance:
                break
        try:
            speeds[shape] = timed(shape)
        except (torch.OutOfMemoryError, MemoryError):
            break
        choice = choose(speeds, budget - (timer() - start), text_chars, vocab_size, rule,
                        val_chars=val_chars)
        worse = 0 if choice is not None and choice.shape == shape else worse + 1
        if worse >= 2 and choice is not None:
            break
    # Near-ties are decided by a few timed steps each, and a neighbour's burst makes a timing
    # slow, never fast: time each shape within NEAR of the best again (while the measuring
    # share lasts) and keep the faster of its two timings.
    found = sorted(predictions(speeds, budget - (timer() - start), text_chars, vocab_size, rule,
                               val_chars=val_chars), key=lambda c: c.predicted)
    for shape in [c.shape for c in found if c.predicted <= found[0].predicted + NEAR]:
        if timer() - start > MEASURE_SHARE * budget:
            break
        try:
            again = timed(shape)
        except (torch.OutOfMemoryError, MemoryError):
            break
        first = speeds[shape]
        speeds[shape] = Speed(max(first.train, again.train), max(first.dropout, again.dropout),
                              max(first.evaluate, again.evaluate))
    spent = timer() - start
    choice = choose(speeds, budget - spent, text_chars, vocab_size, rule, spent,
                    val_chars=val_chars)
    if choice is None:
        raise CharlmError(
            f"a budget of {budget:g} s is too short to train any model here: the fastest shape "
            f"needs {MIN_STEPS} steps; give --max-time {smallest_budget(speeds, spent, val_chars):g} "
            "or more, or a shape (--size fixed)")
    return dataclasses.replace(choice, seconds=budget)


# ------------------------------------------------------------------ what the front ends use
def settle(cfg: Config, given: set[str]) -> frozenset[str]:
    """For a new run from a front end (``charlm train``, ``charlm.train()``), given the config
    keys the user set (options, ``--set``, a config file): sizing is on unless ``size`` or a
    shape is among them; with it on, the time budget is the limit, so the default step limit goes.
    Returns the keys sizing must keep (a learning rate or dropout the user gave), for
    :func:`charlm.training.setup.train`'s ``keep``."""
    if "train.size" not in given:
        cfg.train.size = "fixed" if any(key in given for key in SHAPE_KEYS) else "auto"
    if wanted(cfg) and "train.max_steps" not in given:
        cfg.train.max_steps = 0
    return frozenset(key for key in ("train.lr", "model.dropout", *SCHEDULE) if key in given)


def wanted(cfg: Config) -> bool:
    """Whether a new run with ``cfg`` sizes itself: a time budget and ``size = "auto"``."""
    return cfg.train.size == "auto" and cfg.train.max_time > 0


def apply(choice: Choice, cfg: Config, keep: frozenset[str] = frozenset()) -> None:
    """Write the choice into ``cfg`` (a learning rate or dropout the user gave stays) and
    mark it fixed, so that the recorded config trains the same shape again."""
    s = choice.shape
    cfg.model.cell, cfg.model.hidden_size, cfg.model.num_layers = s.cell, s.hidden_size, s.num_layers
    cfg.model.embed_size = s.embed_size
    cfg.train.batch_size, cfg.train.seq_len = s.batch_size, s.seq_len
    chosen = {"train.lr": choice.lr, "model.dropout": choice.dropout, **SCHEDULE}
    for key, value in chosen.items():
        if key not in keep:
            section, _, name = key.partition(".")
            setattr(getattr(cfg, section), name, value)
    cfg.train.size = "fixed"


def comment(choice: Choice | None) -> str:
    """The lines ``config.toml`` starts with when the shape was chosen automatically."""
    if choice is None:
        return ""
    timed = ", ".join(f"{name} {_k(v)}" for name, v in choice.measured)
    return (f"# Chosen by automatic sizing for {choice.seconds:g} s: {choice.reason()}.\n"
            f"# Timed here (chars/s): {timed}.\n"
            "# size = \"fixed\" below: training from this file again keeps this shape.\n")
