"""The suite's tiers, read from the tests' code (``conftest.py`` applies them to every test).

``multiprocess``: the test starts a process. Its function, the fixtures it requests, and every
function or class of this folder that they name (followed transitively: ``train`` in a test module
calling ``runs.run``, a fixture's inner ``get`` calling ``spawn``) are read from their bytecode;
the test is marked when one of them names a process starter: ``subprocess.run``/``Popen``/...,
``os.system``/``fork``/..., ``multiprocessing`` or ``torch.multiprocessing``'s ``Process``,
``Pool``, ``spawn``, ``start_processes``.

``megatron_lm``: the test needs a Megatron-LM checkout: it carries a skip condition that names
``MEGATRON_LM_PATH`` (``test_megatron_lm.needs_checkout``), or it (transitively, as above) reads a
module constant defined from that variable (``CHECKOUT = os.environ.get("MEGATRON_LM_PATH")``).

The fast lane is ``pytest -m "not multiprocess and not megatron_lm"``. A process started by code
outside this folder that a test calls in-process (``cli.main([..., "--submit"])`` running sbatch)
is not seen in the code; ``watching_processes`` sees it when the test runs (Python's audit events
``subprocess.Popen``, ``os.fork``, ``os.system``, ``os.posix_spawn``) and fails the test, saying
to mark it ``@pytest.mark.multiprocess`` by hand.
"""

from __future__ import annotations

import ast
import contextlib
import concurrent.futures
import dis
import functools
import importlib
import importlib.util
import inspect
import multiprocessing
import multiprocessing.managers
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

MULTIPROCESS = "multiprocess"
MEGATRON_LM = "megatron_lm"
MARKERS = {
    MULTIPROCESS: "starts processes (torchrun, subprocess, torch.multiprocessing); "
    "applied by tests/tiers.py",
    MEGATRON_LM: "needs a Megatron-LM checkout at MEGATRON_LM_PATH; applied by tests/tiers.py",
}
CHECKOUT_VARIABLE = "MEGATRON_LM_PATH"
FOLDER = str(Path(__file__).resolve().parent) + os.sep


def _process_starters() -> list[object]:
    starters: list[object] = [
        *(getattr(subprocess, name) for name in
          ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")),
        *(getattr(os, name) for name in
          ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "spawnv", "spawnve",
           "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe") if hasattr(os, name)),
        multiprocessing.Process, multiprocessing.Pool, multiprocessing.get_context,
        multiprocessing.managers.SyncManager, concurrent.futures.ProcessPoolExecutor,
    ]
    torch_multiprocessing = sys.modules.get("torch.multiprocessing")
    if torch_multiprocessing is None:
        try:
            import torch.multiprocessing as torch_multiprocessing
        except ImportError:
            torch_multiprocessing = None
    if torch_multiprocessing is not None:
        starters += [getattr(torch_multiprocessing, name) for name in
                     ("spawn", "start_processes", "Process", "Pool", "get_context")
                     if hasattr(torch_multiprocessing, name)]
    return starters


_STARTERS = _process_starters()
_STARTER_IDS = frozenset(id(starter) for starter in _STARTERS)


def tiers(item: pytest.Item) -> list[str]:
    """The tier markers ``item`` gets (none for a test that is not a function)."""
    function = getattr(item, "function", None)
    if function is None:
        return []
    parameters = getattr(getattr(item, "callspec", None), "params", {})
    found = _reached(function, *_fixture_functions(item), *parameters.values(), *_helpers_of_class(item))
    if _skips_without_a_checkout(item):
        found.add(MEGATRON_LM)
    return [tier for tier in MARKERS if tier in found]


def starts_processes(*functions: object) -> bool:
    """Whether any of ``functions``, or what they name in this folder, names a process starter."""
    return MULTIPROCESS in _reached(*functions)


def reads_the_checkout(*functions: object) -> bool:
    """Whether any of ``functions``, or what they name in this folder, reads a module constant
    defined from ``MEGATRON_LM_PATH``."""
    return MEGATRON_LM in _reached(*functions)


def _reached(*roots: object) -> set[str]:
    return set().union(*(_tiers_of(function) for root in roots for function in _ours(root)))


