"""Rule: Label Studio credentials go only to the Label Studio origin (same scheme, host and port), whatever the
task or a caller writes; a Label Studio path stays on Label Studio."""

from __future__ import annotations

import pytest

from backend.errors import MediaError
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.media.policy import UrlPolicy, setup_credentials

KEY = "legacy-token-secret"


def _fetcher(ls, allowed=(), **kw):
    return MediaFetcher(MediaSettings(label_studio_url=ls.url, api_key=KEY, allowed_hosts=frozenset(allowed), **kw))


def _try(fetcher, url):
    try:
        fetcher.load(url, task_id=1)
    except MediaError:
        pass


def test_paths_that_contain_another_url_stay_on_label_studio(servers):
    ls, other, _ = servers
    fetcher = _fetcher(ls, allowed=["127.0.0.2"])  # even a host allowed for plain downloads
    spellings = [
        f"/{other.url}/x.png",  # /http://127.0.0.2:port/x.png
        f"//{other.host}:{other.port}/x.png",  # protocol-relative
        f"///{other.host}:{other.port}/x.png",
        f"/\\{other.host}:{other.port}/x.png",  # backslash, as browsers read it
        f"/\\\\{other.host}:{other.port}/x.png",
        f"/{other.url.replace('http', 'HTTP')}/x.png",
        f"/data/upload/../../{other.url}/x.png",
    ]
    for url in spellings:
        _try(fetcher, url)
    assert other.requests == []  # none of them left Label Studio
    assert len(ls.requests) == len(spellings)
    assert all(h.get("authorization") == f"Token {KEY}" for _, h in ls.requests)


def test_lookalike_origins_get_no_credentials(servers):
    ls, other, _ = servers
    # every one of these reaches a server (allowed by name), and none may carry the key
    fetcher = _fetcher(ls, allowed=["127.0.0.2", "localhost", "127.1", "127.0.0.1."])
    for url in [f"{other.url}/a.png", f"http://localhost:{ls.port}/b.png", f"http://127.1:{ls.port}/c.png",
                f"http://127.0.0.1.:{ls.port}/d.png", f"http://127.0.0.2:{ls.port}/e.png"]:
        _try(fetcher, url)
    assert other.with_auth() == [] and ls.with_auth() == []
    assert {p for p, _ in ls.requests} >= {"/b.png", "/c.png"} and len(other.requests) == 1


def test_urls_with_user_info_are_refused(servers):
    ls, other, _ = servers
    fetcher = _fetcher(ls, allowed=["127.0.0.2"])
    for url in [f"http://u:p@{other.host}:{other.port}/x.png", f"http://{ls.host}:{ls.port}\\@{other.host}:{other.port}/",
                f"http://{ls.host}:{ls.port}@{other.host}:{other.port}/x.png"]:
        with pytest.raises(MediaError):
            fetcher.load(url)
    assert other.requests == [] and ls.requests == []


def test_a_redirect_never_carries_credentials_off_label_studio(servers):
    ls, other, _ = servers
    ls.redirect("/data/upload/1/r.png", f"{other.url}/landed.png")
    ls.redirect("/data/upload/1/rel.png", f"//{other.host}:{other.port}/landed2.png")
    fetcher = MediaFetcher(MediaSettings(label_studio_url=ls.url, api_key=KEY, allowed_hosts=frozenset({"127.0.0.2"})))
    assert fetcher.load("/data/upload/1/r.png").size == (8, 8)
    assert fetcher.load("/data/upload/1/rel.png").size == (8, 8)
    assert [p for p, _ in other.requests] == ["/landed.png", "/landed2.png"]
    assert other.with_auth() == []
    assert ls.with_auth() == ["/data/upload/1/r.png", "/data/upload/1/rel.png"]


def test_label_studio_s_own_api_is_never_called_for_a_task(servers):
    """Images live under /data/, /storage-data/ and /tasks/…/resolve/: a task whose image names an API endpoint
    (an export, every user) would have Tandem call it with its key. Refused before any request, however spelt,
    and when Label Studio itself redirects there."""
    ls, _, _ = servers
    ls.redirect("/data/upload/1/to-api.png", f"{ls.url}/api/users/")
    fetcher = _fetcher(ls)
    for url in ["/api/projects/", "/api/projects/1/export?exportType=JSON", "//api/users/", "/./api/users/",
                "/data/upload/../../api/users/", f"{ls.url}/api/current-user/whoami", f"{ls.url}/%61pi/users/",
                "/data/upload/1/to-api.png"]:
        with pytest.raises(MediaError, match="is Label Studio's API, not an image"):
            fetcher.load(url, task_id=1)
    assert [p for p, _ in ls.requests] == ["/data/upload/1/to-api.png"]  # only the redirecting image was asked
    assert fetcher.load("/data/upload/1/a.png", task_id=1).size == (8, 8)  # images still come with the key
    assert ls.with_auth() == ["/data/upload/1/to-api.png", "/data/upload/1/a.png"]


def test_label_studio_redirects_to_a_private_host_are_refused_unless_named(servers):
    """Label Studio's presigned cloud redirects may lead to public hosts; a private one must be named."""
    ls, other, _ = servers
    ls.redirect("/tasks/1/resolve/", f"{other.url}/bucket/key.png", 303)
    fetcher = _fetcher(ls)
    with pytest.raises(MediaError, match="private"):
        fetcher.load("s3://bucket/key.png", task_id=1)
    assert other.requests == []
    public_other = MediaFetcher(MediaSettings(label_studio_url=ls.url, api_key=KEY),
                                policy=UrlPolicy(ls.url, (), is_public=lambda ip: ip == "127.0.0.2"))
    assert public_other.load("s3://bucket/key.png", task_id=1).size == (8, 8)
    assert [p for p, _ in other.requests] == ["/bucket/key.png"] and other.with_auth() == []


@pytest.mark.parametrize("task_id", ["1/../../api/users", -1, 2**64, True, 1.5])
def test_cloud_uris_need_an_integer_task_id(servers, task_id):
    ls, _, _ = servers
    with pytest.raises(MediaError, match="task id"):
        _fetcher(ls).load("s3://bucket/key.png", task_id=task_id)
    assert ls.requests == []


def test_setup_never_pairs_the_configured_key_with_a_host_it_names():
    # LABEL_STUDIO_URL set: the /setup hostname is ignored
    assert setup_credentials("http://ls:8080", KEY, "http://evil:1", "t") == ("http://ls:8080", KEY)
    # not set: the hostname goes only with the token the same /setup sent
    assert setup_credentials(None, KEY, "http://evil:1", "their-token") == ("http://evil:1", "their-token")
    assert setup_credentials(None, KEY, "http://evil:1", None) == ("http://evil:1", None)
    assert setup_credentials(None, KEY, "http://evil:1", "") == ("http://evil:1", None)
    for bad in ("evil:1", "ftp://evil", "http://u:p@evil/", "http://evil:99999", "", None, "http://e\r\nvil"):
        assert setup_credentials(None, KEY, bad, "t") is None


def test_a_fetcher_for_a_setup_hostname_sends_only_that_setups_token(servers):
    ls, other, _ = servers
    url, key = setup_credentials(None, KEY, other.url, None)
    fetcher = MediaFetcher(MediaSettings(label_studio_url=url, api_key=key))
    fetcher.load("/data/upload/1/a.png")
    assert other.with_auth() == []
    url, key = setup_credentials(None, KEY, other.url, "their-token")
    MediaFetcher(MediaSettings(label_studio_url=url, api_key=key)).load("/data/upload/1/b.png")
    assert [h.get("authorization") for _, h in other.requests] == [None, "Token their-token"]
