"""What ``pip install`` gives and what a clone runs: pyproject.toml against requirements.txt and
against the package's imports, and the README's scripts run from a copy of the repository in
which ``oscqat_jax`` is not installed."""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest
from testkit import collect_imports

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = "oscqat_jax"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# The extras requirements.txt installs besides the core dependencies. `tf` (tensorflow-cpu,
# only for tfds' tfrecord path) is optional and deliberately not in requirements.txt.
REQUIREMENTS_EXTRAS = ("train", "data", "export")
# Extras of optional features: a lazy import of one of their distributions is a feature the
# training program uses only when asked (a file format, a data source), not part of `[train]`.
OPTIONAL_EXTRAS = ("data", "export", "tf")
# Lazy imports of distributions nobody declares: reading PyTorch checkpoints needs the user's
# own torch (weight_files.py), which this project never installs.
UNDECLARED_OPTIONAL = frozenset({"torch"})

# Import name -> distribution, where the two differ beyond PEP 503 normalisation.
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "absl": "absl-py",
    "orbax": "orbax-checkpoint",
    "tensorflow": "tensorflow-cpu",
    # Imported directly but installed by a declared requirement that depends on them.
    "etils": "orbax-checkpoint",  # orbax-checkpoint requires etils[epath]
    "ml_dtypes": "jax",  # jax requires ml_dtypes
}

