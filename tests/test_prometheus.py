"""A real Prometheus server scrapes the proxy's admin listener and reads back the same token
expiry the proxy exports: the exposition is one Prometheus actually ingests, content negotiation
included (Prometheus asks for OpenMetrics first)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.app import Proxy
from tests.binaries import require_binary
from tests.conftest import WS, ProxyFactory, free_port, royalti_config

DEADLINE = 60.0
POLL = 0.2
EXPIRY = "royalti_proxy_token_expiry_timestamp_seconds"


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Any]:
    """``await prometheus(target)``: a Prometheus server scraping ``host:port`` every second;
    returns its base URL. Killed at the end of the test."""
    binary = require_binary("prometheus")
    procs: list[asyncio.subprocess.Process] = []

    async def start(target: str) -> str:
        (tmp_path / "prom.yml").write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: royalti-proxy\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={tmp_path / 'prom.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()  # the child has its own copy
        procs.append(proc)
        return f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await asyncio.wait_for(proc.wait(), 30)


async def query_until_result(base: str, query: str, log: Path) -> list[dict[str, Any]]:
    """Poll Prometheus's query API until the query has a result (bounded by ``DEADLINE``)."""
    url = URL(base) / "api/v1/query" % {"query": query}
    deadline = time.monotonic() + DEADLINE
    async with aiohttp.ClientSession() as http:  # Prometheus answers gzipped
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        body = await resp.json()
                        if body["status"] == "success" and body["data"]["result"]:
                            return list(body["data"]["result"])
            await asyncio.sleep(POLL)
    output = await asyncio.to_thread(log.read_text)
    pytest.fail(f"Prometheus had no {query} after {DEADLINE}s; its log:\n{output}")


async def test_prometheus_scrapes_the_token_expiry_the_proxy_exports(
    start_proxy: ProxyFactory,
    fake_url: str,
    prometheus: Any,
    tmp_path: Path,
) -> None:
    proxy: Proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    own = proxy.registry.get_sample_value(EXPIRY, {"upstream": "royalti", "workspace": WS[0]})
    assert own is not None

    base = await prometheus(URL(proxy.addresses["admin"]).raw_authority)
    [series] = await query_until_result(base, EXPIRY, tmp_path / "prometheus.log")

    assert series["metric"]["workspace"] == WS[0]
    assert series["metric"]["upstream"] == "royalti"
    assert series["metric"]["job"] == "royalti-proxy"
    assert float(series["value"][1]) == pytest.approx(own, abs=1.0)
    [up] = await query_until_result(base, "royalti_proxy_ready", tmp_path / "prometheus.log")
    assert float(up["value"][1]) == 1.0
