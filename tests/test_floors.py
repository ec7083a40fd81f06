"""The package's floors, read from the code's own imports: each module imports only from
its own floor or below, nothing imports in a circle, and the checks that run before torch
(the architectures and the commands' pre-checks) import no torch.

Floors, bottom up: red.errors; red.files and red.config; red.distributed and red.dtypes; red.model;
red.run; red.data; red.train; red.commands; red.cli (and the package's entry points)."""
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [("red.errors",), ("red.files", "red.config"), ("red.distributed", "red.dtypes"), ("red.model",), ("red.run",),
          ("red.data",), ("red.train",), ("red.commands",), ("red.cli", "red.__main__", "red")]


def floor_of(mod: str) -> int:
    """Index in FLOORS of the longest name that ``mod`` is or lies under."""
    best = max(((len(n), i) for i, names in enumerate(FLOORS) for n in names if mod == n or mod.startswith(n + ".")),
               default=None)
    assert best is not None, f"{mod} is on no floor"
    return best[1]


def module_name(p: Path) -> str:
    parts = list(p.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the red modules it imports (at the top or inside a function)."""
    out: dict[str, set[str]] = defaultdict(set)
    for p in sorted((ROOT / "red").rglob("*.py")):
        me = module_name(p)
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                pytest.fail(f"{me} imports relatively ({'.' * n.level}{n.module or ''}): name the floor")
            names = [n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names] \
                if isinstance(n, ast.Import) else []
            out[me].update(m for m in names if m and (m == "red" or m.startswith("red.")))
    return out


def test_every_import_goes_down_or_stays_on_its_floor():
    graph = imports()
    assert len(graph) > 30  # the whole package was read
    up = [(a, b) for a, targets in graph.items() for b in targets if floor_of(b) > floor_of(a)]
    assert not up, f"imports from a higher floor: {up}"


def test_no_import_circles():
    graph = imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            t = t if t in graph else next((g for g in graph if g.startswith(t + ".")), t)
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t in graph and state.get(t) is None:
                visit(t)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if state.get(m) is None:
            visit(m)


@pytest.mark.parametrize("module", ["red.model.arch", "red.model.gguf", "red.commands.checks", "red.commands.import_gguf",
                                    "red.config", "red.files", "red.cli"])
def test_the_checks_before_torch_import_no_torch(module):
    code = f"import sys, {module}; heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; " \
           "assert not heavy, heavy[:5]"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
