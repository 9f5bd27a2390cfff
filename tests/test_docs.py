"""The documentation holds: links and anchors resolve, every exported metric, alert and command is
documented, and every configuration the docs show passes ``check-config`` (issue 16)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography.fernet import Fernet
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Proxy
from proxy.clock import FakeClock
from proxy.config import build
from proxy.fakes.oauth2 import FakeOAuth2, start_fake_oauth2
from proxy.store.memory import MemoryBackend, MemoryStore
from tests.conftest import WS, royalti_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPERATIONS = DOCS / "operations.md"
CONFIGURATION = DOCS / "configuration.md"
RECIPES = DOCS / "recipes.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
#: Pages whose links are checked: also the deployment recipes, which the docs link into.
LINKED_PAGES = [*PAGES, ROOT / "deploy" / "README.md"]
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
METRIC = re.compile(r"\broyalti_proxy_[a-z0-9_]+\b")


# -- Markdown, as GitHub renders it ------------------------------------------------------------


def prose_lines(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks."""
    fence: str | None = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
                continue
            if match.group(1) == fence:
                fence = None
                continue
        if fence is None:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation but ``-`` and
    ``_`` removed, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's ``-1``, ``-2`` for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    """The targets of the links in ``path`` that point inside the repository."""
    links: list[str] = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                links.append(target)
    return links


def broken_links(path: Path) -> list[str]:
    """Each link of ``path`` whose file, or whose ``#anchor`` in that file, does not exist."""
    problems: list[str] = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor:
            if dest.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{target}: {dest.name} has no heading #{anchor}")
    return problems


def test_slugs_follow_githubs_rules() -> None:
    assert slug("Royalti's tokens") == "royaltis-tokens"
    assert slug("Secrets in files (`*_file`)") == "secrets-in-files-_file"
    assert slug("Several upstreams: OAuth2 APIs next to Royalti") == (
        "several-upstreams-oauth2-apis-next-to-royalti"
    )
    assert slug("With [Docker](x.md)") == "with-docker"


def test_the_link_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Title\n\n## Part\n\n## Part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#part-1) [self](#page) [web](https://example.org/x)\n"
        "`[not a link](nowhere.md)`\n\n```\n[in code](nowhere.md)\n```\n"
        "[gone](missing.md) [no anchor](other.md#nope) [no self anchor](#nope)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nope: other.md has no heading #nope",
        "#nope: page.md has no heading #nope",
    ]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_pages_link_to_each_other() -> None:
    # So that the test above has something to check: the README reaches every page of docs/.
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert {p.resolve() for p in DOCS.glob("*.md")} <= linked


def test_the_readme_fits_on_a_screen_or_two() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_the_configuration_reference_is_one_generated_block() -> None:
    lines = CONFIGURATION.read_text(encoding="utf-8").splitlines()
    begin = [
        i for i, s in enumerate(lines) if s == "<!-- BEGIN GENERATED: royalti-proxy config-docs -->"
    ]
    end = [i for i, s in enumerate(lines) if s == "<!-- END GENERATED -->"]
    assert len(begin) == 1 and len(end) == 1 and begin[0] < end[0]


# -- every metric, alert and command is documented ----------------------------------------------


@pytest.fixture
async def oauth2_url(clock: FakeClock) -> AsyncIterator[str]:
    fake = FakeOAuth2(clients={"docs-client": "docs-secret"}, users={}, wall=clock.wall)
    runner, url = await start_fake_oauth2(fake)
    yield url
    await runner.cleanup()


