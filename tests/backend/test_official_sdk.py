"""The official Pluto SDK (pluto-ml 0.0.29) logs to our backend, and every point is readable.

It runs in its own virtualenv (``make test`` creates ``.venv-pluto-ml``; ``PLUTO_ML_PYTHON``
overrides the interpreter), as a real process with a clean environment: its URLs, key and HOME
are all it gets, so its keyring and staging files land in a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, Backend

STEPS = 2000

SCRIPT = """
    import json, sys
    import pluto

    settings = {
        "disable_console": True, "disable_system_metrics": True, "x_console_fd_capture": False,
        "sync_process_batch_size": 1000, "sync_process_flush_interval": 0.2,
    }
    run = pluto.init(project=sys.argv[1], name="official", config={"lr": 0.1, "depth": 3},
                     tags=["compat"], run_id=sys.argv[2], settings=settings)
    for i in range(1, %(steps)d + 1):
        run.log({"train/loss": 1.0 / i, "acc": i * 0.1 + 1e-9})
    run.finish()
    print("RESULT " + json.dumps({"id": run.settings._op_id}), flush=True)
"""


def official_python() -> Path:
    path = Path(os.environ.get("PLUTO_ML_PYTHON") or ROOT / ".venv-pluto-ml" / "bin" / "python")
    if not path.exists():
        pytest.fail(f"no interpreter with the official SDK at {path}: run `make test` (it creates "
                    ".venv-pluto-ml with `pip install pluto-ml==0.0.29`) or set PLUTO_ML_PYTHON")
    return path


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_official_sdk_logs_every_point(backend: Backend, tmp_path: Path) -> None:
    python = official_python()
    script = tmp_path / "official.py"
    script.write_text(textwrap.dedent(SCRIPT % {"steps": STEPS}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PLUTO_", "MLOP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(tmp_path), PLUTO_API_KEY=backend.key, PLUTO_DISABLE_TELEMETRY="1",
               PLUTO_URL_APP=backend.url, PLUTO_URL_API=backend.url,
               PLUTO_URL_INGEST=backend.url, PLUTO_URL_PY=backend.url)
    proc = subprocess.run([str(python), str(script), "official-sdk", "ext-official"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=100,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = [json.loads(line[7:]) for line in proc.stdout.splitlines()
              if line.startswith("RESULT ")]
    assert result, proc.stdout + proc.stderr
    run_id = result[0]["id"]

    run = backend.run(run_id)
    assert (run["project"], run["name"], run["externalId"]) == ("official-sdk", "official",
                                                                "ext-official")
    assert run["status"] == "COMPLETED"
    assert run["config"] == {"lr": 0.1, "depth": 3} and run["tags"] == ["compat"]
    assert backend.get(f"/api/runs/{run_id}/metrics")["names"] == ["acc", "train/loss"]
    loss, acc = backend.points(run_id, "train/loss"), backend.points(run_id, "acc")
    assert [p[0] for p in loss] == list(range(1, STEPS + 1))
    assert [p[1] for p in loss] == [1.0 / i for i in range(1, STEPS + 1)]
    assert [p[:2] for p in acc] == [[i, i * 0.1 + 1e-9] for i in range(1, STEPS + 1)]
    assert all(isinstance(p[2], int) and p[2] > 0 for p in loss)


CONTRACT = """
    import json, os, httpx
    from pluto import query as q

    spec = httpx.get(os.environ["PLUTO_URL_API"] + "/api/openapi.json", timeout=30,
                     headers={"Authorization": "Bearer " + os.environ["PLUTO_API_KEY"]}).json()
    grammar = spec["components"]["schemas"]["RunFilterGrammar"]["properties"]
    listed = {p["name"] for p in spec["paths"]["/api/runs/list"]["get"]["parameters"]}
    client = {"booleanOperators": q._FILTER_BOOL_OPS, "leafOperators": q._FILTER_LEAF_OPS,
              "fields": q._FILTER_FIELDS, "fieldPrefixes": set(q._FILTER_FIELD_PREFIXES)}
    print("RESULT " + json.dumps({
        "drift": {k: sorted(set(grammar[k]["items"]["enum"]) ^ v) for k, v in client.items()},
        "list_params": sorted(listed)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_published_filter_grammar_is_the_official_clients(backend: Backend,
                                                           tmp_path: Path) -> None:
    """What the official SDK's tests/test_contract.py checks: /api/openapi.json documents
    /api/runs/list's parameters and a RunFilterGrammar equal to the client's vocabulary."""
    script = tmp_path / "contract.py"
    script.write_text(textwrap.dedent(CONTRACT))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PLUTO_", "MLOP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(tmp_path), PLUTO_API_KEY=backend.key, PLUTO_URL_API=backend.url)
    proc = subprocess.run([str(official_python()), str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=100,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [result] = [json.loads(line[7:]) for line in proc.stdout.splitlines()
                if line.startswith("RESULT ")]
    assert result["drift"] == {"booleanOperators": [], "leafOperators": [], "fields": [],
                               "fieldPrefixes": []}
    assert {"filter", "projectName", "limit", "sort", "offset"} <= set(result["list_params"])
