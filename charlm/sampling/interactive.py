"""Interactive sampling: read a line, continue it from the model, repeat.

With ``keep_state`` the model's state runs on across turns, so each line continues the whole
conversation so far (every typed line and every continuation, in order, exactly as if it had
been one text); without it each line starts afresh. The reading and writing are passed in, so
the loop runs the same on a terminal (with readline), on piped input and in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TextIO

import torch

from charlm.data.vocab import Vocab
from charlm.errors import CharlmError
from charlm.model.network import CharRNN, State
from charlm.sampling.options import seed_ids, start_ids
from charlm.sampling.sampler import sample_from, warm


class Session:
    """Continues lines of text; holds the carried state between turns when ``keep_state``."""

    def __init__(self, model: CharRNN, vocab: Vocab, length: int, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, random_seed: int | None = None,
                 stop: Sequence[str] = (), keep_state: bool = False, drop_unknown: bool = False):
        if length < 1:  # so that every turn leaves a generated id to feed the next one
            raise CharlmError("--interactive needs --length of at least 1")
        self.model, self.vocab, self.length = model, vocab, length
        self.options = dict(temperatures=[temperature], top_k=top_k, top_p=top_p, stop=stop)
        self.random_seed, self.keep_state, self.drop_unknown = random_seed, keep_state, drop_unknown
        self.turns = 0
        self.state: State | None = None  # the carried state, which has not yet seen ``pending``
        self.pending: list[int] = []  # the last generated id, fed at the start of the next turn

    @torch.inference_mode()
    def reply(self, line: str, on_step: Callable[[str], None] | None = None) -> str:
        """The continuation of ``line`` (streamed character by character to ``on_step``).
        Characters outside the vocabulary are a CharlmError, or dropped with drop_unknown."""
        ids = seed_ids(self.vocab, line, self.drop_unknown)
        if self.keep_state and self.state is not None:
            ids = self.pending + ids
        else:
            ids, self.state = start_ids(self.vocab, ids), None
        seed = None if self.random_seed is None else (self.random_seed + self.turns) % 2**63
        self.turns += 1
        logits, state = warm(self.model, ids, self.state)
        run = sample_from(
            self.model, self.vocab, logits, state, self.length, random_seed=seed,
            on_step=None if on_step is None else (lambda new: on_step(self.vocab.chars[new[0]])),
            **self.options,
        )
        if self.keep_state:
            self.state = run.state
            self.pending = [run.last[0]]
        return self.vocab.decode(run.ids[0, : run.lengths[0]])


# The longest line read in one turn: a line is read whole before the model sees it, so
# without a bound ``charlm sample -i < /dev/zero`` grew to 15 GB.
MAX_LINE_CHARS = 1 << 20


def line_reader(stream: TextIO) -> Callable[[], str]:
    """A ``read_line`` for :func:`run` that reads ``stream`` (piped input) at most
    ``MAX_LINE_CHARS`` characters at a time: a longer line is a one-line CharlmError, raised
    before the rest of it is read; end of input is ``EOFError``."""

    def read_line() -> str:
        try:
            line = stream.readline(MAX_LINE_CHARS + 1)
        except UnicodeDecodeError as exc:
            raise CharlmError(
                f"standard input is not valid {exc.encoding}; set PYTHONIOENCODING to its "
                "encoding"
            ) from None
        if not line:
            raise EOFError
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):  # still no newline
            raise CharlmError(
                f"an input line is longer than {MAX_LINE_CHARS:,} characters; split it into "
                "shorter lines, or pass a long text with --seed-file"
            )
        return line.removesuffix("\n")

    return read_line


def check_line(line: str) -> str:
    """``line`` (typed at a terminal), refused as :func:`line_reader` refuses a long one."""
    if len(line) > MAX_LINE_CHARS:
        raise CharlmError(
            f"an input line is longer than {MAX_LINE_CHARS:,} characters; split it into "
            "shorter lines, or pass a long text with --seed-file"
        )
    return line


def run(session: Session, read_line: Callable[[], str], write: Callable[[str], None],
        report: Callable[[str], None]) -> int:
    """The prompt loop: each line from ``read_line`` is continued and written (streamed) with
    ``write``, ending with a newline. A line the model cannot read is reported and skipped.
    End of input (``EOFError``, Ctrl-D) or Ctrl-C ends it. Returns the number of turns."""
    turns = 0
    try:
        while True:
            try:
                line = read_line()
            except EOFError:
                break
            try:
                text = session.reply(line, write)
            except CharlmError as exc:
                report(str(exc))
                continue
            turns += 1
            if not text.endswith("\n"):
                write("\n")
    except KeyboardInterrupt:
        write("\n")
    return turns
