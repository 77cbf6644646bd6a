"""Builds the HTML API reference of oscqat_jax from its docstrings, with pdoc.

    python docs/build_api.py                 # into docs/api/ (generated, not committed)
    python docs/build_api.py --out=/tmp/api

Every warning pdoc gives (a module that fails to import, a name in ``__all__`` that does
not resolve, ...) stops the build with an error, so a broken module or export cannot silently
drop a page; the one exception is explained in :func:`build`. ``tests/test_docs.py`` runs
:func:`build`. Needs ``pdoc`` (in requirements-test.txt).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import pkgutil
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent

PACKAGE = "oscqat_jax"


def public_modules(package: str = PACKAGE) -> tuple[str, ...]:
    """Every module of ``package`` whose dotted name has no part starting with ``_`` (so no
    ``__main__`` and no private helper), sorted; the package itself first.

    pdoc would follow a package's submodules on its own, but only those listed in its
    ``__all__`` when it has one (``oscqat_jax.nn``, for instance, lists functions there).
    """
    root = importlib.import_module(package)
    names = [
        info.name
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    return (package, *sorted(names))


def _resolve_lazy_exports(module_names: tuple[str, ...]) -> None:
    """Puts each name of a module's ``__all__`` into the module's namespace.

    pdoc reads only a module's ``__dict__``; the names that ``oscqat_jax`` and
    ``oscqat_jax.deploy`` load on first use (a module ``__getattr__``, so that importing them
    needs neither Flax nor onnx) would otherwise be reported as unresolved.
    """
    for name in module_names:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            if attr not in vars(module):
                setattr(module, attr, getattr(module, attr))


def build(output_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes the reference into ``output_dir`` (created if missing): one page per module of
    :func:`public_modules`, an index and a search index. Returns the HTML pages written.

    Raises the first warning pdoc gives as an exception (``UserWarning``).
    """
    import pdoc.doc
    import pdoc.render

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    output_dir = pathlib.Path(output_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module=r"pdoc(\.|$)")
        # One kind is let through: pdoc evaluates a string annotation in the namespace of the
        # function that carries it, and the __init__ that dataclasses and NamedTuple generate
        # for a subclass or a tuple type does not see the names of the module that wrote the
        # annotation (e.g. Sequence for a Flax layer's inherited field). The page then shows
        # the annotation as written, which is right; ruff (F821) checks those names instead.
        warnings.filterwarnings(
            "ignore", message="Error parsing type annotation", module=r"pdoc\.doc_types"
        )
        names = public_modules()
        _resolve_lazy_exports(names)
        # The docstrings are Google style ("Args:", "Returns:") with reST markup (``code``,
        # :func:`name`); pdoc's google format converts both.
        pdoc.render.configure(docformat="google", show_source=False)
        # pdoc.pdoc() would walk each package itself and skip the submodules missing from
        # its __all__, so the modules are rendered one by one here, as pdoc.pdoc() does.
        modules = {name: pdoc.doc.Module.from_name(name) for name in names}
        pages = []
        for name, module in modules.items():
            page = output_dir / f"{name.replace('.', '/')}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(pdoc.render.html_module(module, modules), encoding="utf-8")
            pages.append(page)
        index = output_dir / "index.html"
        index.write_text(pdoc.render.html_index(modules), encoding="utf-8")
        search = pdoc.render.search_index(modules)
        (output_dir / "search.js").write_text(search, encoding="utf-8")
    return [index, *pages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python docs/build_api.py",
        description="Build the HTML API reference of oscqat_jax from its docstrings (pdoc).",
    )
    parser.add_argument(
        "--out", default=str(ROOT / "docs" / "api"), help="output folder (default: docs/api)"
    )
    args = parser.parse_args(argv)
    pages = build(args.out)
    print(f"{len(pages)} pages in {args.out}; open {pathlib.Path(args.out) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
