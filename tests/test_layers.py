"""The package's floors: every import inside ``knnlm/`` points down, so there is no import cycle.

Imports are read from the source with ``ast`` (module level and inside functions; imports under
``if TYPE_CHECKING:`` are annotations only and not counted). A name imported from ``knnlm``
itself (the lazy public API) counts as an import of the module that defines it.
"""

import ast
from pathlib import Path

import knnlm

PKG = Path(knnlm.__file__).parent

# lowest first; a module may import only modules on lower floors
FLOORS = [
    ["errors"],
    ["config", "corpora", "loading", "ops", "distributed"],
    ["scoring", "capture", "index", "sharding", "cpu"],  # cpu: the few-row linear layer is an op
    ["data"],
    ["datastore"],
    ["retrieval"],
    ["gate"],
    ["build", "derive", "evaluation", "generate"],  # derive: datastores from other datastores (subset, merge, reindex)
    ["model"],
    ["testing", "cli", "harness"],  # front ends over KNNLM: the command line, lm-evaluation-harness
]
FLOOR = {m: i for i, floor in enumerate(FLOORS) for m in floor}


def _imports(path: Path) -> set[str]:
    """knnlm modules imported by ``path`` (first component after ``knnlm.``)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "knnlm":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from knnlm import x: a submodule, a public name (its defining module), __version__
                for a in node.names:
                    if a.name in FLOOR:
                        out.add(a.name)
                    elif a.name in knnlm._API:
                        out.add(knnlm._API[a.name].split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("knnlm.")}
    return out


def test_every_module_has_a_floor():
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(FLOOR), f"place new modules in FLOORS: {sorted(modules ^ set(FLOOR))}"


def test_imports_only_point_down():
    bad = []
    for name, floor in FLOOR.items():
        for dep in _imports(PKG / f"{name}.py"):
            if FLOOR[dep] >= floor:
                bad.append(f"{name} (floor {floor}) imports {dep} (floor {FLOOR[dep]})")
    assert not bad, "; ".join(bad)


def _knnlm_classes():
    import importlib
    import inspect

    for name in FLOOR:
        if name == "harness":
            continue  # needs lm-eval; its one class subclasses lm-eval's TemplateLM (checked in test_harness)
        mod = importlib.import_module(f"knnlm.{name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__:
                yield name, cls


def test_no_behaviour_is_inherited_across_modules():
    """No mixins: a class takes no base class from another knnlm module (except the error
    hierarchy), so a lower module never supplies methods that call up into a higher one (as
    ``EvaluationMixin`` / ``GenerationMixin`` once called ``KNNLM.replace`` from below it)."""
    bad = []
    for name, cls in _knnlm_classes():
        for base in cls.__mro__[1:]:
            mod = base.__module__
            if mod.startswith("knnlm.") and mod not in (f"knnlm.{name}", "knnlm.errors"):
                bad.append(f"{cls.__module__}.{cls.__name__} inherits from {mod}.{base.__name__}")
    assert not bad, "; ".join(bad)


def test_every_benchmark_and_experiment_module_imports():
    """Scripts nothing else imports must still import, and every knnlm name they import (at
    module level or inside a function) or use as ``knnlm.NAME`` must exist: a renamed library
    function breaks them silently otherwise."""
    import importlib

    root = PKG.parent
    files = [p for d in ("benchmarks", "experiments") for p in sorted((root / d).rglob("*.py"))]
    assert len(files) > 10
    missing = []
    for path in files:
        if path.stem != "__main__":
            importlib.import_module(".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "knnlm":
                if not hasattr(knnlm, node.attr) and not _is_submodule("knnlm", node.attr):
                    missing.append(f"{path.relative_to(root)}: knnlm.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("knnlm"):
                mod = importlib.import_module(node.module)
                missing += [f"{path.relative_to(root)}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(mod, a.name) and not _is_submodule(node.module, a.name)]
    assert not missing, "; ".join(missing)


def _is_submodule(package: str, name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"{package}.{name}") is not None
