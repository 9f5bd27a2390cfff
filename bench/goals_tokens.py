"""The token and transfer goals, against the fake Royalti API: a cold burst costs one login and
one authtoken per workspace, a steady state through several token lifetimes never waits for a
token, and 1 GiB each way passes in bounded memory."""

from __future__ import annotations

import json

from harness import BENCH, PY, http_get, metric, proc_status
from report import Row, verdict
from runners import FAKE_AUTH, LOAD_CPU, WORKSPACES, Bench, MiB


def cold_start(b: Bench, fake_url: str, control: str) -> None:
    before = json.loads(http_get(f"{control}/counters")[1])
    proc, url, admin, _ = b.start_proxy("proxy-cold", fake_url, dict(FAKE_AUTH))
    with b.procs.running(proc):
        burst = b.loadgen(
            "burst",
            f"{url}/user/",
            "--n",
            str(b.plan.burst),
            "--workspaces",
            "10",
            timeout=90,
        )
        text = http_get(f"{admin}/metrics")[1].decode()
    after = json.loads(http_get(f"{control}/counters")[1])
    logins = after["login_calls"] - before["login_calls"]
    per_ws = {
        w: after["authtoken_calls"].get(w, 0) - before["authtoken_calls"].get(w, 0)
        for w in WORKSPACES
    }
    authtokens = sum(per_ws.values())
    m_login = metric(text, "royalti_proxy_token_fetches_total", kind="login", outcome="success")
    m_access = metric(text, "royalti_proxy_token_fetches_total", kind="access", outcome="success")
    ok200 = burst["statuses"].get("200", 0)
    b.results["cold_start"] = {
        "burst": burst,
        "logins": logins,
        "authtoken_per_workspace": per_ws,
        "metrics_login": m_login,
        "metrics_access": m_access,
    }
    b.rows.append(
        Row(
            f"cold start: {b.plan.burst} requests, 10 workspaces",
            "1 login, 10 authtoken",
            f"{logins} login, {authtokens} authtoken "
            f"({max(per_ws.values())} max per workspace; "
            f"metrics {m_login:.0f}/{m_access:.0f}); "
            f"{ok200}/{b.plan.burst} answered 200, "
            f"p99 {burst.get('p99', 0) / 1000:.0f} ms",
            verdict(
                logins == 1
                and authtokens == 10
                and max(per_ws.values()) == 1
                and ok200 == b.plan.burst
            ),
        )
    )


def steady_state(b: Bench) -> None:
    plan = b.plan
    lifetime = plan.token_lifetime
    duration = lifetime * plan.lifetimes
    fake, fake_url, control = b.start_fake(lifetime)
    with b.procs.running(fake):
        auth = {**FAKE_AUTH, "default_workspace": "ws-00"}
        proxy, url, admin, _ = b.start_proxy("proxy-steady", fake_url, auth)
        token = json.loads(http_get(f"{control}/token?workspace=ws-00&lifetime=3600")[1])
        bare_url, bare = b.start_bare(fake_url)
        rate = ["--rate", f"{plan.steady_rate:g}", "--duration", f"{duration:g}"]
        with b.procs.running(proxy, bare):
            m0 = http_get(f"{admin}/metrics")[1].decode()
            c0 = json.loads(http_get(f"{control}/counters")[1])
            # Both at once, each from its own generator at the full rate: a stall of the
            # shared machine lands in both tails, not in one of them.
            runs = b.loadgens(
                {
                    "steady-proxy": ["rate", f"{url}/user/", *rate],
                    "steady-bare": [
                        "rate",
                        f"{bare_url}/user/",
                        *rate,
                        "--header",
                        f"Authorization: Bearer {token['access_token']}",
                    ],
                },
                timeout=duration + 60,
            )
            m1 = http_get(f"{admin}/metrics")[1].decode()
            c1 = json.loads(http_get(f"{control}/counters")[1])
    through_proxy, through_bare = runs["steady-proxy"], runs["steady-bare"]

    def delta(name: str, **labels: str) -> float:
        return metric(m1, name, **labels) - metric(m0, name, **labels)

    waits = delta("royalti_proxy_token_waits_total")
    renewals = delta("royalti_proxy_token_fetches_total", kind="access", outcome="success")
    expired = c1["expired_seen"] - c0["expired_seen"]
    unauthorized = c1["unauthorized"] - c0["unauthorized"]
    ok = through_proxy["statuses"].get("200", 0)
    b.results["steady_state"] = {
        "lifetime_s": lifetime,
        "duration_s": duration,
        "rate": plan.steady_rate,
        "proxy": through_proxy,
        "bare": through_bare,
        "token_waits": waits,
        "renewals": renewals,
        "upstream_expired_seen": expired,
        "upstream_401": unauthorized,
    }
    b.rows.append(
        Row(
            f"steady state: {plan.lifetimes} token lifetimes ({lifetime} s) at "
            f"{plan.steady_rate:g}/s",
            "0 token waits",
            f"{waits:.0f} waits, {renewals:.0f} renewals, {expired} expired / "
            f"{unauthorized} 401 at upstream; {ok}/{through_proxy['requests']} answered 200",
            verdict(
                waits == 0
                and expired == 0
                and unauthorized == 0
                and ok == through_proxy["requests"]
            ),
        )
    )
    ratio = through_proxy["p99"] / through_bare["p99"]
    b.rows.append(
        Row(
            "steady state p99 (both at once)",
            "<= 1.5 x bare",
            f"proxy {through_proxy['p99'] / 1000:.2f} ms, "
            f"bare {through_bare['p99'] / 1000:.2f} ms ({ratio:.2f} x); "
            f"p50 {through_proxy['p50'] / 1000:.2f} vs "
            f"{through_bare['p50'] / 1000:.2f} ms",
            verdict(ratio <= 1.5),
        )
    )


def transfers(b: Bench, fake_url: str, control: str) -> None:
    size = b.plan.transfer_size
    auth = {**FAKE_AUTH, "default_workspace": "ws-00"}
    for kind, path in (
        ("upload", "/file/royalty"),
        ("download", f"/file/1/download?size={size}"),
    ):
        proc, url, _, _ = b.start_proxy(f"proxy-{kind}", fake_url, auth)
        with b.procs.running(proc):
            idle = proc_status(proc.pid)["VmRSS"]
            out = b.procs.run(
                "transfer",
                [PY, str(BENCH / "transfer.py"), kind, url + path, str(size)],
                timeout=300,
                cpu=LOAD_CPU,
            )
            res = json.loads(out.strip().splitlines()[-1])
            status = proc_status(proc.pid)
        res.update(idle_rss_kib=idle, peak_rss_kib=status["VmHWM"])
        b.results[kind] = res
        peak = status["VmHWM"] / 1024
        b.rows.append(
            Row(
                f"{size // MiB} MiB {kind}",
                "peak RSS <= 100 MiB",
                f"peak {peak:.1f} MiB VmHWM (idle {idle / 1024:.1f}); "
                f"{res['mib_s']} MiB/s, {'complete' if res['ok'] else 'INCOMPLETE'}",
                verdict(peak <= 100 and bool(res["ok"])),
            )
        )
