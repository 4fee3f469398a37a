"""The house conventions of style.md, as tests: read with ``ast`` over ``elmctl/``, nothing imported.

- the core (everything but ``elmctl/cli/`` and ``elmctl/__main__.py``) never prints and never uses typer or rich;
  the only exceptions are the ``python -m`` entry points whose stdout *is* their contract (``PRINT_ALLOWED``);
- nothing outside ``elmctl/store/`` imports the store's private modules (``elmctl.store._*``);
- the core never imports ``elmctl.cli``;
- packages import downward only: the graph of top-level packages (``elmctl.X -> elmctl.Y``, imports inside
  functions included, ``if TYPE_CHECKING:`` imports not: they never run) has no cycle, nor has the graph of
  modules;
- one worker entry point: under ``elmctl/train/`` only ``worker.py`` runs as ``__main__``, and the training
  jobs (``train/pretrain``, ``train/tune``, ``train/tools``) import the core, never each other.

Each failure names the file and line (and, for a cycle, the path with one import per edge).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "elmctl"

#: the CLI: the only code that may print, render or import typer/rich
CLI = ("cli/", "__main__.py")
#: (file, function) whose stdout is the process's contract: the torchrun worker's progress lines (the launcher
#: tees them into train.log) and the JSON result of its bench job
PRINT_ALLOWED = {("train/worker.py", "main"), ("train/worker.py", "_train"), ("train/tools/bench.py", "bench_main")}
UI_MODULES = ("typer", "rich", "click")


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def _is_cli(rel: str) -> bool:
    return rel.startswith(CLI[0]) or rel == CLI[1]


def _modname(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES = {_rel(p): p for p in sorted(PKG.rglob("*.py"))}
MODULES = {_modname(p): _rel(p) for p in FILES.values()}
TREES = {rel: ast.parse(p.read_text(), filename=str(p)) for rel, p in FILES.items()}


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:``: imports for annotations only, never run."""
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(rel: str) -> list[tuple[str, int]]:
    """Every module an import statement of ``rel`` names (``from a import b`` names ``a.b`` where that is a
    module, else ``a``), with its line; relative imports resolved; imports inside functions included, those
    under ``if TYPE_CHECKING:`` (annotations only) not."""
    mod = _modname(FILES[rel])
    is_pkg = rel.endswith("__init__.py")
    typing_only = {id(n) for block in ast.walk(TREES[rel]) if _is_type_checking(block)
                   for stmt in block.body for n in ast.walk(stmt)}
    out: list[tuple[str, int]] = []
    for node in ast.walk(TREES[rel]):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
    return list(dict.fromkeys(out))


def _core_files() -> list[str]:
    return [rel for rel in FILES if not _is_cli(rel)]


def test_core_never_prints_or_renders():
    problems = []
    for rel in _core_files():
        allowed_lines: set[int] = set()
        for node in ast.walk(TREES[rel]):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (rel, node.name) in PRINT_ALLOWED:
                allowed_lines |= set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        for node in ast.walk(TREES[rel]):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
                    and node.lineno not in allowed_lines):
                problems.append(f"elmctl/{rel}:{node.lineno} print()")
        for name, line in _imports(rel):
            if name.split(".")[0] in UI_MODULES:
                problems.append(f"elmctl/{rel}:{line} imports {name}")
    assert not problems, "the core returns data and raises; only elmctl/cli prints:\n" + "\n".join(problems)


def test_print_exceptions_exist():
    """The exceptions stay few and real: each names a function that exists (rename it here, or drop it)."""
    for rel, func in PRINT_ALLOWED:
        names = {n.name for n in ast.walk(TREES[rel]) if isinstance(n, ast.FunctionDef)}
        assert func in names, f"PRINT_ALLOWED names elmctl/{rel}:{func}, which does not exist"


def test_store_private_modules_stay_in_store():
    problems = [f"elmctl/{rel}:{line} imports {name}"
                for rel in FILES if not rel.startswith("store/")
                for name, line in _imports(rel)
                if name.startswith("elmctl.store._")]
    assert not problems, "import the store through elmctl.store, not its private modules:\n" + "\n".join(problems)


def test_core_never_imports_cli():
    problems = [f"elmctl/{rel}:{line} imports {name}"
                for rel in _core_files()
                for name, line in _imports(rel)
                if name == "elmctl.cli" or name.startswith("elmctl.cli.")]
    assert not problems, "the core must not import the CLI:\n" + "\n".join(problems)


def _find_cycle(edges: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges.get(v, {})):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def _describe(cycle: list[str], edges: dict[str, dict[str, str]]) -> str:
    return " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b}: {edges[a][b]}" for a, b in zip(cycle, cycle[1:]))


def _package_graph() -> dict[str, dict[str, str]]:
    """elmctl.X -> elmctl.Y for top-level packages/modules X != Y, each edge with one import that makes it."""
    edges: dict[str, dict[str, str]] = defaultdict(dict)
    for rel in FILES:
        if rel == "__init__.py":
            continue  # the top: its lazy public API (importlib) points down at everything
        src = rel.split("/")[0].removesuffix(".py")
        for name, line in _imports(rel):
            parts = name.split(".")
            if parts[0] != "elmctl" or len(parts) < 2 or f"elmctl.{parts[1]}" not in MODULES:
                continue
            if parts[1] != src:
                edges[src].setdefault(parts[1], f"elmctl/{rel}:{line} imports {name}")
    return edges


def _module_graph() -> dict[str, dict[str, str]]:
    """module -> module; ``from elmctl.pkg import name`` is an edge to ``elmctl.pkg.name`` where that is a module,
    else to the package (its ``__init__``)."""
    edges: dict[str, dict[str, str]] = defaultdict(dict)
    for rel in FILES:
        mod = _modname(FILES[rel])
        for name, line in _imports(rel):
            if name not in MODULES or name == mod:
                continue
            edges[mod].setdefault(name, f"elmctl/{rel}:{line}")
    return edges


def test_packages_import_downward_only():
    edges = _package_graph()
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle between packages (import downward only):\n" + _describe(cycle, edges)


def test_modules_have_no_import_cycle():
    edges = _module_graph()
    # the top package re-exports and every submodule's import runs it first: not a cycle anyone can break
    for mod in list(edges):
        edges[mod].pop("elmctl", None)
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle between modules:\n" + _describe(cycle, edges)


def _main_guard(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and isinstance(n.test.left, ast.Name)
               and n.test.left.id == "__name__" for n in tree.body)


def test_one_worker_entry_point_under_train():
    mains = [rel for rel, tree in TREES.items() if rel.startswith("train/") and _main_guard(tree)]
    assert mains == ["train/worker.py"], f"torchrun starts one entry point, elmctl.train.worker; also found: {mains}"


TRAIN_JOBS = ("pretrain", "tune", "tools")


def test_training_jobs_never_import_each_other():
    problems = []
    for rel in FILES:
        parts = rel.split("/")
        if parts[0] != "train" or len(parts) < 3 or parts[1] not in TRAIN_JOBS:
            continue
        for name, line in _imports(rel):
            bits = name.split(".")
            if bits[:2] == ["elmctl", "train"] and len(bits) > 2 and bits[2] in TRAIN_JOBS and bits[2] != parts[1]:
                problems.append(f"elmctl/{rel}:{line} imports {name}")
    assert not problems, "a training job imports another (shared code belongs in elmctl/train/):\n" + "\n".join(problems)
