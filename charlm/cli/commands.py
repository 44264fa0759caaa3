"""The ``charlm`` command. It parses options, calls one library function per command and
renders the result; it is the only module that knows about typer and rich.

Over 300 lines: one short section per command, and typer's options read best one per line."""

from __future__ import annotations

import errno
import os
import re
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from charlm.cli.options import config_options
from charlm.errors import CharlmError, ConfigError, internal_error, path_error, printable

app = typer.Typer(
    help="Character-level RNN/LSTM/GRU language models: train, sample, evaluate, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# No markup: file names, run names and messages are printed literally ("[v2] exp" stays so).
out = Console(highlight=False, markup=False, soft_wrap=True)  # a line is never broken
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


_literal = printable  # every user-supplied string is printed through it


def _error(message: str) -> None:
    # One line whatever the message quotes (a file name or --set value with a newline in it).
    err.print(Text.assemble(("error: ", "bold red"), _literal(message)))


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=_literal(title), show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True)
    for key, value in rows:
        table.add_row(_literal(key), _literal(value))
    return table


def _print_table(console: Console, table: Table) -> None:
    """Print ``table`` with every cell on one line: when it is wider than the terminal it is
    rendered at its own width (the terminal may wrap the long lines, but a run name or a path
    is never cut or folded, so ``charlm runs | grep NAME`` finds it)."""
    from rich.cells import cell_len
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    width = max(natural, cell_len(str(table.title or "")))
    if width > console.width:
        console = Console(file=console.file, width=width, highlight=False, markup=False,
                          color_system=console.color_system, force_terminal=console.is_terminal)
    console.print(table, soft_wrap=False)  # laid out at the width measured above


