"""Unit tests of the token value object and lifetime rules (no network)."""

from __future__ import annotations

import logging
import random

import jwt
import pytest

from proxy.errors import TokenFetchError
from proxy.tokens.token import (
    MAX_LIFETIME,
    SkewNotice,
    Token,
    _claims,
    jwt_lifetime,
    make_token,
    safety_margin,
)

KEY = "k" * 32


def _jwt(**claims: object) -> str:
    return jwt.encode(dict(claims), KEY, algorithm="HS256")


def test_lifetime_is_exp_minus_iat_whatever_our_clock_says():
    value = _jwt(iat=1_000, exp=1_000 + 21_600)
    for local in (0.0, 1_000.0, 1_000 + 3_600.0, 1_000 - 3_600.0, 5e9):
        lifetime, exp = jwt_lifetime(value, server_time=None, local_wall=local)
        assert lifetime == 21_600
        assert exp == 21_600 + 1_000


def test_without_iat_lifetime_is_counted_from_the_servers_date_header():
    value = _jwt(exp=10_000)
    lifetime, _ = jwt_lifetime(value, server_time=9_000.0, local_wall=1.0)
    assert lifetime == 1_000


def test_without_iat_or_date_header_lifetime_falls_back_to_our_wall_clock():
    value = _jwt(exp=10_000)
    lifetime, _ = jwt_lifetime(value, server_time=None, local_wall=9_500.0)
    assert lifetime == 500


@pytest.mark.parametrize("value", ["not-a-jwt", "a.b.c", _jwt(iat=1)])
def test_a_value_that_is_not_a_jwt_with_exp_is_rejected(value):
    with pytest.raises(TokenFetchError) as info:
        jwt_lifetime(value, server_time=None, local_wall=0.0)
    assert info.value.code == "BAD_TOKEN"


def test_a_token_already_expired_when_received_is_rejected():
    with pytest.raises(TokenFetchError) as info:
        make_token("x", lifetime=-5, requested_at=0, wall_requested_at=0, what="t")
    assert info.value.code == "TOKEN_EXPIRED"


def test_a_lifetime_years_long_is_capped():
    t = make_token("x", lifetime=10 * 365 * 86400, requested_at=0, wall_requested_at=0, what="t")
    assert t.lifetime <= MAX_LIFETIME


def test_expiry_counts_from_when_the_token_was_requested_minus_a_safety_margin():
    t = make_token("x", lifetime=21_600, requested_at=50.0, wall_requested_at=0, what="t")
    assert t.expires_at == 50.0 + 21_600 - 1.0
    assert t.is_valid(50.0 + 21_598.9)
    assert not t.is_valid(50.0 + 21_599)


def test_the_safety_margin_scales_down_for_short_lifetimes():
    assert safety_margin(21_600) == 1.0
    assert safety_margin(3.0) == 1.0
    assert safety_margin(1.5) == pytest.approx(0.5)


@pytest.mark.parametrize("lifetime", [2.0, 10.0, 100.0, 600.0, 21_600.0, 86_400.0])
def test_refresh_ahead_point_stays_between_half_and_the_end_of_the_lifetime(lifetime):
    rng = random.Random(7)
    t = Token("v", obtained_at=0.0, lifetime=lifetime, wall_expires_at=lifetime)
    points = [t.refresh_at(rng) for _ in range(200)]
    assert all(lifetime * 0.5 <= p < lifetime for p in points)
    if lifetime - lifetime * 0.5 >= 60:
        # at least a minute before expiry when the lifetime allows it
        assert all(lifetime - p >= 60 for p in points)
    if lifetime >= 600:
        # long-lived tokens renew in the 75-85 % band, jittered
        assert all(0.75 * lifetime <= p <= 0.85 * lifetime for p in points)
        assert len({round(p, 3) for p in points}) > 50


def test_a_fingerprint_is_eight_hex_digits_and_not_the_token():
    t = Token("secret-token-value", 0.0, 10.0, 10.0)
    assert len(t.fingerprint) == 8
    assert int(t.fingerprint, 16) >= 0
    assert t.fingerprint not in "secret-token-value"


# -- issue 12: the Date header and the issuer's clock disagree ---------------------------------


def test_a_fresh_token_whose_date_header_is_past_exp_is_used_for_exp_minus_iat():
    # The issuer's clock is an hour behind the clock that stamps Date: exp - Date is negative.
    value = _jwt(iat=1_000, exp=1_000 + 600)
    lifetime, _ = jwt_lifetime(value, server_time=1_000 + 3_600.0, local_wall=0.0)
    assert lifetime == 600


