"""The documentation: the API reference built from the docstrings (docs/build_api.py, with
pdoc's warnings as errors) and the method document (docs/method.md) that the code cites."""

import importlib
import importlib.util
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"

# The main modules, each of whose public names must have its entry in the reference.
MAIN_MODULES = (
    "oscqat_jax",
    "oscqat_jax.quant",
    "oscqat_jax.ranges",
    "oscqat_jax.oscillation",
    "oscqat_jax.dampening",
    "oscqat_jax.schedules",
    "oscqat_jax.toy",
    "oscqat_jax.nn",
    "oscqat_jax.nn.rules",
    "oscqat_jax.nn.setups",
    "oscqat_jax.models",
    "oscqat_jax.convert",
    "oscqat_jax.export",
    "oscqat_jax.deploy",
    "oscqat_jax.training.trainer",
)

CITING_TREES = ("oscqat_jax", "configs", "demos", "benchmarks", "notebooks", "tests")
CITING_FILES = ("train.py", "README.md")


def _build_api():
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference built once into a temporary folder; the build raises on any warning."""
    out = tmp_path_factory.mktemp("api")
    pages = _build_api().build(out)
    return out, pages


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return [n for n in names if not n.startswith("__")]
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    ]


def test_every_public_module_has_a_page(reference):
    out, pages = reference
    written = {p.relative_to(out).as_posix() for p in pages}
    expected = {f"{name.replace('.', '/')}.html" for name in _build_api().public_modules()}
    assert "index.html" in written
    assert expected <= written
    assert (out / "search.js").is_file()


@pytest.mark.parametrize("name", MAIN_MODULES)
def test_a_main_module_page_holds_its_public_names(reference, name):
    out, _ = reference
    page = (out / f"{name.replace('.', '/')}.html").read_text(encoding="utf-8")
    module = importlib.import_module(name)
    names = _public_names(module)
    assert names, name
    for public in names:
        value = getattr(module, public)
        if inspect.ismodule(value):  # a submodule: linked to its own page
            assert f"{value.__name__.rsplit('.', 1)[-1]}.html" in page, public
        else:
            assert f'id="{public}"' in page, public


def test_no_page_shows_raw_rest_markup(reference):
    # pdoc turns ``code`` and :func:`name` into HTML; what is left over was malformed.
    out, pages = reference
    raw = re.compile(r"``|:(func|mod|class|meth|attr|data|obj|exc):`")
    text_of = {p.relative_to(out).as_posix(): re.sub(r"<[^>]+>", "", p.read_text()) for p in pages}
    broken = {name for name, text in text_of.items() if raw.search(text)}
    assert not broken, broken


def _citing_files():
    for tree in CITING_TREES:
        yield from (p for p in (ROOT / tree).rglob("*") if p.suffix in (".py", ".md", ".ipynb"))
    yield from (ROOT / f for f in CITING_FILES)


def test_every_method_citation_names_a_section_of_the_method_document():
    headings = re.findall(r"^## (\d+)\. ", METHOD.read_text(encoding="utf-8"), re.MULTILINE)
    assert headings == [str(n) for n in range(1, 11)]
    citation = re.compile(r"docs/method\.md ((?:§\d+(?:-\d+)?(?:, |/| and )?)+)")
    cited = set()
    for path in _citing_files():
        for refs in citation.findall(path.read_text()):
            for first, last in re.findall(r"§(\d+)(?:-(\d+))?", refs):
                cited.update({first, last} - {""})
    assert cited and cited <= set(headings)


def test_nothing_cites_a_method_file_outside_the_repository():
    citing = {
        path.relative_to(ROOT).as_posix()
        for path in _citing_files()
        if path != pathlib.Path(__file__) and re.search(r"SPEC §|SPEC\.md", path.read_text())
    }
    assert not citing, citing
