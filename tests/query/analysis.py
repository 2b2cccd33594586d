"""An analysis script that runs unchanged under either SDK (``import pluto.query``): the
official ``pluto-ml`` 0.0.29 or ours. It prints one ``RESULT`` line of JSON with what each
call returned, reduced to what the test compares (run names rather than whole runs; no signed
URLs, which differ per call). Arguments: project, the official run's id, its display id, a
label for this SDK (the file it uploads is named after it), a scratch directory.
"""

import json
import sys
from pathlib import Path

import pluto
import pluto.query as pq

project, official_id, display_id, label, scratch = sys.argv[1:6]
official_id = int(official_id)
out = {"module": pluto.query is pq}


def names(runs):
    return [r["name"] for r in runs]


def frame_rows(frame):
    """A DataFrame (pandas installed) or list of dicts, as plain rows."""
    rows = frame.to_dict("records") if hasattr(frame, "to_dict") else frame
    return [{k: row[k] for k in ("metric", "step", "value")} for row in rows]


def error_of(call):
    try:
        call()
    except pq.QueryError as exc:
        return {"QueryError": exc.status_code}
    except ValueError:
        return {"ValueError": None}
    return None


out["projects"] = sorted(p["name"] for p in pq.list_projects() if p["name"] == project)
runs = pq.list_runs(project, limit=200)
out["all"] = names(runs)
out["run_keys"] = sorted(set(runs[0]) & {"id", "name", "displayId", "status", "tags", "config",
                                         "createdAt", "updatedAt", "url"})
out["search"] = names(pq.list_runs(project, search="OFFICIAL"))
out["tags"] = names(pq.list_runs(project, tags=["baseline", "big"]))
out["page"] = names(pq.list_runs(project, limit=2, offset=1))
out["sorts"] = {s: names(pq.list_runs(project, sort=s)) for s in (
    "name", "-name", "-config.lr.value", "config.lr.value", "summary_metrics.loss",
    "-summary_metrics.loss", "createdAt", "-createdAt", "+status")}
FILTERS = {
    "lr_lt": {"config.lr": {"$lt": 0.05}},
    "or": {"$or": [{"status": "FAILED"}, {"tags": "official"}]},
    "not_in": {"$not": {"tags": {"$in": ["baseline"]}}},
    "regex": {"name": {"$regex": "^[ab]$"}},
    "summary": {"summaryMetrics.loss": {"$lte": 0.3}},
    "nested": {"config.opt.name": "adam"},
    "state": {"state": "finished"},
    "created": {"created_at": {"$gte": "2000-01-01T00:00:00Z"}},
    "in": {"config.layers": {"$in": [2, 8]}},
    "nin": {"tags": {"$nin": ["big"]}},
    "stale": {"$and": [{"status": {"$ne": "COMPLETED"}}, {"heartbeat_at": {"$lt": "2100-01-01"}}]},
    "gt_eq": {"config.layers": {"$gt": 2, "$lte": 8}},
    "eq_string": {"config.lr": "auto"},
    "ne": {"name": {"$ne": "a"}},
}
out["filters"] = {k: sorted(names(pq.list_runs(project, filters=f))) for k, f in FILTERS.items()}
out["filter_and_search"] = names(pq.list_runs(project, search="a", filters={"tags": "baseline"}))

run = pq.get_run(project, official_id)
by_display = pq.get_run(project, display_id)
out["run"] = {k: run[k] for k in ("id", "name", "displayId", "status", "tags", "config")}
out["same_by_display"] = by_display["id"] == run["id"]
out["log_names"] = sorted(n["logName"] if isinstance(n, dict) else n for n in run["logNames"])

out["metric_names"] = pq.get_metric_names(project)
out["metric_names_run"] = pq.get_metric_names(project, run_ids=[official_id])
out["metric_names_search"] = pq.get_metric_names(project, search="LOSS")

sampled = frame_rows(pq.get_metrics(project, official_id, ["train/loss"], limit=100))
out["sampled_count_ok"] = 0 < len(sampled) <= 100
out["spike_kept"] = [r for r in sampled if r["value"] == 100.0]
out["sampled_ends"] = [sampled[0]["step"], sampled[-1]["step"]]
window = frame_rows(pq.get_metrics(project, official_id, ["train/loss"], step_min=770,
                                   step_max=780))
out["window_steps"] = [r["step"] for r in window]
both = frame_rows(pq.get_metrics(project, display_id, ["train/loss", "acc"], limit=10000))
out["both_counts"] = {m: sum(1 for r in both if r["metric"] == m) for m in ("train/loss", "acc")}
out["all_metrics_count"] = len(frame_rows(pq.get_metrics(project, official_id)))

stats = pq.get_statistics(project, official_id, metric_names=["train/loss"])
[loss] = stats["statistics"]
out["stats"] = {k: loss[k] for k in ("logName", "count", "min", "max", "lastStep")}
out["stats_anomaly_steps"] = [a["step"] for a in loss["anomalies"]]
runs_by_name = {r["name"]: r["id"] for r in runs}
cmp = pq.compare_runs(project, [runs_by_name["a"], runs_by_name["b"], runs_by_name["c"]], "loss")
out["compare"] = {"best": cmp["bestRun"]["name"], "runs": [(r["name"], r["count"], r["last"])
                                                          for r in cmp["runs"]]}
out["leaderboard"] = {agg: [(e["name"], e["value"]) for e in pq.leaderboard(
    project, "loss", aggregation=agg, direction="ASC")] for agg in ("MIN", "MAX", "LAST")}
out["leaderboard_desc"] = [e["name"] for e in pq.leaderboard(project, "loss", "AVG", "DESC")]

files = pq.get_files(project, official_id)
out["files"] = sorted((f["logName"], f["fileType"], f["fileSize"], f["step"]) for f in files)
got = pq.download_file(project, official_id, "notes", Path(scratch))
out["downloaded"] = Path(got).read_text()
source = Path(scratch) / f"{label}.txt"
source.write_text(f"uploaded by {label}")
pq.upload_file(project, runs_by_name["a"], f"upload-{label}", source, step=3, caption="hi")
mine = pq.get_files(project, runs_by_name["a"], file_name=f"upload-{label}")
out["uploaded"] = [(f["fileName"], f["fileSize"], f["step"]) for f in mine]
back = pq.download_file(project, runs_by_name["a"], f"upload-{label}",
                        Path(scratch) / "back.txt")
out["uploaded_back"] = Path(back).read_text() == f"uploaded by {label}"

logs = pq.get_logs(project, official_id)
out["logs"] = sorted((line["message"], line["logType"]) for line in logs)
out["error_logs"] = [line["message"] for line in pq.get_logs(project, official_id,
                                                             log_type="error")]
out["logs_page"] = len(pq.get_logs(project, official_id, limit=1, offset=1))

out["errors"] = {
    "missing_run": error_of(lambda: pq.get_run(project, 10**12)),
    "missing_display": error_of(lambda: pq.get_run(project, "ZZZZ-999")),
    "bad_operator": error_of(lambda: pq.list_runs(project, filters={"$nor": []})),
    "bad_field": error_of(lambda: pq.list_runs(project, filters={"colour": 1})),
    "bad_sort": error_of(lambda: pq.list_runs(project, sort="colour")),
    "bad_range": error_of(lambda: pq.get_metrics(project, official_id, step_min=5, step_max=1)),
    "bad_aggregation": error_of(lambda: pq.leaderboard(project, "loss", aggregation="MEDIAN")),
    "bad_regex": error_of(lambda: pq.list_runs(project, filters={"name": {"$regex": "("}})),
}
print("RESULT " + json.dumps(out), flush=True)