def _print_json(document: dict) -> None:
    """One JSON document on stdout; NaN and infinity (no value yet) become null."""
    import json
    import math

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    sys.stdout.write(json.dumps(clean(document), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


JSON_OPTION = typer.Option("--json", help="Print one JSON document (fields: docs/commands.md) instead of a table.")


def _checkpoint(path: Path) -> Path:
    """A checkpoint option or argument: a file, or a run directory (its best.pt, said)."""
    from charlm.runs.directory import checkpoint_in

    found = checkpoint_in(path)
    if found != path:
        err.print(Text(f"using {found}", style="dim"))
    return found


def _show_version(value: bool) -> None:
    if value:
        from charlm._version import __version__

        out.print(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Character-level RNN/LSTM/GRU language models: train, sample, evaluate, export."""


# ---------------------------------------------------------------------------------- train
def _random_seed(random_seed: int | None, seed: int | None) -> int | None:
    """``train --random-seed``, or its old spelling ``--seed`` (with a note: in ``sample``,
    --seed is the text to start from)."""
    if seed is None:
        return random_seed
    if random_seed is not None:
        raise ConfigError("--seed is the old spelling of --random-seed; give only --random-seed")
    err.print("note: train --seed is deprecated and will be removed; use --random-seed "
              "(as in every command; in sample, --seed is the text to start from)")
    return seed


def _default(key: str) -> str:
    """A config field's default, as ``train --help`` shows it (a --config file overrides)."""
    from charlm.config import SETTINGS

    return SETTINGS[key].default_text()


@app.command()
@config_options
def train(
    file: Annotated[Path | None, typer.Argument(
        help="UTF-8 text file, or a directory of *.txt files. Default: tiny Shakespeare "
        "(shipped with charlm), or the file a resumed run was trained on.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config, e.g. configs/cpu.toml; options given here override it.")] = None,
    # The typed options of every config field with a flag (--cell, --seq-len, ...), made from
    # charlm.config.SETTINGS by @config_options and passed here as one dict.
    options: dict | None = None,
    seed: Annotated[int | None, typer.Option(hidden=True, help="Deprecated spelling of --random-seed.")] = None,
    no_samples: Annotated[bool, typer.Option("--no-samples", help="Print no samples during training.")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<stem>-<cell>).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any field: section.key=value (repeatable).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue a run: its directory or a checkpoint.")] = None,
    init_from: Annotated[Path | None, typer.Option(help="Start a new run from a checkpoint's weights.")] = None,
    allow_other_data: Annotated[bool, typer.Option("--allow-other-data", help="Resume on a file other than the run's.")] = False,
    drop_unknown: Annotated[bool, typer.Option("--drop-unknown", help="Drop characters outside an --init-from vocabulary.")] = False,
    grow_vocab: Annotated[bool, typer.Option("--grow-vocab", help="Add the text's new characters to an --init-from vocabulary.")] = False,
    stop_at_step: Annotated[int, typer.Option(help="Pause at this step (resumable; the schedule is unchanged).")] = 0,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="A progress bar, or one plain line per log step and evaluation. Default: the bar when stderr is a terminal.")] = None,
    dist_timeout: Annotated[float | None, typer.Option(help="Under torchrun: seconds to wait for a stalled process before all stop.", show_default="300")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the model's size, and exit without training.")] = False,
) -> None:
    """Train a model on a text file. Under torchrun, trains one model over all processes."""
    from charlm.signals import EXIT_INTERRUPTED
    from charlm.training.distributed import from_env
    from charlm.training.dry_run import DryRun
    from charlm.training.request import TrainRequest, execute

    # Under torchrun: join the other processes first, so that an error in any process's
    # setup is reported once and stops them all.
    with from_env(dist_timeout) as dist:
        options = {**options, "random_seed": _random_seed(options["random_seed"], seed)}
        result = execute(TrainRequest(
            file=file, config=config, options=options, sets=list(set_ or []), out_dir=out_dir,
            resume=resume, init_from=init_from, allow_other_data=allow_other_data,
            drop_unknown=drop_unknown, grow_vocab=grow_vocab, no_samples=no_samples,
            stop_at_step=stop_at_step, dry_run=dry_run, progress=progress,
        ), dist, _note)
    if isinstance(result, DryRun) or result is None:  # a dry run (printed by rank 0)
        _print_dry_run(result)
    elif dist.rank == 0:  # rank 0 speaks for every process
        _print_summary(result)
        _print_loss_curve(result.run_dir)
        _resume_hint(result, dist.world)
    if result is not None and getattr(result, "stopped", "") == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)


def _note(text: str, minor: bool = False) -> None:
    """A line the library says on the way (``minor``: an aside, dim)."""
    err.print(Text(text, style="dim" if minor else ""))


def _print_dry_run(r) -> None:
    if r is None:  # not rank 0
        return
    out.print(r.config_toml.rstrip())
    if r.sized:
        err.print(f"model: chosen for the {r.config.train.max_time:g} s budget when training "
                  "starts (automatic sizing times a few shapes on this device; "
                  "--size fixed trains the shape above); vocabulary "
                  f"{r.vocab_size:,} characters; dry run: nothing trained")
    else:
        err.print(f"model: {r.num_parameters:,} parameters, vocabulary "
                  f"{r.vocab_size:,} characters; dry run: nothing trained")


def _resume_hint(result, world: int) -> None:
    """How to go on with a run that was interrupted or paused."""
    if result.stopped in ("interrupted", "stop_at_step"):
        launcher = "charlm" if world == 1 else "torchrun --nproc_per_node=N -m charlm"
        what = "interrupted" if result.stopped == "interrupted" else "paused (--stop-at-step)"
        err.print(
            f"{what} at step {result.step}; saved {_literal(result.run_dir / 'last.pt')}. "
            f"Resume with: {launcher} train --resume {_literal(shlex.quote(str(result.run_dir)))}"
        )


def _print_summary(r) -> None:
    import math

    from charlm.units import bits

    def nats_and_bits(x: float, what: str = "") -> str:
        if not math.isfinite(x):  # nothing measured yet (stopped before it)
            return "not evaluated" if what == "val" else "not measured"
        return f"{x:.4f} nats  {bits(x):.4f} bits"

    rows = [
        ("run", str(r.run_dir)),
        ("stopped by", r.stopped),
        ("steps", f"{r.step:,}"),
        ("characters seen", f"{r.chars_seen:,}"),
        ("time", f"{r.elapsed:,.1f} s"),
        ("training speed", f"{r.chars_per_sec:,.0f} chars/s"),
        ("evaluating", f"{r.eval_seconds:,.1f} s, {r.evaluations:,} evaluation"
                       + "s" * (r.evaluations != 1)),
        ("checkpoint saving", f"{r.save_seconds:,.2f} s ({r.save_seconds / max(r.elapsed, 1e-9):.1%})"),
        (f"train loss ({r.train_steps or 'recent'})", nats_and_bits(r.train_loss)),
        ("val loss (last)", nats_and_bits(r.val_loss, "val")),
        ("val loss (best)", nats_and_bits(r.best_val_loss, "val")),
        ("parameters", f"{r.num_parameters:,}"),
        ("vocabulary", f"{r.vocab_size:,} characters"),
        ("device", f"{r.device} ({r.precision})"),
    ] + [("note", note) for note in r.notes]
    _print_table(err, _table("charlm train", rows))


def _print_loss_curve(run_dir: Path) -> None:
    """The run's loss curve as a small character grid, so its shape shows without a PNG."""
    from charlm.runs.plot import load_curves, loss_grid

    try:
        curves = load_curves(run_dir)
    except CharlmError:  # nothing logged yet (a very short run): no curve, no fuss
        return
    grid = loss_grid(curves, width=max(20, min(64, err.width - 10)), height=8)
    if grid is None:
        return
    # Drawn in ASCII on a console that cannot encode the drawing characters (cp1252, ascii).
    fancy = err.encoding.lower().replace("-", "").startswith(("utf", "cp65001"))
    dot, disc, tick, bar, corner, rule = "•●┤│└─" if fancy else ".o+|+-"
    glyphs = {"t": (dot, "cyan"), "v": (disc, "bold magenta"), " ": (" ", "")}
    lines = [Text.assemble("bits/char  ", (dot, "cyan"), " train  ", (disc, "bold magenta"),
                           " validation", style="dim")]
    for i, row in enumerate(grid.rows):
        label = {0: f"{grid.y_max:6.2f} {tick}", len(grid.rows) - 1: f"{grid.y_min:6.2f} {tick}"}
        line = Text(label.get(i, f"       {bar}"), style="dim")
        for cell in row:
            line.append(*glyphs[cell])
        lines.append(line)
    width = len(grid.rows[0])
    lines.append(Text(f"       {corner}" + rule * width, style="dim"))
    right = f"{grid.x_max:,} characters"
    lines.append(Text("        0" + right.rjust(width - 1), style="dim"))
    for line in lines:
        err.print(line, no_wrap=True, overflow="crop", soft_wrap=False)


# --------------------------------------------------------------------------------- sample
@app.command()
def sample(
    checkpoint_path: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="Checkpoint, export or run directory (default: best.pt of the newest run under runs/).")] = None,
    seed: Annotated[str, typer.Option("--seed", "-s", help="Text to start from.")] = "",
    seed_file: Annotated[str | None, typer.Option("--seed-file", metavar="PATH", help="Start from the text of a file (up to 16 MiB; - for standard input). It is not echoed.")] = None,
    length: Annotated[int, typer.Option("--length", "-n", help="Characters to generate.")] = 500,
    temperature: Annotated[list[str] | None, typer.Option("--temperature", "-t", metavar="T[,T...]", help="0 is greedy; several (-t 0.5 -t 1 or 0.5,1) give samples for each. Default 0.8.")] = None,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold (1: off).")] = 1.0,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated as one batch.")] = 1,
    random_seed: Annotated[int | None, typer.Option(help="Same seed, same text from the same file (an .onnx export samples with numpy's generator, so its text differs from the .pt's; greedy -t 0 text is the same).")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", metavar="TEXT", help="End each sample right after this text (repeatable; \\n is a newline).")] = None,
    beam: Annotated[int, typer.Option(help="Beam search of this width: the most likely text (0: sample).")] = 0,
    drop_unknown: Annotated[bool, typer.Option("--drop-unknown", help="Drop seed characters outside the vocabulary.")] = False,
    no_echo: Annotated[bool, typer.Option("--no-echo", help="Print only the continuation, not the seed text.")] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Continue each line you type (Ctrl-D or Ctrl-C ends).")] = False,
    keep_state: Annotated[bool, typer.Option("--keep-state", help="With --interactive: carry the model's state across turns.")] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Generate text from a seed string."""
    from charlm.sampling.request import SampleRequest, prepare

    p = prepare(SampleRequest(
        checkpoint=checkpoint_path, seed=seed, seed_file=seed_file, length=length,
        temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
        random_seed=random_seed, stop=list(stop or []), beam=beam, drop_unknown=drop_unknown,
        no_echo=no_echo, interactive=interactive, keep_state=keep_state, device=device,
    ), _note)
    if p.session is not None:
        _interactive(p.session)
        return
    try:
        _print_beam(p) if beam else _print_samples(p)
    except BrokenPipeError:
        _reader_gone()


def _print_beam(p) -> None:
    r = p.beam_search()
    sys.stdout.write(_line(p.echo + r.text))
    sys.stdout.flush()
    err.print(f"beam {p.request.beam}: log-probability {r.logprob:.4f} nats over {len(r.ids)} "
              f"characters ({r.score:.4f} per character)")


def _print_samples(p) -> None:
    """The first sample is printed as it is generated (the others come with it, as one
    batch, and are printed after it), so ``charlm sample | head`` returns at once."""
    from charlm.sampling.options import StopScan

    vocab, seed, headed = p.model.vocab, p.echo, len(p.labels) > 1
    streamed: list[str] = []
    scan = StopScan(p.stops, 1) if p.stops else None

    def on_step(new_ids: list[int]) -> None:
        if scan is not None and scan.ends[0] is not None:
            return  # its text ended at a stop text; the batch goes on for the others
        streamed.append(vocab.chars[new_ids[0]])
        if scan is not None:
            scan.feed(streamed[-1:])
        sys.stdout.write(streamed[-1])
        sys.stdout.flush()

    sys.stdout.write((f"--- {p.labels[0]} ---\n" if headed else "") + seed)
    sys.stdout.flush()
    texts = p.samples(on_step)
    first = "".join(streamed)
    sys.stdout.write(_line(seed + texts[0])[len(seed) + len(first):])
    for label, text in zip(p.labels[1:], texts[1:], strict=True):
        sys.stdout.write(f"\n--- {label} ---\n{_line(seed + text)}")
    sys.stdout.flush()


def _interactive(session) -> None:
    """The prompt loop on this terminal (with readline's line editing and history where Python
    has it), or on piped standard input, without prompts."""
    from charlm.sampling.interactive import check_line, line_reader, run

    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() line editing
        except ImportError:  # Windows without pyreadline
            pass
        err.print("type a line and press Enter; Ctrl-D or Ctrl-C ends", style="dim")

        def read_line() -> str:
            return check_line(input("> "))
    else:
        read_line = line_reader(sys.stdin)  # at most MAX_LINE_CHARS a line

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        run(session, read_line, write, _error)
    except BrokenPipeError:
        _reader_gone()


def _line(text: str) -> str:
    """``text`` ending with one newline: a sample cut after a stop text "\\n" has its own."""
    return text if text.endswith("\n") else text + "\n"


def _reader_gone() -> None:
    """stdout's reader went away (``charlm sample | head``): stop quietly with status 0.
    stdout is pointed at /dev/null so that Python's flush at exit cannot fail again."""
    from charlm.streams import to_devnull

    to_devnull(sys.stdout)
    raise typer.Exit(0)


# ---------------------------------------------------------------------------- eval / info
@app.command("eval")
def eval_(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A checkpoint, a .safetensors export, or a run directory (its best.pt).")],
    file: Annotated[Path, typer.Argument(help="Text file to evaluate on.")],
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N or mps.")] = "auto",
    encoding: Annotated[str, typer.Option(help="Text encoding of FILE.")] = "utf-8",
    unknown: Annotated[str, typer.Option(metavar="drop|charge", help="Characters outside the model's vocabulary: drop them (bits/char over the rest), or charge each log2(1,114,112) = 20.09 bits (the cost of naming any Unicode code point), so that texts with such characters compare.")] = "drop",
    precision: Annotated[str, typer.Option(help="fp32 (exact), or auto/bf16/fp16: faster autocast, as in training.")] = "fp32",
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="A progress bar. Default: when stderr is a terminal.")] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Loss of a checkpoint over a whole text file."""
    from charlm.api import load

    checkpoint_path = _checkpoint(checkpoint_path)
    lm = load(checkpoint_path, device)
    show = sys.stderr.isatty() if progress is None else progress
    with _progress_bar(show, "evaluating", "char") as on_progress:
        r = lm.evaluate(file, encoding=encoding, unknown=unknown, precision=precision,
                        on_progress=on_progress)
    if r.unknown:
        what = (f"each charged {r.to_dict()['unknown_bits']:.2f} bits" if r.unknown_mode == "charge"
                else "dropped: bits/char is over the rest (--unknown charge counts them)")
        err.print(f"warning: {r.unknown:,} characters ({r.unknown_share:.1%}) of the text are "
                  f"outside the model's vocabulary; {what}")
    if as_json:
        _print_json({"checkpoint": str(checkpoint_path), "file": str(file), **r.to_dict()})
        return
    _print_table(out, _table("charlm eval", [
        ("checkpoint", str(checkpoint_path)),
        ("text", str(file)),
        ("loss", f"{r.loss:.4f} nats/char"),
        ("bits per char", f"{r.bpc:.4f}"),
        ("perplexity", f"{r.perplexity:.3f}"),
        ("characters", f"{r.chars:,}"),
        ("outside vocabulary", f"{r.unknown:,} ({r.unknown_share:.1%}, "
                               f"{'charged' if r.unknown_mode == 'charge' else 'dropped'})"),
    ]))


@contextmanager
def _progress_bar(show: bool, what: str, unit: str):
    """A tqdm bar on stderr when ``show``; yields the callback ``(done, total)`` feeding it
    (None without a bar)."""
    if not show:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=what, unit=unit, unit_scale=True, leave=False, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


@app.command()
def info(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A checkpoint, or a run directory (its best.pt).")],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Describe a checkpoint."""
    from charlm.storage.checkpoint import describe_file

    checkpoint_path = _checkpoint(checkpoint_path)
    d = describe_file(checkpoint_path)
    if as_json:
        _print_json({"checkpoint": str(checkpoint_path), **d})
        return
    _print_table(out, _table("charlm info", _info_rows(checkpoint_path, d)))


