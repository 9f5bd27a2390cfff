"""``royalti-proxy demo``: the proxy in front of the embedded fake Royalti API.

Tokens in the demo live two minutes (the refresh token ten), so renewals show up in the log
while you watch.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from proxy.app import Proxy
from proxy.config import build
from proxy.fakes.royalti import FakeRoyalti, start_fake

DEMO_EMAIL = "ops@example.com"
DEMO_PASSWORD = "correct-horse"


def demo_config(upstream_url: str, listen: str, admin_listen: str) -> dict[str, Any]:
    return {
        "listen": listen,
        "admin": {"listen": admin_listen},
        "log_format": "text",
        "upstreams": [
            {
                "name": "royalti",
                "url": upstream_url,
                "path_prefix": "/",
                "auth": {
                    "type": "royalti",
                    "email": DEMO_EMAIL,
                    "password": DEMO_PASSWORD,
                    "default_workspace": "786acdf7-fa3e-4ab2-91d5-13f0b6a8ad97",
                },
            }
        ],
    }


@contextlib.asynccontextmanager
async def running(listen: str, admin_listen: str) -> AsyncIterator[Proxy]:
    """The fake API and the proxy in front of it, both on loopback."""
    fake = FakeRoyalti(access_lifetime=120, refresh_lifetime=600)
    runner, url = await start_fake(fake)
    try:
        config = build(demo_config(url, listen, admin_listen), {}, source="demo")
        async with Proxy(config) as proxy:
            print(banner(proxy.addresses["proxy"], proxy.addresses.get("admin"), url), flush=True)
            yield proxy
    finally:
        await runner.cleanup()


def banner(proxy: str, admin: str | None, fake: str) -> str:
    lines = [
        "",
        f"royalti-auth-proxy demo: proxy on {proxy}, fake Royalti API on {fake}",
        "Paste any of these in another terminal (no credentials needed):",
        "",
        f"  curl -s {proxy}/user/",
        f"  curl -s -H 'X-Royalti-Workspace: ws-beta' '{proxy}/artist/?page=1&size=5'",
        f"  curl -s -F 'statement=@/etc/hostname' {proxy}/file/royalty",
        f"  curl -s -o /dev/null -w '%{{size_download}} bytes\\n' \\\n"
        f"       '{proxy}/file/42/download?size=50000000'",
        f"  curl -sN -X POST '{proxy}/ai/chat?n=5'",
        f"  curl -si -H 'X-Royalti-Workspace: no-such-ws' {proxy}/user/",
    ]
    if admin:
        lines += [
            f"  curl -s {admin}/tokens",
            f"  curl -s {admin}/readyz",
            f"  curl -s {admin}/metrics | grep royalti_proxy_",
        ]
    lines += ["", "Access tokens live 2 minutes here: watch the log renew them. Ctrl-C stops.", ""]
    return "\n".join(lines)
