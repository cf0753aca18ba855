"""The package's layers: offline data tools below, training on top, and no import circles.

The graph is read from the sources (every ``import`` statement, at module level or inside a
function), so a lazy import cannot hide a circle.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_ext"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import submodule`` depends on the submodule; the package itself
                # is only the way there.
                submodules = [f"{node.module}.{a.name}" for a in node.names
                              if f"{node.module}.{a.name}" in modules]
                candidates = submodules or [node.module]
            else:
                continue
            targets.update(c for c in candidates if c in modules and c != name)
        graph[name] = targets
    return graph


def _find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_circles():
    graph = _import_graph()
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_offline_data_tools_do_not_reach_training():
    graph = _import_graph()
    for name, targets in graph.items():
        if name.startswith("megatron_ext.data"):
            upward = [t for t in targets if t.startswith(("megatron_ext.training",
                                                          "megatron_ext.model"))]
            assert not upward, f"{name} imports {upward}"


@pytest.mark.parametrize("module", sorted(
    _module_name(p) for p in (PACKAGE / "data").rglob("*.py")))
def test_data_modules_import_no_torch(module):
    code = (f"import sys, {module}; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'));"
            "print(heavy[:3]); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, f"{module} imports {result.stdout.strip()} {result.stderr}"
