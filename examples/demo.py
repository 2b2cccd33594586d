"""`make demo`: `pluto up`, a 4-process job sharing one run id, then what the backend stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pluto.protocol import Keys

ROOT = Path(__file__).resolve().parent.parent
RANKS = 4


def main() -> int:
    env = dict(os.environ)
    home = Path(env.setdefault("PLUTO_HOME", str(ROOT / ".pluto")))
    api_url = env.setdefault("PLUTO_API_URL", "http://127.0.0.1:8080")
    up = subprocess.Popen([sys.executable, "-m", "pluto._cli", "up"], env=env,
                          stdout=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            print(line, end="", flush=True)
            if "ready" in line:
                break
        else:
            print("demo: `pluto up` did not start; see the lines above", file=sys.stderr)
            return 1
        key = env.get("PLUTO_API_KEY") or (home / "api_key").read_text().strip()
        run_id = f"demo-{int(time.time())}"
        print(f"demo: {RANKS} ranks log into PLUTO_RUN_ID={run_id} ...", flush=True)
        ranks = [subprocess.Popen([sys.executable, str(ROOT / "examples" / "train.py")],
                                  env={**env, "PLUTO_RUN_ID": run_id, "PLUTO_PROJECT": "demo",
                                       "RANK": str(r), "LOCAL_RANK": str(r),
                                       "WORLD_SIZE": str(RANKS)},
                                  stdout=subprocess.PIPE, text=True) for r in range(RANKS)]
        results = []
        for proc in ranks:
            out, _ = proc.communicate(timeout=120)
            results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        ids = {r["id"] for r in results}
        creators = [r["rank"] for r in results if not r["resumed"]]
        print(f"demo: {len(results)} ranks attached to run id(s) {sorted(ids)}; creator rank(s) "
              f"{creators}", flush=True)
        if len(results) != RANKS or len(ids) != 1:
            return 1
        run_pk = ids.pop()
        with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"},
                          timeout=10) as client:
            deadline = time.monotonic() + 60
            run = client.get(f"/api/runs/{run_pk}").json()
            while run["status"] == "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.2)
                run = client.get(f"/api/runs/{run_pk}").json()
            names = client.get(f"/api/runs/{run_pk}/metrics").json()["names"]
            print(f"\nrun {run_pk} ({run['project']}/{run['externalId']}, name {run['name']!r}): "
                  f"status {run['status']}, config {json.dumps(run['config'])}")
            for name in names:
                points = client.get(f"/api/runs/{run_pk}/metrics/{name}").json()["points"]
                print(f"  {name:<22} {len(points):>5} points  last {points[-1] if points else None}")
        stream = Keys(env.get("PLUTO_PREFIX") or "pluto").metrics(run_pk)
        print(f"\ntail it live: redis-cli XREAD BLOCK 0 STREAMS '{stream}' '$'")
        return 0 if run["status"] == "COMPLETED" else 1
    finally:
        up.send_signal(signal.SIGINT)
        try:
            rest, _ = up.communicate(timeout=30)
            print(rest, end="")
        except subprocess.TimeoutExpired:
            up.kill()


if __name__ == "__main__":
    sys.exit(main())
