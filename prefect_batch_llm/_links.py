"""Where the blocks' documentation and logo live (the project's documentation site)."""

DOCS_URL = "https://prefect-batch-llm.readthedocs.io/en/latest"
LOGO_URL = f"{DOCS_URL}/assets/logo.png"


def docs_page(path: str) -> str:
    """The URL of a page of the documentation site, e.g. `docs_page("concepts/strategies/")`."""
    return f"{DOCS_URL}/{path}"
