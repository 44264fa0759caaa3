"""The texts the sizing sweeps run on, built from what every Python installation has.

    python benchmarks/sizing/corpora.py OUT_DIR

writes OUT_DIR/stdlib_code.txt (about 5 MB of the standard library's Python source: a text
of another kind and 4.5x the size of tiny Shakespeare, used for fitting) and
OUT_DIR/stdlib_docs.txt (the standard library's docstrings, English prose about code: held
out, used only to check the fitted rule). Files are taken in sorted path order, tests and
third-party packages left out, so one Python version gives the same bytes on every machine.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
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


def build_code(paths: list[Path], limit: int) -> str:
    parts, size = [], 0
    for p in paths:
        text = read(p)
        if text is None:
            continue
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def build_docs(paths: list[Path], limit: int) -> str:
    parts, size = [], 0
    for p in paths:
        text = read(p)
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc.strip() + "\n\n")
                    size += len(parts[-1])
        if size >= limit:
            break
    return "".join(parts)[:limit]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    paths = sources()
    for name, text in (("stdlib_code.txt", build_code(paths, CODE_CHARS)),
                       ("stdlib_docs.txt", build_docs(paths, DOCS_CHARS))):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: {len(text):,} characters, {len(set(text))} distinct")


if __name__ == "__main__":
    main()