_TIERS_OF: dict[int, tuple[types.FunctionType, frozenset[str]]] = {}


def _tiers_of(function: types.FunctionType) -> frozenset[str]:
    """The tiers that what ``function`` names, transitively, puts a test in (read once)."""
    if id(function) not in _TIERS_OF:
        found = set()
        for named in _named([function]):
            if id(named) in _STARTER_IDS:
                found.add(MULTIPROCESS)
            elif named is _CHECKOUT:
                found.add(MEGATRON_LM)
        _TIERS_OF[id(function)] = (function, frozenset(found))
    return _TIERS_OF[id(function)][1]


def _skips_without_a_checkout(item: pytest.Item) -> bool:
    return any(CHECKOUT_VARIABLE in str(mark.kwargs.get("reason", ""))
               for name in ("skipif", "skip") for mark in item.iter_markers(name))


def _helpers_of_class(item: pytest.Item) -> list[object]:
    """A test class's members other than its tests (``self.helper`` is not resolved)."""
    cls = getattr(item, "cls", None)
    members = vars(cls).items() if cls is not None else ()
    return [member for name, member in members if not name.startswith("test")]


def _fixture_functions(item: pytest.Item) -> list[Callable]:
    info = getattr(item, "_fixtureinfo", None)
    definitions = getattr(info, "name2fixturedefs", {})
    return [definition.func for name in getattr(info, "names_closure", ())
            for definition in definitions.get(name, ()) if callable(getattr(definition, "func", None))]


# --- reading code ---------------------------------------------------------------------------------


_CHECKOUT = object()  # stands for a module constant that holds the MEGATRON_LM_PATH checkout


def _named(functions: Iterable[object]) -> Iterator[object]:
    """Every object the functions name, following the functions and classes of this folder."""
    seen: set[int] = set()
    pending = [code for function in functions for code in _ours(function)]
    while pending:
        function = pending.pop()
        if id(function.__code__) in seen:
            continue
        seen.add(id(function.__code__))
        for named in _names_in(function):
            yield named
            pending.extend(_ours(named))


def _ours(named: object) -> list[Callable]:
    """What to read next when ``named`` is code of this folder: a function, or a class's methods."""
    named = _unwrapped(named)
    if isinstance(named, types.FunctionType):
        filename = named.__code__.co_filename
        return [named] if filename.startswith(FOLDER) and filename != __file__ else []
    if isinstance(named, type) and _defined_here(named):
        members = [_unwrapped(member) for member in vars(named).values()]
        members += [member.fget for member in members if isinstance(member, property)]
        return [member for member in members if isinstance(member, types.FunctionType)]
    return []


def _unwrapped(named: object) -> object:
    if isinstance(named, functools.partial):
        return named.func
    if isinstance(named, (staticmethod, classmethod, types.MethodType)):
        return named.__func__
    return named


def _defined_here(cls: type) -> bool:
    try:
        filename = inspect.getfile(cls)
        return filename.startswith(FOLDER) and filename != __file__
    except (TypeError, OSError):
        return False


_READ: dict[int, tuple[types.FunctionType, list[object]]] = {}


def _names_in(function: types.FunctionType) -> list[object]:
    """What one function names (read once per function)."""
    if id(function) not in _READ:
        _READ[id(function)] = (function, list(_names_in_code(function.__code__, function.__globals__, {})))
    return _READ[id(function)][1]


_MISSING = object()
_TRANSPARENT = {"CACHE", "EXTENDED_ARG", "NOP", "PUSH_NULL", "RESUME", "COPY_FREE_VARS"}
_LOADS_LOCAL = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_DEREF",
                "LOAD_CLASSDEREF", "LOAD_NAME"}
_STORES_LOCAL = {"STORE_FAST", "STORE_DEREF", "STORE_NAME"}


