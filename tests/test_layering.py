"""The core's layers: each module imports only from its own layer or those below it, with no cycles, and the
harness is used only by the front ends (commands). The README's Layout section shows the same table."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "qatbench"
FRONT_ENDS = {"cli", "bench", "deploy", "executors", "__main__"}
LAYERS = [  # bottom to top
    ("foundations", {"__init__", "errors", "params", "options", "atomic", "registry", "distributed", "signals", "stats",
                     "schedules", "opcount"}),
    ("data", {"data", "fingerprint", "text", "corpora", "batches"}),
    ("quantizer and contracts", {"flat", "quant", "activations", "sharding", "method", "task", "diagnostics"}),
    ("records and reports", {"results", "checkpoint", "export", "locks", "progress", "system", "plots", "leaderboard",
                             "verdicts", "compare", "status"}),
    ("one run", {"spec", "step", "clock", "finish", "loop", "harness"}),
    ("front ends", {"sweep", "pool", "executors", "bench", "deploy", "cli", "__main__"}),
]


def _imports() -> dict[str, set[str]]:
    """qatbench module -> the qatbench modules it imports (at any depth of its code)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names.add(node.module.split(".")[0] if node.module else "")
                if not node.module:
                    names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qatbench."):
                names.add(node.module.split(".")[1])
        graph[path.stem] = {n for n in names if (PACKAGE / f"{n}.py").exists()}
    return graph


def test_no_module_of_the_core_imports_itself_back():
    graph = _imports()

    def reaches(start, target, seen):
        for n in graph[start]:
            if n == target or (n not in seen and (seen.add(n) or reaches(n, target, seen))):
                return True
        return False

    cycles = [m for m in graph if reaches(m, m, set())]
    assert cycles == []


def test_only_front_ends_import_the_harness():
    users = {module for module, imported in _imports().items() if "harness" in imported}
    assert users <= FRONT_ENDS, users - FRONT_ENDS


def test_every_module_imports_only_its_layer_or_those_below():
    layer = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
    graph = _imports()
    assert set(graph) == set(layer), "place every module in a layer: " + ", ".join(sorted(set(graph) ^ set(layer)))
    upward = [(m, n) for m, imported in graph.items() for n in imported if layer[n] > layer[m]]
    assert upward == []


def test_the_readme_names_every_module_in_its_layer():
    readme = (PACKAGE.parent / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| ")}
    for layer, modules in LAYERS:
        for module in modules - {"__init__", "__main__"}:
            assert f"`{module}`" in rows[layer], (layer, module)
