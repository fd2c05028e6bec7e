"""The package's shape: the detectron2-free subpackages load no detectron2 and patch nothing, and
no two of its top-level modules and subpackages import each other, directly or round about."""

import ast
import subprocess
import sys
from pathlib import Path

LIGHT = "moco_d2, moco_d2.pretrain, moco_d2.lincls, moco_d2.convert, moco_d2.convert.tool"


def _run(code):
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_light_subpackages_import_no_detectron2_and_patch_nothing():
    # Pillow >= 10 has no Image.LINEAR; only moco_d2.detection's compat shim adds it back.
    _run(
        f"import {LIGHT}, moco_d2.pretrain.main, "
        "moco_d2.lincls.main, sys, PIL.Image\n"
        "assert not any(m.startswith('detectron2') for m in sys.modules), sorted(sys.modules)\n"
        "assert not hasattr(PIL.Image, 'LINEAR')\n"
    )


def test_importing_detection_registers_the_head_and_the_voc_splits():
    out = _run(
        "import moco_d2.detection\n"
        "from detectron2.data import DatasetCatalog\n"
        "from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY\n"
        "ROI_HEADS_REGISTRY.get('Res5ROIHeadsExtraNorm')\n"
        "print(sorted(n for n in DatasetCatalog.list() if n.startswith('voc_20')))\n"
    )
    assert "voc_2007_test" in out and "voc_2012_trainval" in out


def _unit(package: Path, dotted: str) -> str | None:
    """The top-level unit of the package that ``dotted`` (a module, or a name in one) lies in:
    ``x`` for x.py or x/, the package's own name for its __init__; None outside it."""
    parts = dotted.split(".")
    if parts[0] != package.name:
        return None
    if len(parts) > 1 and ((package / parts[1]).is_dir() or (package / f"{parts[1]}.py").is_file()):
        return parts[1]
    return package.name


def _imported(path: Path, module: str) -> set[str]:
    """Every module (or module.name) imported anywhere in ``path``, function bodies included."""
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + base.split(".") * bool(base))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Unit of ``package`` → the other units it imports."""
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        unit = _unit(package, module)
        targets = {_unit(package, name) for name in _imported(path, module)}
        graph.setdefault(unit, set()).update(t for t in targets if t and t != unit)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            cycle = visit(target, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_the_graph_sees_relative_and_function_level_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "a": {"sub"}, "sub": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "sub", "c", "a"]
    (package / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None


def test_no_import_cycles():
    graph = import_graph(Path(__file__).resolve().parents[1] / "moco_d2")
    assert {"io", "convert", "detection"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between moco_d2's units: " + " -> ".join(cycle)
