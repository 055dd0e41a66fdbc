"""Every block type this package ships meets Prefect's block standards, and its logo and
documentation URLs point at pages of the published documentation site that exist.

The site is built from `docs/` by mkdocs (`mkdocs.yml`, published by Read the Docs from
`.readthedocs.yaml`), so a URL `<DOCS_URL>/guides/gemini/#context-caching` must be the page
`docs/guides/gemini.md` with a heading whose anchor is `context-caching`.
"""

from __future__ import annotations

import inspect
import re
import struct
from pathlib import Path

import pytest
import yaml
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

import prefect_batch_llm
from prefect_batch_llm import testing
from prefect_batch_llm._links import DOCS_URL, LOGO_URL

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

#: What `prefect block register -m prefect_batch_llm` registers (its rule: the module's
#: block classes that are not abstract).
REGISTERED = sorted(
    (
        cls
        for _, cls in inspect.getmembers(prefect_batch_llm)
        if cls is not None and Block.is_block_class(cls) and not inspect.isabstract(cls)
    ),
    key=lambda cls: cls.__name__,
)
#: Also the test kit's block, which users save in their own tests and demos.
SHIPPED = [*REGISTERED, testing.MockStrategy]


def test_the_registered_block_types_are_the_ones_users_are_told_about():
    assert [cls.get_block_type_slug() for cls in REGISTERED] == [
        "gemini-cached-strategy",
        "gemini-credentials",
        "gemini-strategy",
        "pydantic-ai-strategy",
    ]


def test_the_docs_site_url_is_where_the_links_point():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["site_url"].rstrip("/") == DOCS_URL
    assert DOCS_URL.startswith("https://")
    readthedocs = yaml.safe_load((REPO / ".readthedocs.yaml").read_text(encoding="utf-8"))
    assert readthedocs["mkdocs"]["configuration"] == "mkdocs.yml"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def anchors(markdown: str) -> set[str]:
    """The heading anchors mkdocs' `toc` extension gives a page (its default slugify)."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, re.M):
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\s-]", "", text).strip().lower()
        found.add(re.sub(r"[-\s]+", "-", slug))
    return found


@pytest.mark.parametrize("block", SHIPPED, ids=lambda cls: cls.__name__)
def test_logo_and_documentation_urls_are_pages_of_the_docs_site(block: type[Block]):
    assert str(block._logo_url) == LOGO_URL
    url = str(block._documentation_url)
    assert url.startswith(f"{DOCS_URL}/"), url
    path, _, anchor = url.removeprefix(f"{DOCS_URL}/").partition("#")
    assert path == "" or path.endswith("/"), f"{url}: mkdocs pages end with '/'"
    page = DOCS / (f"{path.rstrip('/')}.md" if path else "index.md")
    assert page.is_file(), f"{url}: no {page.relative_to(REPO)}"
    if anchor:
        assert anchor in anchors(page.read_text(encoding="utf-8")), f"{url}: no such heading"


class TestShippedBlocks(BlockStandardTestSuite):
    """Prefect's own standard checks (description, documented fields, code example)."""

    @pytest.fixture(params=SHIPPED, ids=lambda cls: cls.__name__)
    def block(self, request: pytest.FixtureRequest) -> type[Block]:
        return request.param  # type: ignore[no-any-return]

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        """Prefect's version downloads the logo; here, offline, the file the site publishes."""
        assert str(block._logo_url) == LOGO_URL
        assert LOGO_URL.startswith(f"{DOCS_URL}/")
        width, height = png_size(DOCS / LOGO_URL.removeprefix(f"{DOCS_URL}/"))
        # Prefect's standard: square, between 45 and 1000 pixels wide.
        assert width == height and 45 < width < 1000
