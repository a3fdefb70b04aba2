"""Planning works without torch or megatron installed; every import goes down the package's
floors, and no two modules or sub-packages import each other in a circle."""

import ast
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path


def test_schedules_package_imports_without_torch_or_megatron():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'megatron', 'numpy'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import megatron_bitpipe.schedules as s\n"
        "from megatron_bitpipe.schedules import simulate, render\n"
        "for name in s.names():\n"
        "    s.get(name)\n"
        "print('ok', len(s.names()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


PACKAGE = Path(__file__).resolve().parents[1] / "megatron_bitpipe"
LAYERS = (
    ("", "schedules"),  # the package's docstring; pure planning, the standard library only
    ("runtime",),  # torch only
    ("run_plan", "run_report"),  # run settings and the run's --report (no megatron)
    ("mcore",),  # the only megatron importer
    ("outputs", "train_args"),  # what entry points share: output folders, the trainer's parser
    ("scale",),  # planning at scale, and the bench (it starts the trainer as a process)
    ("train", "megatron_lm"),  # our trainer, the Megatron-LM launcher
    ("cli", "__main__"),  # megatron-bitpipe
)
"""The package's floors, lowest first: a module imports from its own floor and the ones below."""


def module_files() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(
    name: str, source: str, modules: Collection[str], *, package: bool = False
) -> set[str]:
    """The package's modules named by the import statements of ``source`` (module ``name``, a
    package's ``__init__`` when ``package``), wherever they stand: top level, functions,
    ``TYPE_CHECKING`` blocks. ``from p import x`` names ``p.x`` if that is a module, else ``p``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parent = parts[: len(parts) - node.level + package]
                base = ".".join([*parent, base] if base else parent)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = module_files()
    return {
        name: imported(name, path.read_text(), modules, package=path.name == "__init__.py")
        for name, path in modules.items()
    }


def unit(module: str) -> str:
    """The top-level module or sub-package holding ``module`` ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def floor(module: str) -> int:
    return next(level for level, units in enumerate(LAYERS) if unit(module) in units)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (Tarjan's), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_floor():
    placed = {name for units in LAYERS for name in units}
    assert sorted({unit(module) for module in module_files()} - placed) == []


def test_no_import_goes_up_a_floor():
    upward = [
        f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if floor(target) > floor(module)
    ]
    assert upward == []


def test_no_import_cycle_between_modules_or_between_sub_packages():
    graph = import_graph()
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit(module), set()).update(unit(target) for target in targets)
    for source, targets in units.items():
        targets.discard(source)
    assert cycles(graph) == []
    assert cycles(units) == []


def test_the_checks_resolve_every_import_form_and_find_cycles():
    modules = [
        "megatron_bitpipe", "megatron_bitpipe.scale", "megatron_bitpipe.scale.commands",
        "megatron_bitpipe.train", "megatron_bitpipe.schedules", "megatron_bitpipe.schedules.ir",
        "megatron_bitpipe.mcore", "megatron_bitpipe.mcore.cpu",
    ]
    source = (
        "from .. import train\n"
        "from ..schedules import ir, build\n"
        "def later():\n"
        "    import megatron_bitpipe.mcore.cpu.apply\n"
        "    from megatron_bitpipe.mcore import x\n"
        "import torch\n"
    )
    assert imported("megatron_bitpipe.scale.commands", source, modules) == {
        "megatron_bitpipe.train", "megatron_bitpipe.schedules.ir", "megatron_bitpipe.schedules",
        "megatron_bitpipe.mcore.cpu", "megatron_bitpipe.mcore",
    }
    assert imported("megatron_bitpipe.scale", "from . import commands", modules, package=True) == {
        "megatron_bitpipe.scale.commands"
    }
    assert floor("megatron_bitpipe.scale.commands") < floor("megatron_bitpipe.train")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == [["a", "b", "c"]]
