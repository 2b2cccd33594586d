"""Each integration with its real framework: a tiny CPU model trained for a few steps in a real
process, then what the backend stored (metric names per rank, steps, config, status)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

from .launch import rank_env, reap, torchrun

pytestmark = pytest.mark.frameworks

LIGHTNING = """
import json, os, torch, lightning as L
from torch.utils.data import DataLoader, TensorDataset
from pluto.integrations.lightning import PlutoLogger

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"lr": 0.1, "hidden": 4})
        self.net = torch.nn.Linear(4, 1)
    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss
    def test_step(self, batch, i):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=2)
logger = PlutoLogger(project=os.environ["TEST_PROJECT"], name="lightning-tiny")
trainer = L.Trainer(max_steps=6, logger=logger, log_every_n_steps=1, accelerator="cpu",
                    devices=1, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=os.environ["TEST_DIR"])
model = Tiny()
trainer.fit(model, data)
trainer.test(model, data, verbose=False)   # after fit: the same run
run = logger.experiment
print("RESULT " + json.dumps({"id": run.id, "name": logger.name, "version": logger.version,
                              "closed": run.state.value}), flush=True)
"""

TRANSFORMERS = """
import json, os, torch
from transformers import Trainer, TrainingArguments
from pluto.integrations.transformers import PlutoCallback

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
    def forward(self, x, labels=None):
        out = self.lin(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

torch.manual_seed(0)
data = [{"x": torch.randn(4), "labels": torch.randn(1)} for _ in range(16)]
args = TrainingArguments(output_dir=os.environ["TEST_DIR"], max_steps=5, logging_steps=1,
                         per_device_train_batch_size=2, report_to="none", use_cpu=True,
                         save_strategy="no", disable_tqdm=True)
callback = PlutoCallback(project=os.environ["TEST_PROJECT"], name="hf-tiny")
Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[callback]).train()
print("RESULT " + json.dumps({"id": callback.run.id, "closed": callback.run.state.value}),
      flush=True)
"""

ACCELERATE = """
import json, os, sys, torch
from accelerate import Accelerator
from pluto.integrations.accelerate import PlutoTracker