README_SCRIPTS = (
    "benchmarks/train_step.py",
    "benchmarks/export_size.py",
    "benchmarks/onnx_latency.py",
    "benchmarks/torch_reference.py",
    "benchmarks/input_pipeline.py",
    "demos/toy_regression.py",
    "demos/reproduce.py",
)


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares it (``ML_Collections`` -> ``ml-collections``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(line: str) -> tuple[str, str]:
    """``(normalised name, version specifier)`` of ``"name[extra]>=1.0"``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*?)\s*", line)
    assert match, f"cannot read the requirement {line!r}"
    return normalise(match.group(1)), match.group(3).replace(" ", "")


def requirements_txt() -> dict[str, str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pairs = [parse_requirement(line) for line in lines if line.split("#")[0].strip()]
    return dict(pairs)


def declared(*extras: str) -> dict[str, str]:
    """The core dependencies plus ``extras`` of pyproject.toml: name -> specifier."""
    lines = PROJECT["dependencies"] + [
        r for e in extras for r in PROJECT["optional-dependencies"][e]
    ]
    return dict(parse_requirement(line) for line in lines)


def distribution(import_name: str) -> str | None:
    """The distribution providing top-level ``import_name`` (None: stdlib or this package)."""
    if import_name in sys.stdlib_module_names or import_name in ("__future__", PACKAGE):
        return None
    return normalise(DISTRIBUTION_OF.get(import_name, import_name))


def test_distribution_names_compare_normalised():
    assert parse_requirement("ML_Collections[extra] >= 1.1.0") == ("ml-collections", ">=1.1.0")
    assert distribution("PIL") == "pillow" and distribution("tensorboardX") == "tensorboardx"
    assert distribution("os") is None and distribution(PACKAGE) is None


def test_pyproject_declares_exactly_requirements_txt():
    required, pyproject = requirements_txt(), declared(*REQUIREMENTS_EXTRAS)
    where = f"pyproject.toml's dependencies and extras {', '.join(REQUIREMENTS_EXTRAS)}"
    missing, extra = sorted(required.keys() - pyproject), sorted(pyproject.keys() - required)
    assert not missing, f"in requirements.txt, not in {where}: {missing}"
    assert not extra, f"in {where}, not in requirements.txt: {extra}"
    differing = {n: (required[n], pyproject[n]) for n in required if required[n] != pyproject[n]}
    assert not differing, f"versions differ (requirements.txt, pyproject.toml): {differing}"


def _entry_imports() -> list[str]:
    """Every import of ``train.py`` and the config files (they run as the training program)."""
    names = []
    for path in [ROOT / "train.py", *sorted((ROOT / "configs").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names += [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
    return names


def training_program_distributions(package_dir: pathlib.Path, entry: list[str]) -> set[str]:
    """The distributions the training program needs whatever its config.

    From the ``entry`` imports, follows the package's top-level imports (and the parent
    packages each import runs); the modules reached need their top-level imports and their
    lazy ones, except lazy imports of optional features (OPTIONAL_EXTRAS, UNDECLARED_OPTIONAL)
    and of the package's own modules (a data source imported only when configured).
    """
    files, imports = collect_imports(package_dir)
    optional = (set(declared(*OPTIONAL_EXTRAS)) - set(declared("train"))) | UNDECLARED_OPTIONAL
    needed = {d for name in entry if (d := distribution(name.split(".")[0]))}
    reached, todo = set(), [name for name in entry if name in files]
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for parent in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if parent not in reached:
                reached.add(parent)
                todo += [i.target for i in imports if i.source == parent and not i.lazy]
    for imp in imports:
        dist = distribution(imp.target.split(".")[0])
        if imp.source in reached and dist and not (imp.lazy and dist in optional):
            needed.add(dist)
    return needed


def test_train_extra_gives_everything_the_training_program_imports():
    needed = training_program_distributions(ROOT / PACKAGE, _entry_imports())
    assert {"jax", "orbax-checkpoint", "ml-collections", "absl-py"} <= needed  # the walk works
    missing = needed - set(declared("train"))
    assert not missing, f"`pip install -e .[train]` lacks {sorted(missing)}: add to [train]"


def test_training_program_walk_counts_lazy_imports_and_skips_optional_features(tmp_path):
    package_dir = tmp_path / PACKAGE
    (package_dir / "training").mkdir(parents=True)
    sources = {
        "__init__.py": "import numpy\n",
        "export.py": "import sympy\n",  # never imported by the trainer
        "training/__init__.py": "",
        "training/trainer.py": (
            "import tqdm\nfrom . import data\n\n\ndef run():\n    import tensorboardX\n"
            "    from oscqat_jax import export\n"
        ),
        "training/data.py": "def digits():\n    import sklearn\n\n\ndef f():\n    import grain\n",
    }
    for rel, source in sources.items():
        (package_dir / rel).write_text(source)
    needed = training_program_distributions(
        package_dir, ["absl.app", f"{PACKAGE}.training.trainer"]
    )
    # grain belongs to the data extra; sympy only to a module reached lazily.
    assert needed == {"absl-py", "numpy", "tqdm", "tensorboardx", "scikit-learn"}


def test_every_top_level_import_of_the_package_is_declared():
    files, imports = collect_imports(ROOT / PACKAGE)
    everything = set(declared(*PROJECT["optional-dependencies"]))
    undeclared = {
        f"{imp.target} ({files[imp.source].relative_to(ROOT)}:{imp.line})"
        for imp in imports
        if not imp.lazy
        and (dist := distribution(imp.target.split(".")[0])) not in everything
        and dist is not None
    }
    assert not undeclared, f"imported at top level, declared nowhere in pyproject: {undeclared}"


# Runs SCRIPT as `python SCRIPT ARGS...` would, with `oscqat_jax` importable only from sys.path
# entries that name ROOT itself: an installed copy (site-packages, an editable install's finder)
# or the current directory does not count, so a script must put its repository on sys.path.
_RUN_AS_CLONE = textwrap.dedent(
    """
    import importlib.machinery, os, runpy, sys

    root, script, *args = sys.argv[1:]

    class OnlyFromRoot:
        def find_spec(self, name, path=None, target=None):
            if name != "oscqat_jax":
                return None
            entries = [p for p in sys.path if os.path.isabs(p) and os.path.realpath(p) == root]
            spec = importlib.machinery.PathFinder.find_spec(name, entries)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return spec

    sys.meta_path.insert(0, OnlyFromRoot())
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
    """
)


def run_as_clone(root: pathlib.Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in ``root``, isolated (-I: no PYTHONPATH, no user site)."""
    root = os.path.realpath(root)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONNOUSERSITE": "1"}
    command = [sys.executable, "-I", "-c", _RUN_AS_CLONE, root, os.path.join(root, script), *args]
    return subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> pathlib.Path:
    """A copy of the working tree, elsewhere than any installed or importable oscqat_jax."""
    copy = tmp_path_factory.mktemp("clone") / "repo"
    shutil.copytree(
        ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", ".*_cache", ".hypothesis")
    )
    return copy


def test_clone_runner_needs_the_scripts_own_path_set_up(tmp_path):
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "__init__.py").write_text("WHERE = 'copy'\n")
    (tmp_path / "benchmarks").mkdir()
    set_up = "import os, sys\nsys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))\n"
    scripts = {
        "bare.py": "import oscqat_jax\n",
        # The real repository on sys.path stands for an installed copy: it must not count.
        "elsewhere.py": f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport oscqat_jax\n",
        "with_path.py": set_up + "import oscqat_jax\nassert oscqat_jax.WHERE == 'copy'\n",
    }
    for name, source in scripts.items():
        (tmp_path / "benchmarks" / name).write_text(source)

    for name in ("bare.py", "elsewhere.py"):
        result = run_as_clone(tmp_path, f"benchmarks/{name}")
        assert result.returncode != 0, name
        assert "No module named 'oscqat_jax'" in result.stderr, result.stderr
    result = run_as_clone(tmp_path, "benchmarks/with_path.py")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", README_SCRIPTS)
def test_readme_script_runs_from_a_clone(clone, script):
    if "torch" in script and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (the PyTorch reference is optional)")
    result = run_as_clone(clone, script, "--help")
    assert result.returncode == 0, f"python {script} --help failed:\n{result.stderr[-3000:]}"
    assert "usage:" in result.stdout
