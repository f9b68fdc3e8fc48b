"""The package's layout, read from its source: rooms, arrows between them, size, privacy, a cheap face.

The import graph is built from every ``import`` statement in ``powerbert/`` and ``kernels/``
(module level and inside functions alike: a lazy import is still an arrow). Each module sits in a
room of a rank, and an arrow may only point to a lower rank, or stay inside its own room:

    commands (cli, predict, calibrate + its output, demo)        6
    training/                                                     5
    inputs/                                                       4
    CUDA graphs (cuda_graph: a patched model's forward, replayed) 3.5
    the front door (front_door: patch / unpatch)                  3
    sentence-transformers integration (sentence_models)           2
    elimination/                                                  1
    kernels/                                                      0

The package face (``powerbert/__init__.py``) is not a room: it names modules as strings (lazily)
and no module imports it.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

import powerbert

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("powerbert", "kernels")
MAX_LINES = 450
COMMANDS = ("powerbert.cli", "powerbert.predict", "powerbert.deployment", "powerbert.calibrate", "powerbert.calibration_targets",
            "powerbert.calibration_output", "powerbert.demo")
ROOMS = (  # (room, rank, what it holds: modules, or packages with all below them)
    ("kernels", 0, ("kernels",)),
    ("elimination", 1, ("powerbert.elimination",)),
    ("sentence models", 2, ("powerbert.sentence_models",)),
    ("front door", 3, ("powerbert.front_door",)),
    ("cuda graphs", 3.5, ("powerbert.cuda_graph",)),
    ("inputs", 4, ("powerbert.inputs",)),
    ("training", 5, ("powerbert.training",)),
    ("commands", 6, COMMANDS),
)


def module_files() -> dict[str, Path]:
    """``{dotted module name: path}`` of every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = module_files()


def resolve_import(name: str) -> str | None:
    """The project module an imported dotted name lands in (the longest prefix that is one), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> list[tuple[str, int]]:
    """``(project module imported, line)`` for every import statement of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from a import b`` imports module a.b when b is one, else a name of a
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve_import(name)
            if target is not None and target != module:
                found.append((target, node.lineno))
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def room_of(module: str) -> tuple[str, int] | None:
    for room, rank, members in ROOMS:
        if any(module == member or module.startswith(member + ".") for member in members):
            return room, rank
    return None


def test_every_module_has_a_room():
    homeless = [m for m in MODULES if m not in ("powerbert",) and room_of(m) is None]
    assert not homeless, f"modules in no room of tests/test_package_layout.py ROOMS: {homeless}"


def test_no_import_circle():
    """Depth-first search for a back edge: any circle, however long, fails with its path."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target, _ in GRAPH[module]:
            if state.get(target) == "open":
                circle = stack[stack.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module)


def test_arrows_point_down():
    """Commands -> training/inputs -> front door -> sentence models -> elimination -> kernels."""
    wrong = []
    for module, targets in GRAPH.items():
        if module == "powerbert":
            continue
        room, rank = room_of(module)
        for target, line in targets:
            if target == "powerbert":
                wrong.append(f"{module}:{line} imports the package face 'powerbert'; import the module that "
                             f"defines the name (e.g. powerbert.front_door)")
                continue
            target_room, target_rank = room_of(target)
            if target_room != room and target_rank >= rank:
                wrong.append(f"{module}:{line} -> {target} ({room} rank {rank} -> {target_room} rank {target_rank})")
    assert not wrong, "arrows that do not point down:\n" + "\n".join(wrong)


def test_the_kernels_have_one_dispatch_point():
    """Inside powerbert only the dispatch module calls the kernels (the soft extract goes through it too)."""
    callers = sorted(m for m, edges in GRAPH.items() if m.startswith("powerbert")
                     and any(target.split(".")[0] == "kernels" for target, _ in edges))
    assert callers == ["powerbert.elimination.dispatch"]


def test_the_face_imports_no_module():
    """The face names its modules as strings; a module-level import would load torch at ``import powerbert``."""
    assert [target for target, _ in GRAPH["powerbert"]] == []


def test_no_module_over_the_line_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def private_uses(module: str) -> list[str]:
    """Underscore names this module takes from another project module: ``from m import _x``,
    ``import m._x``, or ``alias._x`` where ``alias`` is bound to another project module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and resolve_import(node.module):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in MODULES:
                    module_aliases[alias.asname or alias.name] = full
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{module}:{node.lineno} from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if resolve_import(alias.name) and any(p.startswith("_") and not p.startswith("__")
                                                      for p in alias.name.split(".")):
                    found.append(f"{module}:{node.lineno} import {alias.name}")
                if alias.asname and alias.name in MODULES:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and module_aliases[node.value.id] != module
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{module}:{node.lineno} {node.value.id}.{node.attr} ({module_aliases[node.value.id]})")
    return found


def test_no_private_name_crosses_modules():
    found = [use for module in MODULES for use in private_uses(module)]
    assert not found, "underscore names imported from another module:\n" + "\n".join(found)


def fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter at the repository root; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


HEAVY = "print(sorted(m for m in ('torch', 'transformers', 'triton', 'numpy') if m in sys.modules))"


@pytest.mark.parametrize("statement", [
    "import powerbert",
    "import powerbert.cli",
    "import powerbert.training.distributed",
    "import powerbert.training.config",
    "import powerbert.inputs.checks, powerbert.inputs.files",
    "import kernels",
])
def test_cheap_imports_load_no_torch(statement):
    assert fresh_python(f"import sys\n{statement}\n{HEAVY}") == "[]"


