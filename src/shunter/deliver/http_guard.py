"""Where an HTTP subscriber may connect: the URL allowlist and the address policy.

Two checks, both on what is really used. The URL is parsed once, with yarl (the parser
aiohttp itself uses, so no parser differential), and its host and port are matched against
``allow_hosts`` / ``allow_ports`` at configuration time. Addresses are checked where the
connection is made: ``GuardedResolver`` drops forbidden addresses from every DNS answer,
so aiohttp only ever connects to addresses that passed, and ``guarded_socket`` refuses to
create a socket for a forbidden address at all (IP literals skip the resolver). A hostname
re-resolved to a private address later (DNS rebinding) is caught on the next connection.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance-metadata services hand out cloud credentials; reaching one is the classic SSRF
# prize. Each needs its own single-address allow_private entry, a covering range is not
# enough.
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


class AddressRefused(OSError):
    """Every address of a host is forbidden by the policy (never retried: a configuration
    matter, not an outage)."""

    def __init__(self, host: str, refused: list[tuple[str, str]]) -> None:
        self.host = host
        self.refused = refused
        shown = ", ".join(f"{addr} ({why})" for addr, why in refused[:4])
        super().__init__(
            f"{host} resolves only to forbidden addresses: {shown}; "
            f"list them in http.allow_private to allow them"
        )


def parse_allowed(entries: Iterable[str]) -> list[Network]:
    """``allow_private`` entries (addresses or CIDR ranges) → networks; ValueError if bad."""
    return [ipaddress.ip_network(entry.strip(), strict=False) for entry in entries]


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches (mapped, 6to4, Teredo, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def forbidden_kind(addr: Address) -> str | None:
    """Why ``addr`` is refused by default (loopback, private, ...), or None if it is public."""
    if addr in METADATA:
        return "cloud-metadata"
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_v4(addr)
        if inner is not None and (kind := forbidden_kind(inner)) is not None:
            return kind
    checks = (
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("unspecified", addr.is_unspecified),
        ("multicast", addr.is_multicast),
        ("private", addr.is_private),
        ("reserved", addr.is_reserved),
    )
    for kind, hit in checks:
        if hit:
            return kind
    return None if addr.is_global else "not globally routable"


class AddressPolicy:
    """Refuses loopback, private, link-local, metadata and other non-public addresses
    unless listed in ``allow_private``."""

    def __init__(self, allow_private: Iterable[str] = ()) -> None:
        self._allowed = parse_allowed(allow_private)

    def refusal(self, host: str) -> str | None:
        """None if a connection to the IP address ``host`` is allowed, else the reason."""
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return "not an IP address"
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        kind = forbidden_kind(addr)
        if kind is None:
            return None
        if kind == "cloud-metadata":
            exact = any(n.num_addresses == 1 and addr in n for n in self._allowed)
            return None if exact else kind
        return None if any(addr in n for n in self._allowed) else kind


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` and returns only the addresses the policy allows."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = ThreadedResolver()
        answers = await self._inner.resolve(host, port, family)
        allowed, refused = [], []
        for answer in answers:
            why = self._policy.refusal(answer["host"])
            if why is None:
                allowed.append(answer)
            else:
                refused.append((answer["host"], why))
        if not allowed:
            raise AddressRefused(host, refused)
        return allowed

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def guarded_socket(policy: AddressPolicy) -> Callable[[Any], socket.socket]:
    """aiohttp ``socket_factory``: the last check, on the very address about to be connected."""

    def factory(addr_info: Any) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        why = policy.refusal(str(sockaddr[0]))
        if why is not None:
            raise AddressRefused(str(sockaddr[0]), [(str(sockaddr[0]), why)])
        return socket.socket(family, kind, proto)

    return factory


# -- the URL, checked once at configuration time -------------------------------------------


def url_problems(
    url: str, allow_hosts: list[str] | None, allow_ports: list[int] | None, allow_private: list[str]
) -> list[str]:
    """Everything wrong with a subscriber URL under its allowlists (empty if none)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        return [f"url: not a valid URL: {exc}"]
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        return ["url: expected an absolute http:// or https:// URL"]
    if parsed.fragment:
        return ["url: a URL with a #fragment is not sent as such; remove it"]
    host = parsed.raw_host.lower()
    problems = _host_problems(host)
    if problems:
        return problems
    if allow_hosts is not None and not any(host_matches(host, p) for p in allow_hosts):
        problems.append(f"url: host {host!r} is not in allow_hosts ({', '.join(allow_hosts)})")
    if allow_ports is not None and parsed.port not in allow_ports:
        problems.append(
            f"url: port {parsed.port} is not in allow_ports ({', '.join(map(str, allow_ports))})"
        )
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return problems
    why = AddressPolicy(allow_private).refusal(str(literal))
    if why is not None:
        problems.append(f"url: {host} is a {why} address; list it in allow_private to allow it")
    return problems


def _host_problems(host: str) -> list[str]:
    try:
        ipaddress.ip_address(host)
        return []
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if _NUMERIC_LABEL.match(labels[-1]):  # 127.1, 2130706433, 0x7f.1: IPv4 in disguise
        return [f"url: {host!r} is not a canonical IP address; write it as a.b.c.d"]
    if not all(_HOST_LABEL.match(label) for label in labels):
        return [f"url: {host!r} is not a valid host name"]
    return []


def host_matches(host: str, pattern: str) -> bool:
    """``pattern`` is a host name, an IP address, or ``*.domain`` (any subdomain)."""
    pattern = pattern.strip().lower().rstrip(".")
    host = host.rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    if pattern.startswith("[") and pattern.endswith("]"):
        pattern = pattern[1:-1]
    return host == pattern


def safe_url(url: URL) -> str:
    """The URL as it may appear in logs and headers: no credentials, no query values."""
    shown = url.with_user(None).with_password(None).with_fragment(None)
    if url.query_string:
        shown = shown.with_query({k: "***" for k in url.query})
    return str(shown)


# -- configured request headers ------------------------------------------------------------

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "idempotency-key",
        "accept-encoding",
    }
)


def check_headers(headers: dict[str, str]) -> None:
    """Refuse header names that are not tokens, values that could split the request, and
    the headers shunter sets itself; ValueError names the header (never its value)."""
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
        lowered = name.lower()
        if lowered in _RESERVED_HEADERS or lowered.startswith("shunter-"):
            raise ValueError(f"header {name!r} is set by shunter and cannot be configured")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"the value of header {name!r} contains a line break or NUL")
