"""The library's layout holds: stages import one way, and each name has one home."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medfold"

# the stages in import order: a package may import those before it, never one after it
ORDER = [
    "core",
    "settings",
    "data",
    "split",
    "evaluation",
    "training",
    "compression",
    "explain",
    "deploy",
    "report",
    "study",
    "cli",
]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "medfold" else None


def _imports(path: Path):
    """Every medfold module ``path`` imports, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medfold"):
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            yield node.lineno, "relative", []


def test_every_stage_imports_only_the_stages_before_it():
    against = []
    for path in sorted(SRC.rglob("*.py")):
        own = path.relative_to(SRC).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        assert own in ORDER, f"{path}: {own!r} is not a stage of the layout (tests/test_layout.py ORDER)"
        for line, module, names in _imports(path):
            assert module != "relative", f"{path}:{line}: relative import; medfold imports by full name"
            stage = _stage(module)
            if module == "medfold":  # the package's own version
                assert names == ["__version__"], f"{path}:{line}: from medfold import {names}"
                continue
            if stage != own and ORDER.index(stage) > ORDER.index(own):
                against.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not against, "imports running against the stage order:\n" + "\n".join(against)


def test_package_inits_define_and_re_export_nothing():
    """One name per concept: a package's __init__ holds its docstring (and the report's
    matplotlib backend), so every name is imported from the module that defines it."""
    for init in sorted(SRC.rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init}: says nothing of what the stage does"
        for node in tree.body[1:]:
            allowed = isinstance(node, ast.Import) and [a.name for a in node.names] == ["matplotlib"]
            allowed |= isinstance(node, ast.Expr) and "matplotlib.use" in ast.unparse(node)
            allowed |= init.parent == SRC and isinstance(node, ast.Assign)  # __version__
            assert allowed, f"{init}:{node.lineno}: {ast.unparse(node)[:80]}"


def test_the_top_level_is_a_dozen_entries():
    entries = sorted(p.name for p in SRC.iterdir() if p.name != "__pycache__" and not p.name.endswith(".egg-info"))
    assert len(entries) <= 13, entries
