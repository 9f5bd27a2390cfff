"""Stand-ins for the upstreams, never used by the running proxy except in ``royalti-proxy demo``.

- :mod:`proxy.fakes.royalti` — the fake Royalti API: the demo runs against it, and so do the
  tests and the benchmark (its endpoints, error envelope and JWTs are in ``royalti_api``,
  ``royalti_envelope`` and ``royalti_jwt``).
- :mod:`proxy.fakes.oauth2` — a fake OAuth2 token server (password, client-credentials and
  refresh-token grants) for the tests and the examples in the docs.

They live apart from the product so that nothing under ``proxy/`` but :mod:`proxy.demo` imports
them; the import contracts in ``pyproject.toml`` enforce it.
"""
