"""Rule: what a project's model settings may ask of the host. A caller over HTTP (Label Studio's "Extra params",
`POST /predict-jobs`) names models only inside TANDEM_HOME, the server's working folder or TANDEM_MODEL_ROOTS:
loading a checkpoint unpickles it, and whether a path loads says what is on the host. A /setup that is refused
changes nothing stored, and malformed settings are a 422 that says what is wrong, never silently ignored."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.projects import ProjectRepo
from tests.harness import ServerThread
from tests.test_server import RECT, samples, task  # noqa: F401 - the module fixture


def test_model_paths_outside_the_allowed_folders_are_refused(tmp_path, monkeypatch):
    home, extra_root, outside = tmp_path / "home", tmp_path / "models", tmp_path / "elsewhere"
    for folder in (home, extra_root, outside):
        folder.mkdir()
    (outside / "x.pt").write_bytes(b"x")
    os.symlink(outside / "x.pt", home / "link.pt")  # a link inside home to a file outside it
    monkeypatch.chdir(tmp_path / "home")
    settings = Settings(home=home, model_roots=[extra_root])
    for spec in ("/etc/hostname", "../elsewhere/x.pt", str(outside / "x.pt"), "link.pt", "../../../../etc/passwd"):
        why = settings.model_spec_refusal(spec)
        assert why and repr(spec) in why and "TANDEM_MODEL_ROOTS" in why, spec
    for spec in (str(home / "weights.pt"), "weights.pt", "google/owlv2-base-patch16", "p3-job4-1a2b3c4d",
                 str(extra_root / "sub" / "best.pt"), "~" if Path.home() == home else str(home)):
        assert settings.model_spec_refusal(spec) is None, spec
    # a local artifact store (retrains' weights) is allowed as well; an fsspec URL store adds no folder
    store = tmp_path / "artifacts"
    assert settings.model_spec_refusal(str(store / "p1" / "best.pt"))
    assert Settings(home=home, artifacts=str(store)).model_spec_refusal(str(store / "p1" / "best.pt")) is None
    assert Settings(home=home, artifacts="s3://bucket/x").model_spec_refusal(str(outside / "x.pt"))


def test_setup_refuses_a_model_outside_the_folders_and_records_nothing(tmp_path, samples,  # noqa: F811
                                                                     detect_adapter):
    root, _, _ = samples
    settings = Settings(home=tmp_path / "home", local_files_root=root)
    with ServerThread(create_app(settings, ModelHolder(detect_adapter), training=False)) as srv:
        for spec in ("/etc/hostname", "../../../../etc/passwd"):
            r = httpx.post(f"{srv.url}/setup", json={"project": "95.1", "schema": RECT,
                                                     "extra_params": {"model": spec}})
            assert r.status_code == 422 and "outside the folders a project may name" in r.text, r.text
            health = httpx.get(f"{srv.url}/health", params={"project": 95}).json()
            assert health["loading"] == [] and health["error"] is None  # nothing was even tried
        assert ProjectRepo(settings.database_url).get(95) is None
        r = httpx.post(f"{srv.url}/predict-jobs", json={"project": 95, "model": "/etc/hostname"})
        assert r.status_code == 422 and "outside the folders" in r.text, r.text


def test_a_binding_stored_before_the_folder_rule_keeps_connecting(tmp_path, samples, detect_adapter,  # noqa: F811
                                                                  detect_weights, caplog):
    """A release before the rule accepted extra params naming a file anywhere, and the project is bound to it:
    refusing the same extra params after the upgrade only broke Label Studio's connection (the stored binding
    served on). The same file is kept, and said once; any other outside file is still refused."""
    import shutil

    root, _, _ = samples
    outside = tmp_path / "elsewhere" / "custom.pt"
    outside.parent.mkdir()
    shutil.copyfile(detect_weights, outside)
    settings = Settings(home=tmp_path / "home", local_files_root=root)
    ProjectRepo(settings.database_url).update(12, model=str(outside), label_config=RECT)  # as the old release left it
    other = tmp_path / "elsewhere" / "other.pt"
    shutil.copyfile(detect_weights, other)
    with ServerThread(create_app(settings, ModelHolder(detect_adapter), training=False)) as srv, \
            caplog.at_level("WARNING", logger="tandem.server"):
        for _ in range(3):
            r = httpx.post(f"{srv.url}/setup", json={"project": "12.1", "schema": RECT,
                                                     "extra_params": {"model": str(outside)}})
            assert r.status_code == 200, r.text
        r = httpx.post(f"{srv.url}/setup", json={"project": "12.1", "schema": RECT, "extra_params": {"model": str(other)}})
        assert r.status_code == 422 and "outside the folders a project may name" in r.text, r.text
    kept = [m.getMessage() for m in caplog.records if "kept, because the project was bound to it" in m.getMessage()]
    assert len(kept) == 1 and str(outside) in kept[0] and "TANDEM_MODEL_ROOTS" in kept[0], kept
    assert ProjectRepo(settings.database_url).get(12).model == str(outside)


@pytest.mark.parametrize("project", ["-3.1", "99999999999999999999999.1", "../../etc", "abc"])
def test_setup_refuses_what_is_not_a_project_id(tmp_path, detect_adapter, project):
    settings = Settings(home=tmp_path / "home")
    with ServerThread(create_app(settings, ModelHolder(detect_adapter), training=False)) as srv:
        r = httpx.post(f"{srv.url}/setup", json={"project": project, "schema": RECT})
        assert r.status_code == 422 and "is not a Label Studio project id" in r.text
    assert ProjectRepo(settings.database_url).count() == 0


def test_malformed_extra_params_are_said_and_a_refused_setup_keeps_the_last_settings(tmp_path, samples,  # noqa: F811
                                                                                      detect_adapter, caplog):
    root, truth, _ = samples
    sample = next(t for t in truth if {o.label for o in t.objects} & {"circle", "triangle"})
    renamed = RECT.replace("Square", "Box")
    settings = Settings(home=tmp_path / "home", local_files_root=root)
    repo = ProjectRepo(settings.database_url)
    with ServerThread(create_app(settings, ModelHolder(detect_adapter), training=False)) as srv:
        def setup(extra, schema=renamed):
            return httpx.post(f"{srv.url}/setup", json={"project": "7.1", "schema": schema, "extra_params": extra})

        assert setup({"label_map": {"square": "Box"}}).status_code == 200
        for bad, said in (('{"label_map": {"square": "Box",}}', "not valid JSON"), ("{not json", "not valid JSON"),
                          ({"label_map": ["square", "Box"]}, "label_map must be an object")):
            with caplog.at_level("WARNING", logger="tandem.server"):
                r = setup(bad)
            assert r.status_code == 422 and said in r.text, r.text
            # Label Studio shows only "check the ML backend server console logs": the reason is there
            assert any(m.getMessage().startswith("POST /setup refused (422): ") and said in m.getMessage()
                       for m in caplog.records), [m.getMessage() for m in caplog.records]
        assert repo.get(7).label_map == {"square": "Box"}
        # a config nothing maps onto is refused, and the project keeps what it had (Label Studio keeps it too)
        nothing = RECT.replace("Square", "A").replace("Circle", "B").replace("Triangle", "C")
        r = setup({}, schema=nothing)
        assert r.status_code == 422 and "none of the model's classes" in r.text
        assert repo.get(7).label_map == {"square": "Box"} and repo.get(7).label_config == renamed
        # a stale entry (its label renamed again) is left out and said once; the other classes still map
        again = renamed.replace('"Box"', '"Cube"')
        with caplog.at_level("WARNING", logger="tandem.server"):
            for _ in range(2):
                assert setup({"label_map": {"square": "Box"}}, schema=again).status_code == 200
        said = [r.getMessage() for r in caplog.records if "left out, the other classes still map" in r.getMessage()]
        assert len(said) == 1 and "label mapping 'square' -> 'Box'" in said[0], said
        out = httpx.post(f"{srv.url}/predict", json={"tasks": [task(1, f"{sample.name}.png")], "label_config": again,
                                                      "project": "7.1"}, timeout=120).json()
        labels = {r["value"]["rectanglelabels"][0] for r in out["results"][0]["result"]}
        assert labels and labels <= {"Circle", "Triangle"}, labels  # served, without the stale mapping


def test_the_embedded_database_that_keeps_label_studio_tokens_is_the_owners_alone(tmp_path):
    settings = Settings(home=tmp_path / "home")
    ProjectRepo(settings.database_url).update(3, access_token="secret-token")
    for name in ("tandem.sqlite3", "tandem.sqlite3-wal", "tandem.sqlite3-shm"):  # with its WAL, shared memory
        path = settings.home / name
        assert not path.exists() or path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    assert settings.db_path.exists()


def test_a_422_does_not_echo_a_huge_input_back(tmp_path, detect_adapter):
    from backend.server.protocol import MAX_LABEL_CONFIG_CHARS

    settings = Settings(home=tmp_path / "home")
    with ServerThread(create_app(settings, ModelHolder(detect_adapter), training=False)) as srv:
        r = httpx.post(f"{srv.url}/setup", json={"project": "1.1", "schema": "<View>" + "x" * MAX_LABEL_CONFIG_CHARS})
        assert r.status_code == 422 and len(r.content) < 2000, len(r.content)
        (error,) = r.json()["detail"]
        assert error["loc"] == ["body", "schema"] and "at most" in error["msg"] and "characters)" in error["input"]
