"""The package layers hold (``[tool.importlinter]`` in pyproject.toml): a regression guard.

Bottom to top: base (errors, settings, scrub, SQL sandbox, sqlglot helpers) -> data -> config
-> model + checkpoints -> training -> evaluation -> tracking (MLflow) -> runners ->
entrypoints. Function-local imports count as imports (import-linter sees them): a lazy import
may keep start-up cheap, it may not point upward. On top of the contract:

- every module of the four packages sits in exactly one layer, so a new module must be placed;
- no import cycle among the modules, including inside a layer;
- nothing in the repository (packages, tests, benchmarks) imports ``trainer/finetune.py``: it
  is the entrypoint script, not a library.

Runs `lint-imports` (import-linter 2.17) as a user would; a broken contract fails with its
report (which import, from which line, crosses which layers).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dataset_utils", "trainer", "evaluation", "cluster")


def _contract() -> dict:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return layers


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _lint_imports(
    config: Path, cwd: Path, *, timeout: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    return subprocess.run(
        [exe, "--no-cache", "--no-logo", str(config)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_lint_imports_contract_is_kept() -> None:
    proc = _lint_imports(REPO / "pyproject.toml", REPO, timeout=300)
    assert proc.returncode == 0, (
        "an import crosses the layers in pyproject.toml [tool.importlinter] (move the code to "
        "the lowest layer that needs it; a function-local import is no way around it):\n"
        + proc.stdout[-6000:]
        + proc.stderr[-2000:]
    )
    assert "Contracts: 1 kept, 0 broken." in proc.stdout, proc.stdout


def test_every_module_is_in_exactly_one_layer() -> None:
    listed: dict[str, int] = {}
    for layer in _contract()["layers"]:
        for name in layer.replace("|", ":").split(":"):
            listed[name.strip()] = listed.get(name.strip(), 0) + 1
    modules = {m for m in _graph().modules if "." in m}  # the packages' __init__ are empty
    twice = sorted(m for m, n in listed.items() if n > 1)
    unplaced = sorted(modules - set(listed))
    unknown = sorted(set(listed) - modules)
    assert not twice, f"modules in more than one layer: {twice}"
    assert not unplaced, (
        f"modules in no layer of pyproject.toml [tool.importlinter]: {unplaced}; add each to "
        "the lowest layer its imports allow"
    )
    assert not unknown, f"layers name modules that do not exist: {unknown}"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    detail = []
    for component in cycles:
        for a in component:
            for b in component:
                if a != b and graph.direct_import_exists(importer=a, imported=b):
                    lines = graph.get_import_details(importer=a, imported=b)
                    where = ", ".join(f"line {d['line_number']}" for d in lines)
                    detail.append(f"  {a} -> {b} ({where})")
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def _imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_imports_the_finetune_entrypoint() -> None:
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in {".venv", "venv", "build"} or rel == Path("trainer/finetune.py"):
            continue
        if "trainer.finetune" in _imports_of(path):
            offenders.append(str(rel))
    assert not offenders, (
        f"{offenders} import trainer.finetune, the entrypoint script; import the step from its "
        "home instead (trainer.job, trainer.training, trainer.modeling, trainer.checkpoint)"
    )


def test_the_checks_catch_violations(tmp_path: Path) -> None:
    """The guard itself works: an upward function-local import, a cycle and an import of the
    entrypoint are each caught, with a message that names them."""
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from demo import high\n")
    (pkg / "high.py").write_text("from demo import low\n")
    (tmp_path / "cfg.toml").write_text(
        '[tool.importlinter]\nroot_packages = ["demo"]\n'
        '[[tool.importlinter.contracts]]\nname = "demo layers"\ntype = "layers"\n'
        'layers = ["demo.high", "demo.low"]\n'
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    proc = _lint_imports(tmp_path / "cfg.toml", tmp_path, timeout=120, env=env)
    assert proc.returncode == 1
    # The report names the layers, the importer and the line of the function-local import.
    assert "demo.low is not allowed to import demo.high" in proc.stdout, proc.stdout
    assert "demo.low -> demo.high (l.2)" in proc.stdout, proc.stdout
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("demo", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    assert _cycles(graph) == [["demo.high", "demo.low"]]
    (tmp_path / "t.py").write_text("import trainer.finetune as f\n")
    assert "trainer.finetune" in _imports_of(tmp_path / "t.py")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_tests_readme_maps_every_module_to_existing_tests() -> None:
    """tests/README.md lists every module of the four packages, and every test file it names
    exists."""
    import re

    text = (REPO / "tests" / "README.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_.]+)` \|", text, flags=re.M))
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if p.name != "__init__.py"
    }
    assert modules - listed == set(), "add these modules to tests/README.md"
    assert listed - modules == set(), "tests/README.md lists modules that do not exist"
    named = set(re.findall(r"([\w/]+\.py)", text))
    missing = sorted(n for n in named if not (REPO / "tests" / n).is_file())
    missing = [n for n in missing if not (REPO / n).is_file()]  # benchmarks/perturb.py
    assert missing == []
