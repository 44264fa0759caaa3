"""Training: AdamW with warmup and cosine decay, truncated BPTT over carried state,
periodic evaluation of the full validation split, and resumable checkpoints.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from charlm import checkpoint, resume_state
from charlm.config import Config, to_toml, validate
from charlm.data import Batcher, as_tensor, load_corpus, split
from charlm.device import autocast, cpu_count, resolve_precision, set_threads
from charlm.distributed import Dist, restack_rows
from charlm.errors import CharlmError, CheckpointError, DataError
from charlm.evaluate import LN2, mean_loss
from charlm.model import build_model, detach_state, state_from_tensors, state_tensors
from charlm.runs import MetricsLog, RunLock, new_run_dir, open_run_dir
from charlm.sample import generate

EXIT_INTERRUPTED = 130
# With train.on_nan = "skip", this many non-finite steps in a row end training anyway: the
# run has diverged and skipping only burns time.
MAX_SKIPS_IN_ROW = 20


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # why training ended: max_steps, max_time, max_epochs, patience, ...
    elapsed: float
    chars_seen: int
    chars_per_sec: float
    train_loss: float
    val_loss: float
    best_val_loss: float
    num_parameters: int
    vocab_size: int
    device: str
    precision: str
    notes: list[str] = field(default_factory=list)


def lr_at(step: int, progress: float, cfg) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` as
    ``progress`` (fraction of the planned run done) goes from 0 to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def planned_progress(step: int, elapsed: float, epochs: float, cfg) -> float:
    """How far the run is through its limits (the nearest one wins)."""
    fractions = [0.0]
    if cfg.max_steps:
        fractions.append(step / cfg.max_steps)
    if cfg.max_time:
        fractions.append(elapsed / cfg.max_time)
    if cfg.max_epochs:
        fractions.append(epochs / cfg.max_epochs)
    return max(fractions)


def rng_state() -> dict[str, Any]:
    """Every random state, as tensors and plain lists (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _seek(batcher: Batcher, progress: float) -> None:
    """Move ``batcher`` to ``progress`` epochs (a fraction), at a window boundary."""
    epoch = int(progress)
    batcher.load_state_dict({"epoch": epoch, "index": 0})
    index = round((progress - epoch) * batcher.steps_per_epoch)
    batcher.load_state_dict({"epoch": epoch, "index": index})


class StopSignals:
    """First SIGINT/SIGTERM asks the loop to stop after the current step (it then saves);
    a second one exits at once. Files are always replaced atomically, so nothing is torn."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce  # only one process of a distributed run speaks
        self.previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def _handle(self, signum, frame):
        if self.signum:
            import os

            os._exit(EXIT_INTERRUPTED)
        self.signum = signum
        if not self.announce:
            return
        try:  # stderr, with the progress bar and the final "Resume with" line
            tqdm.write("stopping after this step and saving last.pt (press Ctrl-C again to "
                       "quit now)", file=sys.stderr)
        except (RuntimeError, OSError):  # the handler interrupted a write to the same stream
            pass

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _param_groups(model, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(model, cfg, device: torch.device) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    try:  # fused kernels exist for CPU and CUDA in recent torch
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def train(
    text_path: str | Path,
    cfg: Config,
    out_dir: str | Path | None = None,
    resume: dict[str, Any] | None = None,
    init_from: dict[str, Any] | None = None,
    allow_other_data: bool = False,
    drop_unknown: bool = False,
    stop_at_step: int = 0,
    progress: bool = True,
    dist: Dist | None = None,
) -> TrainResult:
    """Train a model on ``text_path``; ``resume`` and ``init_from`` are loaded checkpoints."""
    validate(cfg)
    dist = dist or Dist()
    tc = cfg.train
    device = dist.pick_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    if device.type == "cpu":
        # Processes sharing a machine share its cores.
        set_threads(tc.threads or max(1, cpu_count() // dist.local_world))
    notes: list[str] = []

    base = resume or init_from
    if base is not None:
        old = checkpoint.config_of(base)
        checkpoint.check_weights(base)  # before anything is allocated for them
        diffs = checkpoint.shape_differences(old, cfg)
        if diffs:
            raise CheckpointError(
                "the checkpoint's model has a different shape: " + "; ".join(diffs)
            )
    vocab = checkpoint.vocab_of(base) if base is not None else None
    corpus = load_corpus(
        text_path, vocab=vocab, encoding=cfg.data.encoding, errors=cfg.data.errors,
        drop_unknown=drop_unknown,
    )
    if resume is not None:
        trained_on = resume.get("train_file", {})
        if trained_on.get("sha256") != corpus.source.sha256 and not allow_other_data:
            raise DataError(
                f"{corpus.source.name} is not the text this run was trained on "
                f"({trained_on.get('name')}, different content); pass --allow-other-data "
                "to resume on it anyway"
            )
    notes += corpus.notes
    if corpus.unknown:
        notes.append(f"dropped {corpus.unknown:,} characters outside the vocabulary")
    if corpus.crlf:
        notes.append("the text has Windows (CRLF) line endings; they are kept as characters")
    vocab = corpus.vocab
    train_np, val_np = split(corpus.ids, cfg.data.val_fraction)
    need = tc.batch_size * dist.world * tc.seq_len + 1
    if len(train_np) < need:
        # The smallest text whose training split (the cut of data.split) holds ``need``.
        keep = 1.0 - cfg.data.val_fraction
        text_need = math.ceil(need / keep)
        while int(text_need * keep) < need:
            text_need += 1
        while int((text_need - 1) * keep) >= need:
            text_need -= 1
        per = f" x {dist.world} processes" if dist.world > 1 else ""
        raise DataError(
            f"{corpus.source.name} is too short: {len(train_np):,} training characters, but "
            f"--batch-size {tc.batch_size}{per} x --seq-len {tc.seq_len} needs at least "
            f"{need:,}; {'use fewer processes, ' if dist.world > 1 else ''}lower --batch-size "
            f"or --seq-len, or use at least {text_need:,} characters of text"
        )
    if len(val_np) < 2:
        raise DataError(
            f"validation split has {len(val_np)} characters; raise data.val_fraction "
            "or use more text"
        )
    train_ids, val_ids = as_tensor(train_np, device), as_tensor(val_np, device)
    B, T = tc.batch_size, tc.seq_len
    batcher = Batcher(train_ids, B * dist.world, T, tc.seed, dist.rank, dist.world)

    torch.manual_seed(tc.seed)
    model = build_model(len(vocab), cfg.model).to(device)
    if base is not None:
        try:
            model.load_state_dict(base["model"])
        except (RuntimeError, TypeError, KeyError) as exc:
            raise CheckpointError(
                f"the checkpoint's weights do not fit its config ({_first_line(exc)})"
            ) from None
    if dist.rank:  # each process its own dropout masks; rank 0 keeps the 1-process stream
        torch.manual_seed(tc.seed + dist.rank)
    optimizer = make_optimizer(model, tc, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = autocast(device, precision)

    step, elapsed_before, chars_seen = 0, 0.0, 0
    best_val, evals_since_best = math.inf, 0
    loss_sum, loss_count = torch.zeros((), device=device), 0
    state = None
    if resume is not None:
        try:
            old_cfg = checkpoint.config_of(resume)
            # Every tensor checked against this run and copied: a crafted one can corrupt memory.
            ts = resume_state.train_state(resume["train_state"], old_cfg.model,
                                          old_cfg.train.batch_size)
            optimizer.load_state_dict(resume_state.optimizer_state(resume["optimizer"], optimizer))
            step, elapsed_before, chars_seen = ts["step"], ts["elapsed"], ts["chars_seen"]
            best_val, evals_since_best = ts["best_val_loss"], ts["evals_since_best"]
            loss_sum += ts["loss_sum"]
            loss_count = ts["loss_count"]
            old_tc = old_cfg.train
            if old_cfg.data.val_fraction != cfg.data.val_fraction:
                notes.append(
                    f"data.val_fraction changed ({old_cfg.data.val_fraction:g} -> "
                    f"{cfg.data.val_fraction:g}): validation losses from before the resume, and "
                    "best.pt's, were measured on another split"
                )
            old_layout = (old_tc.batch_size, old_tc.seq_len, ts.get("world", 1))
            if old_layout == (B, T, dist.world):
                batcher.load_state_dict(ts["batcher"])
                if ts["carried_state"] is not None:
                    tensors = [t.to(device) for t in ts["carried_state"][dist.rank]]
                    state = state_from_tensors(tensors, cfg.model.cell)
            elif old_layout[1] == T and old_layout[0] * old_layout[2] == B * dist.world:
                # Another number of processes over the same streams: the same windows, so
                # the data order and each stream's carried state go on exactly.
                batcher.load_state_dict(ts["batcher"])
                if ts["carried_state"] is not None:
                    tensors = [t.to(device) for t in restack_rows(ts["carried_state"], dist.rank, B)]
                    state = state_from_tensors(tensors, cfg.model.cell)
                notes.append(
                    f"resumed a {old_layout[2]}-process run on {dist.world} process(es) over the "
                    f"same {B * dist.world} streams: the data order is unchanged"
                )
            else:
                # The saved (epoch, index) and carried state describe other windows: go on
                # from the same point of the epoch with a fresh state.
                _seek(batcher, float(ts["epoch"]))
                notes.append(
                    f"batch_size x seq_len x processes changed ({old_layout[0]}x"
                    f"{old_layout[1]}x{old_layout[2]} -> {B}x{T}x{dist.world}): resumed at "
                    f"epoch {batcher.progress:.3f} with a fresh state, not an exact continuation"
                )
            if dist.rank < len(ts["rng"]):  # a new rank keeps its own seed from above
                set_rng_state(ts["rng"][dist.rank])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise CheckpointError(
                f"the checkpoint's training state cannot be restored ({_first_line(exc)})"
            ) from None

    main = dist.rank == 0
    if main:
        if out_dir is not None:
            run_dir = open_run_dir(Path(out_dir), resuming=resume is not None)
        else:
            run_dir = new_run_dir(Path(corpus.source.name).stem, cfg.model.cell)
        lock = RunLock(run_dir)
        checkpoint.atomic_write_text(run_dir / "config.toml", to_toml(cfg))
        metrics = MetricsLog(run_dir / "metrics.jsonl", step if resume is not None else None)
    else:
        run_dir, lock, metrics = Path(out_dir or "."), None, None
    # The first collective: a setup error on any rank (including the run directory on
    # rank 0) is reported there once, and every rank stops.
    run_dir = dist.broadcast_path(run_dir)
    dmodel = dist.wrap(model)

    sample_seed = vocab.decode(train_np[: min(8, len(train_np))])
    source_info = {**corpus.source.describe(), "path": str(Path(text_path).resolve())}

    def snapshot() -> dict[str, Any]:
        states = dist.gather_objects(
            None if state is None else [t.cpu() for t in state_tensors(state)]
        )
        rngs = dist.gather_objects(rng_state())
        replicas = dist.replica_digests(model)  # raises if the processes' copies differ
        return checkpoint.make_checkpoint(
            model, cfg, vocab,
            optimizer=optimizer.state_dict(),
            train_file=source_info,
            train_state={
                "step": step, "epoch": batcher.progress, "batcher": batcher.state_dict(),
                "carried_state": None if states[0] is None else states,
                "rng": rngs, "elapsed": elapsed(), "chars_seen": chars_seen,
                "best_val_loss": best_val, "evals_since_best": evals_since_best,
                # The mean over processes, so that each can go on from it after a resume.
                "loss_sum": float(dist.mean(loss_sum)), "loss_count": loss_count,
                "world": dist.world, "replicas": replicas,
            },
        )

    t_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def evaluate_and_save() -> bool:
        """Evaluate and write the checkpoints; False (nothing written) when the validation
        loss is not finite, so diverged weights never replace the last good checkpoint."""
        nonlocal last_val, best_val, evals_since_best, saved_step
        last_val = mean_loss(model, val_ids, tc.eval_streams, tc.eval_seq_len, amp,
                             dist.rank, dist.world, dist.all_reduce_sum)
        if not math.isfinite(last_val):
            return False
        improved = last_val < best_val
        if improved:
            best_val, evals_since_best = last_val, 0
        else:
            evals_since_best += 1
        if main:
            metrics.write({
                "kind": "eval", "step": step, "epoch": round(batcher.progress, 6),
                "chars": chars_seen, "val_loss": last_val, "val_bpc": last_val / LN2,
                "best": improved, "elapsed": round(elapsed(), 3),
            })
            bar.set_postfix(loss=f"{last_train:.3f}", val=f"{last_val:.3f}")
        _save_eval_checkpoints(snapshot(), run_dir, improved, step, tc.keep_last, main)
        saved_step = step
        return True

    signals = StopSignals(announce=main)
    bar = tqdm(
        total=tc.max_steps or None, initial=step, unit="step", dynamic_ncols=True,
        disable=not (progress and main), leave=False,
    )
    last_train, last_val = math.nan, math.nan
    stopped = ""
    nan_step, skipped, skips_in_row = 0, 0, 0
    saved_step = step if resume is not None else -1
    # With sample_every not a multiple of eval_every, sample at the first evaluation past
    # each multiple of it (a plain step % sample_every test would wait for their LCM).
    sampled_at = step
    rate_t, rate_chars = time.perf_counter(), chars_seen
    model.train()
    try:
        while True:
            # Clocks differ between processes: they follow rank 0's, so that all stop at
            # the same step and use the same learning rate.
            now = dist.agree(elapsed()) if tc.max_time else elapsed()
            if tc.max_steps and step >= tc.max_steps:
                stopped = "max_steps"
            elif tc.max_time and now >= tc.max_time:
                stopped = "max_time"
            elif tc.max_epochs and batcher.progress >= tc.max_epochs:
                stopped = "max_epochs"
            elif stop_at_step and step >= stop_at_step:
                stopped = "stop_at_step"
            elif dist.any(signals.signum != 0):
                stopped = "interrupted"
            if stopped:
                break
            if batcher.new_epoch or state is None:
                state = model.init_state(B)
            x, y = batcher.next()  # (B, T)
            lr = lr_at(step, planned_progress(step, now, batcher.progress, tc), tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with amp:
                logits, new_state = dmodel(x, state)  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf
            )
            check_now = device.type == "cpu" or tc.on_nan == "skip" or (step + 1) % tc.log_every == 0
            # Both are >= 0, so the sum is finite exactly when both are. Under fp16 the scaler
            # itself skips steps with inf gradients, so only the loss is watched there.
            watched = loss.detach() if scaler.is_enabled() else loss.detach() + grad_norm.detach()
            if check_now and not dist.all_finite(watched):
                skips_in_row += 1
                if (tc.on_nan == "skip" and skips_in_row <= MAX_SKIPS_IN_ROW
                        and _weights_finite(model)):
                    optimizer.zero_grad(set_to_none=True)
                    state = None  # the new state may hold NaN: restart the streams from zero
                    skipped += 1
                    if main:
                        tqdm.write(f"skipped a non-finite loss at step {step + 1}", file=sys.stderr)
                    step += 1
                    continue
                stopped, nan_step = "nan", step + 1
                break
            skips_in_row = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state = detach_state(new_state)
            step += 1
            chars_seen += B * T * dist.world
            loss_sum += loss.detach()
            loss_count += 1
            bar.update(1)

            if step % tc.log_every == 0:
                last_train = float(dist.mean(loss_sum / loss_count))
                now = time.perf_counter()
                rate = (chars_seen - rate_chars) / max(now - rate_t, 1e-9)
                rate_t, rate_chars = now, chars_seen
                loss_sum.zero_()
                loss_count = 0
                if main:
                    metrics.write({
                        "kind": "train", "step": step, "epoch": round(batcher.progress, 6),
                        "chars": chars_seen, "lr": lr, "loss": last_train,
                        "bpc": last_train / LN2, "grad_norm": float(grad_norm),
                        "elapsed": round(elapsed(), 3), "chars_per_sec": round(rate, 1),
                    })
                    bar.set_postfix(loss=f"{last_train:.3f}", val=f"{last_val:.3f}",
                                    cps=f"{rate:,.0f}")

            if step % tc.eval_every == 0:
                if not evaluate_and_save():
                    stopped, nan_step = "nan", step
                    break
                due = not tc.sample_every or step // tc.sample_every > sampled_at // tc.sample_every
                if main and tc.sample_chars and due:
                    sampled_at = step
                    text = generate(model.eval(), vocab, vocab.encode(sample_seed).tolist(),
                                    tc.sample_chars, temperature=0.8, random_seed=tc.seed)[0]
                    model.train()
                    tqdm.write(f"--- sample at step {step} (val {last_val:.3f}) ---\n"
                               f"{sample_seed}{text}\n---")
                if tc.patience and evals_since_best >= tc.patience:
                    stopped = "patience"
                    evals = "1 evaluation" if tc.patience == 1 else f"{tc.patience} evaluations"
                    notes.append(f"early stopping: no new best in {evals}")
                    break
    finally:
        bar.close()
        signals.restore()

    if skipped:
        notes.append(f"skipped {skipped:,} step(s) with a non-finite loss (train.on_nan=skip)")
    if saved_step != step and stopped != "nan":
        if stopped in ("interrupted", "stop_at_step") and _weights_finite(model):
            ckpt = snapshot()
            if main:
                checkpoint.save(run_dir / "last.pt", ckpt)
        elif stopped in ("interrupted", "stop_at_step") or not evaluate_and_save():
            # so last.pt and best.pt reflect the end of training, unless it diverged
            stopped, nan_step = "nan", step
    if stopped == "nan":
        if main:
            metrics.close()
            lock.release()
        kept = (f"kept the last good checkpoint, {run_dir / 'last.pt'}"
                if (run_dir / "last.pt").exists() else "no checkpoint had been written yet")
        hint = ("; skipping cannot help once the weights have diverged" if tc.on_nan == "skip"
                else ", or --set train.on_nan=skip to skip such steps")
        raise CharlmError(
            f"loss became NaN or infinite at step {nan_step}; stopped and {kept}; try a lower "
            f"--lr or stronger clipping (--set train.grad_clip=0.5){hint}"
        )
    total = elapsed()
    if main:
        metrics.close()
        lock.release()
    if loss_count and math.isnan(last_train):
        last_train = float(dist.mean(loss_sum / loss_count))
    return TrainResult(
        run_dir=run_dir, step=step, stopped=stopped, elapsed=total, chars_seen=chars_seen,
        chars_per_sec=chars_seen / max(total, 1e-9), train_loss=last_train, val_loss=last_val,
        best_val_loss=best_val, num_parameters=model.num_parameters(), vocab_size=len(vocab),
        device=str(device), precision=precision, notes=notes,
    )


def _weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _save_eval_checkpoints(ckpt, run_dir: Path, improved: bool, step: int, keep_last: int,
                           main: bool) -> None:
    """best.pt first (when improved), then last.pt, then the numbered copies."""
    if not main:
        return
    if improved:
        checkpoint.save(run_dir / "best.pt", ckpt)
    checkpoint.save(run_dir / "last.pt", ckpt)
    if keep_last:
        checkpoint.save(run_dir / f"step-{step:08d}.pt", ckpt)
        for old in sorted(run_dir.glob("step-*.pt"))[:-keep_last]:
            old.unlink(missing_ok=True)
