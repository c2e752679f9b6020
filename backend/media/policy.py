"""One policy for every request Tandem sends on a task's (or a caller's) behalf.

Rules, in the order they are checked (SECURITY.md states them for users):

1. A URL is text of at most MAX_URL_LENGTH characters, with no control characters or whitespace, an http(s)
   scheme, a host, no user:password part and a port in 1..65535. It is parsed once, by httpx, the same parser
   that sends it, so the host checked is the host connected to.
2. A path (`/data/upload/…`) is appended to LABEL_STUDIO_URL's path, never joined as a URL: `/http://x/…`,
   `//x/…` or `/\\x/…` stay on Label Studio.
3. Label Studio credentials go only to the Label Studio origin: scheme, host and port all equal to
   LABEL_STUDIO_URL's. A hostname that merely looks alike (`127.1`, a trailing dot, another port) gets none.
   Nor do they go to Label Studio's own API (`LABEL_STUDIO_URL/api/…`): images are served under `/data/`,
   `/storage-data/` and `/tasks/…/resolve/`, and a task whose "image" names an API endpoint (an export, a
   listing of every project) would otherwise make Tandem call it with its key.
4. Any other host must be named in TANDEM_ALLOWED_HOSTS (`host` or `host:port`), or allowed by `*`, or be the
   target of a redirect that Label Studio itself issued (its presigned cloud-storage URLs). Under `*` and for
   Label Studio's redirects, every address the host resolves to must be public (not private, loopback,
   link-local, reserved, multicast, unspecified, nor an IPv4 address mapped or embedded in IPv6).
5. The host is resolved once and the connection goes to that address (the Host header and TLS name stay the
   host's): a second DNS answer cannot move an approved request to another address (DNS rebinding).
6. Redirects are never followed by the HTTP client: each hop is a new request checked by rules 1-5, and
   credentials go with a hop only when that hop is the Label Studio origin.
"""

from __future__ import annotations

import ipaddress
import posixpath
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from backend.errors import MediaError

MAX_URL_LENGTH = 8192
MAX_REDIRECTS = 5
_DEFAULT_PORTS = {"http": 80, "https": 443}

Resolver = Callable[[str, int], list[str]]
IpRule = Callable[[str], bool]


def _short(url: str, limit: int = 120) -> str:
    text = url if len(url) <= limit else url[:limit] + f"… ({len(url)} characters)"
    return text.encode("unicode_escape").decode("ascii")  # control characters shown, never written to a log raw


def check_text(url: object, what: str = "image URL") -> str:
    """The URL as text, or a MediaError naming what is wrong with it (rule 1's text part)."""
    if not isinstance(url, str):
        raise MediaError(f"the {what} must be text, got {type(url).__name__}")
    if len(url) > MAX_URL_LENGTH:
        raise MediaError(f"the {what} is {len(url)} characters long, over the {MAX_URL_LENGTH}-character limit")
    bad = next((c for c in url if ord(c) < 0x20 or ord(c) == 0x7F or c in " \u2028\u2029\u0085\u00a0"), None)
    if bad is not None:
        raise MediaError(f"the {what} {_short(url)!r} contains a control or space character ({bad!r})")
    return url


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str  # lowercase ASCII (IDNA), IPv6 without brackets
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if _DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


def parse(url: str, what: str = "image URL") -> tuple[httpx.URL, Origin]:
    """Rule 1: the URL as httpx will send it, and its origin; a MediaError for anything else."""
    check_text(url, what)
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii").lower()
        port = parsed.port
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise MediaError(f"the {what} {_short(url)!r} is malformed: {exc}") from None
    if parsed.scheme not in _DEFAULT_PORTS:
        raise MediaError(f"the {what} {_short(url)!r} is not http(s)")
    if not host:
        raise MediaError(f"the {what} {_short(url)!r} has no host")
    if parsed.userinfo:
        raise MediaError(f"the {what} {_short(url)!r} carries a user name or password; refused")
    if port is not None and not 0 < port < 65536:
        raise MediaError(f"the {what} {_short(url)!r} has port {port}, outside 1..65535")
    return parsed, Origin(parsed.scheme, host, port or _DEFAULT_PORTS[parsed.scheme])


