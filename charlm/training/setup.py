"""Training, from the top: :func:`train` sets a run up (:func:`setup`), restores a resumed
run's state, opens the run directory and hands over to the loop.

Where to change what:

* the learning-rate schedule and the optimizer: :mod:`charlm.training.schedule`
* the stopping rules: :meth:`charlm.training.loop.Loop.stop_reason` (and the patience in ``fit``)
* the checkpoint policy: :meth:`charlm.training.loop.Loop.save_checkpoints`
* what a resume restores: :mod:`charlm.training.state`
* what the user sees (bar, log lines, metrics.jsonl, TensorBoard): :mod:`charlm.training.monitors`
* when to log and evaluate, and the time a limit keeps for the end: :mod:`charlm.training.pacing`
* ``--dry-run``: :mod:`charlm.training.dry_run`
* what ``charlm train`` and ``charlm.train()`` ask for (option checks, resume, ``--init-from``,
  the config's layers, sizing, the dry run), resolved before this: :mod:`charlm.training.request`

Over 300 lines: the set-up of a run with the checks it makes, and its result, read in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm.config import Config, to_toml, validate
from charlm.data.batching import Batcher, as_tensor, load_corpus, split
from charlm.device import allow_tf32, amp_plan, autocast, cpu_count, resolve_precision, set_threads
from charlm.errors import CharlmError, CheckpointError, ConfigError, DataError, first_line
from charlm.model.network import build_model
from charlm.runs.directory import check_out_dir, run_directory
from charlm.signals import EXIT_INTERRUPTED  # noqa: F401 - re-exported for the CLI
from charlm.storage import checkpoint
from charlm.streams import keep_going
from charlm.training import sizing
from charlm.training.distributed import Dist
from charlm.training.loop import Loop
from charlm.training.monitors import Header, MetricsFile, Monitor, Monitors, console
from charlm.training.pacing import Pacer
from charlm.training.schedule import lr_at, make_optimizer, planned_progress  # noqa: F401 - re-exported
from charlm.training.state import TrainState, restore
from charlm.training.step import Setup


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # why training ended: max_steps, max_time, max_epochs, patience, ...
    elapsed: float
    chars_seen: int
    chars_per_sec: float  # of training alone (this process's run), without evaluations
    train_loss: float  # the mean over the last train record's steps (``train_steps``)
    val_loss: float
    best_val_loss: float
    num_parameters: int
    vocab_size: int
    device: str
    precision: str
    notes: list[str] = field(default_factory=list)
    train_steps: str = ""  # the steps train_loss is the mean over, e.g. "steps 951-1,000"
    eval_seconds: float = 0.0  # spent evaluating, saving and sampling
    evaluations: int = 0
    save_seconds: float = 0.0  # training time spent on checkpoints (copies and waits)


def train(
    text_path: str | Path,
    cfg: Config,
    out_dir: str | Path | None = None,
    resume: dict[str, Any] | None = None,
    init_from: dict[str, Any] | None = None,
    allow_other_data: bool = False,
    drop_unknown: bool = False,
    stop_at_step: int = 0,
    progress: bool | None = None,
    dist: Dist | None = None,
    monitors: list[Monitor] | None = None,
    keep: frozenset[str] = frozenset(),
) -> TrainResult:
    """Train a model on ``text_path``; ``resume`` and ``init_from`` are loaded checkpoints.

    ``progress``: a progress bar (True), plain log lines (False), or the bar only when
    stderr is a terminal (None). ``monitors`` replace that console output when given;
    metrics.jsonl is always written, and TensorBoard logs with ``train.tensorboard``.
    A new run with a time budget and ``train.size = "auto"`` sizes itself
    (:mod:`charlm.training.sizing`), keeping the config fields named in ``keep``.
    """
    validate(cfg)
    dist = dist or Dist()
    main = dist.rank == 0
    if main and out_dir is not None:  # a directory charlm may not use: refused before set-up
        check_out_dir(Path(out_dir), resume is not None)
    # Training never stops because of its output: a lost stdout or stderr is turned off.
    with keep_going(), _out_of_gpu_memory(cfg):
        report = Monitors(_monitors(cfg, progress, monitors) if main else [])
        run = setup(text_path, cfg, resume, init_from, allow_other_data, drop_unknown, dist, keep)
        state = TrainState(loss_sum=torch.zeros((), device=run.device))
        if run.sizing is not None:  # the seconds spent choosing count in the budget
            state.elapsed = run.sizing.measure_seconds
        if resume is not None:
            run.notes += restore(resume, state, run.batcher, run.optimizer, cfg, dist,
                                 run.device, run.scaler)

        stem = Path(run.source_info["name"]).stem
        recorded = sizing.comment(run.sizing) + to_toml(cfg)
        with run_directory(out_dir, resume is not None, stem, cfg.model.cell, recorded,
                           create=main, notes=run.notes) as run_dir, report:
            # The first collective: a setup error on any rank (including the run directory
            # on rank 0) is reported there once, and every rank stops.
            run_dir = dist.broadcast_path(run_dir)
            report.on_start(header(run, state, run_dir, resume is not None))
            loop = Loop(run, state, run_dir, report, resume is not None, stop_at_step)
            stopped = loop.fit()
            total = loop.elapsed()

    if stopped == "nan":
        kept = (f"kept the last good checkpoint, {run_dir / 'last.pt'}"
                if (run_dir / "last.pt").exists() else "no checkpoint had been written yet")
        hint = ("; skipping cannot help once the weights have diverged" if cfg.train.on_nan == "skip"
                else ", or --set train.on_nan=skip to skip such steps")
        raise CharlmError(
            f"loss became NaN or infinite at step {loop.nan_step}; stopped and {kept}; try a "
            f"lower --lr or stronger clipping (--set train.grad_clip=0.5){hint}"
        )
    last_train, train_steps = loop.recent_train()
    return TrainResult(
        run_dir=run_dir, step=state.step, stopped=stopped, elapsed=total,
        chars_seen=state.chars_seen, chars_per_sec=loop.train_speed(),
        train_loss=last_train, val_loss=loop.last_val, best_val_loss=state.best_val_loss,
        num_parameters=run.model.num_parameters(), vocab_size=len(run.vocab),
        device=str(run.device), precision=run.precision, notes=run.notes,
        train_steps=train_steps, eval_seconds=loop.pacer.eval_total + loop.pacer.sample_total,
        evaluations=loop.pacer.evaluations,
        save_seconds=loop.save_seconds,
    )


# torch.OutOfMemoryError since torch 2.5; torch.cuda.OutOfMemoryError before.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@contextmanager
def _out_of_gpu_memory(cfg: Config) -> Iterator[None]:
    """The GPU running out of memory (the CPU's is a MemoryError) as one line naming the
    options that lower it; the run directory is unlocked and written files stay as they are."""
    try:
        yield
    except OUT_OF_MEMORY as exc:
        m, tc = cfg.model, cfg.train
        raise CharlmError(
            f"out of GPU memory ({first_line(exc).split('. ')[0]}); lower --batch-size (now "
            f"{tc.batch_size}), --seq-len (now {tc.seq_len}) or --hidden-size (now "
            f"{m.hidden_size}); checkpoints already written are unchanged"
        ) from None


def _monitors(cfg: Config, progress: bool | None, given: list[Monitor] | None) -> list[Monitor]:
    chosen: list[Monitor] = [MetricsFile()]
    chosen += [console(progress)] if given is None else list(given)
    if cfg.train.tensorboard:
        from charlm.training.tensorboard import TensorBoard  # the optional extra

        chosen.append(TensorBoard())
    return chosen


def setup(text_path: str | Path, cfg: Config, resume: dict[str, Any] | None,
          init_from: dict[str, Any] | None, allow_other_data: bool, drop_unknown: bool,
          dist: Dist, keep: frozenset[str] = frozenset()) -> Setup:
    """Device, precision, data, batcher, model (with a checkpoint's weights), optimizer and
    gradient scaler of a run. Every process runs it before the first collective."""
    tc = cfg.train
    device = dist.pick_device(tc.device, cfg.model.cell)
    precision = resolve_precision(tc.precision, device)
    plan = amp_plan(precision, device, cfg.model.cell)
    allow_tf32(device)
    if device.type == "cpu":
        # Processes sharing a machine share its cores.
        set_threads(tc.threads or max(1, cpu_count() // dist.local_world))

    base = resume or init_from
    if base is not None:
        old = checkpoint.config_of(base)
        checkpoint.check_weights(base)  # before anything is allocated for them
        diffs = checkpoint.shape_differences(old, cfg)
        if diffs:
            raise CheckpointError("the checkpoint's model has a different shape: " + "; ".join(diffs))
    corpus = load_corpus(
        text_path, vocab=checkpoint.vocab_of(base) if base is not None else None,
        encoding=cfg.data.encoding, errors=cfg.data.errors, drop_unknown=drop_unknown,
        newline=cfg.data.newline,
    )
    if resume is not None:
        trained_on = resume.get("train_file", {})
        if trained_on.get("sha256") != corpus.source.sha256 and not allow_other_data:
            raise DataError(
                f"{corpus.source.name} is not the text this run was trained on "
                f"({trained_on.get('name')}, different content); pass --allow-other-data "
                "to resume on it anyway"
            )
    notes = list(corpus.notes)
    if corpus.unknown:
        notes.append(f"dropped {corpus.unknown:,} characters outside the vocabulary")
    if corpus.crlf:
        notes.append("the text's Windows (CRLF) or CR line endings " + (
            "were kept as characters (data.newline=keep)" if cfg.data.newline == "keep"
            else "were read as \\n (--set data.newline=keep keeps them)"))
    vocab = corpus.vocab
    train_np, val_np = split(corpus.ids, cfg.data.val_fraction)
    choice = None
    if base is None and sizing.wanted(cfg):
        if dist.world > 1:
            raise ConfigError(
                "automatic sizing (a time budget and no shape) runs in one process; under "
                "torchrun give the shape (--config, --hidden-size, ...) or --size fixed")
        choice = sizing.size(tc.max_time, len(train_np), len(vocab), device, precision,
                             val_chars=len(val_np), eval_streams=tc.eval_streams)
        sizing.apply(choice, cfg, keep)
    check_split(train_np, val_np, corpus.source.name, cfg, dist.world)
    train_ids, val_ids = as_tensor(train_np, device), as_tensor(val_np, device)
    batcher = Batcher(train_ids, tc.batch_size * dist.world, tc.seq_len, tc.seed, dist.rank,
                      dist.world)

    torch.manual_seed(tc.seed)
    model = build_model(len(vocab), cfg.model).to(device)
    if base is not None:
        try:
            model.load_state_dict(base["model"])
        except (RuntimeError, TypeError, KeyError) as exc:
            raise CheckpointError(
                f"the checkpoint's weights do not fit its config ({first_line(exc)})"
            ) from None
    if dist.rank:  # each process its own dropout masks; rank 0 keeps the 1-process stream
        torch.manual_seed(tc.seed + dist.rank)
    optimizer = make_optimizer(model, tc, device)
    return Setup(
        cfg=cfg, dist=dist, device=device, precision=precision,
        source_info={**corpus.source.describe(), "path": str(Path(text_path).resolve())},
        chars=len(corpus.ids), vocab=vocab, val_ids=val_ids, batcher=batcher, model=model,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=plan.loss_scaling),
        amp=autocast(device, precision), plan=plan,
        sample_seed=vocab.decode(train_np[: min(8, len(train_np))]),
        notes=notes, vocab_growth=checkpoint.growth_of(base), sizing=choice,
    )


def check_split(train_np: np.ndarray, val_np: np.ndarray, name: str, cfg: Config,
                world: int) -> None:
    """Refuse a text too short for one batch of every process, or to validate on."""
    tc = cfg.train
    need = tc.batch_size * world * tc.seq_len + 1
    if len(train_np) < need:
        # The smallest text whose training split (the cut of data.split) holds ``need``.
        keep = 1.0 - cfg.data.val_fraction
        text_need = math.ceil(need / keep)
        while int(text_need * keep) < need:
            text_need += 1
        while int((text_need - 1) * keep) >= need:
            text_need -= 1
        per = f" x {world} processes" if world > 1 else ""
        raise DataError(
            f"{name} is too short: {len(train_np):,} training characters, but "
            f"--batch-size {tc.batch_size}{per} x --seq-len {tc.seq_len} needs at least "
            f"{need:,}; {'use fewer processes, ' if world > 1 else ''}lower --batch-size "
            f"or --seq-len, or use at least {text_need:,} characters of text"
        )
    if len(val_np) < 2:
        raise DataError(
            f"validation split has {len(val_np)} characters; raise data.val_fraction "
            "or use more text"
        )


def header(run: Setup, state: TrainState, run_dir: Path, resumed: bool) -> Header:
    """What the run is about to do, for the monitors."""
    tc, m = run.cfg.train, run.cfg.model
    limits = [f"{tc.max_steps:,} steps"] * bool(tc.max_steps)
    limits += [f"{tc.max_time:g} s"] * bool(tc.max_time)
    limits += [f"{tc.max_epochs:g} epochs"] * bool(tc.max_epochs)
    limits += [f"patience {tc.patience} evaluations"] * bool(tc.patience)
    dropout = f", dropout {m.dropout:g}" if m.dropout else ""
    return Header(
        file=run.source_info["name"], chars=run.chars, vocab_size=len(run.vocab),
        model=f"{m.cell} {m.hidden_size} x {m.num_layers}, embedding {m.embed_size}{dropout}",
        parameters=run.model.num_parameters(), device=str(run.device), precision=run.plan.describe(),
        batch_size=tc.batch_size, seq_len=tc.seq_len, world=run.dist.world,
        limits=(", ".join(limits) or "none (Ctrl-C stops and saves)")
        + "; " + Pacer(tc.eval_every, tc.log_every, tc.max_steps, tc.max_time, tc.max_epochs,
                       run.batcher.steps_per_epoch).describe(),
        run_dir=run_dir, start_step=state.step, max_steps=tc.max_steps, resumed=resumed,
        best_val_loss=state.best_val_loss, notes=list(run.notes),
        sizing=run.sizing.reason() if run.sizing else "",
    )

