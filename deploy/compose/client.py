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
    # Only http(s): urllib would also open file: and custom schemes (ruff's S310).
    if not PROXY_URL.startswith(("http://", "https://")):
        return f"ROYALTI_PROXY_URL is not an http(s) URL: {PROXY_URL}"
    request = urllib.request.Request(PROXY_URL + path)  # noqa: S310 (scheme checked above)
    if secret is not None:
        request.add_header("X-Proxy-Secret", secret)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (as above)
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