def _info_rows(checkpoint_path: Path, d: dict) -> list[tuple[str, str]]:
    from charlm.data.vocab import show_chars

    def number(value, spec: str) -> str:
        return "?" if value is None else format(value, spec)

    source = d["train_file"]
    best = d["best_val_loss"]
    return [
        ("checkpoint", str(checkpoint_path)),
        ("cell", d["cell"]),
        ("embedding / hidden / layers", f"{d['embed_size']} / {d['hidden_size']} / {d['num_layers']}"),
        ("dropout", f"{d['dropout']:g}"),
        ("parameters", f"{d['parameters']:,}"),
        ("vocabulary", f"{d['vocab_size']:,} characters"),
        *[("vocabulary growth", f"{g['base_size']:,} + {len(g['added']):,} characters: "
                                f"{show_chars(g['added'])}")
          for g in d["vocab_growth"]],
        ("steps", number(d["steps"], ",")),
        ("epochs", number(d["epochs"], ".2f")),
        ("best val loss", "?" if best is None else f"{best:.4f} nats ({d['best_val_bpc']:.4f} bits/char)"),
        ("training time", "?" if d["elapsed"] is None else f"{d['elapsed']:,.1f} s"),
        ("training file", f"{source['name'] or '?'} ({number(source['size'], ',')} bytes)"),
        ("file sha256", str(source["sha256"] or "?")),
        ("format / charlm / torch",
         f"{d['format_version']} / {d['charlm_version']} / {d['torch_version']}"),
    ]


