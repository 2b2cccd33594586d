"""The deploy files parse and agree with the tree (no container engine or cluster here): the
Dockerfile's COPY sources exist and it runs as a non-root user, compose files use the image it
builds, the Kubernetes manifests have what the README promises, and the Konduktor task is the
documented one plus PLUTO_REDIS_URL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_dockerfile_copies_what_exists_and_drops_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.MULTILINE)
    assert copies
    for line in copies:
        for src in line.split():
            assert (ROOT / src).exists(), src
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert "pip install" in text and "[server,postgres]" in text  # installed at build time
    assert re.search(r'^ENTRYPOINT \["pluto"\]$', text, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "tests" in ignored


def test_compose_files_build_and_use_the_image() -> None:
    for name, backends in (("docker-compose.yml", 1), ("docker-compose.postgres.yml", 2)):
        compose = yaml.safe_load((ROOT / name).read_text())
        services = compose["services"]
        assert services["backend"]["build"] == "."
        image = services["backend"]["image"]
        assert services["worker"]["image"] == image
        assert services["backend"]["command"] == ["server"]
        assert services["worker"]["command"] == ["worker"]
        assert services["backend"].get("deploy", {}).get("replicas", 1) == backends
        assert all("pip install" not in str(s.get("command")) for s in services.values())
    plain = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert plain["services"]["prometheus"]["profiles"] == ["monitoring"]
    pg = yaml.safe_load((ROOT / "docker-compose.postgres.yml").read_text())["services"]
    assert pg["backend"]["environment"]["PLUTO_DB_URL"].startswith("postgresql://")
    assert pg["backend"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_kubernetes_manifests() -> None:
    k8s = ROOT / "deploy" / "k8s"
    kinds: dict[tuple[str, str], Any] = {}
    for path in sorted(k8s.glob("*.yaml")):
        for doc in _docs(path):
            if doc["kind"] == "Kustomization":
                continue
            kinds[(doc["kind"], doc["metadata"].get("name", ""))] = doc
    listed = yaml.safe_load((k8s / "kustomization.yaml").read_text())["resources"]
    assert all((k8s / f).exists() for f in listed)
    worker = kinds[("Deployment", "pluto-worker")]["spec"]
    assert worker["replicas"] >= 2
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    backend = kinds[("Deployment", "pluto-backend")]["spec"]
    service = kinds[("Service", "pluto-backend")]["spec"]
    assert service["selector"] == backend["selector"]["matchLabels"]
    secret = kinds[("Secret", "pluto")]["stringData"]
    refs = [e["valueFrom"]["secretKeyRef"] for d in (worker, backend)
            for c in d["template"]["spec"]["containers"] for e in c["env"] if "valueFrom" in e]
    assert refs and all(r["name"] == "pluto" and r["key"] in secret for r in refs)
    env = {e["name"]: e.get("value") for e in worker["template"]["spec"]["containers"][0]["env"]}
    assert env["PLUTO_API_URL"] == "http://pluto-backend:8080" and env["PLUTO_REDIS_URL"]
    note = (k8s / "README.md").read_text()
    assert "Redis" in note and "PostgreSQL" in note


def test_konduktor_task() -> None:
    task = yaml.safe_load((ROOT / "deploy" / "konduktor" / "task.yaml").read_text())
    assert task["num_nodes"] == 2
    assert task["resources"]["accelerators"] == "H100:8"
    assert re.search(r"torchrun\b.*train\.py", task["run"], re.DOTALL)
    assert task["envs"]["PLUTO_REDIS_URL"].startswith("redis://")
    assert task["envs"]["PLUTO_RUN_ID"]


def test_the_monitoring_profile_scrapes_both_and_alerts_on_real_metrics() -> None:
    """``docker compose --profile monitoring``: a Prometheus scraping the backend and every worker
    replica with deploy/alerts.yml; the default stays Redis, backend and workers. Every metric an
    alert uses is one the worker or backend defines, and README "Operating" explains each alert."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {n for n, s in services.items() if "profiles" not in s} == {"redis", "backend", "worker"}
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"])
    assert set(mounts) == {"./deploy/prometheus.yml", "./deploy/alerts.yml"}
    assert all((ROOT / src).is_file() for src in mounts)
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    assert config["rule_files"] == [mounts["./deploy/alerts.yml"]]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["pluto-backend"]["static_configs"] == [{"targets": ["backend:8080"]}]
    assert services["backend"]["environment"]["PLUTO_API_URL"].endswith(":8080")
    [sd] = jobs["pluto-worker"]["dns_sd_configs"]
    assert sd["names"] == ["worker"]
    assert sd["port"] == int(services["worker"]["environment"]["PLUTO_METRICS_PORT"])
    defined = set(re.findall(r'"(pluto_[a-z_]+)"', (ROOT / "worker/_metrics.py").read_text()
                             + (ROOT / "backend/_metrics.py").read_text()))
    rules = [rule for group in _docs(ROOT / "deploy/alerts.yml")[0]["groups"]
             for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"PlutoNoLiveWorker", "PlutoBacklogGrowing", "PlutoDeadLetters"} <= names
    operating = (ROOT / "README.md").read_text().split("## Operating", 1)[1].split("\n## ", 1)[0]
    assert {m for m in defined if f"`{m}" not in operating} == set()  # every metric documented
    for rule in rules:
        used = set(re.findall(r"\b(pluto_[a-z_]+)", rule["expr"]))
        assert used and used <= defined, (rule["alert"], used - defined)
        assert rule["annotations"]["summary"], rule
        assert rule["alert"] in operating, f"README Operating does not explain {rule['alert']}"
