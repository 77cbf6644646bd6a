"""The floors of the package, checked on its source text (``ast``; nothing is imported).

Every import of every module under ``oscqat_jax/`` (top level and inside functions, absolute
and relative) is resolved to a module name by ``testkit.collect_imports``; ``from pkg import
name`` counts as importing ``pkg.name`` when that is a module. The package must have no import
cycle, no import from a lower floor to a higher one, no ``torch`` outside the torch reader, and
no Flax in the core. The checker runs on synthetic trees first (each rule must catch its
violation), then on the real package.
"""

from __future__ import annotations

import collections
import pathlib
import textwrap

import pytest
from testkit import Import, collect_imports

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "oscqat_jax"

# The floors of the house, bottom to top (STYLE.md): a module may import its own floor and
# those below it, never one above. Keys are the top-level modules or packages of oscqat_jax;
# every top-level *module* not listed here (quant, ranges, oscillation, dampening, schedules,
# toy, _checks, weight_files, the package's own __init__...) is the core, floor 0. A top-level
# *package* missing from this table is reported: a new subpackage must be given its floor.
FLOORS = {
    "nn": 1,
    "models": 2,
    "convert": 3,
    "export": 3,
    "training": 4,
    # Deployment's command checks an exported file against the checkpoint it came from, read
    # through the training program; the exporters themselves are export/ (the trainer writes
    # ONNX files through export.onnx, never through deploy).
    "deploy": 5,
}
CORE = 0
FLOOR_NAMES = {0: "core", 1: "nn", 2: "models", 3: "convert/export", 4: "training", 5: "deploy"}

TORCH = frozenset({"torch", "torchvision", "torchaudio"})
# The one module allowed to read PyTorch files (relative to the package directory).
TORCH_READER = "weight_files.py"
FLAX = "flax"


def floor(module: str, unfloored: frozenset[str] = frozenset()) -> int | None:
    """The floor of a module of the package, from its top-level name: FLOORS, else the core;
    None inside a top-level package of ``unfloored`` (one missing from FLOORS)."""
    parts = module.split(".")
    if len(parts) == 1:
        return CORE
    if parts[1] in unfloored:
        return None
    return FLOORS.get(parts[1], CORE)


def _where(package_dir: pathlib.Path, files, imp: Import) -> str:
    rel = files[imp.source].relative_to(package_dir.parent).as_posix()
    return f"{rel}:{imp.line}{' (in a function)' if imp.lazy else ''}"


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest ``[start, ..., start]`` path through ``component`` (breadth first)."""
    paths, queue = {start: [start]}, collections.deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node] & component):
            if succ == start:
                return paths[node] + [start]
            if succ not in paths:
                paths[succ] = paths[node] + [succ]
                queue.append(succ)
    raise AssertionError(f"{start} is on no cycle of its component")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles covering every module that is on one: per strongly connected component, the
    shortest cycle through each module no earlier cycle passed."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        uncovered = set(component) if len(component) > 1 else set()
        while uncovered:
            cycle = _shortest_cycle(graph, component, min(uncovered))
            uncovered -= set(cycle)
            cycles.append(cycle)
    return sorted(cycles)


def check_layering(package_dir: pathlib.Path) -> list[str]:
    """Every violation of the package's floors, one readable line each (empty: none)."""
    name = package_dir.name
    files, imports = collect_imports(package_dir)
    subpackages = {p.name for p in package_dir.iterdir() if (p / "__init__.py").is_file()}
    unfloored = frozenset(subpackages - set(FLOORS))
    problems = [
        f"package {name}.{sub} has no floor: add it to FLOORS in {__file__}"
        for sub in sorted(unfloored)
    ]
    graph = {module: set() for module in files}
    for imp in imports:
        top = imp.target.split(".")[0]
        where = _where(package_dir, files, imp)
        low, high = floor(imp.source, unfloored), floor(imp.target, unfloored)
        if top in TORCH and files[imp.source] != package_dir / TORCH_READER:
            problems.append(
                f"torch: {where} imports {imp.target}; only {name}/{TORCH_READER} may read torch"
            )
        if top == FLAX and low == CORE:
            problems.append(f"flax in the core: {where} imports {imp.target}")
        if top != name:
            continue
        if imp.target in files and imp.target != imp.source:
            graph[imp.source].add(imp.target)
        if low is not None and high is not None and high > low:
            problems.append(
                f"upward: {where} ({FLOOR_NAMES[low]}) imports {imp.target} ({FLOOR_NAMES[high]})"
            )
    problems += ["cycle: " + " → ".join(cycle) for cycle in _cycles(graph)]
    return problems