@pytest.mark.parametrize("skew", [3_600.0, -3_600.0, 7 * 3_600.0, -7 * 3_600.0, 301.0, -301.0])
def test_a_date_header_beyond_the_tolerance_is_ignored_whichever_clock_is_ahead(skew):
    value = _jwt(iat=100_000, exp=100_000 + 21_600)
    notice = SkewNotice("royalti")
    lifetime, _ = jwt_lifetime(value, server_time=100_000 + skew, local_wall=0.0, skew=notice)
    assert lifetime == 21_600


@pytest.mark.parametrize("skew", [180.0, 299.0, 1.0])
def test_a_date_header_a_few_minutes_after_iat_shortens_the_lifetime(skew):
    value = _jwt(iat=100_000, exp=100_000 + 21_600)
    lifetime, _ = jwt_lifetime(value, server_time=100_000 + skew, local_wall=0.0)
    assert lifetime == 21_600 - skew


def test_a_date_header_a_few_minutes_before_iat_never_lengthens_the_lifetime():
    value = _jwt(iat=100_000, exp=100_000 + 21_600)
    lifetime, _ = jwt_lifetime(value, server_time=100_000 - 240.0, local_wall=0.0)
    assert lifetime == 21_600


def test_the_date_header_never_takes_more_than_half_of_a_short_lifetime():
    # 60 s token, Date 40 s after iat: within 5 minutes, but more than half the lifetime.
    value = _jwt(iat=1_000, exp=1_060)
    lifetime, _ = jwt_lifetime(value, server_time=1_040.0, local_wall=0.0)
    assert lifetime == 60
    lifetime, _ = jwt_lifetime(value, server_time=1_020.0, local_wall=0.0)
    assert lifetime == 40


def test_a_handed_in_token_has_only_exp_minus_now_left_however_old():
    value = _jwt(iat=1_000, exp=1_000 + 86_400)
    lifetime, _ = jwt_lifetime(value, server_time=1_000 + 80_000.0, local_wall=0.0, fresh=False)
    assert lifetime == 6_400
    lifetime, _ = jwt_lifetime(value, server_time=1_000 + 90_000.0, local_wall=0.0, fresh=False)
    assert lifetime < 0  # make_token then rejects it as expired


def test_the_skew_warning_is_logged_once_per_distinct_skew_not_per_token(caplog):
    notice = SkewNotice("royalti")
    with caplog.at_level(logging.WARNING, logger="proxy.tokens"):
        for i in range(50):  # 50 tokens, all an hour off (give or take a few seconds)
            iat = 100_000 + i * 600
            value = _jwt(iat=iat, exp=iat + 600)
            jwt_lifetime(value, server_time=iat + 3_600.0 + i % 3, local_wall=0.0, skew=notice)
        value = _jwt(iat=500_000, exp=500_600)
        jwt_lifetime(value, server_time=500_000 - 7_200.0, local_wall=0.0, skew=notice)
    records = [r for r in caplog.records if getattr(r, "event", None) == "issuer_clock_skew"]
    assert [r.skew_seconds for r in records] == [-3_600, 7_200]
    assert all(r.issuer == "royalti" for r in records)


@pytest.mark.parametrize(
    "value",
    [
        "a.b.c.d",  # four segments
        "e30.W10.",  # payload a JSON array
        "W10.e30.",  # header a JSON array
        "e30.e30!.",  # a character outside base64url
        "e30.bm90IGpzb24.",  # payload not JSON
        "e30..",  # empty payload
    ],
)
def test_malformed_compact_serialisations_are_rejected(value):
    with pytest.raises(TokenFetchError) as info:
        jwt_lifetime(value, server_time=None, local_wall=0.0)
    assert info.value.code == "BAD_TOKEN"


@pytest.mark.parametrize(
    "claims",
    [
        {"iat": 1_000, "exp": 1_000 + 21_600},
        {"exp": 10_000.5, "name": "ü ✓", "activeWorkspace": "ws"},
        {"iat": 5, "exp": 7, "pad": "x" * 1},
        {"iat": 5, "exp": 7, "pad": "x" * 2},
        {"iat": 5, "exp": 7, "pad": "x" * 3},
    ],
)
def test_claims_are_read_as_pyjwt_reads_them_unverified(claims):
    value = _jwt(**claims)
    assert _claims(value) == jwt.decode(value, options={"verify_signature": False})
    assert _claims(value) == claims


def test_the_signature_is_never_checked():
    value = jwt.encode({"iat": 1, "exp": 2}, "another key entirely, 32 bytes long", "HS256")
    assert jwt_lifetime(value, server_time=None, local_wall=0.0) == (1.0, 2.0)
