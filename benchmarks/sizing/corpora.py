"""The texts the sizing sweeps run on, built from what every Python installation has.

    python benchmarks/sizing/corpora.py OUT_DIR

writes OUT_DIR/stdlib_code.txt (about 5 MB of the standard library's Python source: a text
of another kind and 4.5x the size of tiny Shakespeare, used for fitting) and
OUT_DIR/stdlib_docs.txt (the standard library's docstrings, English prose about code: held
out, used only to check the fitted rule) and OUT_DIR/python_reference.txt (the language
reference's topics that ``help()`` shows, from ``pydoc_data``: a second held-out text, about
0.47 MB on Python 3.11). Files are taken in sorted path order, tests and
third-party packages left out, so one Python version gives the same bytes on every machine.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

CODE_CHARS = 5_000_000
DOCS_CHARS = 2_000_000
SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
        "turtledemo", "ensurepip", "pydoc_data", "encodings")


def sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not any(part in SKIP for part in p.relative_to(root).parts))


def read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def gather(paths: list[Path], limit: int, pieces: Callable[[str], list[str]]) -> str:
    """The first ``limit`` characters of ``pieces(text)`` over the readable files, in order."""
    parts, size = [], 0
    for p in paths:
        text = read(p)
        if text is None:
            continue
        for piece in pieces(text):
            parts.append(piece)
            size += len(piece)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def docstrings(text: str) -> list[str]:
    """A module's docstrings over 40 characters, each followed by a blank line."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                found.append(doc.strip() + "\n\n")
    return found


def reference() -> str:
    """The topics of the language reference, in sorted order, each followed by a blank line."""
    from pydoc_data.topics import topics

    return "".join(topics[key].strip() + "\n\n" for key in sorted(topics))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    paths = sources()
    for name, text in (("stdlib_code.txt", gather(paths, CODE_CHARS, lambda text: [text])),
                       ("stdlib_docs.txt", gather(paths, DOCS_CHARS, docstrings)),
                       ("python_reference.txt", reference())):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: {len(text):,} characters, {len(set(text))} distinct")


if __name__ == "__main__":
    main()
