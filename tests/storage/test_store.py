"""The store's contract, run against SQLite and PostgreSQL alike (the ``store`` fixture)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest

from pluto_server._store import Store

pytestmark = pytest.mark.e2e  # a PostgreSQL server process (tests/conftest.py: pg_url is e2e)


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(f) for n, f in vars(cls).items()
            if callable(f) and not n.startswith("_")}


def test_both_stores_have_the_same_interface() -> None:
    from pluto_server._pgstore import PgStore

    sqlite, pg = _public(Store), _public(PgStore)
    assert sqlite.keys() <= pg.keys(), sorted(sqlite.keys() - pg.keys())
    for name, sig in sqlite.items():
        assert list(sig.parameters) == list(pg[name].parameters), name


def test_create_is_idempotent_and_merges_config(store: Any) -> None:
    run, resumed = store.create_run("p", "ext", "first", {"lr": 0.1}, ["a"])
    again, resumed2 = store.create_run("p", "ext", "ignored", {"bs": 8}, ["b"])
    other, _ = store.create_run("q", "ext", "other project", None, None)
    assert (resumed, resumed2, again) == (False, True, run)
    assert other != run
    got = store.get_run(run)
    assert (got["name"], got["config"], got["tags"]) == ("first", {"lr": 0.1, "bs": 8}, ["a"])
    assert store.find_run("p", "ext") == run and store.find_run("p", "nope") is None
    a, _ = store.create_run("p", None, "anon", None, None)
    b, _ = store.create_run("p", None, "anon", None, None)
    assert a != b  # no external id: always a new run


def test_status_config_tags_and_unknown_ids(store: Any) -> None:
    run, _ = store.create_run("p", "s", "n", None, None)
    assert store.set_status(run, "COMPLETED") and store.status(run) == "COMPLETED"
    assert store.merge_config(run, {"x": [1, 2]}) and store.get_run(run)["config"] == {"x": [1, 2]}
    assert store.set_tags(run, ["t1", "t2"]) and store.get_run(run)["tags"] == ["t1", "t2"]
    for missing in (run + 1000, 2**63, -(2**63) - 1):
        assert not store.run_exists(missing)
        assert store.get_run(missing) is None and store.status(missing) is None
        assert not store.set_status(missing, "FAILED") and not store.merge_config(missing, {})
        assert not store.upsert_members(missing, [{"member": "m"}])
        assert store.points(missing, "x") == [] and store.metric_names(missing) == []


def test_members_and_ledger_upsert_keep_what_is_not_given(store: Any) -> None:
    run, _ = store.create_run("p", "m", "n", None, None)
    assert store.upsert_members(run, [{"member": "h:2", "rank": 1, "host": "h", "pid": 2,
                                       "state": "running", "logged": 5,
                                       "drops": {"x": 1, "console": 4}},
                                      {"member": "h:1", "rank": 0, "state": "running"}])
    assert store.upsert_members(run, [{"member": "h:2", "state": "finished", "sent": 5}])
    assert store.upsert_ledger(run, [{"rank": 1, "stored": 4, "dead": 1, "last_step": 9},
                                     {"rank": None, "stored": 0, "dead": 2}])
    assert store.upsert_ledger(run, [{"rank": 1, "stored": 5, "dead": 1}])
    got = store.get_run(run)
    by = {m["member"]: m for m in got["members"]}
    assert [m["member"] for m in got["members"]] == ["h:1", "h:2"]  # by rank
    assert by["h:2"] | {} == {"member": "h:2", "rank": 1, "local_rank": None, "node": None,
                              "attempt": None, "host": "h",
                              "pid": 2, "state": "finished", "logged": 5, "sent": 5,
                              "dropped": None, "drops": {"x": 1, "console": 4}, "stored": 5,
                              "dead": 1}
    assert got["ranks"][0] == {"rank": 1, "stored": 5, "dead": 1, "last_step": 9,
                               "last_time": None}
    assert got["ledger"]["stored"] == 5 and got["ledger"]["dead"] == 3
    listed = next(r for r in store.list_runs("p") if r["id"] == run)
    assert listed["members"] == 2 and listed["lost"] == 3
    assert listed["console_dropped"] == got["ledger"]["console_dropped"] == 4  # lines, apart


def test_values_round_trip_exactly(store: Any) -> None:
    run, _ = store.create_run("p", "v", "n", None, None)
    data = {"f": 0.1 + 0.2, "i": -(2**63), "j": 2**63 - 1, "big": str(2**80), "nan": None,
            "inf": math.inf, "ninf": -math.inf, "tiny": 5e-324, "three": 3.0}
    assert store.write_points(run, [(1, 1000, None, None, data)]) == len(data)
    for name, value in data.items():
        [(step, got, t)] = store.points(run, name)
        assert (step, t) == (1, 1000)
        assert type(got) is type(value) and (got == value or value is None), name
    assert store.metric_names(run) == sorted(data)


def test_newest_seq_wins_across_and_within_batches(store: Any) -> None:
    run, _ = store.create_run("p", "seq", "n", None, None)
    store.write_points(run, [(1, 1, 10, 0, {"a": 1.0})])
    store.write_points(run, [(1, 2, 9, 5, {"a": 2.0})])  # older: ignored
    assert store.points(run, "a") == [(1, 1.0, 1)]
    store.write_points(run, [(1, 3, 10, 0, {"a": 3.0})])  # equal: replaces
    store.write_points(run, [(1, 4, 11, 0, {"a": 4.0}), (1, 5, 10, 7, {"a": 5.0}),
                             (2, 6, 3, 0, {"a": 6.0}), (2, 7, 3, 1, {"a": 7.0})])
    assert store.points(run, "a") == [(1, 4.0, 4), (2, 7.0, 7)]
    store.write_points(run, [(1, 8, None, None, {"a": 8.0})])  # no seq: the later write wins
    assert store.points(run, "a")[0] == (1, 8.0, 8)
    # the same through the columns path, with a key named twice in one batch
    n = store.write_columns(run, ["a", "b"], [0, 1, 0], [9.0, 1.5, 10.0], [2, 1], [3, 3],
                            [9, 10], [20, 19], [0, 0])
    assert n == 3
    assert store.points(run, "a")[-1] == (3, 9.0, 9)  # seq 20 beats the later seq 19
    assert store.points(run, "b") == [(3, 1.5, 9)]


def test_columns_refuse_ints_beyond_64_bits_whole(store: Any) -> None:
    run, _ = store.create_run("p", "big", "n", None, None)
    with pytest.raises(OverflowError):
        store.write_columns(run, ["x"], [0, 0], [1, 2**64], [2], [1], [1], [1], [0])
    assert store.points(run, "x") == []


def test_points_since_and_last_only(store: Any) -> None:
    run, _ = store.create_run("p", "since", "n", None, None)
    store.write_points(run, [(s, s, None, None, {"m": float(s)}) for s in range(1, 11)])
    assert [p[0] for p in store.points(run, "m", since_step=8)] == [8, 9, 10]
    assert store.points(run, "m", last_only=True) == [(10, 10.0, 10)]
    assert store.points(run, "m", since_step=2**70)  == []
    assert store.points(run, "unknown") == []


def test_reopening_keeps_everything(store_url: str, store: Any) -> None:
    from pluto_server._store import open_store

    run, _ = store.create_run("p", "re", "n", {"k": 1}, None)
    store.write_points(run, [(1, 1, 1, 0, {"m": 1.5})])
    again = open_store(store_url)  # a second process's store on the same database
    try:
        assert again.get_run(run)["config"] == {"k": 1}
        assert again.points(run, "m") == [(1, 1.5, 1)]
        assert again.create_run("p", "re", "x", None, None) == (run, True)
        again.write_points(run, [(2, 2, 2, 0, {"m": 2.5, "new": 1})])
        assert store.metric_names(run) == ["m", "new"]
    finally:
        again.close()