async def exported_metrics(clock: FakeClock, royalti_url: str, oauth2_url: str) -> set[str]:
    """The metric names a scrape of the real proxy's ``/metrics`` shows, as they are queried
    (counters with ``_total``), with a Royalti and an OAuth2 upstream and a shared token store:
    every kind of family the proxy registers."""
    data = royalti_config(royalti_url, default_workspace=WS[0])
    data["upstreams"].append(
        {
            "name": "oauth",
            "url": oauth2_url,
            "path_prefix": "/oauth/",
            "auth": {
                "type": "oauth2_client_credentials",
                "token_url": f"{oauth2_url}/token",
                "client_id": "docs-client",
                "client_secret": "docs-secret",
            },
        }
    )
    proxy = Proxy(
        build(data, {}, source="test"), clock=clock, store=MemoryStore(MemoryBackend(clock))
    )
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proxy.addresses['proxy']}/user/") as resp:
                assert resp.status == 200
            async with http.get(f"{proxy.addresses['admin']}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
    finally:
        await proxy.stop()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter" and not family.name.endswith("_total"):
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


async def test_every_metric_the_proxy_exports_is_named_in_operations_md(
    clock: FakeClock, fake_url: str, oauth2_url: str
) -> None:
    exported = await exported_metrics(clock, fake_url, oauth2_url)
    # The store's families and the per-request ones are there: the scrape saw every collector.
    assert {"royalti_proxy_token_store_fetches_total", "royalti_proxy_requests_total"} <= exported
    documented = set(METRIC.findall(OPERATIONS.read_text(encoding="utf-8")))
    assert exported - documented == set()
    # And the other way: no page names a metric the proxy does not have.
    named = {m for page in PAGES for m in METRIC.findall(page.read_text(encoding="utf-8"))}
    assert named - exported == set()


def test_every_alert_is_described_in_operations_md() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    assert alerts
    text = OPERATIONS.read_text(encoding="utf-8")
    assert {a for a in alerts if f"`{a}`" not in text} == set()


def test_every_subcommand_is_documented_on_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    choices = re.search(r"\{([a-z][a-z,-]*)\}", out)
    assert choices, out
    commands = choices.group(1).split(",")
    assert {"run", "check-config", "demo"} <= set(commands)
    text = OPERATIONS.read_text(encoding="utf-8")
    assert [c for c in commands if not re.search(rf"royalti-proxy \[?{c}\b", text)] == []


def test_every_make_target_is_documented() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    assert {"demo", "test", "image"} <= targets
    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    assert {t for t in targets if f"make {t}" not in text} == set()


# -- every configuration shown passes check-config ------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: str
    heading: str
    number: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{slug(self.heading) or 'top'}:{self.number}"


def yaml_blocks(path: Path) -> list[Block]:
    """The ```yaml blocks of ``path``, each with the ``##`` heading it is under."""
    blocks: list[Block] = []
    heading, inside, count = "", False, 0
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if inside:
            if line.strip() == "```":
                blocks.append(
                    Block(path.name, heading, count, textwrap.dedent("\n".join(lines)) + "\n")
                )
                inside, lines, count = False, [], count + 1
            else:
                lines.append(line)
        elif line.strip() == "```yaml":
            inside = True
        elif line.startswith("## "):
            heading, count = line[3:].strip(), 0
    assert not inside, f"{path.name}: a yaml block is not closed"
    return blocks


def is_config(block: Block) -> bool:
    data = yaml.safe_load(block.text)
    return isinstance(data, dict) and "upstreams" in data


RECIPE_NAMES = {
    "Several Royalti workspaces with an allowlist",
    "Royalti plus an OAuth2 API side by side by prefix",
    "Refresh-token mode with a rotated secret file",
    "Five replicas on Redis",
    "Behind an egress proxy",
}
RECIPE_BLOCKS = yaml_blocks(RECIPES)
# Complete configurations elsewhere (the README's examples, the docs' larger snippets).
OTHER_BLOCKS = [b for p in PAGES if p != RECIPES for b in yaml_blocks(p) if is_config(b)]
#: What the configurations shown read from the environment.
ENV = {
    "ROYALTI_API_KEY": "RWAK-docs-test-key",
    "REDIS_PASSWORD": "docs-redis-password",
    "ROYALTI_EMAIL": "ops@example.com",
    "ROYALTI_PASSWORD": "docs-password",
}


def with_files_in(data: Any, directory: Path) -> Any:
    """``data`` with every ``*_file`` path replaced by a file created in ``directory``: a Fernet
    key for ``encryption_key_file``, a placeholder secret for the others."""
    if isinstance(data, list):
        return [with_files_in(v, directory) for v in data]
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
            secret = directory / Path(value).name
            if key == "encryption_key_file":
                secret.write_bytes(Fernet.generate_key())
            else:
                secret.write_text(f"docs-{Path(value).name}\n")
            out[key] = str(secret)
        else:
            out[key] = with_files_in(value, directory)
    return out


def check_config(block: Block, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(with_files_in(yaml.safe_load(block.text), secrets)))
    # Only what the process needs: no HTTPS_PROXY or ROYALTI_* of the machine running the tests.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **ENV}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_recipes_page_has_each_recipe_with_its_configuration() -> None:
    headings = {b.heading for b in RECIPE_BLOCKS}
    assert headings == RECIPE_NAMES
    assert all(is_config(b) for b in RECIPE_BLOCKS)


@pytest.mark.parametrize("block", RECIPE_BLOCKS, ids=lambda b: b.id)
def test_each_recipe_passes_check_config(block: Block, tmp_path: Path) -> None:
    result = check_config(block, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK"), result.stdout


def test_the_egress_recipe_sends_royalti_through_the_egress_proxy(tmp_path: Path) -> None:
    (block,) = [b for b in RECIPE_BLOCKS if b.heading == "Behind an egress proxy"]
    out = check_config(block, tmp_path).stdout
    assert "royalti: egress http://egress.corp.example:3128 (from the upstream setting)" in out
    assert "internal: egress direct" in out


def test_the_readme_shows_every_upstream_kind_and_the_editor_line() -> None:
    kinds = {
        (
            u["auth"]["type"],
            next((k for k in ("email", "refresh_token_file", "api_key") if k in u["auth"]), ""),
        )
        for b in yaml_blocks(README)
        if is_config(b)
        for u in yaml.safe_load(b.text)["upstreams"]
    }
    assert kinds == {
        ("royalti", "email"),
        ("royalti", "refresh_token_file"),
        ("royalti", "api_key"),
        ("oauth2_password", ""),
        ("oauth2_client_credentials", ""),
        ("static", ""),
        ("none", ""),
    }
    text = README.read_text(encoding="utf-8")
    assert "# yaml-language-server: $schema=./config/royalti-proxy.schema.json" in text
    assert "royalti-proxy config-schema" in text


@pytest.mark.parametrize("block", OTHER_BLOCKS, ids=lambda b: b.id)
def test_each_configuration_the_docs_show_passes_check_config(block: Block, tmp_path: Path) -> None:
    result = check_config(block, tmp_path)
    assert result.returncode == 0, result.stderr
