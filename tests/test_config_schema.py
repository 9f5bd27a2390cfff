"""The configuration declared once: the JSON Schema is generated from the settings classes and
kept in sync; every example and deploy configuration validates against it; the generic loader
reports every problem with its key path; no secret shows in the schema, the docs or an error.
(docs/configuration.md, generated from the same classes: tests/test_config_docs.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import pytest
import yaml

from proxy.__main__ import main
from proxy.config import SecretRef, build
from proxy.config import docs as config_docs
from proxy.config.fields import DURATION, key, specs
from proxy.config.schema import schema, schema_text
from proxy.config.settings import Config
from proxy.config.walk import Checks, Walk, read
from proxy.errors import ConfigError
from proxy.secret import Secret
from tests.test_config import EXAMPLE, PASSWORD, edit, minimal, uncommented

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "config" / "royalti-proxy.schema.json"
REGENERATE_SCHEMA = "royalti-proxy config-schema > config/royalti-proxy.schema.json"


def proxy_configs() -> list[Path]:
    """config/*.yaml and every YAML file under deploy/ that is a configuration of the proxy."""
    found = sorted((ROOT / "config").glob("*.yaml"))
    for path in sorted((ROOT / "deploy").rglob("*.y*ml")):
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        if len(docs) == 1 and isinstance(docs[0], dict) and "upstreams" in docs[0]:
            found.append(path)
    return found


def validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))


# -- the schema -------------------------------------------------------------------------------


def test_config_schema_command_prints_a_valid_draft_2020_12_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config-schema"], {}) == 0
    printed = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(printed)
    assert printed == json.loads(schema_text())
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_committed_schema_is_the_generated_one() -> None:
    committed = SCHEMA_FILE.read_text(encoding="utf-8")
    assert committed == schema_text(), (
        f"config/royalti-proxy.schema.json is stale: run `{REGENERATE_SCHEMA}`"
    )


def test_schema_gives_descriptions_defaults_and_environment_variables() -> None:
    defs = schema()["$defs"]
    listen = defs["Config"]["properties"]["listen"]
    assert listen["default"] == "127.0.0.1:8080"
    assert listen["x-env"] == "ROYALTI_PROXY_LISTEN"
    assert "loopback" in listen["description"]
    read_timeout = defs["Timeouts"]["properties"]["read"]
    assert read_timeout["default"] == 300.0
    assert {"type": "number", "minimum": 0} in read_timeout["anyOf"]
    royalti = defs["Auth_royalti"]["properties"]
    assert royalti["password_file"]["x-env"] == "ROYALTI_PASSWORD_FILE"
    # Every key the loader reads has a meaning.
    for name, definition in defs.items():
        for key_name, prop in definition["properties"].items():
            assert key_name == "type" or prop.get("description"), f"{name}.{key_name}"


@pytest.mark.parametrize("path", proxy_configs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_example_and_deploy_configuration_validates_against_the_schema(path: Path) -> None:
    errors = [e.message for e in validator().iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def test_the_deploy_configurations_are_among_those_validated() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in proxy_configs()}
    assert {
        "config/royalti-proxy.example.yaml",
        "deploy/docker/config.yaml",
        "deploy/compose/royalti-proxy.yaml",
        "deploy/kubernetes/config.yaml",
    } <= names


@pytest.mark.parametrize("block", ["vbot-v2", "vbot-v3"])
def test_the_examples_commented_out_upstreams_validate_too(block: str) -> None:
    data = yaml.safe_load(uncommented(EXAMPLE.read_text(), block))
    assert [e.message for e in validator().iter_errors(data)] == []


def test_check_jsonschema_accepts_every_configuration_with_the_committed_schema() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMA_FILE)]
        + [str(p) for p in proxy_configs()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (minimal() | {"listn": ":8080"}, []),
        (minimal(passwrd="x"), ["upstreams", 0, "auth"]),
        (minimal(type="static", token="t", email="e"), ["upstreams", 0, "auth"]),
        ({"upstreams": []}, ["upstreams"]),
        (minimal() | {"shutdown_timeout": "5 minutes"}, ["shutdown_timeout"]),
        (minimal() | {"log_format": "xml"}, ["log_format"]),
        (minimal() | {"tokens": {"max_entries": 0}}, ["tokens", "max_entries"]),
        (minimal(type="static", email=None, password=None), ["upstreams", 0, "auth"]),
    ],
    ids=[
        "unknown-key",
        "unknown-auth-key",
        "key-of-another-type",
        "no-upstream",
        "duration",
        "choice",
        "bound",
        "required-secret",
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(data: dict[str, Any], where: list[Any]) -> None:
    with pytest.raises(ConfigError):
        build(data, {}, source="test")
    errors = list(validator().iter_errors(data))
    assert errors
    # The error under an anyOf (a section may be null) is in its context.
    every = [*errors, *(sub for e in errors for sub in e.context or [])]
    assert any(list(e.absolute_path) == where for e in every), [e.absolute_path for e in every]


def test_the_schema_accepts_durations_sizes_and_variables_where_the_loader_does() -> None:
    data = minimal()
    data["upstreams"][0].update(
        timeouts={"read": "5m", "connect": 2.5, "token": "${TOKEN_TIMEOUT:-10s}"},
        replay_max_body="512KiB",
        max_connections="${MAX_CONNECTIONS:-10}",
        replay_on="401, 403",
        tls={"verify": "yes"},
    )
    env = {"MAX_CONNECTIONS": "20"}
    assert build(data, env, source="test").upstreams[0].max_connections == 20
    assert [e.message for e in validator().iter_errors(data)] == []


# -- every problem, with its path -------------------------------------------------------------


def test_a_configuration_with_several_mistakes_reports_all_of_them_with_their_paths(
    tmp_path: Path,
) -> None:
    data = minimal(email=None, password=None, api_key_file=str(tmp_path / "absent"))
    data["admin"] = {"listen": "nowhere", "metrics_max_workspaces": 0}
    data["tokens"] = {"max_backof": "5m"}
    data["token_store"] = {"type": "redis"}
    data["upstreams"][0]["tls"] = {"key_file": __file__}
    data["upstreams"].append(
        {"name": "royalti", "url": "ftp://x", "auth": {"type": "none", "token": "t"}}
    )
    with pytest.raises(ConfigError) as info:
        build(data, {}, source="test")
    assert info.value.problems == [
        "admin.listen: expected host:port, [ipv6]:port or unix:/path",
        "admin.metrics_max_workspaces: must be at least 1",
        "tokens.max_backof: unknown key",
        "token_store.url: required when type is redis",
        "token_store.encryption_key_file: required when type is redis (tokens are encrypted)",
        "upstreams[0].auth.api_key_file: cannot read the file it names (No such file or directory)",
        "upstreams[0].auth.email: required when type is royalti (or refresh_token or api_key)",
        "upstreams[0].tls.cert_file: required with key_file",
        "upstreams[1].auth.token: unknown key",
        "upstreams[1].url: must be an http:// or https:// URL",
        "upstreams[1].name: duplicate name 'royalti'",
        "upstreams[1].path_prefix: duplicate prefix '/'",
    ]


@dataclass(frozen=True, slots=True)
class _Inner:
    """A section."""

    wait: Annotated[float, DURATION, key("A duration.")] = 1.0
    count: Annotated[int, key("At least two.", ge=2)] = 2

    def _check(self, c: Checks) -> _Inner:
        if self.wait > 10:
            c.problem("wait", "must be at most 10")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outer:
    """A toy settings class: the loader knows nothing of it but its declarations."""

    name: Annotated[str, key("A name.", required="always")]
    token: Annotated[SecretRef | None, key("A secret.")] = None
    inner: Annotated[_Inner, key("A section.")] = _Inner()
    items: Annotated[tuple[_Inner, ...], key("A list of sections.")] = ()


def test_the_loader_is_generic_over_the_declarations() -> None:
    walk = Walk({"WAIT": "30"})
    data = {
        "token": "t",
        "token_file": "/nonexistent/t",
        "inner": {"wait": "${WAIT}", "count": 1, "extra": True},
        "items": [{"count": "3"}, "not a mapping"],
    }
    outer = read(_Outer, data, walk)
    assert walk.problems == [
        "name: required always",
        "token: give either token or token_file, not both",
        "inner.count: must be at least 2",
        "inner.wait: must be at most 10",
        "inner.extra: unknown key",
        "items[1]: must be a mapping",
    ]
    assert outer.inner.wait == 30.0
    assert outer.items[0].count == 3
    assert [s.name for s in specs(_Outer)] == ["name", "token", "inner", "items"]


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_has_a_default_or_a_readable_form_in_the_schema() -> None:
    defs = schema()["$defs"]
    secret_keys = 0
    for definition in defs.values():
        for name, prop in definition["properties"].items():
            if f"{name}_file" in definition["properties"]:
                secret_keys += 1
                assert prop == {"description": prop["description"], **_secret_schema(prop)}
                assert "default" not in prop and "examples" not in prop
    assert secret_keys >= 10  # password (twice), refresh_token, api_key, client_secret, ...


def _secret_schema(prop: dict[str, Any]) -> dict[str, Any]:
    rest = {k: v for k, v in prop.items() if k != "description"}
    assert rest.get("anyOf") == [{"type": "string", "writeOnly": True}, {"type": "null"}], rest
    return rest


def test_no_secret_appears_in_the_schema_the_docs_or_the_errors(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-value\n")
    env = {"ROYALTI_PASSWORD": PASSWORD, "SECRET_FILE": str(secret_file)}
    data = minimal(password="${ROYALTI_PASSWORD}", refresh_token_file="${SECRET_FILE}")
    data["upstreams"][0]["egress"] = {"password": "egress-secret-value"}
    with pytest.raises(ConfigError) as info:
        build(data, env, source="test")
    problems = "\n".join(info.value.problems)
    assert "upstreams[0].auth: give one of" in problems
    assert "upstreams[0].egress.username: required with password" in problems
    generated = schema_text() + config_docs.reference() + problems + repr(info.value)
    # A secret where a number belongs is not repeated either.
    with pytest.raises(ConfigError) as number:
        build(edit(minimal(), "upstreams.0.max_connections", PASSWORD), {}, source="test")
    assert number.value.problems == ["upstreams[0].max_connections: must be a whole number"]
    for secret in (PASSWORD, "file-secret-value", "egress-secret-value"):
        assert secret not in generated
    assert repr(Secret(PASSWORD)) == "Secret('***')"


def test_every_declared_field_of_config_is_documented() -> None:
    for spec in specs(Config):
        assert spec.derived or spec.description, spec.name
