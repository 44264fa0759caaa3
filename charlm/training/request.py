"""What ``charlm train`` and ``charlm.train()`` ask for, resolved and carried out by one
function, :func:`execute`: the option checks, a resumed run (its config and training file),
``--init-from`` (and growing its vocabulary), the config's layers (defaults or the resumed
run's, a TOML file, the typed options, ``--set``), validation, automatic sizing and the dry
run, then :func:`charlm.training.setup.train`.

The front ends only parse and render: what the command prints along the way comes back as
lines through ``on_note(text, minor)``, and the result is a
:class:`~charlm.training.setup.TrainResult`, or a :class:`~charlm.training.dry_run.DryRun`.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charlm.config import Config, apply_options, apply_overrides, load_toml, validate
from charlm.errors import CharlmError, ConfigError, printable
from charlm.training.distributed import Dist
from charlm.training.dry_run import DryRun

if TYPE_CHECKING:
    from charlm.training.setup import TrainResult


@dataclass
class TrainRequest:
    """A training run as asked for; ``None`` and empty fields are "not given"."""

    file: Path | None = None  # default: the resumed run's file, else tiny Shakespeare
    config: Path | None = None  # a TOML file over the defaults (or the resumed run's config)
    # The typed options of ``charlm train``, by parameter name (``{"seq_len": 64}``; None:
    # not given); errors name their flag (charlm.config.apply_options).
    options: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)  # --set section.key=value, over the options
    overrides: dict[str, Any] = field(default_factory=dict)  # charlm.train(**overrides), by field
    out_dir: Path | None = None
    resume: Path | None = None  # a run directory (its last.pt) or a checkpoint
    init_from: Path | None = None  # a checkpoint, or a run directory (its best.pt)
    allow_other_data: bool = False
    drop_unknown: bool = False
    grow_vocab: bool = False
    no_samples: bool = False
    stop_at_step: int = 0
    dry_run: bool = False
    progress: bool | None = None


@dataclass
class Resolved:
    """A request resolved: what :func:`charlm.training.setup.train` is called with."""

    file: Path
    cfg: Config
    out_dir: Path | None  # a resumed run's own directory unless --out names another
    resume: dict[str, Any] | None  # the loaded checkpoints
    init_from: dict[str, Any] | None
    keep: frozenset[str]  # the keys automatic sizing keeps (charlm.training.sizing.settle)


# What the command prints on stderr before training: on_note(text, minor), ``minor`` for a
# dim aside ("using runs/x/best.pt"); charlm.train() logs it on the "charlm" logger.
OnNote = Callable[..., None]


def _log(text: str, minor: bool = False) -> None:
    logging.getLogger("charlm").info(text)


def execute(request: TrainRequest, dist: Dist | None = None,
            on_note: OnNote | None = None) -> TrainResult | DryRun | None:
    """Resolve ``request`` and train (a :class:`TrainResult`), or with ``dry_run`` return what
    would be trained (a :class:`DryRun`; None on the processes other than rank 0)."""
    from charlm.training import setup  # looked up at the call: tests replace setup.train

    dist = dist or Dist()
    say = on_note or _log
    r = resolve(request, dist, say)
    if request.dry_run:
        from charlm.training.dry_run import dry_run

        return dry_run(r.file, r.cfg, r.resume or r.init_from) if dist.rank == 0 else None
    return setup.train(
        r.file, r.cfg, out_dir=r.out_dir, resume=r.resume, init_from=r.init_from,
        allow_other_data=request.allow_other_data, drop_unknown=request.drop_unknown,
        stop_at_step=request.stop_at_step, progress=request.progress, dist=dist, keep=r.keep,
    )


def check_combinations(request: TrainRequest) -> None:
    """Refuse options that do not go together, by their command-line names."""
    q = request
    if q.resume and q.init_from:
        raise ConfigError("--resume and --init-from cannot be used together")
    if q.allow_other_data and not q.resume:
        raise ConfigError("--allow-other-data only applies with --resume")
    if q.drop_unknown and not (q.resume or q.init_from):
        raise ConfigError("--drop-unknown only applies with --resume or --init-from "
                          "(a new run's vocabulary is built from its text)")
    if q.grow_vocab and (not q.init_from or q.drop_unknown):
        raise ConfigError("--grow-vocab only applies with --init-from, and not with --drop-unknown")
    if q.no_samples and q.options.get("sample_every"):
        raise ConfigError("--no-samples and --sample-every cannot be used together")


def resolve(request: TrainRequest, dist: Dist, say: OnNote) -> Resolved:
    """Everything decided before training, in the order the command has always done it (so
    that of two mistakes the same one is reported)."""
    from charlm.data.corpus import default_corpus
    from charlm.runs.directory import check_resume_out, checkpoint_in
    from charlm.storage import checkpoint
    from charlm.training.sizing import settle

    check_combinations(request)
    file = Path(request.file) if request.file is not None else None
    out_dir = Path(request.out_dir) if request.out_dir is not None else None
    resume_ckpt = init_ckpt = None
    if request.resume is not None:
        resume = Path(request.resume)
        ckpt_path = resume / "last.pt" if resume.is_dir() else resume
        resume_ckpt = checkpoint.load(ckpt_path)
        if "train_state" not in resume_ckpt:
            raise CharlmError(f"{ckpt_path} has no training state to resume (exported weights?)")
        cfg = checkpoint.config_of(resume_ckpt)
        out_dir = out_dir or ckpt_path.parent
        check_resume_out(ckpt_path, out_dir)
        if file is None:
            file = _recorded_file(resume_ckpt, resume)
    else:
        cfg = Config()
        if request.init_from is not None:
            found = checkpoint_in(Path(request.init_from))
            if found != Path(request.init_from):
                say(f"using {found}", minor=True)
            init_ckpt = checkpoint.load(found)
            cfg.model = checkpoint.config_of(init_ckpt).model
    given: set[str] = set()
    if request.config is not None:
        cfg = load_toml(request.config, cfg, given)
    sources = apply_options(cfg, request.options, request.sets)
    given |= apply_overrides(cfg, request.overrides, source="charlm.train()")
    if request.no_samples:
        cfg.train.sample_chars = 0
    validate(cfg, sources)
    keep: frozenset[str] = frozenset()
    if resume_ckpt is None:
        given |= set(sources) | {item.partition("=")[0].strip() for item in request.sets}
        if init_ckpt is not None:
            given.add("model.cell")  # the checkpoint's shape
        keep = settle(cfg, given)
    if file is None:
        file = default_corpus()
        if dist.rank == 0:
            say(f"training on tiny Shakespeare: {printable(file)}")
    if request.stop_at_step < 0:
        raise ConfigError(f"--stop-at-step must be >= 0; got {request.stop_at_step}")
    if request.grow_vocab:
        init_ckpt = _grow(init_ckpt, file, cfg, dist, say)
    return Resolved(file, cfg, out_dir, resume_ckpt, init_ckpt, keep)


def _recorded_file(ckpt: dict[str, Any], resume: Path) -> Path:
    """The training file a resumed run recorded, when it is still there."""
    source = ckpt.get("train_file")
    recorded = source.get("path") if isinstance(source, dict) else None
    if not recorded or not Path(recorded).exists():
        raise CharlmError(
            f"the run's training file {recorded or '(not recorded)'} is not there; "
            f"name it: charlm train FILE --resume {shlex.quote(str(resume))}"
        )
    return Path(recorded)


def _grow(init_ckpt: dict[str, Any], file: Path, cfg: Config, dist: Dist,
          say: OnNote) -> dict[str, Any]:
    """``--grow-vocab``: the --init-from checkpoint with the text's new characters added."""
    from charlm.data.batching import scan_code_points
    from charlm.data.vocab import show_chars
    from charlm.storage import checkpoint

    present = scan_code_points(file, cfg.data.encoding, cfg.data.errors, newline=cfg.data.newline)
    grown, added = checkpoint.grow_vocab(init_ckpt, present)
    if dist.rank == 0:
        say(f"vocabulary grown by {len(added)} characters: {show_chars(added)}" if added
            else "vocabulary not grown: the text has no new characters")
    return grown


