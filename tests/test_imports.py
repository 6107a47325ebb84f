"""The team's import rules (DESIGN.md): no import circles; an import inside a function only to defer a heavy
library, with a comment saying so. Checked on the source with ast: no project module is imported or run."""

import ast
import functools
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The project's own code. tests/ import everything on purpose and are not nodes of the graph.
SOURCES = ("app.py", "ui", "backend", "serving", "compile_scripts", "benchmarks")

# Third-party libraries worth deferring: slow to import (torch, diffusers, transformers, peft, gradio: 0.5 s to
# a few seconds each on the dev box; boto3 and gradio_client about 0.1 s) or absent on some machines
# (torch_neuronx, neuronxcc only on inf2; psutil, playwright, moto are dev requirements). huggingface_hub loads
# lazily but its functions pull in the HTTP stack. PIL and numpy load in about 0.05 s; they count because the
# code already defers them to keep light modules free of them, a choice this test should not overrule. Not
# counted: anyio, httpx, starlette, tqdm, filelock: gradio's own dependencies, each under 0.1 s, so deferring a
# project module only for them buys nothing.
HEAVY = ("torch", "torch_neuronx", "neuronxcc", "diffusers", "transformers", "peft", "huggingface_hub",
         "boto3", "botocore", "gradio", "gradio_client", "PIL", "numpy", "psutil", "playwright", "moto", "spaces")

# Cycles listed per strongly connected component: enough to show where to cut.
CYCLES_SHOWN = 50
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def module_name(path):
    """The dotted name Python gives a project file (backend/core/__init__.py -> backend.core)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules():
    """Every project module: dotted name -> path."""
    paths = [ROOT / SOURCES[0]] + [p for d in SOURCES[1:] for p in sorted((ROOT / d).rglob("*.py"))]
    return {module_name(p): p for p in paths}


def is_type_checking(test):
    """Whether an `if` tests TYPE_CHECKING (its body never runs)."""
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def walk(nodes, in_function=False):
    """Each import statement that can run, with whether it sits in a function (class bodies, `if`, `try` and
    `if __name__ == "__main__":` at the top all run at module level)."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            yield from walk(node.orelse, in_function)
        else:
            yield from walk(ast.iter_child_nodes(node), in_function or isinstance(node, FUNCTIONS))


def targets(node, name):
    """The modules an import statement runs, as {dotted name: explicit}: parent packages of an explicit target
    run too (Python imports them first) and come back with explicit=False."""
    if isinstance(node, ast.Import):
        wanted = [(alias.name, True) for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: `from ..core.api import X` in backend/inprocess/base.py
            package = name.split(".") if modules()[name].name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules()]
        # `from pkg import sub` only needs pkg started; `from pkg import name` needs pkg's code to have run.
        wanted = [(base, len(submodules) < len(node.names))] + [(sub, True) for sub in submodules]
    found = {}
    for target, explicit in wanted:
        parts = target.split(".")
        for i in range(1, len(parts)):
            found.setdefault(".".join(parts[:i]), False)
        found[target] = found.get(target, False) or explicit
    return found


@functools.cache
def imports():
    """Every import statement of the project: (module, node, in_function, {target: explicit})."""
    found = []
    for name, path in modules().items():
        for node, in_function in walk(ast.parse(path.read_text(), str(path)).body):
            found.append((name, node, in_function, targets(node, name)))
    return found


def project_edges(name, found):
    """The project modules an import really starts: a parent package of the importer is already running, so
    only an explicit `from parent import name` depends on it."""
    return [t for t, explicit in found.items() if t in modules() and t != name
            and (explicit or not name.startswith(t + "."))]


@functools.cache
def graph(top_level_only):
    """module -> {imported project module: line of the first import}."""
    edges = {name: {} for name in modules()}
    for name, node, in_function, found in imports():
        if not (top_level_only and in_function):
            for target in project_edges(name, found):
                edges[name].setdefault(target, node.lineno)
    return edges


@functools.cache
def heavy_modules():
    """Project modules that load a HEAVY library when imported, through their module-level imports."""
    heavy = {name for name, _, in_function, found in imports()
             if not in_function and any(t.split(".")[0] in HEAVY for t in found)}
    edges = graph(top_level_only=True)
    while grown := {name for name in edges if name not in heavy and heavy & edges[name].keys()}:
        heavy |= grown
    return heavy


def where(name, node):
    """`path:line` of a statement, for the failure lists."""
    return f"{modules()[name].relative_to(ROOT)}:{node.lineno}"


def in_functions():
    """Each in-function import: (module, node, the modules it names, the project modules it starts)."""
    for name, node, in_function, found in imports():
        if in_function:
            yield name, node, [t for t, explicit in found.items() if explicit], project_edges(name, found)


@functools.cache
def comment_lines(path):
    """Line numbers that carry a # comment (tokenize, so a # inside a string does not count)."""
    with path.open("rb") as f:
        return {tok.start[0] for tok in tokenize.tokenize(f.readline) if tok.type == tokenize.COMMENT}


