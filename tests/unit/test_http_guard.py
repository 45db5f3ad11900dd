"""The address policy and the URL allowlist of HTTP subscribers (no network)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from shunter.deliver.http_guard import (
    AddressPolicy,
    AddressRefused,
    GuardedResolver,
    check_headers,
    forbidden_kind,
    guarded_socket,
    host_matches,
    safe_url,
    url_problems,
)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "cloud-metadata"),
        ("fd00:ec2::254", "cloud-metadata"),
        ("100.100.100.200", "cloud-metadata"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not globally routable"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_forbidden_kinds(address: str, kind: str | None) -> None:
    assert forbidden_kind(ipaddress.ip_address(address)) == kind


def test_allow_private_opens_only_what_it_lists() -> None:
    policy = AddressPolicy(["127.0.0.1", "10.0.0.0/8", "169.254.0.0/16"])
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None  # the same address, mapped
    assert policy.refusal("127.0.0.2") == "loopback"
    assert policy.refusal("10.200.0.9") is None
    assert policy.refusal("169.254.3.4") is None
    assert policy.refusal("169.254.169.254") == "cloud-metadata"  # a range is not enough
    assert AddressPolicy(["169.254.169.254"]).refusal("169.254.169.254") is None


class Answers(AbstractResolver):
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


def test_resolver_keeps_only_allowed_addresses() -> None:
    resolver = GuardedResolver(
        AddressPolicy(["127.0.0.1"]), Answers("10.0.0.7", "127.0.0.1", "169.254.169.254")
    )
    answers = asyncio.run(resolver.resolve("hooks.test", 80))
    assert [a["host"] for a in answers] == ["127.0.0.1"]


def test_resolver_refuses_a_name_with_only_forbidden_addresses() -> None:
    resolver = GuardedResolver(AddressPolicy(), Answers("10.0.0.7", "169.254.169.254"))
    with pytest.raises(AddressRefused) as refused:
        asyncio.run(resolver.resolve("hooks.test", 80))
    assert str(refused.value) == (
        "hooks.test resolves only to forbidden addresses: 10.0.0.7 (private), "
        "169.254.169.254 (cloud-metadata); list them in http.allow_private to allow them"
    )


def test_socket_factory_refuses_before_any_socket_exists() -> None:
    factory = guarded_socket(AddressPolicy(["127.0.0.1"]))
    with pytest.raises(AddressRefused):
        factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80)))
    factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))).close()


@pytest.mark.parametrize(
    ("host", "pattern", "matches"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.Example.com", True),
        ("a.b.example.com", "*.example.com", True),
        ("example.com", "*.example.com", False),
        ("evilexample.com", "*.example.com", False),
        ("::1", "[::1]", True),
        ("api.example.com.", "api.example.com", True),
    ],
)
def test_host_patterns(host: str, pattern: str, matches: bool) -> None:
    assert host_matches(host, pattern) is matches


def test_url_checks() -> None:
    assert url_problems("https://hooks.example.com/x", ["*.example.com"], [443], []) == []
    assert url_problems("http://127.0.0.1:8080/x", ["127.0.0.1"], [8080], ["127.0.0.1"]) == []
    assert "not a canonical IP address" in url_problems("http://127.1/", None, None, [])[0]
    assert "not a canonical IP address" in url_problems("http://0x7f.0.0.1/", None, None, [])[0]
    assert "#fragment" in url_problems("http://example.com/#a", None, None, [])[0]
    assert "not a valid host name" in url_problems("http://exa mple.com/", None, None, [])[0]


def test_logged_urls_carry_no_credentials_or_query_values() -> None:
    shown = safe_url(URL("https://user:pw@hooks.example.com/x?token=abc&b=1"))
    assert shown == "https://hooks.example.com/x?token=***&b=***"


def test_configured_headers_cannot_split_or_replace_requests() -> None:
    check_headers({"Authorization": "Bearer x", "X-Team": "revenue"})
    for bad in (
        {"Host": "x"},
        {"Shunter-Caller": "x"},
        {"Idempotency-Key": "x"},
        {"X-A": "a\r\nX-B: b"},
        {"Bad Name": "x"},
    ):
        with pytest.raises(ValueError):
            check_headers(bad)
