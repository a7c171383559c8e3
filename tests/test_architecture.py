"""The direction of dependencies inside fm9g (docs/architecture.md), checked on the source.

Every import of ``fm9g/`` is read with ``ast`` — at module level and inside functions, ``import x``
and ``from x import y``, relative imports resolved — and compared with the rules:

- ``fm9g.models`` imports no other room (only torch and ``fm9g._io``);
- ``fm9g.data`` imports neither ``models``, ``training`` nor ``convert``;
- ``fm9g.convert`` imports no ``training``;
- library code never imports ``fm9g.commands`` or ``fm9g.cli`` (only they import the library).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fm9g"

# room -> rooms it must not import
FORBIDDEN = {
    "models": ("convert", "training", "data", "commands", "cli"),
    "data": ("models", "training", "convert", "commands", "cli"),
    "convert": ("training", "commands", "cli"),
    "training": ("commands", "cli"),
    "_io": ("models", "data", "convert", "training", "commands", "cli"),
}


def _module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, pkg: Path = PKG) -> list[tuple[int, str]]:
    """``[(line, absolute module name), ...]`` of every import in `path`, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path, pkg).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            # `from fm9g import training` imports a room too
            found += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names if mod == "fm9g"]
    return found


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fm9g" or len(parts) < 2:
        return None
    return parts[1]


def violations(pkg: Path = PKG) -> list[str]:
    out = []
    for path in sorted(pkg.rglob("*.py")):
        room = room_of(_module_name(path, pkg))
        if room not in FORBIDDEN:
            continue
        for line, mod in imported_modules(path, pkg):
            target = room_of(mod)
            if target in FORBIDDEN[room]:
                out.append(f"{path.relative_to(pkg.parent)}:{line}: fm9g.{room} imports {mod}")
    return out


def test_dependencies_point_one_way():
    bad = violations()
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


@pytest.mark.parametrize("room, source, bad_module", [
    ("models", "def f():\n    from fm9g.convert.keys import NAME_TABLE\n", "fm9g.convert.keys"),
    ("models", "from ..training import engine\n", "fm9g.training"),
    ("data", "import fm9g.models.fm9g\n", "fm9g.models.fm9g"),
    ("convert", "from fm9g import training\n", "fm9g.training"),
    ("training", "def g():\n    import fm9g.cli\n", "fm9g.cli"),
])
def test_a_forbidden_import_is_caught(tmp_path, room, source, bad_module):
    """The checker finds an added forbidden import, nested or relative, in a copy of the package."""
    pkg = tmp_path / "fm9g"
    (pkg / room).mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / room / "__init__.py").write_text("")
    (pkg / room / "added.py").write_text(source)
    bad = violations(pkg)
    assert len(bad) == 1 and bad_module in bad[0] and "added.py" in bad[0], bad


def test_allowed_imports_pass(tmp_path):
    pkg = tmp_path / "fm9g"
    for room, src in {"models": "import torch\nfrom fm9g._io import ConfigError\nfrom .config import X\n",
                      "convert": "from fm9g.models.config import FM9GConfig\n",
                      "training": "from fm9g.data.mixture import MixtureLoader\nfrom fm9g.convert import hf\n"}.items():
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
        (pkg / room / "m.py").write_text(src)
    (pkg / "__init__.py").write_text("")
    assert violations(pkg) == []


# ---------------------------------------------------------------------------------- fm9g/training
TRAINING = PKG / "training"
MAX_FUNCTION_LINES = 60


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the statements under ``if TYPE_CHECKING:`` (imports there may point back)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def import_cycles(folder: Path = TRAINING, pkg: Path = PKG) -> list[list[str]]:
    """Cycles among the modules of ``folder`` through their imports (module level and inside
    functions, but not those under ``if TYPE_CHECKING:``)."""
    mods = {_module_name(p, pkg): p for p in sorted(folder.glob("*.py")) if p.name != "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        skip = _type_checking_lines(ast.parse(path.read_text(encoding="utf-8")))
        graph[name] = {m for line, m in imported_modules(path, pkg) if line not in skip and m in mods and m != name}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def trainer_attribute_writes(folder: Path = TRAINING, owner: str = "trainer.py") -> list[str]:
    """Assignments to an attribute of a Trainer outside its own module: ``trainer.x = ...``,
    ``trainer.x += ...`` or ``setattr(trainer, ...)`` where ``trainer`` is a parameter named so or
    annotated ``Trainer``."""
    found = []
    for path in sorted(folder.glob("*.py")):
        if path.name == owner:
            continue
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            names = {a.arg for a in args if a.arg == "trainer" or "Trainer" in ast.unparse(a.annotation or ast.Constant(""))}
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                    node, (ast.AugAssign, ast.AnnAssign)) else []
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                    targets = [ast.Attribute(value=node.args[0], attr="?")]
                for t in targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in names:
                            found.append(f"{path.name}:{node.lineno}: {ast.unparse(sub)}")
    return found


def longest_functions(folder: Path = TRAINING) -> list[tuple[int, str]]:
    """``(lines, "file:line name")`` of every function of ``folder``, longest first."""
    rows = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def test_training_has_no_import_cycle():
    assert import_cycles() == []


def test_only_the_trainer_writes_trainer_fields():
    assert trainer_attribute_writes() == []


def test_no_function_in_training_passes_60_lines():
    too_long = [r for r in longest_functions() if r[0] > MAX_FUNCTION_LINES]
    assert not too_long, too_long


def _copy_training(tmp_path: Path) -> Path:
    """A copy of fm9g/training under a package root of its own (for planting faults)."""
    import shutil

    root = tmp_path / "fm9g"
    shutil.copytree(TRAINING, root / "training")
    (root / "__init__.py").write_text("")
    return root


def test_a_planted_import_cycle_is_caught(tmp_path):
    root = _copy_training(tmp_path)
    (root / "training" / "step_math.py").write_text(
        (root / "training" / "step_math.py").read_text() + "\ndef _back():\n    from fm9g.training.trainer import Trainer\n")
    cycles = import_cycles(root / "training", root)
    assert cycles and any("fm9g.training.step_math" in c for c in cycles), cycles


def test_a_planted_trainer_write_is_caught(tmp_path):
    root = _copy_training(tmp_path)
    (root / "training" / "planted.py").write_text(
        "def restore(trainer, n):\n    trainer.step = n\n\ndef other(t: 'Trainer'):\n    t.tokens += 1\n"
        "    setattr(t, 'skipped', {})\n")
    found = trainer_attribute_writes(root / "training")
    assert len(found) == 3 and all(f.startswith("planted.py") for f in found), found
