"""Rule: one malformed task is that task's error. A URL, id or data that cannot be read raises a MediaError for
that task (never another exception, which became a 500 for the whole batch), and the protocol layer reads
each task on its own; what does not fit a field at all is a 422 naming it, never a 500."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backend.errors import MediaError
from backend.media.fetch import INVALID_TASK_PREFIX, MediaFetcher, MediaSettings
from backend.media.policy import MAX_URL_LENGTH
from backend.server.protocol import (
    MAX_LABEL_CONFIG_CHARS,
    PredictRequest,
    SetupRequest,
    TrainRequest,
    WebhookRequest,
    project_id,
)
from backend.training.jobs import JobStore

HOSTILE_URLS = [
    "http://127.0.0.1:99999/x.png", "http://127.0.0.1:0/x.png", "http://127.0.0.1:-1/x.png",
    "http://[::1/x.png", "http://[::1]]/x.png", "http://[zz::1]/x.png", "http://[::1]:/x", "http://:80/x.png",
    "http://127.0.0.1/a\r\nHost: evil", "http://127.0.0.1/a\nb", "http://127.0.0.1/\x00", "http://127.0.0.1/\x7f",
    "http://127.0.0.1/\u2028", "/data/upload/\r\n/x.png", "/data/upload/x\x00.png", "http://" + "a" * 70 + ".com/x",
    "http://127.0.0.1/" + "a" * (MAX_URL_LENGTH + 1), "/" + "a" * 100_000, "http://\udcff/x", "http://%zz/x",
    "file:///etc/passwd", "gopher://127.0.0.1:70/", "data:image/png;base64,AAAA", "javascript:alert(1)",
    "ftp://127.0.0.1/x.png", "\\\\server\\share\\x.png", "s3://", "s3://bucket/" + "k" * 20000,
    "http://127.0.0.1:1:2/x", "http://user@/x", "https://xn--/x", "http://a..b/x", "http:///x", "http:x",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_hostile_urls_are_one_tasks_error(url, tmp_path):
    fetcher = MediaFetcher(MediaSettings(label_studio_url="http://127.0.0.1:9", local_files_root=tmp_path,
                                         allowed_hosts=frozenset({"127.0.0.1"}), download_deadline_s=2))
    with pytest.raises(MediaError):
        fetcher.load(url, task_id=1)


@pytest.mark.parametrize("name", ["x\x00.png", "%00.png", "a%00/../../etc/passwd", "a" * 5000, "%2e%2e/%2e%2e/etc/passwd",
                                  "/etc/passwd", "..%5c..%5cetc", "\udcff.png"])
def test_hostile_local_file_names_are_one_tasks_error(name, tmp_path):
    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path))
    with pytest.raises(MediaError):
        fetcher.load(f"/data/local-files/?d={name}")


@pytest.mark.parametrize("value", [None, 12, ["http://x"], {"url": "x"}, "", "   ", 1.5])
def test_a_non_text_image_value_is_one_tasks_error(value):
    with pytest.raises(MediaError):
        MediaFetcher(MediaSettings()).load(value)


def test_each_task_is_read_on_its_own():
    good = {"id": 1, "data": {"image": "/data/upload/1/a.png"}}
    body = PredictRequest(tasks=[good, 7, "x", None, [], {"id": 2**63, "data": {}}, {"id": -1, "data": {}},
                                 {"id": "5", "data": {}}, {"id": True, "data": {}}, {"id": 3.0, "data": {}},
                                 {"id": 4, "data": "text"}, {"id": 5, "data": None}, {"id": 6}, {"id": 7, "data": [1]},
                                 {"id": 2**63 - 1, "data": {"image": "x"}}, {"data": {"image": "y"}}],
                          label_config="<View/>")
    tasks = body.tasks
    assert len(tasks) == 16 and tasks[0] is good or tasks[0] == good
    bad = [t for t in tasks if t["data"].get("$undefined$", "").startswith(INVALID_TASK_PREFIX)]
    assert len(bad) == 13
    assert tasks[-2]["id"] == 2**63 - 1 and tasks[-1]["data"] == {"image": "y"}
    assert [t["id"] for t in tasks[10:14]] == [4, 5, 6, 7]  # the id is kept where it is valid
    fetcher = MediaFetcher(MediaSettings())
    messages = []
    for task in bad:
        with pytest.raises(MediaError) as caught:
            fetcher.load(task["data"]["$undefined$"], task_id=task["id"])
        messages.append(str(caught.value))
    assert "not an object" in messages[0] and "2^63" in messages[4]


@pytest.mark.parametrize("body", [
    {"tasks": "x"}, {"tasks": {"id": 1}}, {"tasks": [], "label_config": "x" * (MAX_LABEL_CONFIG_CHARS + 1)},
    {"tasks": [], "project": "9" * 100}, {"tasks": [], "label_config": 5}])
def test_requests_that_do_not_fit_are_a_422_naming_the_field(body):
    with pytest.raises(ValidationError):
        PredictRequest(**body)


@pytest.mark.parametrize("action", ["X" * 65, "ANNOTATION_CREATED\n", "a b", "", "<script>", "A" * 10_000_000])
def test_webhook_actions_are_bounded(action):
    with pytest.raises(ValidationError):
        WebhookRequest(action=action, project=1)
    assert WebhookRequest(action="ANNOTATION_CREATED", project={"id": 3}).action == "ANNOTATION_CREATED"


@pytest.mark.parametrize("project", [2**63, -1, "1" * 30, 1e30, float("nan")])
def test_train_requests_need_a_64_bit_project(project):
    with pytest.raises(ValidationError):
        TrainRequest(project=project)


def test_train_requests_say_a_key_that_is_not_theirs():
    """`{"epochs": 30}` beside the project ran the default epochs without a word; Label Studio's legacy /train
    payload (tasks and config) still passes."""
    with pytest.raises(ValidationError, match=r'unknown field\(s\) epochs: training options go under params'):
        TrainRequest(project=1, epochs=30)
    assert TrainRequest(project=1, annotations=[], label_config="<View/>", params={"epochs": 3}).params == {"epochs": 3}


def test_setup_fields_are_bounded():
    for field in ({"schema": "x" * (MAX_LABEL_CONFIG_CHARS + 1)}, {"hostname": "h" * 5000},
                  {"access_token": "t" * 10_000}, {"project": "1" * 100}):
        with pytest.raises(ValidationError):
            SetupRequest(**field)


@pytest.mark.parametrize("project, expected", [
    ("12.1795428881", 12), ({"id": 4}, 4), (7, 7), (str(2**63), None), (2**64, None), ("-3", None),
    ({"id": {"id": 1}}, None), (True, None), ("1e5", None), ("9" * 10_000, None), (None, None), ([1], None)])
def test_project_ids_outside_64_bits_are_none(project, expected):
    assert project_id(project) == expected


def test_the_job_store_answers_ids_outside_64_bits(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    assert store.get(2**63) is None and store.get(-(2**70)) is None
    assert store.list(2**64) == [] and store.active(2**64) == []


def test_webhook_deliveries_have_a_key_for_deduplication():
    one = WebhookRequest(action="ANNOTATION_UPDATED", project=1, annotation={"id": 9, "updated_at": "t1"})
    same = WebhookRequest(action="ANNOTATION_UPDATED", project=1, annotation={"id": 9, "updated_at": "t1"})
    later = WebhookRequest(action="ANNOTATION_UPDATED", project=1, annotation={"id": 9, "updated_at": "t2"})
    assert one.event_key() == same.event_key() != later.event_key()
    deleted = WebhookRequest(action="ANNOTATIONS_DELETED", project=1, annotations=[{"id": 2}, {"id": 1}])
    assert deleted.event_key() == "ANNOTATIONS_DELETED:1@None,2@None"
    for odd in ({"annotation": "x"}, {"annotation": {"no": "id"}}, {"annotations": "x"}, {}):
        assert WebhookRequest(action="ANNOTATION_CREATED", **odd).event_key() is None
    huge = WebhookRequest(action="ANNOTATIONS_DELETED", annotations=[{"id": "x" * 10_000}] * 5000)
    assert len(huge.event_key()) <= 200
