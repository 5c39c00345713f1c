"""The package's floors (docs/architecture.md): imports only point down, and never in circles.

From the bottom: the base modules (errors, blockio, runner, clock, config, ...)
-> ``ondisk`` -> ``lease``, ``ledger``, ``lvm`` -> ``control``, ``guard``,
``lab``, ``hv`` -> ``ops`` -> ``agent`` -> ``cli``. Packages that share a
floor never import each other. Every import counts, also one inside a
function or under ``TYPE_CHECKING``: a cycle hidden there is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "fenceless"

FLOORS: dict[str, int] = {
    "ondisk": 1,
    "lease": 2, "ledger": 2, "lvm": 2,
    "control": 3, "guard": 3, "lab": 3, "hv": 3, "watchdog": 3,
    "ops": 4,
    "agent": 5,
    "cli": 6,
}
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def package_of(mod: str) -> str:
    """``fenceless.lease.delta`` -> ``lease``; a base module is its own package."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def floor_of(mod: str) -> int:
    return FLOORS.get(package_of(mod), 0) if "." in mod and package_of(mod) in FLOORS else 0


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every fenceless module ``path`` imports, wherever the import statement is."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    this = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = this.split(".")
                if path.name != "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            mod = name  # the longest known module that the name starts with
            while mod and mod not in known:
                mod = mod.rpartition(".")[0]
            if mod and mod != this and mod.startswith("fenceless"):
                found.add(mod)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) for m, p in mods.items()}


def test_every_package_has_a_floor() -> None:
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(FLOORS), f"give these a floor: {sorted(packages - set(FLOORS))}"


def violations(g: dict[str, set[str]]) -> list[str]:
    """Imports that point up, or across packages of one floor."""
    wrong = []
    for mod, deps in g.items():
        for dep in deps:
            if dep == "fenceless" or package_of(dep) == package_of(mod):
                continue
            if floor_of(dep) > floor_of(mod):
                wrong.append(f"{mod} (floor {floor_of(mod)}) imports {dep} "
                             f"(floor {floor_of(dep)})")
            elif floor_of(dep) == floor_of(mod) and floor_of(mod) > 0:
                wrong.append(f"{mod} imports {dep}: packages on one floor stay apart")
    return sorted(wrong)


def cycles_in(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_imports_only_point_down() -> None:
    wrong = violations(graph())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    cycles = cycles_in(graph())
    assert not cycles, f"import cycles: {cycles}"


def test_no_file_over_600_lines() -> None:
    big = {m: n for m, p in modules().items()
           if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not big, f"split these by responsibility: {big}"


def test_no_function_over_80_lines() -> None:
    long = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_the_rules_catch_wrong_imports() -> None:
    """The checks themselves, on a made-up graph that breaks each rule once."""
    g = {
        "fenceless.lease.delta": {"fenceless.ledger.slots", "fenceless.ondisk.record"},
        "fenceless.ondisk.record": {"fenceless.errors"},
        "fenceless.errors": set(),
        "fenceless.ledger.slots": {"fenceless.ondisk.record"},
        "fenceless.ops.volume": {"fenceless.agent.daemon"},
        "fenceless.agent.daemon": {"fenceless.agent.volumes"},
        "fenceless.agent.volumes": {"fenceless.agent.daemon"},
    }
    assert violations(g) == [
        "fenceless.lease.delta imports fenceless.ledger.slots: packages on one floor stay apart",
        "fenceless.ops.volume (floor 4) imports fenceless.agent.daemon (floor 5)",
    ]
    assert cycles_in(g) == [["fenceless.agent.daemon", "fenceless.agent.volumes"]]
