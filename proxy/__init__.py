"""royalti-auth-proxy: an authenticating reverse-proxy sidecar for the Royalti.io API."""

__version__ = "0.1.0"
