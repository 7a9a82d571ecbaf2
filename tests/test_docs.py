"""The documentation runs as written: every ```python block of docs/ is executed, here or by the
test file its marker names, and the site builds with mkdocs --strict where mkdocs is installed
(make docs installs it; CI runs make docs as its own step).

A block runs here with small stand-ins for the names the page leaves to the reader (``model``,
``loader``, ``group``), in a temporary folder. An HTML comment on the line before a block changes
that (docs/contributing.md lists the markers):

- ``<!-- docs-test: by tests/test_x.py -->``: that file runs it, with its own checks;
- ``<!-- docs-test: needs cuda: REASON -->``: it runs here where CUDA is available;
- ``<!-- docs-test: skip: REASON -->``: it does not run in make test, and the reason says where.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import small_classifier

import fxghost

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(
    r"^(?:<!-- docs-test: (?P<marker>[^`]*?) -->\n)?```python\n(?P<code>.*?)^```[ \t]*$",
    re.M | re.S,
)
#: Skipped blocks are the exception: each one is code no test in make test holds to its word.
MAX_SKIPPED = 2
#: Printed output that a block's run must show, by a line of its code.
OUTPUT = {
    "gm(torch.randn(3, 3, 6, 6))  ": "smaller than ghost_batch_size=4",
    "fxghost.transform(mlp, ghost_batch_size=3)": "single value per channel",
    "print(fxghost.report(gm).untraced)": "not traced: 2: fxghost could not symbolically trace",
}


@dataclass(frozen=True)
class Block:
    page: str  # relative to docs/
    line: int
    marker: str | None
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text()
        matches = list(BLOCK.finditer(text))
        # A fence this pattern misses (indented, or with attributes) would go untested.
        assert len(matches) == text.count("```python"), f"{path}: a python fence not parsed"
        for m in matches:
            line = text.count("\n", 0, m.start("code"))
            marker = " ".join(m["marker"].split()) if m["marker"] else None
            found.append(Block(path.relative_to(DOCS).as_posix(), line, marker, m["code"]))
    return found


BLOCKS = blocks()
RUN_HERE = [b for b in BLOCKS if not (b.marker or "").startswith("by ")]


def test_markers_are_known_and_few() -> None:
    skipped = []
    for b in BLOCKS:
        if b.marker is None:
            continue
        kind, _, rest = b.marker.partition(" ")
        if kind == "by":
            path = ROOT / rest.split()[0]
            assert path.is_file(), f"{b.id}: {path} does not exist"
            # The test file reads the page it runs.
            assert f"docs/{b.page}" in path.read_text(), (
                f"{b.id}: {path.name} does not read {b.page}"
            )
        elif kind == "needs":
            assert rest.startswith("cuda: ") and rest[6:].strip(), f"{b.id}: needs cuda: REASON"
        elif kind == "skip:":
            assert rest.strip(), f"{b.id}: a skip needs a reason"
            skipped.append(b.id)
        else:
            raise AssertionError(f"{b.id}: unknown marker {b.marker!r}")
    assert len(skipped) <= MAX_SKIPPED, skipped


@contextlib.contextmanager
def _group_of_one(tmp_path: Path) -> Iterator[Any]:
    """A gloo process group of this process alone, which fxghost treats as no group."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("block", RUN_HERE, ids=[b.id for b in RUN_HERE])
def test_block_runs(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    if block.marker and block.marker.startswith("skip:"):
        pytest.skip(block.marker)
    if block.marker and block.marker.startswith("needs cuda") and not torch.cuda.is_available():
        pytest.skip(block.marker)
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 10, (64,))) for _ in "ab"]
    names: dict[str, Any] = {"model": small_classifier(), "loader": batches}
    out = io.StringIO()
    with contextlib.ExitStack() as stack:
        if re.search(r"\bgroup\b", block.code):
            names["group"] = stack.enter_context(_group_of_one(tmp_path))
        stack.enter_context(contextlib.redirect_stdout(out))
        exec(compile(block.code, f"docs/{block.id}", "exec"), names)
    for line, expected in OUTPUT.items():
        if line in block.code:
            assert expected in out.getvalue(), out.getvalue()


