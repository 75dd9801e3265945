"""The import graph follows the layers declared in docs/architecture.md.

Every module of the package (``peftloop/`` and ``kernels/``, installed as ``peftloop.kernels``)
is parsed with ``ast``. The checks: no import cycle; no import of a module in a higher layer;
no private name (``_x``) imported or used across a module boundary (a package's private modules,
``kernels._dispatch``, are for that package's own modules); no function-local import except of
the optional packages below. The checker runs on small made-up packages too, so a broken rule
is shown to fail.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"peftloop": ROOT / "peftloop", "peftloop.kernels": ROOT / "kernels"}

# Imported inside functions on purpose: packages that may be absent (triton off Linux and in
# minimal installs; the AOT compile check needs triton's compiler internals; torch.utils.tensorboard
# imports the optional tensorboard package; optuna, the 'optuna' extra, only where a search trial
# needs it). A name covers the modules inside it.
OPTIONAL_PACKAGES = {"triton", "torch.utils.tensorboard", "optuna"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[tuple[str, int, bool]] = field(default_factory=list)  # (module, line, inside a function)
    private_uses: list[tuple[str, int]] = field(default_factory=list)  # ("module._name", line)


def declared_layers(page: Path = ROOT / "docs" / "architecture.md") -> list[list[str]]:
    """The layer table of docs/architecture.md, bottom first: [[module, ...], ...]."""
    text = page.read_text()
    table = text[text.index("<!-- layers:start -->"):text.index("<!-- layers:end -->")]
    layers = []
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 3 and re.match(r"\d+\.", cells[0]):
            layers.append(re.findall(r"`([\w.]+)`", cells[1]))
    assert layers, f"{page}: no layer table between the layers:start/end markers"
    return layers


def read_modules(sources: dict[str, Path]) -> dict[str, Module]:
    modules = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules[name] = Module(name, path, is_package)
    for module in modules.values():
        _read_imports(module, modules)
    return modules


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    base = base if module.is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _read_imports(module: Module, known: dict[str, Module]) -> None:
    tree = ast.parse(module.path.read_text(), str(module.path))
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    bound = {}  # local name -> module it refers to
    for node in ast.walk(tree):
        inside = getattr(node, "lineno", None) in local_lines
        if isinstance(node, ast.Import):
            for alias in node.names:
                module.imports.append((alias.name, node.lineno, inside))
                top = alias.name.split(".")[0]
                bound[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target in known:  # `from peftloop import distributed`: the submodule itself
                    module.imports.append((target, node.lineno, inside))
                    bound[alias.asname or alias.name] = target
                else:
                    module.imports.append((source, node.lineno, inside))
                    if _private(alias.name):
                        module.private_uses.append((f"{source}.{alias.name}", node.lineno))
    for node in ast.walk(tree):  # `kernels._dispatch.x`, `checkpoint._write_json(...)`
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if _private(node.attr):
                module.private_uses.append((f"{bound[node.value.id]}.{node.attr}", node.lineno))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def owner(name: str, modules: dict[str, Module]) -> str | None:
    """The package module ``name`` belongs to (the longest known prefix), None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def violations(modules: dict[str, Module], layers: list[list[str]]) -> list[str]:
    def layer_of(name: str) -> int | None:
        best = None
        for i, entries in enumerate(layers):
            for entry in entries:
                # a package stands for its modules, except the root package, which is only its __init__
                inside = "." in entry and name.startswith(entry + ".")
                if (name == entry or inside) and (best is None or len(entry) > len(best[1])):
                    best = (i, entry)
        return None if best is None else best[0]

    found = []
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for module in modules.values():
        where = f"{module.path.relative_to(module.path.parents[1])}"
        here = layer_of(module.name)
        if here is None:
            found.append(f"{module.name}: not in the declared layers")
            continue
        for target, line, inside in module.imports:
            dep = owner(target, modules)
            if inside and not any(target == p or target.startswith(p + ".") for p in OPTIONAL_PACKAGES):
                found.append(f"{where}:{line}: function-local import of {target}")
            if dep is None or dep == module.name:
                continue
            edges[module.name].add(dep)
            there = layer_of(dep)
            if there is not None and there > here:
                found.append(f"{where}:{line}: {module.name} (layer {here + 1}) imports {dep} "
                             f"(layer {there + 1})")
            private_module = next((p for p in dep.split(".") if _private(p)), None)
            if private_module:
                package = dep[: dep.index(private_module) - 1]
                if module.name != package and not module.name.startswith(package + "."):
                    found.append(f"{where}:{line}: {module.name} imports the private module {dep}")
        for target, line in module.private_uses:
            home = owner(target.rpartition(".")[0], modules)
            if home is not None and home != module.name:
                found.append(f"{where}:{line}: {module.name} uses the private name {target}")
    found += [f"import cycle among {', '.join(component)}" for component in _cycles(edges)]
    return list(dict.fromkeys(found))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each import cycle: Tarjan's strongly connected components of more than one
    module (or a module importing itself)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
            if len(component) > 1 or v in edges.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