def _write_tree(root: pathlib.Path, modules: dict[str, str]) -> pathlib.Path:
    """A synthetic ``oscqat_jax`` under ``root``: ``{"nn/convbn.py": source, ...}``."""
    package_dir = root / "oscqat_jax"
    for rel, source in {"__init__.py": "", **modules}.items():
        path = package_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(package_dir).parents:
            (package_dir / parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
    return package_dir


CLEAN = {
    "quant.py": "import jax\n",
    "weight_files.py": "def read(path):\n    import torch\n    return torch.load(path)\n",
    "nn/convbn.py": "import flax.linen as nn\nfrom oscqat_jax import quant\n",
    "models/mobilenet_v2.py": "from ..nn import convbn\nfrom oscqat_jax import weight_files\n",
    "convert.py": "from oscqat_jax.models import mobilenet_v2\n",
    "training/trainer.py": "from oscqat_jax import convert, export\nfrom . import optim\n",
    "training/optim.py": "from oscqat_jax.nn.convbn import nn\n",
    "export.py": "from .models.mobilenet_v2 import convbn\n",
}


def test_clean_tree_has_no_violations(tmp_path):
    assert check_layering(_write_tree(tmp_path, CLEAN)) == []


def test_reports_a_two_module_cycle_as_a_chain(tmp_path):
    tree = _write_tree(
        tmp_path,
        {
            **CLEAN,
            "training/data.py": "from oscqat_jax.training import pipelines\n",
            "training/pipelines.py": "def load():\n    from . import data\n",
        },
    )
    training = "oscqat_jax.training"
    assert check_layering(tree) == [
        f"cycle: {training}.data → {training}.pipelines → {training}.data"
    ]


def test_reports_every_module_of_two_cycles_through_one_module(tmp_path):
    tree = _write_tree(
        tmp_path,
        {
            **CLEAN,
            "training/data.py": "from . import fashion_mnist, pipelines\n",
            "training/fashion_mnist.py": "from oscqat_jax.training.data import ArrayDataset\n",
            "training/pipelines.py": "from oscqat_jax.training import data\n",
        },
    )
    training = "oscqat_jax.training"
    assert check_layering(tree) == [
        f"cycle: {training}.data → {training}.fashion_mnist → {training}.data",
        f"cycle: {training}.pipelines → {training}.data → {training}.pipelines",
    ]


def test_reports_a_three_module_cycle_once_through_a_submodule_import(tmp_path):
    tree = _write_tree(
        tmp_path,
        {
            **CLEAN,
            "schedules.py": "import oscqat_jax.ranges\n",
            "ranges.py": "from oscqat_jax import toy\n",
            "toy.py": "from oscqat_jax.schedules import cosine\n",
        },
    )
    assert check_layering(tree) == [
        "cycle: oscqat_jax.ranges → oscqat_jax.toy → oscqat_jax.schedules → oscqat_jax.ranges"
    ]


def test_reports_an_upward_import_from_nn_to_training(tmp_path):
    tree = _write_tree(
        tmp_path, {**CLEAN, "nn/quantizer.py": "from oscqat_jax.training import optim\n"}
    )
    assert check_layering(tree) == [
        "upward: oscqat_jax/nn/quantizer.py:1 (nn) imports oscqat_jax.training.optim (training)"
    ]


def test_reports_an_upward_relative_import_inside_a_function(tmp_path):
    source = "import jax\n\n\ndef f():\n    from ..training import x\n"
    tree = _write_tree(tmp_path, {**CLEAN, "models/resnet.py": source})
    # x is not a module: the import is of the package oscqat_jax.training itself.
    assert check_layering(tree) == [
        "upward: oscqat_jax/models/resnet.py:5 (in a function) (models) imports"
        " oscqat_jax.training (training)"
    ]


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        ("toy.py", "from oscqat_jax.nn import convbn", "(core) imports oscqat_jax.nn.convbn (nn)"),
        ("__init__.py", "from . import models", "(core) imports oscqat_jax.models (models)"),
        ("nn/setups.py", "import oscqat_jax.models", "(nn) imports oscqat_jax.models (models)"),
        (
            "models/layers.py",
            "from .. import export",
            "(models) imports oscqat_jax.export (convert/export)",
        ),
        (
            "export.py",
            "from .training import optim",
            "(convert/export) imports oscqat_jax.training.optim (training)",
        ),
    ],
)
def test_reports_each_kind_of_upward_import(tmp_path, rel, source, expected):
    tree = _write_tree(tmp_path, {**CLEAN, rel: source + "\n"})
    assert check_layering(tree) == [f"upward: oscqat_jax/{rel}:1 {expected}"]


def test_reports_torch_in_a_model_and_allows_it_in_the_reader(tmp_path):
    tree = _write_tree(tmp_path, {**CLEAN, "models/resnet.py": "from torch import nn\n"})
    assert check_layering(tree) == [
        "torch: oscqat_jax/models/resnet.py:1 imports torch;"
        " only oscqat_jax/weight_files.py may read torch"
    ]


def test_reports_flax_in_the_core_only(tmp_path):
    tree = _write_tree(tmp_path, {**CLEAN, "ranges.py": "def f():\n    from flax import linen\n"})
    assert check_layering(tree) == [
        "flax in the core: oscqat_jax/ranges.py:2 (in a function) imports flax"
    ]


def test_reports_a_top_level_package_without_a_floor(tmp_path):
    # Its modules are not judged against a floor it does not have (no "core" noise).
    tree = _write_tree(
        tmp_path, {**CLEAN, "data/__init__.py": "import flax\nfrom oscqat_jax import training\n"}
    )
    (problem,) = check_layering(tree)
    assert problem.startswith("package oscqat_jax.data has no floor: add it to FLOORS in ")


def test_the_walk_sees_the_real_package():
    # Guards the next test against passing on an empty or misread tree.
    files, imports = collect_imports(PACKAGE_DIR)
    assert {"oscqat_jax", "oscqat_jax.quant", "oscqat_jax.nn", "oscqat_jax.models"} <= set(files)
    assert any(floor(i.source) == 2 and floor(i.target) == 1 for i in imports), "no models → nn"


def test_package_keeps_its_floors():
    problems = check_layering(PACKAGE_DIR)
    assert not problems, f"{len(problems)} layering violation(s):\n" + "\n".join(problems)
