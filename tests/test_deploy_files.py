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
    assert set(services) == {"label-studio", "tandem", "postgres", "tandem-2", "lb"}
    assert all("profiles" in services[name] for name in ("postgres", "tandem-2", "lb"))  # optional: off by default
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


def _expand(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} substitution, with the defaults (or `env`)."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: (env or {}).get(m[1], m[2]), value)


def test_compose_postgres_and_two_replicas_behind_one_port(monkeypatch):
    from backend.settings import Settings
    from backend.storage.db import normalise_url

    compose = _compose()
    services = compose["services"]
    pg, one, two, lb = services["postgres"], services["tandem"], services["tandem-2"], services["lb"]
    assert pg["image"] == "postgres:16" and set(pg["profiles"]) == {"postgres", "replicas"}
    assert two["profiles"] == ["replicas"] and lb["profiles"] == ["replicas"]
    assert "postgres-data:/var/lib/postgresql/data" in pg["volumes"] and "pg_isready" in " ".join(pg["healthcheck"]["test"])
    # the replicas' URL names the postgres service, its user, database and password
    url = _expand(two["environment"]["TANDEM_DATABASE_URL"])
    env = {k: _expand(str(v)) for k, v in pg["environment"].items()}
    assert url == f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    assert normalise_url(url).startswith("postgresql+psycopg://")
    assert url in compose_text() and two["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert one["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}
    # the first replica: SQLite unless TANDEM_DATABASE_URL is given (empty reads as unset)
    assert one["environment"]["TANDEM_DATABASE_URL"] == "${TANDEM_DATABASE_URL:-}"
    monkeypatch.setenv("TANDEM_DATABASE_URL", _expand(one["environment"]["TANDEM_DATABASE_URL"]))
    assert Settings.from_env().database_url.startswith("sqlite:///")
    # same settings, the database aside; each its own home; one artifact store on a shared volume
    same = {k: v for k, v in one["environment"].items() if k != "TANDEM_DATABASE_URL"}
    assert same == {k: v for k, v in two["environment"].items() if k != "TANDEM_DATABASE_URL"}
    mounts = [dict(v.split(":") for v in s["volumes"]) for s in (one, two)]
    homes = [next(k for k, v in m.items() if v == "/data/tandem") for m in mounts]
    assert homes[0] != homes[1] and same["TANDEM_HOME"] == "/data/tandem"
    assert all(m["tandem-artifacts"] == same["TANDEM_ARTIFACTS"] for m in mounts)
    assert float(same["TANDEM_LEASE_SECONDS"]) > 0 and two["build"] == one["build"]
    # nginx on one port, balancing over both replicas' port
    conf = compose["configs"][lb["configs"][0]["source"]]["content"]
    assert lb["configs"][0]["target"] == "/etc/nginx/conf.d/default.conf"
    assert re.findall(r"server (\S+):9090", conf) == ["tandem", "tandem-2"] and "listen 9090;" in conf
    assert lb["ports"] == ["9091:9090"] and set(lb["depends_on"]) == {"tandem", "tandem-2"}
    assert "http://lb:9090" in compose_text()


def compose_text() -> str:
    return (REPO / "docker-compose.yml").read_text()


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
