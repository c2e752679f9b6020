"""docker-compose.yml and infra/Dockerfile checked statically (no Docker engine runs here): they must
agree with what the code reads and listens on."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _env_names_read_by_tandem() -> set[str]:
    source = (REPO / "backend" / "settings.py").read_text()
    return set(re.findall(r'"((?:TANDEM|LABEL_STUDIO|BASIC_AUTH|LOCAL_FILES)_[A-Z_]+)"', source))


def test_compose_services_ports_env_and_volumes_agree_with_the_code():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"label-studio", "tandem"}
    ls, tandem = services["label-studio"], services["tandem"]
    assert ls["image"].endswith(":1.23.2")
    assert ls["environment"]["ML_BLOCK_LOCAL_IP"] == "false" and ls["environment"]["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls["environment"]["LABEL_STUDIO_USER_TOKEN"] == tandem["environment"]["LABEL_STUDIO_API_KEY"]
    assert "8080:8080" in ls["ports"] and "9090:9090" in tandem["ports"]
    # Tandem reaches Label Studio by its service name, on the port Label Studio listens on
    assert tandem["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    unknown = {k for k in tandem["environment"] if k not in _env_names_read_by_tandem()}
    assert not unknown, f"compose sets variables Tandem never reads: {unknown}"
    # every named volume is declared, and TANDEM_HOME is on a volume
    declared = set(compose["volumes"])
    mounts = {v.split(":")[0]: v.split(":")[1] for s in services.values() for v in s.get("volumes", [])}
    assert set(mounts) <= declared
    assert mounts["tandem-home"] == tandem["environment"]["TANDEM_HOME"]
    assert mounts["label-studio-data"] == "/label-studio/data"
    assert (REPO / tandem["build"]["dockerfile"]).is_file()


def test_dockerfile_matches_compose_and_repo():
    text = (REPO / "infra" / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 9090$", text, re.M)
    assert '"--port", "9090"' in text and '"--host", "0.0.0.0"' in text
    assert "TANDEM_HOME=/data/tandem" in text and "uv sync --frozen" in text
    for src in re.findall(r"^COPY (.+) \./?\S*$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies {part}, which is not in the repository"
    assert re.search(r"curl -fsS http://127.0.0.1:9090/health", text)


def test_gpu_override_reserves_one_nvidia_gpu():
    gpu = _compose("docker-compose.gpu.yml")["services"]["tandem"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "TANDEM_DEVICE" in _env_names_read_by_tandem() and gpu["environment"]["TANDEM_DEVICE"] == "cuda:0"
