"""The import contracts of ``pyproject.toml`` (``[tool.importlinter]``): the code as it is keeps
them, and each contract fails when an import it forbids is added.

``lint-imports`` runs in a fresh interpreter from the directory it checks (it puts that directory
first on ``sys.path``), so the failing cases run it on a copy of ``proxy/`` with one import
injected, never on the working tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
#: What the ``lint-imports`` script runs, run with this interpreter.
LINT_IMPORTS = "\n".join(
    (
        "import sys",
        "from importlinter.cli import lint_imports_command",
        "sys.exit(lint_imports_command())",
    )
)


def contracts() -> dict[str, dict[str, Any]]:
    """The contracts of ``pyproject.toml``, by id."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        listed: list[dict[str, Any]] = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    return {c["id"]: c for c in listed}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def summary_line(output: str, name: str) -> str:
    """The line of the summary that names contract ``name``: it ends in KEPT or BROKEN (a long
    name is wrapped, so the words are joined back first)."""
    flat = " ".join(output.split())
    for verdict in ("KEPT", "BROKEN"):
        if f"{name} {verdict}" in flat:
            return verdict
    raise AssertionError(f"contract {name!r} is not in the output:\n{output}")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``proxy/`` and ``pyproject.toml`` copied to a scratch directory."""
    shutil.copytree(
        ROOT / "proxy", tmp_path / "proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def module_file(root: Path, module: str) -> Path:
    """The file of ``module`` under ``root``: ``a/b.py`` or, for a package, ``a/b/__init__.py``."""
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def test_the_code_keeps_every_import_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in done.stdout
    for contract in contracts().values():
        assert summary_line(done.stdout, contract["name"]) == "KEPT"


#: (module, the import added to it, the contract it breaks, what lint-imports says).
INJECTED = [
    # The two cycles issue 14 found: configuration reaching up into a token source, metrics
    # (and websocket) into the forwarder.
    (
        "proxy.config",
        "from proxy.tokens.sources import oauth2",
        "layers",
        "proxy.config is not allowed to import proxy.tokens",
    ),
    (
        "proxy.metrics",
        "from proxy.forward import Forwarder",
        "layers",
        "proxy.metrics is not allowed to import proxy.forward",
    ),
    (
        "proxy.websocket",
        "from proxy.forward import Route",
        "layers",
        "proxy.websocket is not allowed to import proxy.forward",
    ),
    ("proxy.errors", "import proxy.app", "layers", "proxy.errors is not allowed to import"),
    # Imports only the type checker sees count as much as the others.
    (
        "proxy.store.base",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from proxy.tokens import Token",
        "layers",
        "proxy.store is not allowed to import proxy.tokens",
    ),
    # Modules of one layer joined by `|` do not import each other.
    ("proxy.admin", "import proxy.metrics", "layers", "proxy.admin is not allowed to import"),
    (
        "proxy.forward",
        "import proxy.fakes.royalti",
        "no-fakes-in-product",
        "proxy.forward is not allowed to import proxy.fakes",
    ),
    # Indirectly too: through a module that may import the fakes.
    (
        "proxy.config",
        "import proxy.demo",
        "no-fakes-in-product",
        "proxy.config is not allowed to import proxy.fakes",
    ),
    (
        "proxy.fakes.oauth2",
        "from proxy.secret import Secret",
        "fakes-stand-alone",
        "proxy.fakes is not allowed to import proxy.secret",
    ),
    (
        "proxy.tokens.token",
        "from proxy.tokens.manager import TokenManager",
        "tokens",
        "proxy.tokens.token is not allowed to import proxy.tokens.manager",
    ),
    (
        "proxy.tokens.shared.lease",
        "from proxy.tokens.shared.source import SharedSource",
        "shared-tokens",
        "proxy.tokens.shared.lease is not allowed to import proxy.tokens.shared.source",
    ),
    (
        "proxy.tokens.sources.static",
        "from proxy.tokens.sources.oauth2 import OAuth2Source",
        "token-sources",
        "proxy.tokens.sources.static is not allowed to import proxy.tokens.sources.oauth2",
    ),
    (
        "proxy.tokens.sources.royalti.refresh",
        "from proxy.tokens.sources.royalti.source import RoyaltiSource",
        "royalti-source",
        "proxy.tokens.sources.royalti.refresh is not allowed to import "
        "proxy.tokens.sources.royalti.source",
    ),
    (
        "proxy.store.memory",
        "from proxy.store import redis_store",
        "store",
        "proxy.store.memory is not allowed to import proxy.store.redis_store",
    ),
]


@pytest.mark.parametrize(
    ("module", "statement", "contract", "message"),
    INJECTED,
    ids=[f"{m} {c}" for m, _, c, _ in INJECTED],
)
def test_an_import_against_a_contract_breaks_it(
    tree: Path, module: str, statement: str, contract: str, message: str
) -> None:
    path = module_file(tree, module)
    path.write_text(path.read_text() + f"\n{statement}\n")
    done = lint_imports(tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert summary_line(done.stdout, contracts()[contract]["name"]) == "BROKEN"
    assert message in " ".join(done.stdout.split())  # joined back where a long line wrapped


@pytest.mark.parametrize(
    ("package", "contract"),
    [
        ("proxy", "layers"),
        ("proxy.tokens", "tokens"),
        ("proxy.tokens.shared", "shared-tokens"),
        ("proxy.tokens.sources", "token-sources"),
        ("proxy.tokens.sources.royalti", "royalti-source"),
        ("proxy.store", "store"),
    ],
)
def test_a_new_module_without_a_layer_breaks_its_packages_contract(
    tree: Path, package: str, contract: str
) -> None:
    # Even one that imports nothing: every module has to be given its place.
    module_file(tree, package).parent.joinpath("stray.py").write_text('"""Placed nowhere."""\n')
    done = lint_imports(tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert summary_line(done.stdout, contracts()[contract]["name"]) == "BROKEN"
    assert f"{package}.stray" in done.stdout


def test_every_module_of_the_proxy_has_a_place_in_the_contracts() -> None:
    """Every package with modules of its own is a container of an exhaustive layers contract,
    unless it is one layer of its parent's (the configuration, the fakes)."""
    exhaustive = {
        container
        for c in contracts().values()
        if c["type"] == "layers" and c.get("exhaustive")
        for container in c["containers"]
    }
    packages = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in ROOT.glob("proxy/**/__init__.py")
    }
    whole = ("proxy.config", "proxy.fakes")
    inside = {p for p in packages if not any(p == w or p.startswith(f"{w}.") for w in whole)}
    assert inside <= exhaustive, sorted(inside - exhaustive)


def top_level_modules() -> set[str]:
    """``proxy.X`` for every module and package directly under ``proxy/``."""
    names = {p.stem for p in (ROOT / "proxy").glob("*.py") if p.stem != "__init__"}
    names |= {p.parent.name for p in (ROOT / "proxy").glob("*/__init__.py")}
    return {f"proxy.{name}" for name in names}


def test_the_fakes_contracts_name_every_module_of_the_product() -> None:
    """A module added to the product is kept from the fakes, and the fakes from it, only when
    the forbidden contracts name it: they must name them all."""
    outside = {"proxy.__main__", "proxy.demo", "proxy.fakes"}
    product = top_level_modules() - outside
    assert set(contracts()["no-fakes-in-product"]["source_modules"]) == product
    assert set(contracts()["fakes-stand-alone"]["forbidden_modules"]) == (
        top_level_modules() - {"proxy.fakes"}
    )