def test_help_loads_no_torch():
    code = ("import sys, contextlib, io\nfrom powerbert.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['predict', '--help'], ['calibrate', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n            main(argv)\n        except SystemExit as stop:\n"
            "            assert stop.code == 0, (argv, stop.code)\n"
            "    assert 'usage' in out.getvalue(), argv\n" + HEAVY)
    # numpy (0.06 s) may load: the predict parser reads its engines from powerbert.predict
    assert fresh_python(code) in ("[]", "['numpy']")


def test_patch_works_as_the_first_call():
    code = ("import powerbert, torch\nfrom transformers import BertConfig, BertModel\n"
            "model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,"
            " intermediate_size=32, max_position_embeddings=32)).eval()\n"
            "assert powerbert.patch(model, (5, 2)) is model and powerbert.is_patched(model)\n"
            "out = model(input_ids=torch.ones(2, 9, dtype=torch.long))\nprint(tuple(out.last_hidden_state.shape))")
    assert fresh_python(code) == "(2, 2, 16)"


def test_public_names_resolve():
    for name in powerbert.__all__:
        assert getattr(powerbert, name) is not None, name
    assert callable(powerbert.patch) and isinstance(powerbert.__version__, str)
    assert set(powerbert.__all__) <= set(dir(powerbert))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        powerbert.nope


# ------------------------------------------------------------------ models saved before the move

SAVED = ROOT / "tests" / "data" / "saved_before_rooms"  # torch.save(model) at e8e3eee, the flat package


def tiny_config() -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, num_labels=3)


def ragged_batch():
    ids = torch.randint(1, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, length in enumerate((12, 7, 3)):
        mask[row, :length] = 1
    return dict(input_ids=ids * mask, attention_mask=mask)


@pytest.mark.parametrize("name, cls, retention, minimum", [
    ("head_proportional", BertForSequenceClassification, (0.8, 0.5, 0.3), (4, 2, 1)),
    ("bare_fixed", BertModel, (6, 4, 2), None),
])
def test_patched_models_saved_before_the_move_load_and_run(name, cls, retention, minimum):
    saved = torch.load(SAVED / f"{name}.pt", weights_only=False)
    assert powerbert.is_patched(saved)
    assert powerbert.patched_retention(saved) == retention
    fresh = cls(tiny_config()).eval()
    fresh.load_state_dict(saved.state_dict())
    powerbert.patch(fresh, retention, retention_min=minimum)
    inputs = ragged_batch()
    with torch.no_grad():
        got, want = saved(**inputs), fresh(**inputs)
    first = "logits" if cls is BertForSequenceClassification else "last_hidden_state"
    torch.testing.assert_close(getattr(got, first), getattr(want, first), rtol=0, atol=0)
    powerbert.unpatch(saved)
    assert not powerbert.is_patched(saved)


def test_soft_extract_saved_before_the_move_loads():
    from powerbert.elimination.forwards import installed

    saved = torch.load(SAVED / "soft_extract.pt", weights_only=False)
    soft = installed(saved).runner  # the soft extract is the layer runner of the installed forward
    assert isinstance(soft, powerbert.SoftExtract) and soft.max_length == 16
    saved.train()
    out = saved(**ragged_batch(), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()  # the learned retention vectors still receive gradients
    assert soft.retention.grad is not None and soft.retention.grad.abs().sum() > 0
    soft.detach()
    assert installed(saved) is None


def test_old_module_names_stay_importable():
    """``import powerbert.patch`` (an old module) finds its alias, and ``powerbert.patch`` stays the function."""
    import importlib

    from powerbert import MOVED_MODULES

    for old, new in MOVED_MODULES.items():
        alias = importlib.import_module(old)
        target = importlib.import_module(new)
        public = [n for n in vars(target) if not n.startswith("_")]
        assert all(getattr(alias, n) is getattr(target, n) for n in public), old
    assert callable(powerbert.patch)


def test_the_spec_is_in_the_repository_with_every_cited_section():
    spec = ROOT / "powerbert" / "ALGORITHM.md"
    sections = set(re.findall(r"^## (\d+)\. ", spec.read_text(), flags=re.M))
    assert sections == {str(n) for n in range(1, 11)}
    cited = set()
    for path in [ROOT / "README.md", *ROOT.glob("powerbert/**/*.py"), *ROOT.glob("kernels/*.py")]:
        text = path.read_text()
        assert "shared/ALGORITHM.md" not in text, f"{path} cites the spec outside the repository"
        cited |= set(re.findall(r"§(\d+)", text))
    assert cited and cited <= sections, f"cited sections missing from the spec: {cited - sections}"


def _resolve(dotted: str):
    """The object a dotted name (``powerbert.training.steps.run``) names, importing its module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            value = getattr(value, name)
        return value
    raise ImportError(dotted)


def test_every_name_and_path_the_readme_documents_exists():
    readme = (ROOT / "README.md").read_text()
    names = set(re.findall(r"`(powerbert(?:\.[A-Za-z_]\w*)+)", readme))
    for module, imported in re.findall(r"^from (powerbert[\w.]*) import ([\w, ]+)$", readme, flags=re.M):
        names |= {f"{module}.{name.strip()}" for name in imported.split(",")}
    assert len(names) > 10
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"README names that do not exist: {missing}"
    paths = set(re.findall(r"`((?:powerbert|kernels|tests|benchmarks)/[\w./-]*\.(?:py|md|sh))`", readme))
    assert len(paths) > 5
    assert not [p for p in sorted(paths) if not (ROOT / p).is_file()], "README paths that do not exist"
