"""The package's seams: no import cycles, torch-free modules that stay torch-free, typed
command-line options, and one definition each of the cell table, ln 2 and an exception's
first line; every module short, or saying why not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from charlm import config, errors
from charlm.config import Config, ModelConfig, validate
from charlm.errors import ConfigError, first_line, internal_error
from charlm.model import cells
from charlm.model import network as model
from charlm.storage import onnx as onnx_runtime
from charlm.training.bench import train_flops_per_char

PACKAGE = Path(__file__).resolve().parents[1] / "charlm"
MODULES = sorted(PACKAGE.glob("*.py"))


def imports_of(path: Path) -> set[str]:
    """The charlm modules a module imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("charlm"):
            names = [f"charlm.{a.name}" for a in node.names] if node.module == "charlm" else []
            found |= {node.module, *names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("charlm")}
    return found


def test_no_module_imports_itself_through_others():
    graph = {f"charlm.{p.stem}": imports_of(p) for p in MODULES}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            assert name != start, f"{start} imports itself through another module"
            if name not in seen:
                seen.add(name)
                todo.extend(graph.get(name, ()))


@pytest.mark.parametrize("module", ["charlm.runs.plot", "charlm.runs.directory", "charlm.files",
                                    "charlm.model.cells", "charlm.storage.onnx", "charlm.units"])
def test_torch_free_modules_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_torch_check_itself_can_see_torch():
    code = "import sys, charlm.storage.checkpoint; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "True", proc.stderr


def test_every_module_is_short_or_says_why():
    for path in MODULES:
        lines = path.read_text(encoding="utf-8").splitlines()
        doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
        assert len(lines) <= 300 or "Over 300 lines:" in doc, f"{path.name}: {len(lines)} lines"


def test_ln2_is_defined_once():
    defining = [p.name for p in MODULES if "log(2" in p.read_text(encoding="utf-8")]
    assert defining == ["units.py"]


def test_first_line_of_an_exception():
    assert first_line(ValueError("bad value\nsecond line")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("x" * 500)) == "x" * 200
    assert internal_error(ZeroDivisionError("division by zero")) == (
        "internal error: ZeroDivisionError: division by zero")
    sources = [p.read_text(encoding="utf-8") for p in MODULES if p.name != "errors.py"]
    assert not any("splitlines() or [" in s for s in sources)  # nobody rolls their own


@pytest.mark.parametrize("name", cells.NAMES)
def test_one_cell_table_for_the_model_the_samplers_and_the_cli(name):
    cell = cells.CELLS[name]
    cfg = ModelConfig(cell=name, embed_size=5, hidden_size=7, num_layers=2)
    net = model.build_model(11, cfg)
    assert type(net.rnn) is getattr(torch.nn, cell.torch_class)
    assert net.rnn.weight_ih_l0.shape == (cell.gates * 7, 5)
    assert len(model.state_tensors(net.init_state(3))) == len(cell.states)
    assert onnx_runtime.state_names(name) == list(cell.states)
    assert name in config.CELLS
    # Forward: gates x H x (inputs + H) per layer, twice for multiply-add; plus the head.
    forward = 2 * cell.gates * 7 * (5 + 7) + 2 * cell.gates * 7 * (7 + 7) + 2 * 7 * 11
    assert train_flops_per_char(cfg, 11) == 3 * forward
    with pytest.raises(ValueError, match=f"a {name} state is {len(cell.states)} tensor"):
        model.state_from_tensors([torch.zeros(1)] * (len(cell.states) + 1), name)


def test_cli_help_lists_the_cells_from_the_table():
    assert cells.CHOICES_TEXT == "rnn, lstm or gru"
    proc = run_cli("train", "--help")
    assert proc.returncode == 0 and cells.CHOICES_TEXT in proc.stdout, proc.stdout


def test_typed_options_set_the_config_fields_directly():
    # The typed options of charlm train, as the CLI passes them to the library (one dict).
    from charlm.config import apply_options

    cfg = Config()
    sources = apply_options(cfg, dict(seq_len=48, cell="gru", dropout=0.25, encoding="latin-1",
                                      lr=0.1, tensorboard=True, batch_size=None), ["train.lr=0.5"])
    assert (cfg.train.seq_len, cfg.model.cell, cfg.model.dropout) == (48, "gru", 0.25)
    assert cfg.data.encoding == "latin-1" and cfg.train.tensorboard is True
    assert cfg.train.lr == 0.5  # --set is applied over the options
    assert sources == {"train.seq_len": "--seq-len", "model.cell": "--cell",
                       "model.dropout": "--dropout", "data.encoding": "--encoding",
                       "train.tensorboard": "--tensorboard"}


def test_a_wrong_option_value_names_the_option():
    from charlm.config import apply_options

    cfg = Config()
    sources = apply_options(cfg, dict(seq_len=0), [])
    with pytest.raises(ConfigError, match=r"^--seq-len: train\.seq_len must be in \[1, 1048576\]"):
        validate(cfg, sources)
    with pytest.raises(ConfigError, match=r"--seq-len \(train\.seq_len\) must be int"):
        apply_options(Config(), dict(seq_len="64"), [])
    bad = Config()
    bad.train.seq_len = 0  # from a config file or --set: no option to name
    with pytest.raises(ConfigError, match=r"^train\.seq_len must be in"):
        validate(bad, sources={"train.lr": "--lr"})


def test_errors_module_stays_plain():
    assert imports_of(Path(errors.__file__)) == set()
