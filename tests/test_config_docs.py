"""docs/configuration.md's reference is generated from the settings classes (``python -m
proxy.config.docs``), lists every key, and is kept in sync; the generator touches nothing outside
its markers."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import docs as config_docs
from proxy.config.schema import schema

ROOT = Path(__file__).resolve().parent.parent
DOCS_FILE = ROOT / "docs" / "configuration.md"


def test_the_configuration_reference_in_docs_is_the_generated_one() -> None:
    text = DOCS_FILE.read_text(encoding="utf-8")
    assert config_docs.updated(text) == text, (
        f"docs/configuration.md is stale: run `{config_docs.REGENERATE}`"
    )
    assert config_docs.main(["--check", str(DOCS_FILE)]) == 0


def test_the_reference_lists_every_key_with_its_default_and_variable() -> None:
    reference = config_docs.reference()
    keys = {k for d in schema()["$defs"].values() for k in d["properties"]}
    for k in keys:
        assert f"| `{k}` |" in reference, k
    assert "| `idle_timeout` | duration | `1h` |" in reference
    assert "| `replay_max_body` | size | `1MiB` |" in reference
    assert "| `email` | string |  | `ROYALTI_EMAIL` |" in reference
    assert "### `upstreams[].auth` (`type: oauth2_client_credentials`)" in reference


def test_the_generator_rewrites_only_its_block(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    block = f"{config_docs.BEGIN}\nold table\n{config_docs.END}"
    page.write_text(f"# Prose\n\nWritten by hand.\n\n{block}\n\nMore prose.\n")
    assert config_docs.main(["--check", str(page)]) == 1
    assert config_docs.main([str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Prose\n\nWritten by hand.\n\n" + config_docs.BEGIN + "\n")
    assert text.endswith(config_docs.END + "\n\nMore prose.\n")
    assert "old table" not in text
    assert config_docs.reference() in text
    assert config_docs.main(["--check", str(page)]) == 0


def test_the_generator_creates_a_missing_page_with_an_intro_and_the_markers(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    assert config_docs.main([str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Configuration\n\n")
    assert text.count(config_docs.BEGIN) == 1 and text.count(config_docs.END) == 1
    assert config_docs.main(["--check", str(page)]) == 0


def test_the_generator_refuses_a_page_without_the_markers(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    page.write_text("# Prose only\n")
    with pytest.raises(ValueError, match="BEGIN GENERATED"):
        config_docs.main([str(page)])
    assert page.read_text() == "# Prose only\n"
