"""Rule: every hop of a redirect is checked like the first request (allow-list, private addresses), and the
address a host resolved to is the one connected to (no DNS rebinding). 127.0.0.2 plays a public host here:
the policy's `is_public` says so; everything else on loopback stays private."""

from __future__ import annotations

import ipaddress

import pytest

from backend.errors import MediaError
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.media.policy import UrlPolicy, is_public_ip


def _public_is(*addresses):
    return lambda ip: ip in addresses


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "255.255.255.255", "224.0.0.1", "198.18.0.1", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "2002:7f00:1::1", "2002:a9fe:a9fe::",
    "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "2001:0::1", "ff02::1", "fe80::1%eth0", "not-an-ip"])
def test_private_and_special_addresses_are_not_public(address):
    assert not is_public_ip(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_public(address):
    assert is_public_ip(address)


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data", "http://[::ffff:169.254.169.254]/", "http://[::1]:1/",
    "http://127.0.0.1:1/", "http://0.0.0.0:1/", "http://2130706433:1/", "http://0x7f.1:1/", "http://127.1:1/",
    "http://[fd00:ec2::254]/", "http://10.0.0.1/"])
def test_wildcard_refuses_private_literals_before_connecting(url):
    policy = UrlPolicy("http://ls.invalid:1", ["*"])
    with pytest.raises(MediaError):
        policy.check(url)


def test_an_allowed_host_cannot_redirect_to_a_private_or_unlisted_one(servers):
    ls, other, internal = servers
    for path, location in [("/a", f"{internal.url}/secret"), ("/b", f"http://localhost:{internal.port}/secret"),
                           ("/c", f"http://[::1]:{internal.port}/secret"),
                           ("/d", f"http://169.254.169.254/latest/meta-data/"),
                           ("/e", f"//{internal.host}:{internal.port}/secret"),
                           ("/f", f"http://2130706435:{internal.port}/secret")]:
        other.redirect(path, location, 302 if path < "/d" else 307)
    fetcher = MediaFetcher(MediaSettings(label_studio_url=ls.url, api_key="k", allowed_hosts=frozenset({"127.0.0.2"})))
    for path in "abcdef":
        with pytest.raises(MediaError, match="refusing|resolve"):
            fetcher.load(f"{other.url}/{path}")
    assert internal.requests == [] and ls.requests == []


def test_wildcard_rechecks_every_hop(servers):
    ls, other, internal = servers
    other.redirect("/to-internal", f"{internal.url}/secret")
    other.redirect("/to-ls", f"{ls.url}/data/upload/1/x.png")
    other.redirect("/to-self", f"{other.url}/ok.png")
    policy = UrlPolicy(ls.url, ["*"], is_public=_public_is("127.0.0.2"))
    fetcher = MediaFetcher(MediaSettings(label_studio_url=ls.url, api_key="k", allowed_hosts=frozenset({"*"})),
                           policy=policy)
    with pytest.raises(MediaError, match="private"):
        fetcher.load(f"{other.url}/to-internal")
    assert internal.requests == []
    fetcher.load(f"{other.url}/to-ls")  # Label Studio itself: reached, but the hop came from elsewhere
    assert ls.requests and ls.with_auth() == ["/data/upload/1/x.png"]  # credentials belong to the origin only
    assert fetcher.load(f"{other.url}/to-self").size == (8, 8)
    assert other.with_auth() == []


def test_redirect_loops_and_chains_end(servers):
    _, other, _ = servers
    other.redirect("/loop", "/loop")
    for i in range(10):
        other.redirect(f"/chain{i}", f"/chain{i + 1}")
    fetcher = MediaFetcher(MediaSettings(allowed_hosts=frozenset({"127.0.0.2"})))
    for start in ("/loop", "/chain0"):
        with pytest.raises(MediaError, match="redirects"):
            fetcher.load(f"{other.url}{start}")
    assert len(other.requests) == 12  # 6 hops each, then it stopped


@pytest.mark.parametrize("location", ["http://[::1", "http://h:99999/", "http://a b/", "javascript:alert(1)",
                                      "file:///etc/passwd", "gopher://127.0.0.3:70/", "http://u:p@127.0.0.2/"])
def test_malformed_or_foreign_redirects_are_that_tasks_error(servers, location):
    _, other, internal = servers
    other.redirect("/bad", location)
    fetcher = MediaFetcher(MediaSettings(allowed_hosts=frozenset({"127.0.0.2"})))
    with pytest.raises(MediaError):
        fetcher.load(f"{other.url}/bad")
    assert internal.requests == []


def test_the_resolved_address_is_pinned(servers):
    """A resolver that answers a public address first and a private one next (DNS rebinding): the connection
    goes to the address that was checked."""
    _, other, internal = servers
    answers = iter([["127.0.0.2"], ["127.0.0.3"], ["127.0.0.3"]])

    def rebinding(host, port):
        return next(answers)

    policy = UrlPolicy(None, ["*"], resolver=rebinding, is_public=_public_is("127.0.0.2"))
    fetcher = MediaFetcher(MediaSettings(allowed_hosts=frozenset({"*"})), policy=policy)
    assert fetcher.load(f"http://images.example:{other.port}/x.png").size == (8, 8)
    assert internal.requests == []
    assert other.requests[0][1]["host"] == f"images.example:{other.port}"  # the name, not the address


def test_a_name_with_any_private_address_is_refused():
    policy = UrlPolicy(None, ["*"], resolver=lambda h, p: ["8.8.8.8", "10.0.0.1"])
    with pytest.raises(MediaError, match="private"):
        policy.check("http://mixed.example/x.png")
    policy = UrlPolicy(None, ["*"], resolver=lambda h, p: ["8.8.8.8", "2606:4700:4700::1111"])
    target = policy.check("http://public.example/x.png")
    assert target.address == "8.8.8.8" and not target.label_studio
    assert ipaddress.ip_address(target.connect_url.host)
