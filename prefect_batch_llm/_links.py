"""Where the blocks' documentation and logo live: the project's documentation site.

Read the Docs builds `docs/` with mkdocs (`.readthedocs.yaml`) and publishes it at
`DOCS_URL`, which is also `site_url` in `mkdocs.yml`; the logo is `docs/assets/logo.png`,
published as `assets/logo.png`. `tests/test_block_standards.py` checks that every block's
URLs are pages (and headings) of that site. Prefect's client accepts only http(s) URLs for
`_logo_url`, so there is no offline form: see "Block logos" in docs/guides/deployments.md.
"""

DOCS_URL = "https://prefect-batch-llm.readthedocs.io/en/latest"
LOGO_URL = f"{DOCS_URL}/assets/logo.png"


def docs_page(path: str) -> str:
    """The URL of a page of the documentation site, e.g. `docs_page("concepts/strategies/")`."""
    return f"{DOCS_URL}/{path}"
