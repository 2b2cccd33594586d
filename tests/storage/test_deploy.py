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