# --------------------------------------------------------------------------------------------


def test_the_package_follows_its_declared_layers():
    modules = read_modules(SOURCES)
    assert "peftloop.kernels.lora_linear" in modules and "peftloop.train" in modules
    problems = violations(modules, declared_layers())
    assert not problems, "\n".join(problems)


def test_every_declared_module_exists():
    modules = read_modules(SOURCES)
    for layer in declared_layers():
        for name in layer:
            assert name in modules, f"docs/architecture.md declares {name}, which does not exist"


def _fake_package(tmp_path, files: dict[str, str]) -> dict[str, Module]:
    folder = tmp_path / "pkg"
    folder.mkdir()
    for name, source in {"__init__.py": "", **files}.items():
        (folder / name).write_text(source)
    return read_modules({"pkg": folder})


LAYERS = [["pkg.low"], ["pkg.mid", "pkg.side"], ["pkg.high"], ["pkg"]]


def test_a_clean_fake_package_passes(tmp_path):
    modules = _fake_package(tmp_path, {
        "low.py": "import os\n", "mid.py": "from pkg.low import f\n",
        "side.py": "from pkg import mid\n", "high.py": "from . import mid, side\n",
    })
    assert violations(modules, LAYERS) == []


@pytest.mark.parametrize("files, message", [
    ({"low.py": "from pkg.mid import g\n", "mid.py": ""},
     "pkg.low (layer 1) imports pkg.mid (layer 2)"),
    ({"mid.py": "from pkg import side\n", "side.py": "import pkg.mid\n"},
     "import cycle among pkg.mid, pkg.side"),
    ({"low.py": "", "mid.py": "from pkg.low import _helper\n"},
     "uses the private name pkg.low._helper"),
    ({"low.py": "", "mid.py": "from pkg import low\nlow._helper()\n"},
     "uses the private name pkg.low._helper"),
    ({"mid.py": "def f():\n    import json\n"}, "function-local import of json"),
    ({"mid.py": "def f():\n    from pkg import low\n", "low.py": ""}, "function-local import of pkg.low"),
    ({"mid.py": "from pkg.high import x\n", "high.py": ""}, "pkg.mid (layer 2) imports pkg.high (layer 3)"),
    ({"stray.py": ""}, "pkg.stray: not in the declared layers"),
])
def test_each_broken_rule_is_reported(tmp_path, files, message):
    problems = violations(_fake_package(tmp_path, files), LAYERS)
    assert any(message in p for p in problems), problems


def test_an_optional_package_may_be_imported_in_a_function(tmp_path):
    modules = _fake_package(tmp_path, {"low.py": "def f():\n    import triton\n"})
    assert violations(modules, LAYERS) == []
