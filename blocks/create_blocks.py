"""Create the block documents the deployments use, in one command.

    python blocks/create_blocks.py          # Gemini API: key read from GEMINI_API_KEY at run time
    python blocks/create_blocks.py --emulator-url http://127.0.0.1:8765   # the bundled emulator

It registers this package's block types with the Prefect server (PREFECT_API_URL), then saves:
  gemini-credentials/gemini            the key (left empty: read from GEMINI_API_KEY by the
                                       process that runs the flow) and, for the emulator, its URL
  gemini-cached-strategy/handbook-qa   gemini-2.5-flash over flows/data/handbook.txt, kept in a
                                       context cache (TTL 1 h, renewed 5 min before expiry,
                                       tags app=handbook-qa, version=1); the path is stored
                                       relative: flows run from the repository root read it
  gemini-strategy/gemini-flash         plain gemini-2.5-flash, no cache
Run it again to update them (documents are overwritten).
"""

from __future__ import annotations

import argparse

from pydantic import SecretStr

from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials, GeminiStrategy
from prefect_batch_llm.pydantic_ai import PydanticAIStrategy

#: Saved relative to the repository root, the working directory of the deployments in
#: prefect.yaml (and of `make demo`): a block must not carry this machine's absolute path.
HANDBOOK = "flows/data/handbook.txt"


def create_blocks(emulator_url: str | None = None) -> list[str]:
    """Save the documents; returns their `slug/name`s."""
    for block_type in (
        GeminiCredentials,
        GeminiStrategy,
        GeminiCachedStrategy,
        PydanticAIStrategy,
    ):
        block_type.register_type_and_schema()
    credentials = GeminiCredentials(
        api_key=SecretStr("emulator-key") if emulator_url else None,
        base_url=emulator_url,
    )
    credentials.save("gemini", overwrite=True)
    credentials = GeminiCredentials.load("gemini")  # saved: nested as a reference
    GeminiCachedStrategy(
        credentials=credentials,
        model="gemini-2.5-flash",
        system_instruction="Answer the customer's question from the returns handbook, briefly.",
        cached_document_paths=[HANDBOOK],
        cache_ttl_seconds=3600,
        cache_renewal_buffer_seconds=300,
        cache_tags={"app": "handbook-qa", "version": "1"},
    ).save("handbook-qa", overwrite=True)
    GeminiStrategy(credentials=credentials, model="gemini-2.5-flash").save(
        "gemini-flash", overwrite=True
    )
    return [
        "gemini-credentials/gemini",
        "gemini-cached-strategy/handbook-qa",
        "gemini-strategy/gemini-flash",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulator-url", help="use the Gemini emulator at this URL")
    args = parser.parse_args()
    for name in create_blocks(args.emulator_url):
        print(f"saved {name}")


if __name__ == "__main__":
    main()