@app.command()
def export(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A .pt checkpoint (or a .safetensors export), or a run directory (its best.pt).")],
    format_: Annotated[str, typer.Option("--format", "-f", help="safetensors, onnx, or html (one web page that generates text in any browser, offline).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output file (default: CHECKPOINT with the suffix of the format).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    quantize: Annotated[str | None, typer.Option("--quantize", metavar="fp16|int8|none", help="--format html: the weights as fp16 (default), int8 (one scale per row: smaller; the validation-loss change is reported) or none (fp32, exact).")] = None,
) -> None:
    """Export a checkpoint as safetensors or ONNX, verified against PyTorch, or as a web page."""
    if format_ == "html":
        _export_html(checkpoint_path, output, force, quantize or "fp16")
        return
    if quantize is not None:
        raise ConfigError("--quantize applies to --format html only")
    from charlm.export.writers import TOLERANCE, export_checkpoint

    r = export_checkpoint(_checkpoint(checkpoint_path), format_, output, force)
    batches = " and ".join(str(b) for b in r.batches)
    with _written(r.path):
        _print_table(out, _table("charlm export", [
            ("file", str(r.path)),
            ("format", f"{r.format} ({r.cell})"),
            ("size", f"{r.size:,} bytes"),
            ("verified", f"batch {batches}: max |diff| from PyTorch {r.max_diff:.1e} (< {TOLERANCE:g})"),
        ]))


def _export_html(checkpoint_path: Path, output: Path | None, force: bool, quantize: str) -> None:
    from charlm.export.web import export_html

    r = export_html(_checkpoint(checkpoint_path), output, force, quantize)
    if r.loss_change is not None:
        loss = (f"{r.loss_page:.4f} nats/char, {r.loss_change:+.4f} from the checkpoint's "
                f"{r.loss:.4f} (PyTorch on the page's weights, {r.loss_chars:,} characters of "
                "the validation split)")
    else:
        loss = r.loss_note
    with _written(r.path):
        _print_table(out, _table("charlm export", [
            ("file", str(r.path)),
            ("format", f"html ({r.cell}, {r.parameters:,} parameters)"),
            ("weights", {"fp16": "fp16", "int8": "int8, one scale per row", "none": "fp32"}[r.quantize]),
            ("size", f"{r.size:,} bytes ({r.size / 1e6:.2f} MB)"),
            ("validation loss", loss),
        ]))


@contextmanager
def _written(path: Path):
    """Around the summary of a file just written: when stdout cannot take it, the one-line
    error says that the file itself was written (the exit status is still 1)."""
    from charlm.streams import OutputLost

    try:
        yield
    except OutputLost as exc:
        raise OutputLost(f"{exc}; {_literal(path)} itself was written") from None


# ---------------------------------------------------------------------------- plot / runs
@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR", help="Run directories to compare.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="A .png, .svg or .pdf file (default: RUN_DIR/loss.png, or loss.png for several runs).")] = None,
    width: Annotated[int, typer.Option(help="Image width in pixels.")] = 1200,
    height: Annotated[int, typer.Option(help="Image height in pixels.")] = 480,
) -> None:
    """Plot train and validation loss (bits/char) against characters seen and wall time."""
    from charlm.runs.plot import plot_runs

    r = plot_runs(run_dirs, output, width=width, height=height)
    for why in r.skipped:
        err.print(Text(f"warning: skipped {_literal(why)}"))
    for warning in r.warnings:
        err.print(Text(f"warning: {_literal(warning)}"))
    runs_text = "1 run" if r.runs == 1 else f"{r.runs} runs"
    with _written(r.path):
        out.print(f"wrote {_literal(r.path)} ({r.width}x{r.height} px, {runs_text}, {r.curves} curves)")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@app.command()