def strongly_connected(edges):
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def cycles(edges, component):
    """The elementary cycles inside one component, each starting at its smallest module name; at most
    CYCLES_SHOWN of them, as a dense component has too many to list (or to find quickly)."""
    found = []

    def extend(path):
        for w in sorted(edges[path[-1]]):
            if len(found) == CYCLES_SHOWN:
                return
            if w == path[0]:
                found.append(path + [w])
            elif w in component and w > path[0] and w not in path:
                extend(path + [w])

    for start in sorted(component):
        extend([start])
    return found


def fail_with(problems):
    """Fail listing `path:line: message` entries, sorted; pass silently when there are none."""
    def by_place(problem):
        path, line, _ = problem.split(":", 2)
        return path, int(line)

    if problems := sorted(problems, key=by_place):
        pytest.fail("\n".join(problems), pytrace=False)


def test_no_import_cycles():
    """No import circle, counting imports in functions too (only `if TYPE_CHECKING:` is left out)."""
    edges = graph(top_level_only=False)
    problems = []
    for component in strongly_connected(edges):
        found = cycles(edges, component)
        for cycle in found:
            steps = [f"{modules()[a].relative_to(ROOT)}:{edges[a][b]}" for a, b in zip(cycle, cycle[1:])]
            problems.append(f"{steps[0]}: import cycle {' -> '.join(cycle)} (edges at {', '.join(steps)})")
        if len(found) == CYCLES_SHOWN:
            problems.append(f"{modules()[min(component)].relative_to(ROOT)}:1: and maybe more cycles among "
                            f"{', '.join(sorted(component))}")
    fail_with(problems)


# Standard-library modules that exist on some platforms only: imported where they are used, so that importing the
# module that uses them works everywhere (root_store's fcntl lock: `import backend` on Windows).
PLATFORM_ONLY = {"fcntl", "msvcrt", "resource", "termios", "pwd", "grp", "winreg"}


def test_no_standard_library_import_inside_a_function():
    """The standard library is never worth deferring (but for PLATFORM_ONLY): its imports belong at the top."""
    problems = []
    for name, node, named, _ in in_functions():
        if stdlib := [t for t in named if t.split(".")[0] in sys.stdlib_module_names - PLATFORM_ONLY]:
            problems.append(f"{where(name, node)}: standard-library import of {', '.join(stdlib)} inside a "
                            "function: move it to the top")
    fail_with(problems)


def test_in_function_project_imports_defer_something_heavy():
    """A project module imported inside a function must load a HEAVY library (else it belongs at the top)."""
    heavy = heavy_modules()
    fail_with(f"{where(name, node)}: imports {', '.join(named)} inside a function, but it loads no heavy "
              "library: move it to the top" for name, node, named, ours in in_functions()
              if ours and not heavy & set(ours))


def test_in_function_project_imports_say_why():
    """Each in-function import of a project module has a comment on its line or the line above saying why."""
    fail_with(f"{where(name, node)}: in-function import of {', '.join(named)} has no comment saying why"
              for name, node, named, ours in in_functions()
              if ours and not set(range(node.lineno - 1, node.end_lineno + 1)) & comment_lines(modules()[name]))


# backend/'s subpackages as floors (docs/architecture.md, "Layout"): an import goes down, or sideways within a
# subpackage. backend/__init__.py (create_backend) and the backend.tiny entry point stand above them all.
FLOORS = {"core": 0, "models": 1, "inprocess": 2, "neuron": 3, "sagemaker": 3}


def floor(name):
    """(floor, subpackage) of a backend module, None outside backend/'s subpackages."""
    parts = name.split(".")
    if parts[0] != "backend" or len(parts) < 2 or parts[1] not in FLOORS:
        return None
    return FLOORS[parts[1]], parts[1]


def test_backend_subpackages_import_only_downwards():
    """core imports no other subpackage; models only core; inprocess core and models; neuron and sagemaker those
    below them and never each other."""
    problems = []
    for name, targets in graph(top_level_only=False).items():
        here = floor(name)
        for target, line in targets.items():
            there = floor(target)
            if here is None or there is None or here[1] == there[1]:
                continue
            if there[0] >= here[0]:
                problems.append(f"{modules()[name].relative_to(ROOT)}:{line}: backend.{here[1]} imports "
                                f"{target}, which is not below it (floors: {FLOORS})")
    fail_with(problems)


# What must start without torch, diffusers or boto3: `import backend` (the app picks a backend first), the
# scripts' command lines (compile.py --help, doctor, package, deploy) and the root format they read.
LIGHT = ("backend", "backend.neuron.root_format", "backend.neuron.root_plan", "backend.neuron.preflight",
         "compile_scripts.compile", "compile_scripts.doctor", "compile_scripts.package", "compile_scripts.deploy")


def test_light_entry_points_load_no_heavy_library():
    """Imported in a fresh interpreter, each LIGHT module leaves torch, diffusers, transformers and boto3 unloaded."""
    import subprocess

    code = ("import importlib, sys\n"
            f"for name in {LIGHT!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'boto3'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
