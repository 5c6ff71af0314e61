"""The package's imports run one way: no cycle, and no import against the layers in docs/architecture.md.

Every ``import`` in the package counts, the ones inside functions too (a lazy import is still a
dependency). The layers are read from the table in docs/architecture.md, so the docs and the
code cannot drift apart without this test failing.
"""

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "bioray"
DOC = ROOT / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules a file imports; ``from pkg import sub`` counts as importing ``pkg.sub``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Imports under `if TYPE_CHECKING:` never run: type hints only, not a dependency.
    hints_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                  for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in hints_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "bioray"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bioray":
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            out |= subs or {node.module}
    return out & modules.keys()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _component(module: str) -> str:
    """``bioray.corpus.build`` -> ``corpus``: the unit the layers speak of."""
    return module.split(".")[1] if "." in module else "bioray"


def _layers() -> dict[str, int]:
    """The layer of each component, from the marked table in docs/architecture.md."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- layers -->", 1)[1]
    out = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            out[name] = int(cells[0])
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_component_has_a_layer_in_the_docs(graph):
    layers = _layers()
    missing = sorted({_component(m) for m in graph} - layers.keys() - {"bioray"})
    assert not missing, f"docs/architecture.md's layer table does not name: {missing}"


def test_imports_only_go_down_the_layers(graph):
    layers = _layers()
    wrong = []
    for module, imported in graph.items():
        here = _component(module)
        if here == "bioray":  # the package facade re-exports the public names
            continue
        for dep in imported:
            there = _component(dep)
            if there != here and not layers[there] < layers[here]:
                wrong.append(f"{module} (layer {layers[here]}) imports {dep} (layer {layers[there]})")
    assert not wrong, "imports against the layers in docs/architecture.md:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle(graph):
    # Package facades (__init__ re-exports) are left out: importing one is importing what it names.
    facades = {m for m, p in _modules().items() if p.name == "__init__.py"}
    edges = {m: deps - facades for m, deps in graph.items() if m not in facades}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    # The checker itself: a module of a lower layer importing a higher one is reported.
    layers = _layers()
    assert layers["files"] < layers["recipes"]
    modules = {"bioray.files": tmp_path / "files.py", "bioray.recipes": tmp_path / "recipes.py"}
    modules["bioray.files"].write_text("def f():\n    from bioray.recipes import finetune\n")
    assert _imports(modules["bioray.files"], modules) == {"bioray.recipes"}


def test_rays_private_names_are_where_bioray_expects_them():
    # bioray._ray is the one door to them; when a Ray upgrade moves one, this says which and where.
    import importlib

    import ray

    try:
        module = importlib.import_module("bioray._ray")
        module.quiet_train_report_lines()
        importlib.import_module(module.DATA_PROGRESS_LOGGER)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"Ray {ray.__version__} moved a name bioray._ray imports (written for Ray 2.60): {e}")
    for name in ("UserCallback", "ValidationConfig", "ValidationTaskConfig"):
        assert getattr(module, name).__module__.startswith("ray."), name


def test_only_bioray_ray_imports_rays_private_modules():
    private = re.compile(r"^ray\.(.*\._internal|train\.v2)")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_ray.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if private.match(n)]
    assert not found, "Ray-private imports outside bioray/_ray.py:\n" + "\n".join(found)
