"""The shape of the house: every stage imports only from stages before it on the data's path, and
an import that points the other way is lazy (inside a function) and says why on its line.

The order (README, "Development"): errors, safeio, device -> sae -> data -> models -> activations
-> train -> formats -> {evaluate, analysis, jacobian, steer} -> dashboard -> jobs -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "jumpscope"
ORDER = [("errors",), ("safeio",), ("device",), ("sae",), ("data",), ("models",), ("activations",), ("train",),
         ("formats",), ("evaluate", "analysis", "jacobian", "steer"), ("explain",), ("dashboard",), ("jobs",), ("cli",)]
RANK = {stage: rank for rank, stages in enumerate(ORDER) for stage in stages}
ENTRY_POINTS = {"__init__", "__main__"}  # the public API and `python -m jumpscope` gather every stage


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, src: Path = SRC) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, at module level, the import's source line) of every jumpscope import."""
    relative = path.relative_to(src.parent).with_suffix("")
    package = list(relative.parts[:-1])  # a package's __init__ and its modules share the package
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    top = {id(node) for statement in tree.body if not isinstance(statement, (ast.FunctionDef, ast.ClassDef))
           for node in ast.walk(statement)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - (node.level - 1)]
            targets = [".".join(base + [node.module])] if node.module else \
                [".".join(base + [alias.name]) for alias in node.names]
        elif (node.module or "").split(".")[0] == "jumpscope":
            targets = [node.module]
        else:
            continue
        found += [(target, node.lineno, id(node) in top, lines[node.lineno - 1]) for target in targets]
    return found


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_stage_is_a_known_folder_or_bottom_module():
    stages = {path.relative_to(SRC).parts[0].removesuffix(".py") for path in modules()}
    assert stages - ENTRY_POINTS == set(RANK), "a new stage must take its place in ORDER (and the README's map)"


def violations(path: Path, src: Path = SRC) -> list[str]:
    here = stage_of(".".join(path.relative_to(src.parent).with_suffix("").parts))
    if here in ENTRY_POINTS:
        return []
    found = []
    for target, line, top_level, source in imports(path, src):
        there = stage_of(target)
        if there in ENTRY_POINTS or there == here or there == "__version__" or RANK[there] < RANK[here]:
            continue
        where = f"{path.relative_to(src)}:{line} imports {target}"
        if top_level:
            found.append(f"{where}: a stage may import only from stages before it")
        elif "#" not in source:
            found.append(f"{where}: a lazy import against the data's path must say why in a comment")
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_back_along_the_data_path(path):
    assert violations(path) == []


def test_the_checker_finds_backward_imports(tmp_path):
    src = tmp_path / "jumpscope"
    (src / "sae").mkdir(parents=True)
    module = src / "sae" / "base.py"
    module.write_text("from ..safeio import x\nfrom ..jobs import train\n\n\ndef f():\n"
                      "    from ..formats import save\n    from ..formats import load  # formats import this\n")
    found = violations(module, src)
    assert len(found) == 2 and "jobs" in found[0] and "before it" in found[0]
    assert "formats" in found[1] and "comment" in found[1]
