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
