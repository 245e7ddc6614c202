"""How long an error answer asks us to wait: one parser for the Messages API and the Batch API."""

from __future__ import annotations

import httpx2
import pytest
from multidict import CIMultiDict

from runner.send.retries import retry_after_seconds


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one is taken first
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),  # a garbled one falls back to the other
        ({"retry-after": "86400"}, 86400.0),  # huge: returned as asked, capped by whoever waits
        ({"retry-after": "1e12"}, 1e12),
    ],
)
def test_a_positive_number_of_seconds_is_read(headers: dict[str, str], seconds: float) -> None:
    assert retry_after_seconds(headers) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 21 Oct 2015 07:28:00 GMT",  # an HTTP date: not read; our own backoff applies
        "soon",
        "",
        "0",
        "-5",
        "inf",
        "nan",
        "1e400",  # overflows to infinity
    ],
)
def test_anything_else_says_nothing(value: str) -> None:
    assert retry_after_seconds({"retry-after": value}) is None
    assert retry_after_seconds({"retry-after-ms": value}) is None


def test_no_header_says_nothing() -> None:
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"content-type": "application/json"}) is None


def test_header_names_are_matched_as_the_transport_matches_them() -> None:
    """The SDK's headers (httpx2) and the Batch API client's (aiohttp) ignore case: `Retry-After` is read."""
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "3"})) == 3.0
    assert retry_after_seconds(httpx2.Headers({"Retry-After-Ms": "40"})) == 0.04
    assert retry_after_seconds(CIMultiDict({"Retry-After": "3"})) == 3.0
