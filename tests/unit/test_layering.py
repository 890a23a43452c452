"""
The layering rule, checked from the code (every module under dragonfly/,
parsed with ast; imports inside functions count too):

    core  <-  protocol  <-  supernode, peer  <-  daemon  <-  cli

A module imports only from its own layer or the layers below it; the two
middle packages (supernode, peer) do not import each other; and no set of
modules imports itself around in a cycle.  The tools at the top
(dragonfly.testing, dragonfly.sim, dragonfly.demo, dragonfly.openapi_doc) may import
anything, and nothing may import them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import dragonfly

ROOT = os.path.dirname(os.path.abspath(dragonfly.__file__))

#: the rank of each part; a module may import ranks <= its own
RANKS = {"core": 0, "protocol": 1, "supernode": 2, "peer": 2, "daemon": 3, "cli": 4}
#: top-level tools: import anything, imported by nothing but themselves
TOOLS = {"testing", "demo", "openapi_doc", "sim"}


def modules() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = ["dragonfly", *os.path.relpath(path, ROOT)[:-3].split(os.sep)]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The dragonfly modules C{name} imports."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            # the deepest dragonfly module the name reaches
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("dragonfly") and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def part(module: str) -> str | None:
    """The layer a module belongs to (None: the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_is_in_a_layer() -> None:
    unplaced = {m for m in graph() if part(m) is not None and part(m) not in RANKS and part(m) not in TOOLS}
    assert unplaced == set()


def test_no_module_imports_from_a_layer_above_it() -> None:
    wrong = []
    for module, targets in graph().items():
        here = part(module)
        for target in targets:
            there = part(target)
            if there is None:
                continue
            if there in TOOLS:
                if here not in TOOLS:
                    wrong.append(f"{module} imports the tool {target}")
                continue
            if here in TOOLS:
                continue
            if here is None or RANKS[there] > RANKS[here]:
                wrong.append(f"{module} ({here}) imports {target} ({there}), a layer above")
            elif RANKS[there] == RANKS[here] and there != here:
                wrong.append(f"{module} imports {target}: {here} and {there} stand side by side")
    assert wrong == []


def test_no_import_cycles() -> None:
    g = graph()
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(g):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_upward_imports_and_cycles(tmp_path) -> None:
    """The parser resolves relative imports (else the tests above could pass on nothing)."""
    g = graph()
    assert "dragonfly.core.defaults" in g["dragonfly.peer.tap"]
    assert "dragonfly.peer.launch" in g["dragonfly.daemon.peerlink"]
    assert "dragonfly.supernode.metrics" in g["dragonfly.supernode.api"]  # from . import metrics
    assert "dragonfly.cli.dfget" not in g["dragonfly.daemon.peerlink"]


def test_dfget_loads_no_twisted() -> None:
    """dfget's way to its first request imports no Twisted, treq, klein, attrs or yaml."""
    code = (
        "import sys, dragonfly.cli.dfget\n"
        "heavy = {'twisted', 'treq', 'klein', 'attr', 'attrs', 'yaml', 'http', 'email'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
