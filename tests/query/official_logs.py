"""Logged by the official SDK (run by tests/query with pluto-ml's interpreter): metrics with a
spike, console lines, a histogram, a text file and an artifact, then finish."""

import json
import sys

import pluto

project, external_id = sys.argv[1], sys.argv[2]
settings = {"disable_system_metrics": True, "x_console_fd_capture": False,
            "sync_process_batch_size": 1000, "sync_process_flush_interval": 0.2}
run = pluto.init(project=project, name="official-run", config={"lr": 0.1, "layers": 4},
                 tags=["official", "compat"], run_id=external_id, settings=settings)
for i in range(1, 1001):
    run.log({"train/loss": 100.0 if i == 777 else 1.0 / i, "acc": i / 1000})
print("hello from the official sdk", flush=True)
print("an error line", file=sys.stderr, flush=True)
run.log({"weights": pluto.Histogram([1, 2, 2, 3, 3, 3], bins=3)}, step=5)
run.log({"notes": pluto.Text("some notes", caption="notes")}, step=6)
run.log({"blob": pluto.Artifact(b"\x00\x01binary", caption="blob")}, step=7)
run.finish()
print("RESULT " + json.dumps({"id": run.settings._op_id}), flush=True)
