"""Unit tests of proxy/egress.py: NO_PROXY matching, proxy URLs, precedence, and the
configuration keys that carry them. No network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.__main__ import main
from proxy.config import build
from proxy.egress import NoProxy, ProxyEnvironment, ProxySetting, parse_proxy_url, resolve
from proxy.errors import ConfigError
from proxy.secret import Secret


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        ("example.com", "badexample.com", 443, False),
        (".example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        ("*.example.com", "a.b.example.com", 80, True),
        ("EXAMPLE.com", "Api.Example.COM", 443, True),
        ("example.com", "example.com.", 443, True),
        ("*", "anything.at.all", 8080, True),
        ("foo, *", "bar", 1, True),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("10.0.0.0/8", "10.example.com", 80, False),
        ("192.168.1.7", "192.168.1.7", 443, True),
        ("192.168.1.7", "192.168.1.8", 443, False),
        ("fd00::/8", "fd00::1", 443, True),
        ("::1", "::1", 443, True),
        ("[::1]:8443", "::1", 8443, True),
        ("[::1]:8443", "::1", 443, False),
        ("example.com:8443", "api.example.com", 8443, True),
        ("example.com:8443", "api.example.com", 443, False),
        ("127.0.0.1:80", "127.0.0.1", 80, True),
        ("127.0.0.1:80", "127.0.0.1", 81, False),
        ("a.com b.com,c.com", "b.com", 443, True),
        ("", "example.com", 443, False),
        ("example.com", "127.0.0.1", 443, False),
        ("localhost", "127.0.0.1", 443, False),  # names are never resolved
    ],
)
def test_no_proxy_matches_by_the_usual_rules(
    no_proxy: str, host: str, port: int, bypass: bool
) -> None:
    assert NoProxy.parse(no_proxy).matches(host, port) is bypass


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "host:port", "[::1", "example.com:99999"])
def test_a_malformed_no_proxy_entry_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match=r"is not|port"):
        NoProxy.parse(f"ok.example.com,{bad}")


def test_a_proxy_url_is_split_from_its_credentials() -> None:
    parsed = parse_proxy_url("http://user%40corp:p%3Ass@egress.corp:3128/")
    assert parsed.url == "http://egress.corp:3128"
    assert parsed.username == "user@corp"
    assert parsed.password == Secret("p:ss")
    assert "p:ss" not in repr(parsed)
    assert parse_proxy_url("egress.corp:3128").url == "http://egress.corp:3128"
    assert parse_proxy_url("https://egress.corp").url == "https://egress.corp:443"
    assert parse_proxy_url("http://[fd00::1]:3128").url == "http://[fd00::1]:3128"


@pytest.mark.parametrize(
    "bad", ["socks5://egress:1080", "http://", "http://egress:3128/path", "http://egress:port"]
)
def test_a_bad_proxy_url_is_refused_without_repeating_it(bad: str) -> None:
    with pytest.raises(ValueError, match=r"URL|host|path") as info:
        parse_proxy_url(bad)
    assert "egress" not in str(info.value)


def environment(**env: str) -> ProxyEnvironment:
    problems: list[str] = []
    out = ProxyEnvironment.from_env(env, problems)
    assert problems == []
    return out


def test_https_targets_use_https_proxy_and_http_targets_http_proxy() -> None:
    env = environment(HTTPS_PROXY="http://tls-egress:3128", HTTP_PROXY="http://plain-egress:3128")
    https = resolve("https://api.royalti.io", ProxySetting(), env)
    plain = resolve("http://api.internal:8080", ProxySetting(), env)
    assert https is not None and https.url == "http://tls-egress:3128"
    assert https.origin == "environment"
    assert plain is not None and plain.url == "http://plain-egress:3128"


def test_lower_case_variables_are_honoured_and_upper_case_wins() -> None:
    assert environment(https_proxy="http://low:1").https_proxy is not None
    both = environment(HTTPS_PROXY="http://up:1", https_proxy="http://low:1", no_proxy="x.com")
    assert both.https_proxy is not None and both.https_proxy.url == "http://up:1"
    assert both.no_proxy.matches("x.com", 443)


def test_no_proxy_is_off_unless_set() -> None:
    assert resolve("https://api.royalti.io", ProxySetting(), environment()) is None


def test_no_proxy_bypasses_the_environment_proxy_only() -> None:
    env = environment(HTTPS_PROXY="http://egress:3128", NO_PROXY=".royalti.io")
    assert resolve("https://api.royalti.io", ProxySetting(), env) is None
    assert resolve("https://open-api.vbot.vn", ProxySetting(), env) is not None
    # An explicit per-upstream proxy is meant: NO_PROXY does not undo it.
    own = ProxySetting(proxy=parse_proxy_url("http://own:3128"))
    chosen = resolve("https://api.royalti.io", own, env)
    assert chosen is not None and chosen.url == "http://own:3128"
    assert chosen.origin == "upstream"


def test_the_upstream_setting_wins_over_the_environment() -> None:
    env = environment(HTTPS_PROXY="http://env-user:env-pw@egress:3128")
    assert resolve("https://api.royalti.io", ProxySetting(proxy="none"), env) is None
    inherited = resolve("https://api.royalti.io", ProxySetting(), env)
    assert inherited is not None
    auth = inherited.basic_auth()
    assert auth is not None and (auth.login, auth.password) == ("env-user", "env-pw")
    # Credentials from the upstream's own setting replace those of the URL.
    own = ProxySetting(username="svc", password=Secret("from-file"))
    chosen = resolve("https://api.royalti.io", own, env)
    assert chosen is not None and chosen.url == "http://egress:3128"
    auth = chosen.basic_auth()
    assert auth is not None and (auth.login, auth.password) == ("svc", "from-file")
    assert "from-file" not in repr(chosen) and "from-file" not in chosen.describe()


def upstream_config(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "up", "url": url, "auth": {"type": "static", "token": "t"}, **extra}]
    }


def test_the_configuration_resolves_each_upstream_and_token_endpoint(tmp_path: Path) -> None:
    secret = tmp_path / "egress-password"
    secret.write_text("s3cret\n")
    data = {
        "upstreams": [
            {
                "name": "royalti",
                "url": "https://api.royalti.io",
                "auth": {"type": "royalti", "api_key": "RWAK1"},
                "egress": {"proxy": "none"},
            },
            {
                "name": "vbot",
                "url": "https://open-api.vbot.vn/v2.0",
                "path_prefix": "/vbot/",
                "auth": {
                    "type": "oauth2_password",
                    "token_url": "http://token.internal/token",
                    "username": "u",
                    "password": "p",
                    "client_auth": "none",
                },
                "egress": {
                    "proxy": "http://egress.corp:3128",
                    "username": "svc",
                    "password_file": str(secret),
                },
                "token_egress": {"proxy": "none"},
            },
            {
                "name": "plain",
                "url": "http://plain.internal",
                "path_prefix": "/plain/",
                "auth": {"type": "royalti", "email": "a@b.c", "password": "x"},
            },
        ]
    }
    config = build(data, {"HTTP_PROXY": "http://env-egress:8080"}, source="test")
    royalti, vbot, plain = config.upstreams
    assert royalti.proxy is None and royalti.token_proxy is None
    assert vbot.proxy is not None and vbot.proxy.url == "http://egress.corp:3128"
    assert vbot.proxy.password == Secret("s3cret")
    assert vbot.token_proxy is None  # token_egress: none
    assert plain.proxy is not None and plain.proxy.url == "http://env-egress:8080"
    assert plain.token_proxy is not None and plain.token_proxy.origin == "environment"
    assert str(secret) in config.watched_files
    assert "s3cret" not in repr(config)


def test_check_config_reports_bad_egress_settings_without_their_secrets() -> None:
    data = upstream_config(
        "https://api.example.com",
        egress={"proxy": "ftp://user:hunter2@egress:21", "password": "pw"},
    )
    env = {"HTTPS_PROXY": "socks5://u:hunter2@x:1", "no_proxy": "10.0.0.0/40"}
    with pytest.raises(ConfigError) as info:
        build(data, env, source="test")
    problems = info.value.problems
    assert "HTTPS_PROXY: must be an http:// or https:// proxy URL" in problems
    assert any(p.startswith("no_proxy: ") and "CIDR" in p for p in problems)
    assert any(p.startswith("upstreams[0].egress.proxy: must be an http://") for p in problems)
    assert "upstreams[0].egress.username: required with password" in problems
    assert not any("hunter2" in p for p in problems)


def test_proxy_none_with_credentials_is_a_mistake() -> None:
    data = upstream_config(
        "https://api.example.com", egress={"proxy": "none", "username": "u", "password": "p"}
    )
    with pytest.raises(ConfigError, match="proxy credentials would never be used"):
        build(data, {}, source="test")


def test_an_unknown_egress_key_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.egress\.prxy: unknown key"):
        build(upstream_config("https://a.example", egress={"prxy": "none"}), {}, source="test")


def test_check_config_prints_each_upstreams_egress_without_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "upstreams:\n"
        "  - name: royalti\n"
        "    url: https://api.royalti.io\n"
        "    auth: {type: royalti, email: a@b.c, password: x}\n"
        "    token_egress: {proxy: none}\n"
    )
    env = {"HTTPS_PROXY": "http://svc:hunter2@egress.corp:3128"}
    assert main(["check-config", "--config", str(path)], env) == 0
    out = capsys.readouterr().out
    assert (
        "  royalti: egress http://egress.corp:3128 (from the environment); "
        "token endpoint egress direct\n"
    ) in out
    assert "hunter2" not in out


def test_check_config_fails_on_a_bad_environment_proxy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"ROYALTI_API_KEY": "RWAK1", "HTTPS_PROXY": "socks5://svc:hunter2@egress:1080"}
    assert main(["check-config"], env) == 2
    err = capsys.readouterr().err
    assert "HTTPS_PROXY: must be an http:// or https:// proxy URL" in err
    assert "hunter2" not in err