tracker = PlutoTracker(project=os.environ["TEST_PROJECT"], name="accelerate-tiny")
accelerator = Accelerator(log_with=tracker, cpu=True)
accelerator.init_trackers("ignored", config={"lr": 0.05, "optimizer": torch.optim.SGD})
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
model, opt = accelerator.prepare(model, opt)
rank = accelerator.process_index
for step in range(1, 5):
    x, y = torch.randn(2, 4), torch.randn(2, 1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    opt.step(); opt.zero_grad()
    accelerator.log({"loss": loss.item()}, step=step)      # main process only
    tracker.log({"tokens": step * 8 + rank}, step=step)     # every rank
run = tracker.tracker
with open(os.path.join(os.environ["TEST_DIR"], f"result-{rank}.json"), "w") as f:
    json.dump({"rank": rank, "id": run.id}, f)  # a file per rank: their stdout lines interleave
accelerator.end_training()
run.finish()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown (torch 2.13 gloo exit abort under torchrun)
"""


def _run_script(stack: Stack, tmp_path: Path, code: str, project: str,
                **env: str) -> dict[str, Any]:
    script = write_script(tmp_path, code)
    proc = start_rank(script, stack.env(TEST_PROJECT=project, TEST_DIR=str(tmp_path),
                                        OMP_NUM_THREADS="1", **env))
    code_, out, err = finish_rank(proc, 170)
    results = json_lines(out)
    assert code_ == 0 and results, f"exit {code_}\n{out}\n{err[-4000:]}"
    return results[0]


def _completed(stack: Stack, run: int) -> dict[str, Any]:
    return wait_until(lambda: (x := stack.backend.run(run))["status"] == "COMPLETED" and x, 60,
                      f"run {run} COMPLETED")


def test_lightning_logger_logs_each_metric_per_rank(stack: Stack, tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    project = f"lit-{uuid.uuid4().hex[:8]}"
    out = _run_script(stack, tmp_path, LIGHTNING, project)
    assert out["name"] == "lightning-tiny" and out["version"]
    assert out["closed"] == "running"  # open for a later trainer.test(); finished at exit
    run = _completed(stack, out["id"])
    assert run["name"] == "lightning-tiny"
    assert run["config"]["lr"] == 0.1 and run["config"]["hidden"] == 4
    names = stack.backend.get(f"/api/runs/{out['id']}/metrics")["names"]
    assert "train_loss/rank0" in names and "test_loss/rank0" in names, names
    points = stack.backend.points(out["id"], "train_loss/rank0")
    assert [p[0] for p in points] == [0, 1, 2, 3, 4, 5]
    assert all(isinstance(p[1], float) and p[1] >= 0 for p in points)


def test_transformers_callback_logs_train_metrics_at_global_step(stack: Stack,
                                                                  tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    project = f"hf-{uuid.uuid4().hex[:8]}"
    out = _run_script(stack, tmp_path, TRANSFORMERS, project)
    assert out["closed"] == "running"  # evaluate() after train() still logs; finished at exit
    run = _completed(stack, out["id"])
    assert run["name"] == "hf-tiny"
    assert run["config"]["training_args"]["max_steps"] == 5
    points = stack.backend.points(out["id"], "train/loss/rank0")
    assert [p[0] for p in points] == [1, 2, 3, 4, 5]
    names = stack.backend.get(f"/api/runs/{out['id']}/metrics")["names"]
    assert "train/learning_rate/rank0" in names and "train/train_runtime/rank0" in names, names


def test_accelerate_tracker_main_process_and_every_rank(stack: Stack, tmp_path: Path) -> None:
    """Two ranks under torchrun: Accelerator.log lands from the main process only (rank 0's
    name), the tracker's own log from both ranks, all in one run."""
    pytest.importorskip("accelerate")
    project = f"acc-{uuid.uuid4().hex[:8]}"
    script = write_script(tmp_path, ACCELERATE)
    log = tmp_path / "agent.log"
    env = rank_env(stack, TEST_PROJECT=project, PLUTO_RUN_ID=f"acc-{uuid.uuid4().hex[:6]}",
                   TEST_DIR=str(tmp_path))
    reap([torchrun(script, env, nproc=2, extra=("--standalone",), log=log)])
    # judged by what was stored (a rank may abort at exit, see README); each result file that
    # was written names the one run
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    runs = stack.backend.runs(project)
    assert len(runs) == 1, (runs, log.read_text()[-3000:])
    run_id = runs[0]["id"]
    assert results and {r["id"] for r in results} == {run_id}, results
    run = _completed(stack, run_id)
    assert run["config"]["lr"] == 0.05 and "SGD" in run["config"]["optimizer"]
    names = set(stack.backend.get(f"/api/runs/{run_id}/metrics")["names"])
    assert {"loss/rank0", "tokens/rank0", "tokens/rank1"} <= names, names
    assert "loss/rank1" not in names
    assert [p[1] for p in stack.backend.points(run_id, "tokens/rank1")] == [9, 17, 25, 33]


def test_rank_zero_only_starts_no_run_on_other_ranks(stack: Stack,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared rank logic of all three (in-process, without a framework)."""
    from pluto.integrations._common import RankLogger

    for name, value in stack.env().items():
        if name.startswith("PLUTO_"):
            monkeypatch.setenv(name, value)
    project, run_id = f"zero-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    loggers = [RankLogger(project=project, name="z", run_id=run_id, tags=None,
                          config={"a": object}, run=None, rank_zero_only=True) for _ in range(2)]
    for rank, lg in enumerate(loggers):
        lg.rank = rank
        lg.log({"loss": 0.5, "note": "text"}, step=1)
    assert loggers[1].run() is None  # rank 1 never attached
    first = loggers[0].run()
    assert first is not None and first.rank == 0
    loggers[0].merge_config({"b": 2})
    for lg in loggers:
        lg.finish()
    run = _completed(stack, first.id)
    assert len(run["members"]) == 1
    assert stack.backend.get(f"/api/runs/{first.id}/metrics")["names"] == ["loss"]
    assert run["config"] == {"a": "object", "b": 2}
    assert loggers[0].skipped == {"note"}
    assert os.environ.get("PLUTO_SYSTEM_METRICS") == "0"
