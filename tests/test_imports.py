"""Data flows one way: a module imports only modules upstream of it (STYLE.md's "shape of the house").

The imports of every module of src/dogbench are parsed (top-level, in functions and under TYPE_CHECKING alike);
a module may import one of its own layer or of a layer above it, never one below.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dogbench"

# Upstream first. A package (data, features, protocols, report) is one layer: its modules may import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "atomic", "locks", "names", "ledger"),
    ("config",),
    ("device", "distributed"),
    ("track",),
    ("data",),
    ("backbones",),
    ("architecture",),
    ("features",),
    ("heads",),
    ("tune",),
    ("training",),
    ("evaluate",),
    ("predictor",),
    ("results",),
    ("rundir",),
    ("protocols", "report"),
    ("inference",),
    ("explain",),
    ("export",),
    ("pipeline", "bench", "serve", "screen"),
    ("cli", "__init__", "__main__"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """``dogbench.features.cache`` -> ``features``; ``dogbench`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"] if rel.parts[-1] == "__init__" and len(rel.parts) > 1 \
            else list(rel.parts)
        out["dogbench." + ".".join(parts) if parts != ["__init__"] else "dogbench"] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported dogbench module) for every import statement in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dogbench"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "dogbench":
                # "from dogbench import x" may import a submodule x
                targets = [f"{name}.{a.name}" for a in node.names] if name == "dogbench" else [name]
                found += [(node.lineno, t) for t in targets]
    return found


def test_every_module_has_a_layer() -> None:
    units = {_unit(m) for m in _modules()}
    assert units - set(RANK) == set(), "new modules need a place in LAYERS (upstream first)"


def test_imports_only_go_upstream() -> None:
    problems = []
    for module, path in _modules().items():
        own = RANK[_unit(module)]
        for line, imported in _imports(path, module):
            unit = _unit(imported)
            if unit == "__version__":  # from dogbench import __version__
                continue
            if RANK.get(unit, -1) > own:
                problems.append(f"{path.relative_to(SRC.parent)}:{line}: {module} imports {imported}, which is "
                                f"downstream of it")
    assert problems == []


def test_the_checker_catches_a_downstream_import(tmp_path: Path) -> None:
    bad = tmp_path / "config.py"
    bad.write_text("from dogbench.features import extract_features\nimport dogbench.cli\n")
    found = [_unit(m) for _, m in _imports(bad, "dogbench.config")]
    assert found == ["features", "cli"] and all(RANK[u] > RANK["config"] for u in found)
