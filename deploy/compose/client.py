"""The example client of deploy/docker-compose.yml: it calls the Royalti API through the proxy.

It holds no Royalti credential, only the shared secret that lets it use the proxy (sent in
X-Proxy-Secret). Standard library only: it runs on the proxy image's Python.
"""

import os
import time
import urllib.error
import urllib.request

PROXY_URL = os.environ.get("ROYALTI_PROXY_URL", "http://royalti-proxy:8080")
SECRET_FILE = os.environ.get("PROXY_SHARED_SECRET_FILE", "/run/secrets/proxy-shared-secret")
INTERVAL = float(os.environ.get("INTERVAL", "30"))


def get(path: str, secret: str | None) -> str:
    request = urllib.request.Request(PROXY_URL + path)
    if secret is not None:
        request.add_header("X-Proxy-Secret", secret)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return f"{response.status} ({len(response.read())} bytes)"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {exc.headers.get('X-Royalti-Proxy-Error', '')}".rstrip()
    except OSError as exc:
        return f"unreachable: {exc}"


def main() -> None:
    with open(SECRET_FILE, encoding="utf-8") as fh:
        secret = fh.read().rstrip("\r\n")
    # Without the secret the proxy refuses (401 CLIENT_UNAUTHENTICATED): shown once.
    print(f"GET /user/ without X-Proxy-Secret -> {get('/user/', None)}", flush=True)
    while True:
        print(f"GET /user/ -> {get('/user/', secret)}", flush=True)
        time.sleep(INTERVAL)


if __name__ == "__main__":
    main()