def runs(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Folder of run directories.")] = Path("runs"),
    text: Annotated[str | None, typer.Option("--text", metavar="NAME", help="Only the runs trained on the text of this name (as the text column shows it).")] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List the runs in DIR (default runs/) by training text, best validation loss first."""
    from charlm.runs.directory import list_runs

    warnings: list[str] = []
    found = list_runs(directory, text, warnings)
    for warning in warnings:  # what could not be read is left out, said in one line each
        err.print(Text(f"warning: {_literal(warning)}"))
    if as_json:
        _print_json({"directory": str(directory), "runs": [r.to_dict() for r in found]})
    elif not found:
        out.print(f"no runs on {_literal(text)} in {_literal(directory)}" if text is not None
                  else f"no runs in {_literal(directory)} yet; start one with: charlm train")
    else:
        _print_table(out, _runs_table(directory, found))


def _runs_table(directory: Path, found: list) -> Table:
    """A light box, and no padding on narrow terminals; no cell ever wraps: a table wider
    than the terminal is printed whole (see _print_table)."""
    from datetime import datetime

    table = Table(title=f"runs in {_literal(directory)} by training text, best validation loss first",
                  title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1) if out.width >= 100 else (0, 0))
    for name in ("text", "run", "cell", "size", "steps", "val loss", "bits/char", "chars/s",
                 "time", "date"):
        table.add_column(name, justify="left" if name in ("text", "run", "cell", "date") else "right",
                         no_wrap=True)
    for i, r in enumerate(found):
        size = "?" if r.hidden_size is None else f"{r.hidden_size}x{r.num_layers or '?'}"
        same_text = i > 0 and found[i - 1].text == r.text
        table.add_row(
            "" if same_text else _literal(r.text or "?"), _literal(r.name),
            _literal(r.cell or "?"), size, f"{r.steps:,}",
            "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f}",
            "-" if r.best_val_bpc is None else f"{r.best_val_bpc:.4f}",
            "-" if r.chars_per_sec is None else f"{r.chars_per_sec:,.0f}",
            _duration(r.elapsed) if r.elapsed > 0 else "-",
            datetime.fromtimestamp(r.modified).strftime("%Y-%m-%d %H:%M"),
        )
    return table


@app.command()
def bench(
    config: Annotated[Path | None, typer.Option(help="TOML config whose model and batch to measure.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any field: section.key=value.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", show_default=_default("train.device"))] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.", show_default=_default("train.precision"))] = None,
    steps: Annotated[int, typer.Option(min=2, max=100_000, help="Training steps to time.")] = 30,
    random_seed: Annotated[int | None, typer.Option(help="Random seed of the weights and batches.", show_default=_default("train.seed"))] = None,
    sample_length: Annotated[int, typer.Option(min=10, max=10_000_000, help="Characters per sampling run.")] = 2000,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Measure training and sampling speed of a config on this device."""
    from charlm.config import layered
    from charlm.training import bench as benchmark

    options = {"device": device, "precision": precision, "random_seed": random_seed}
    cfg = layered(config, options, list(set_ or []))
    r = benchmark.run(cfg, steps=steps, sample_length=sample_length)
    if as_json:
        _print_json({**r.to_dict(), "model": cfg.to_dict()["model"],
                     "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len})
    else:
        _print_table(out, _table(f"charlm bench ({r.device}, {r.precision})", _bench_rows(cfg, r)))


def _bench_rows(cfg, r) -> list[tuple[str, str]]:
    m = cfg.model
    return [
        ("model", f"{m.cell} {m.hidden_size} x {m.num_layers}, embedding {m.embed_size}, "
                  f"{r.params:,} parameters"),
        ("batch x window", f"{cfg.train.batch_size} x {cfg.train.seq_len}"),
        ("CPU threads", str(r.threads) if r.threads else "-"),
        ("training", f"{r.train_chars_per_sec:,.0f} chars/s"),
        ("sampling, 1 stream", f"{r.sample_one_chars_per_sec:,.0f} chars/s"),
        (f"sampling, {r.sample_batch} streams", f"{r.sample_batch_chars_per_sec:,.0f} chars/s"),
        ("matmul peak (measured)", f"{r.matmul_gflops:,.0f} GFLOP/s"),
        ("training arithmetic", f"{r.model_gflops:,.1f} GFLOP/s = {r.peak_fraction:.0%} of peak"),
    ]


# ---------------------------------------------------------------------------------- inspect
@app.command("inspect")
def inspect_(
    target: Annotated[Path | None, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="A run directory (its best.pt), a checkpoint or a .safetensors export (default: the newest run under runs/).")] = None,
    text: Annotated[Path | None, typer.Argument(metavar="TEXT", help="Text file to inspect on (default: the run's validation split).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The page to write (one self-contained HTML file).")] = Path("inspect.html"),
    chars: Annotated[int, typer.Option(help="Inspect the first N characters of the text (at most 200,000).")] = 5000,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file that is not an inspect page.")] = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """See what a model learned: surprise over a text, units that track its features, gate
    saturation and how far back it remembers, as one HTML page."""
    from charlm.inspect.analysis import check_chars, inspect_to_page

    check_chars(chars)
    if target is None:
        from charlm.runs.directory import latest_checkpoint

        try:
            target = latest_checkpoint()
        except CharlmError as exc:  # its hint names sample's --checkpoint
            raise CharlmError(f"{str(exc).split(';')[0]}; name a run or checkpoint: "
                              "charlm inspect RUN_OR_CHECKPOINT") from None
        err.print(f"using {_literal(target)}", style="dim")
    else:
        target = _checkpoint(target)
    r = inspect_to_page(target, text, output, chars, force)
    d = r.document
    if d["cut"]:
        err.print(f"note: inspected the first {chars:,} characters of the text; --chars N "
                  "inspects more (up to 200,000)")
    if d["unknown"]:
        err.print(f"warning: dropped {d['unknown']:,} characters outside the model's vocabulary")
    if as_json:
        _print_json(d)
        return
    mem = {p["k"]: p["loss"] for p in d["memory"]}
    best = ", ".join(f"{u['feature']} L{u['layer']} {u['kind']}[{u['index']}] r={u['correlation']:+.2f}"
                     for u in d["units"][:3])
    with _written(output):
        _print_table(out, _table("charlm inspect", [
            ("checkpoint", str(target)),
            ("text", f"{d['text']} ({d['chars']:,} characters)"),
            ("bits per char", f"{d['bits_per_char']:.4f} (charlm eval: {d['eval_bits_per_char']:.4f})"),
            ("by class", ", ".join(f"{k} {v['bits_per_char']:.2f}" for k, v in d["by_class"].items())),
            ("best units", best or "-"),
            ("memory", f"loss {mem[1]:.3f} nats with 1 character of context, {mem[64]:.3f} with "
                       f"64, {mem[None]:.3f} with all"),
            ("page", f"{output} ({d['page_bytes']:,} bytes, {d['seconds']:.1f} s)"),
        ]))


# ---------------------------------------------------------------------------------- serve
@app.command()
def serve(
    targets: Annotated[list[Path] | None, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="Run directories (their best.pt), checkpoints, .safetensors or .onnx exports, each served under its run's (or file's) name (default: the newest run under runs/).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", metavar="NAME=PATH", help="Serve a model under a name of your choice (repeatable).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY' on the API (default: $CHARLM_API_KEY; none).", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N or mps.")] = "auto",
    max_tokens: Annotated[int, typer.Option(help="Most characters one text may ask for.")] = 4096,
    max_prompt_chars: Annotated[int, typer.Option(help="Longest prompt, in characters.")] = 8192,
    max_n: Annotated[int, typer.Option(help="Most texts per request (prompts x n).")] = 16,
    max_streams: Annotated[int, typer.Option(help="Texts generated together per model (one batched step).")] = 256,
    max_queue: Annotated[int, typer.Option(help="Texts that may wait for a place (then 429).")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (then 413).")] = 1 << 20,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take (then 503).")] = 300.0,
    threads: Annotated[int, typer.Option(help="CPU threads for the model (0: all CPUs but one, which serves HTTP).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No access log line per request.")] = False,
) -> None:
    """Serve models over HTTP: OpenAI's completions API and a page to try them at /."""
    from charlm.serving import serve as run_server

    def started(s) -> None:
        lim = s.limits
        err.print(f"charlm serve: {s.url}/  (API: {s.url}/v1, Ctrl-C stops)")
        for name, path in s.models.items():
            err.print(f"  model {_literal(name)}: {_literal(path)}")
        err.print(f"  limits: prompt {lim.max_prompt_chars:,} chars, max_tokens {lim.max_tokens:,}, "
                  f"n {lim.max_n}, {lim.max_streams} streams per step + {lim.max_queue} waiting, "
                  f"body {lim.max_body_bytes:,} bytes, {lim.timeout:g} s per request")
        if s.api_key:
            err.print("  API key required (Authorization: Bearer KEY)")
        if s.all_interfaces:
            err.print(f"warning: listening on every interface ({_literal(host)}): other machines "
                      "can reach this server" + ("" if s.api_key else "; consider --api-key"))

    def log(line: str) -> None:
        try:
            err.print(line)
        except (OSError, ValueError):  # stderr gone: the server goes on
            pass

    from charlm.serving.app import Limits

    limits = Limits(max_body_bytes, max_prompt_chars, max_tokens, max_n, max_streams, max_queue, timeout)
    run_server(targets or [], model or [], host=host, port=port, device=device, api_key=api_key,
               limits=limits, threads=threads, on_start=started, log=None if quiet else log)


# ---------------------------------------------------------------------------------- entry
def _flags_as_flags(command) -> None:
    """Help shows a boolean option as a bare flag (``--dry-run``), not ``--dry-run <bool>``:
    typer gives every option a type label, which says nothing for a flag."""
    make_help = command.get_help_option

    def help_option(ctx):
        option = make_help(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for param in command.params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _flags_as_flags(sub)


# How torch's CPU and CUDA allocators word a failed allocation.
_ALLOCATOR = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: library errors become one line on stderr and a non-zero exit code."""
    from charlm.signals import interrupting
    from charlm.streams import guarded

    # SIGTERM and SIGHUP stop every command as Ctrl-C does. Called without argv (the
    # console script), the process ends next: a signal during its exit changes nothing.
    # stdout and stderr escape what the console cannot encode, and a lost one is turned off
    # (charlm.streams); the console script keeps them so for Python's flush at exit.
    with guarded(restore=argv is not None), interrupting(to_the_end=argv is None):
        _main(argv)


def _interrupted() -> None:
    """The one line a stop signal outside training leaves (training says how to resume);
    nothing when stderr is gone (a closed terminal)."""
    import signal

    from charlm.signals import received

    if received():
        try:
            err.print(f"interrupted by {signal.Signals(received()).name}")
        except (OSError, ValueError, AttributeError):
            pass


def _exit_if_interrupted() -> None:
    """An error after a stop signal is the interruption's (an exporter or an import cut
    short reports a failure of its own): exit as interrupted, without the error."""
    from charlm.signals import EXIT_INTERRUPTED, received

    if received():
        _interrupted()
        sys.exit(EXIT_INTERRUPTED)


def _main(argv: list[str] | None) -> None:
    command = typer.main.get_command(app)
    _flags_as_flags(command)
    try:
        # Typer returns the code of an Exit (including 130 for Ctrl-C) instead of raising it.
        code = command.main(args=argv, prog_name="charlm", standalone_mode=False)
        if code == 130:
            _interrupted()
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # click's usage errors, as typer vendors them
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `charlm`: the help (rich has
            if str(exc).strip():  # already printed it when it renders help itself)
                err.print(str(exc))
            sys.exit(0)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _error(" ".join(message.split()) + hint)
        sys.exit(getattr(exc, "exit_code", 2))
    except CharlmError as exc:
        _exit_if_interrupted()
        if not getattr(exc, "quiet", False):  # another training process printed it
            _error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (charlm sample | head): exit quietly, without a second error
        # when Python flushes stdout at exit.
        from charlm.streams import to_devnull

        to_devnull(sys.stdout)
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        _exit_if_interrupted()
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, for CUDA (torch not imported here)
            _error("out of GPU memory; lower --num-samples (sample), or use a smaller model, "
                   "--batch-size or --seq-len")
            sys.exit(1)
        if isinstance(exc, MemoryError) or _ALLOCATOR.search(str(exc)):
            tried = re.search(r"allocate (\d+) bytes", str(exc))
            size = f" (an allocation of {int(tried.group(1)) / 2**30:,.1f} GiB failed)" if tried else ""
            _error(f"out of memory{size}; use a smaller model or batch")
            sys.exit(1)
        problem = path_error(exc) if isinstance(exc, OSError) and exc.filename else None
        if problem is not None:  # a path too long, permission denied, ...: named, one line
            if not os.environ.get("CHARLM_DEBUG"):
                _error(str(problem))
                sys.exit(problem.exit_code)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            # Files the library writes report their own errors: this is stdout (/dev/full, a
            # full disk under a redirect). Point it at /dev/null so the flush at exit is quiet.
            _error(f"cannot write the output: {exc.strerror}")
            from charlm.streams import to_devnull

            to_devnull(sys.stdout)
            sys.exit(1)
        if os.environ.get("CHARLM_DEBUG"):
            raise
        _error(f"{internal_error(exc)} (set CHARLM_DEBUG=1 for the traceback)")
        sys.exit(1)