def is_public_ip(address: str) -> bool:
    """Globally routable unicast, also through IPv4-in-IPv6 (mapped, 6to4, NAT64); Teredo is never public."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            return False
        elif ip in ipaddress.ip_network("64:ff9b::/96") or ip in ipaddress.ip_network("64:ff9b:1::/48"):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast and not ip.is_unspecified


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise MediaError(f"cannot resolve {host}: {exc}") from None
    seen: list[str] = []
    for info in infos:
        addr = info[4][0]
        if addr not in seen:
            seen.append(addr)
    return seen


@dataclass(frozen=True)
class Target:
    """One approved request: where to connect (`url`, host replaced by the pinned address) and how."""

    url: httpx.URL  # the URL as written (for messages and redirects)
    origin: Origin
    connect_url: httpx.URL  # the same URL with the host replaced by the pinned address
    address: str
    label_studio: bool  # the Label Studio origin: the only target credentials may go to

    def headers(self) -> dict[str, str]:
        return {"Host": self.origin.netloc}

    def extensions(self) -> dict[str, str]:
        return {"sni_hostname": self.origin.host} if self.origin.scheme == "https" else {}


class UrlPolicy:
    """Rules 2-5 (see the module docstring); `resolver` and `is_public` are parameters so that a test can run
    the real policy against servers on 127.0.0.x and say which of those count as public."""

    def __init__(
        self,
        label_studio_url: str | None,
        allowed_hosts: Iterable[str] = (),
        resolver: Resolver = system_resolver,
        is_public: IpRule = is_public_ip,
    ) -> None:
        self.base: httpx.URL | None = None
        self.ls_origin: Origin | None = None
        if label_studio_url:
            self.base, self.ls_origin = parse(label_studio_url.rstrip("/"), "LABEL_STUDIO_URL")
        self.allow_any = False
        self.allowed: set[tuple[str, int | None]] = set()
        for entry in allowed_hosts:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            if entry == "*":
                self.allow_any = True
                continue
            host, port = entry, None
            if entry.startswith("[") and "]" in entry:  # [v6] or [v6]:port
                host, _, rest = entry[1:].partition("]")
                port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
            elif entry.count(":") == 1:
                name, _, num = entry.partition(":")
                if num.isdigit():
                    host, port = name, int(num)
            self.allowed.add((host, port))
        self.resolver = resolver
        self.is_public = is_public

    # -- rule 2 -------------------------------------------------------------------------------------
    def absolute(self, url: str) -> str:
        """A Label Studio path appended to LABEL_STUDIO_URL (never URL-joined); any other URL as given."""
        check_text(url)
        if not url.startswith("/"):
            return url
        if self.base is None:
            raise MediaError(f"{_short(url)} is a Label Studio path but LABEL_STUDIO_URL is not set; set it "
                             "(and LABEL_STUDIO_API_KEY)")
        base = str(self.base).rstrip("/")
        # "//host/x" and "/\\host" must stay paths: collapse the leading run of slashes and backslashes to one
        path = "/" + url.lstrip("/\\")
        return base + path

    def label_studio_origin(self, url: str) -> bool:
        try:
            _, origin = parse(url)
        except MediaError:
            return False
        return origin == self.ls_origin

    # -- rules 3-5 ----------------------------------------------------------------------------------
    def _named(self, origin: Origin) -> bool:
        host = origin.host.rstrip(".")
        return (host, None) in self.allowed or (host, origin.port) in self.allowed

    def check(self, url: str, redirected_by_label_studio: bool = False) -> Target:
        parsed, origin = parse(url)
        if self.ls_origin is not None and origin == self.ls_origin:
            self._refuse_api(parsed)
            return self._pin(parsed, origin, label_studio=True, public_only=False)
        if self._named(origin):
            return self._pin(parsed, origin, label_studio=False, public_only=False)
        if self.allow_any or redirected_by_label_studio:
            return self._pin(parsed, origin, label_studio=False, public_only=True)
        where = str(origin).split("://", 1)[1]  # host:port, an IPv6 host in brackets
        ls = f" ({str(self.ls_origin).split('://', 1)[1]})" if self.ls_origin is not None else ""
        raise MediaError(f"refusing to fetch {where}: only the configured Label Studio{ls} is allowed (add {where} "
                         "to TANDEM_ALLOWED_HOSTS, where the server and the CLI both read it, to permit it)")

    def _refuse_api(self, parsed: httpx.URL) -> None:
        """Rule 3's second half: Label Studio's API is not an image, and is never called with the key for a task."""
        base = self.base.path.rstrip("/") if self.base is not None else ""
        path = parsed.path
        if path.startswith(base + "/"):
            path = path[len(base):]
        # as a server resolves it: "//api", "/./api" and "/x/../api" reach the API too
        first = posixpath.normpath("/" + path.lstrip("/")).lstrip("/").split("/")[0]
        if first.lower() == "api":
            raise MediaError(f"{_short(str(parsed))} is Label Studio's API, not an image: refused (task images are "
                             "under /data/upload/, /data/local-files/, /storage-data/ or cloud storage)")

    def _pin(self, parsed: httpx.URL, origin: Origin, label_studio: bool, public_only: bool) -> Target:
        addresses = self.resolver(origin.host, origin.port)
        if not addresses:
            raise MediaError(f"cannot resolve {origin.host}: no address")
        if public_only:
            private = [a for a in addresses if not self.is_public(a)]
            if private:
                raise MediaError(
                    f"refusing to fetch {origin.host}: it resolves to a private, loopback or link-local address "
                    f"({private[0]}; name the host in TANDEM_ALLOWED_HOSTS to permit it)")
        address = addresses[0]
        connect = parsed.copy_with(host=address.split("%")[0])
        return Target(parsed, origin, connect, address, label_studio)

    def join(self, current: httpx.URL, location: str) -> str:
        """A redirect's Location against the URL that answered it (the same parser as the request)."""
        check_text(location, "redirect location")
        try:
            return str(current.join(location))
        except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
            raise MediaError(f"the redirect location {_short(location)!r} is malformed: {exc}") from None


def setup_credentials(
    label_studio_url: str | None,
    api_key: str | None,
    hostname: str | None,
    access_token: str | None,
) -> tuple[str, str | None] | None:
    """Which Label Studio (and key) serves a project's media and version sync, given its /setup.

    With LABEL_STUDIO_URL set, the configured URL and key, always: a /setup's hostname is ignored. Without it, the
    hostname /setup named is paired only with the access_token that same /setup sent, never with the configured
    LABEL_STUDIO_API_KEY — a caller of /setup names a host, so the key it may receive is the caller's own.
    None when there is nowhere to fetch from.
    """
    if label_studio_url:
        return label_studio_url.rstrip("/"), api_key
    if not hostname or not isinstance(hostname, str):
        return None
    try:
        _, origin = parse(hostname.rstrip("/"), "/setup hostname")
    except MediaError:
        return None
    return hostname.rstrip("/"), (access_token or None)
