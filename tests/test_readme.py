"""The README's config reference is generated from the schema: it cannot drift."""

from pathlib import Path

from qadpipe.config.reference import splice_into

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_matches_the_schema():
    text = README.read_text()
    assert splice_into(text) == text, "README config reference is stale: run `make readme`"