def run(path: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None, progress: bool = True,
        resume: str | os.PathLike | None = None, init_from: str | os.PathLike | None = None,
        grow_vocab: bool = False, drop_unknown: bool = False, allow_other_data: bool = False,
        stop_at_step: int = 0, dry_run: bool = False, **overrides: Any):
    """The Python API's ``charlm.train(...)``: what ``charlm train`` does.

    Trains a new model on ``path`` (a text file or a directory of ``*.txt``; default: the
    bundled tiny Shakespeare, or the file a resumed run was trained on). ``config`` is a TOML
    file like ``configs/cpu.toml``; ``overrides`` set any config field by name (``cell="gru"``,
    ``hidden_size=128``, ``max_steps=500``, ``lr=2e-3``, ...); ``out`` is the run directory
    (default ``runs/<stem>-<cell>``, or the resumed run's). ``resume`` continues a run (its
    directory or a checkpoint) exactly as ``charlm train --resume`` does; ``init_from`` starts
    from a checkpoint's weights (``grow_vocab``: adding the text's new characters);
    ``drop_unknown``, ``allow_other_data`` and ``stop_at_step`` are the options of the same
    names. Returns a :class:`TrainResult` (``run_dir``, ``step``, ``best_val_loss``, ...), or
    with ``dry_run`` a :class:`DryRun` (``config``, ``config_toml``, ``num_parameters``,
    ``vocab_size``) without training. What the command prints before training is logged on
    the ``charlm`` logger."""
    def path_of(value: Any, name: str) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"charlm.train(): {name} must be a path, got {type(value).__name__}")
        return Path(value)

    if not isinstance(stop_at_step, int) or isinstance(stop_at_step, bool):
        raise ConfigError(f"charlm.train(): stop_at_step must be int, got {stop_at_step!r}")
    request = TrainRequest(
        file=path_of(path, "path"), config=path_of(config, "config"), overrides=overrides,
        out_dir=path_of(out, "out"), resume=path_of(resume, "resume"),
        init_from=path_of(init_from, "init_from"), allow_other_data=bool(allow_other_data),
        drop_unknown=bool(drop_unknown), grow_vocab=bool(grow_vocab),
        stop_at_step=stop_at_step, dry_run=bool(dry_run), progress=progress,
    )
    return execute(request)