def _names_in_code(code: types.CodeType, module: dict, imported: dict[str, object]) -> Iterator[object]:
    """The globals ``code`` loads, attributes of them it loads (``subprocess.run``: the function),
    and what it imports, in nested functions, lambdas and comprehensions too."""
    imported = dict(imported)
    checkout = _checkout_constants(module)
    current: object = _MISSING
    importing: object = _MISSING
    from_list: object = None
    for instruction in dis.get_instructions(code):
        operation, name = instruction.opname, instruction.argval
        if operation in _TRANSPARENT:
            continue
        if operation == "LOAD_CONST":
            from_list = name
        if operation == "LOAD_GLOBAL":
            if name in checkout:
                yield _CHECKOUT
            current = module.get(name, _MISSING)
        elif operation in _LOADS_LOCAL:
            current = imported.get(name, _MISSING)
        elif operation in ("LOAD_ATTR", "LOAD_METHOD"):
            current = _attribute(current, name)
        elif operation == "IMPORT_NAME":  # ``import a.b`` gives ``a``; ``from a.b import c``, ``a.b``
            current = importing = _module(name if from_list else name.partition(".")[0])
        elif operation == "IMPORT_FROM":
            current = _attribute(importing, name)
        elif operation in _STORES_LOCAL and current is not _MISSING:
            imported[name] = current
            current = _MISSING
            continue
        else:
            current = _MISSING
        if current is not _MISSING:
            yield current
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _names_in_code(constant, module, imported)


def _attribute(owner: object, name: str) -> object:
    """``owner.name`` for a module or a class, without running code (no lazy imports, no
    properties); nothing for other objects."""
    if isinstance(owner, types.ModuleType):
        return vars(owner).get(name, _MISSING)
    if isinstance(owner, type):
        try:
            return inspect.getattr_static(owner, name)
        except AttributeError:
            return _MISSING
    return _MISSING


def _module(name: str) -> object:
    """The module ``name`` if it is imported already or is one of this folder's (those are
    imported now); nothing otherwise (reading a test must not import megatron)."""
    if name in sys.modules:
        return sys.modules[name]
    if "." not in name:
        try:
            spec = importlib.util.find_spec(name)
            if spec is not None and str(spec.origin).startswith(FOLDER):
                return importlib.import_module(name)
        except (ImportError, ValueError):
            pass
    return _MISSING


@functools.cache
def _checkout_constants_of(filename: str) -> frozenset[str]:
    """Names assigned at a module's top level from an expression that names MEGATRON_LM_PATH."""
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    names = set()
    for statement in tree.body:
        if isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
            if any(isinstance(node, ast.Constant) and node.value == CHECKOUT_VARIABLE
                   for node in ast.walk(statement.value)):
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                names.update(node.id for target in targets for node in ast.walk(target)
                             if isinstance(node, ast.Name))
    return frozenset(names)


def _checkout_constants(module: dict) -> frozenset[str]:
    filename = module.get("__file__")
    if not filename or not str(filename).startswith(FOLDER):
        return frozenset()
    return _checkout_constants_of(str(filename))


# --- what the code does not show ------------------------------------------------------------------

PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.posix_spawn",
                            "os.spawn"})
_started: list[str] | None = None  # while a test without the multiprocess marker runs


def _audit(event: str, arguments: tuple) -> None:
    if _started is not None and event in PROCESS_EVENTS and not _megatron_version_probe():
        _started.append(f"{event} {arguments[:2]!r}"[:200])


def _megatron_version_probe() -> bool:
    """megatron-core 0.19 runs ``git rev-parse`` when first imported (its package_info)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("megatron", "core", "package_info.py")):
            return True
        frame = frame.f_back
    return False


_watching = False


def watch_processes() -> None:
    """Hear every process started from now on (an audit hook, which stays: once per interpreter)."""
    global _watching
    if not _watching:
        sys.addaudithook(_audit)
        _watching = True


@contextlib.contextmanager
def watching_processes(item: pytest.Item) -> Iterator[None]:
    """Fail ``item`` if it starts a process without the ``multiprocess`` marker."""
    global _started
    marked = item.get_closest_marker(MULTIPROCESS) is not None
    outer, _started = _started, (None if marked else [])
    try:
        yield
    finally:
        started, _started = _started, outer
    if started:
        pytest.fail(
            f"{item.nodeid} started a process ({started[0]}) but is not marked {MULTIPROCESS}: the "
            "process is started by code that tests/tiers.py does not read; mark the test "
            f"@pytest.mark.{MULTIPROCESS}",
            pytrace=False,
        )