def test_output_checks_name_existing_lines() -> None:
    for line in OUTPUT:
        assert sum(line in b.code for b in RUN_HERE) == 1, line


# The API reference: mkdocstrings renders each documented name under an anchor of its full name.

API_PAGES = {
    "fxghost": "api/fxghost.md",
    "fxghost.lightning": "api/lightning.md",
    "fxghost.composer": "api/composer.md",
    "fxghost.reference": "api/reference.md",
    "fxghost.ops": "api/ops.md",
}


def test_api_pages_render_each_module() -> None:
    for module, page in API_PAGES.items():
        assert f"\n::: {module}\n" in (DOCS / page).read_text(), page


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built with --strict: a warning (a broken link or anchor, a name mkdocstrings
    cannot resolve, a page left out of the nav) fails it."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    return out


def test_site_documents_every_public_name(site: Path) -> None:
    for module, page in API_PAGES.items():
        html = (site / page.removesuffix(".md") / "index.html").read_text()
        public = importlib.import_module(module).__all__
        missing = [n for n in public if f'id="{module}.{n}"' not in html]
        assert not missing, f"{page}: {missing}"
        # Docstring doctests render as code, not as block quotes.
        assert "<blockquote>" not in html, page
    assert set(fxghost.__all__) >= {"transform", "apply_ghost_batchnorm", "report"}


def test_site_links_into_the_repository(site: Path) -> None:
    """Links from a page to files outside docs/ lead to those files in the clone the site was
    built from (mkdocs.yml sets no repo_url)."""
    html = (site / "performance" / "index.html").read_text()
    hrefs = re.findall(r'href="([^"]*RESULTS\.md)"', html)
    assert hrefs
    for href in hrefs:
        assert (site / "performance" / href).resolve() == ROOT / "benchmarks" / "RESULTS.md"


def _docs_module(name: str) -> Any:
    """A Python module of docs/ (the build's hook or griffe extension), imported as mkdocs does."""
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(DOCS))


def test_a_broken_repository_link_fails_the_build(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    from mkdocs.exceptions import PluginError

    hooks = _docs_module("hooks")

    class Config:
        docs_dir = str(DOCS)
        config_file_path = str(ROOT / "mkdocs.yml")
        site_dir = str(tmp_path)
        repo_url: str | None = None

    class File:
        src_uri = "performance.md"
        dest_uri = "performance/index.html"

    class Page:
        file = File()

    def link(target: str) -> str:
        return hooks.on_page_markdown(f"See [it]({target}).", page=Page(), config=Config())

    assert link("semantics.md") == "See [it](semantics.md)."  # a page: left to mkdocs
    up = os.path.relpath(ROOT, tmp_path / "performance")  # from the built page's folder
    assert link("../LICENSE") == f'See <a href="{up}/LICENSE">it</a>.'
    with pytest.raises(PluginError, match="no-such-file.md' leads to no file"):
        link("../benchmarks/no-such-file.md")
    Config.repo_url = "https://example.org/fxghost"
    assert link("../benchmarks/RESULTS.md#cpu") == (
        "See [it](https://example.org/fxghost/blob/HEAD/benchmarks/RESULTS.md#cpu)."
    )


def test_docstring_doctests_are_fenced() -> None:
    pytest.importorskip("griffe")
    ext = _docs_module("griffe_docstrings")
    text = "Intro, :func:`fxghost.transform`.\n\n>>> 1 + 1\n2\n\nArgs:\n    x: a value.\n"
    assert ext.markdown_docstring(text) == (
        "Intro, `fxghost.transform`.\n\n```pycon\n>>> 1 + 1\n2\n```\n\nArgs:\n    x: a value."
    )


# README.md is not part of the site: its links to the pages are checked here.


def _anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file, as GitHub and mkdocs make them."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in heads}


def test_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.exists(), link
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), link
