"""Columns: the same values as ``decode_entry``, sent only to a backend that offered them."""

from __future__ import annotations

import httpx
import msgpack
import pytest

from pluto.protocol import decode_entry
from pluto_worker._backend import COLUMNS, MSGPACK, Backend
from pluto_worker._entries import Columns, flatten
from pluto_worker._settings import WorkerSettings

HEAD = {b"_rank": b"0", b"_step": b"3", b"_time": b"9"}


@pytest.mark.parametrize("fields", [
    {**HEAD, b"a": b"1.5", b"b": b"-7", b"c": b"nan", b"d": b"-0.0", b"e": b"5e-324"},
    {**HEAD, b"_extra": b"x", b"a": b"1e300"},
    {b"_time": b"9", b"a": b"2", b"_rank": b"0", b"_step": b"3"},  # another field order
    {**HEAD, b"big": b"18446744073709551615"},
    HEAD,
])
def test_columns_hold_what_decode_entry_decodes(fields: dict[bytes, bytes]) -> None:
    cols = Columns()
    for _ in range(2):  # the second time through, names come from the cache
        cols.add(b"5-1", flatten(fields))
    _, step, time_ms, data = decode_entry(fields)
    assert (step, time_ms) == (3, 9)
    assert cols.names == list(data)
    assert [repr(v) for v in cols.value] == [repr(v) for v in data.values()] * 2
    assert [type(v) for v in cols.value] == [type(v) for v in data.values()] * 2
    assert cols.name == list(range(len(data))) * 2 and cols.count == [len(data)] * 2
    assert (cols.step, cols.time, cols.seq_ms, cols.seq_n) == ([3] * 2, [9] * 2, [5] * 2, [1] * 2)
    assert cols.big == (b"big" in fields)


def test_a_malformed_entry_adds_nothing() -> None:
    cols = Columns()
    cols.add(b"1-0", flatten({**HEAD, b"a": b"2"}))
    for bad in ({**HEAD, b"a": b"abc"}, {b"_rank": b"0", b"_time": b"9", b"a": b"1"},
                {**HEAD, b"bad\x01name": b"1"}):
        with pytest.raises(ValueError):
            cols.add(b"1-1", flatten(bad))
    assert (cols.value, cols.count) == ([2], [1])


OUTSIDE_THE_GRAMMAR = [b"1_000", b" 7 ", b"+5", b"0x10", b"Infinity", b"NaN", b"1e5 ", b"1.",
                      b".5", b"1E5", b"-nan", b"", b"\xd9\xa3", b"inf ", b"1e", b"--1"]
REPR_WRITES = [b"0.1", b"-0.0", b"1e-05", b"5e-324", b"1.7976931348623157e+308", b"inf", b"-inf",
               b"nan", b"123", b"-7", b"1e+16"]


@pytest.mark.parametrize("text", OUTSIDE_THE_GRAMMAR)
@pytest.mark.parametrize("where", ["value", "_step", "_time", "_rank"])
def test_every_path_refuses_what_the_grammar_refuses(text: bytes, where: str) -> None:
    """DESIGN §4's grammar, not float()'s: decode_entry, record, Columns.add and add_many
    agree, with decode_entry's message."""
    good = {**HEAD, b"a": b"2"}
    bad = {**good, (b"a" if where == "value" else where.encode()): text}
    from pluto_worker._entries import record

    record(b"1-0", flatten(good))  # the name is known: the fast paths are taken
    with pytest.raises(ValueError) as slow:
        decode_entry(bad)
    with pytest.raises(ValueError) as fast:
        record(b"1-1", flatten(bad))
    cols = Columns()
    with pytest.raises(ValueError) as col:
        cols.add(b"1-1", flatten(bad))
    assert str(fast.value) == str(col.value) == str(slow.value)
    batch = [(b"%d-0" % i, flatten(good)) for i in range(1, 40)] + [(b"40-0", flatten(bad))]
    many = Columns()
    taken, left = many.add_many(batch)  # type: ignore[arg-type]
    assert (b"40-0", flatten(bad)) not in taken and many.points() == len(taken)


@pytest.mark.parametrize("text", REPR_WRITES)
def test_every_path_takes_what_repr_writes(text: bytes) -> None:
    fields = {**HEAD, b"a": text}
    _, _, _, data = decode_entry(fields)
    cols = Columns()
    cols.add(b"1-0", flatten(fields))
    assert repr(cols.value[0]) == repr(data["a"]) == repr(
        float(text) if not text.lstrip(b"-").isdigit() else int(text))
    batch = [(b"%d-0" % i, flatten(fields)) for i in range(1, 40)]
    many = Columns()
    assert len(many.add_many(batch)[0]) == 39  # type: ignore[arg-type]
    assert {repr(v) for v in many.value} == {repr(data["a"])}


def test_columns_only_after_the_offer_and_records_for_huge_ints() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["content-type"])
        if request.headers["content-type"] == COLUMNS:
            body = msgpack.unpackb(request.content)
            assert (body["names"], body["value"], body["step"]) == (["a"], [1.5], [3])
        return httpx.Response(200, json={"stored": 1}, headers={"X-Pluto-Ingest": COLUMNS})

    settings = WorkerSettings.from_env({}, api_url="http://backend", api_key="k")
    b = Backend(settings, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    assert not b.takes_columns
    b.ingest(1, "p", [{"time": 9, "step": 3, "data": {"a": 1.5}, "seq": "5-0"}])
    assert b.takes_columns
    for step, value in ((b"3", b"1.5"), (b"3", b"18446744073709551615"), (b"%d" % 2**70, b"1")):
        entry = (b"5-0", flatten({**HEAD, b"_step": step, b"a": value}))
        cols = Columns()
        cols.add(*entry)
        assert b.ingest_columns(1, "p", cols, [entry]).stored == 1
    # msgpack carries a uint64 (the backend keeps it as text); a 70-bit step needs JSON
    assert seen == [MSGPACK, COLUMNS, MSGPACK, "application/x-ndjson"]


def _batch(seed: int) -> list[tuple[bytes, list[bytes] | None]]:
    """A batch as XREADGROUP returns it: mostly uniform, sometimes with one odd entry."""
    import random

    rng = random.Random(seed)
    names = rng.choice([[b"loss"], [b"loss", b"acc", b"lr"], [b"w\xc3\xa9ird/x y", b"n"]])
    kinds = [rng.choice(["float", "int", "neg", "big", "special", "mixed"]) for _ in names]

    def value(kind: str, i: int) -> bytes:
        return {"float": repr(rng.random() * 10 ** rng.randint(-300, 300)),
                "int": str(rng.getrandbits(40)), "neg": str(-rng.getrandbits(63)),
                "big": str(2**64 + i), "special": rng.choice(["nan", "inf", "-inf", "-0.0"]),
                "mixed": rng.choice(["1", "-2", "0.5"])}[kind].encode()

    batch: list[tuple[bytes, list[bytes] | None]] = []
    for i in range(rng.randint(1, 60)):
        flat = [b"_rank", b"2", b"_step", str(i).encode(), b"_time", str(1764 + i).encode()]
        for name, kind in zip(names, kinds):
            flat += [name, value(kind, i)]
        batch.append((f"{1764000 + i}-{i % 3}".encode(), flat))
    odd = rng.randrange(len(batch))
    twist = rng.choice(["none", "none", "deleted", "unknown name", "bad value", "field order",
                        "lenient value", "lenient step"])
    if twist == "deleted":
        batch[odd] = (batch[odd][0], None)
    elif twist == "unknown name":
        batch[odd][1][-2] = b"never-seen-%d" % seed  # type: ignore[index]
    elif twist == "bad value":
        batch[odd][1][-1] = b"abc"  # type: ignore[index]
    elif twist == "lenient value":  # float() takes these; the grammar does not
        batch[odd][1][-1] = rng.choice([b"1_000", b" 7 ", b"+5", b"Infinity", b"NaN"])  # type: ignore[index]
    elif twist == "lenient step":
        batch[odd][1][3] = rng.choice([b" 3", b"+3", b"1_0"])  # type: ignore[index]
    elif twist == "field order":
        flat = batch[odd][1]
        assert flat is not None
        flat[0:2], flat[2:4] = flat[2:4], flat[0:2]
    return batch


@pytest.mark.parametrize("seed", range(200))
def test_add_many_stores_exactly_what_add_stores_or_declines(seed: int) -> None:
    """The column-wise path either takes the whole batch with add()'s exact values and types,
    or declines and appends nothing (the caller then adds entry by entry)."""
    batch = _batch(seed)
    one_by_one = Columns()
    for entry_id, flat in batch:
        if flat is not None:
            try:
                one_by_one.add(entry_id, flat)  # also teaches the name cache, as a worker would
            except ValueError:
                pass
    many = Columns()
    taken, left = many.add_many(batch)
    assert sorted(taken + left) == sorted(batch, key=repr) or len(taken + left) == len(batch)
    if not taken:
        assert _state(many) == _state(Columns())
        return
    for entry_id, flat in left:  # as the worker does with what the column-wise path left
        if flat is not None:
            try:
                many.add(entry_id, flat)
            except ValueError:
                pass
    assert _state(_sorted(many)) == _state(_sorted(one_by_one))


def _sorted(c: Columns) -> Columns:
    """The same points in stream order (groups are taken in any order)."""
    out = Columns()
    starts = [sum(c.count[:i]) for i in range(len(c.count))]
    for i in sorted(range(len(c.count)), key=lambda i: (c.seq_ms[i], c.seq_n[i])):
        for j in range(starts[i], starts[i] + c.count[i]):
            out.name.append(out._slot(c.names[c.name[j]].encode(), c.names[c.name[j]]))
            out.value.append(c.value[j])
        out.count.append(c.count[i])
        out.step.append(c.step[i])
        out.time.append(c.time[i])
        out.seq_ms.append(c.seq_ms[i])
        out.seq_n.append(c.seq_n[i])
    out.big = c.big
    return out


def _state(c: Columns) -> tuple[object, ...]:
    return (c.names, c.name, [(type(v), repr(v)) for v in c.value], c.count, c.step, c.time,
            c.seq_ms, c.seq_n, c.big)


def test_add_many_takes_a_uniform_batch() -> None:
    """The fast path is really taken for what producers write (else the test above proves little)."""
    flat = [b"_rank", b"0", b"_step", b"1", b"_time", b"9", b"a", b"0.5", b"b", b"-3"]
    Columns().add(b"1-0", flat)  # names validated once
    batch = [(b"%d-0" % i, flat[:3] + [b"%d" % i] + flat[4:]) for i in range(1, 40)]
    cols = Columns()
    assert cols.add_many(batch) == (batch, [])  # type: ignore[arg-type]
    assert cols.step == list(range(1, 40)) and cols.value[:2] == [0.5, -3]
    assert type(cols.value[1]) is int and cols.seq_ms == list(range(1, 40))


def test_add_many_takes_a_group_whose_names_it_never_saw() -> None:
    """A rank's first batch goes column-wise too (its names are checked once, for the group,
    instead of by decode_entry per entry); a group with a name decode_entry refuses (not
    UTF-8, a control character) is left to the per-entry path, which dead-letters it."""
    import uuid

    fresh = uuid.uuid4().hex
    good = [(f"{i}-0".encode(), flatten({b"_rank": b"3", b"_step": str(i).encode(),
                                         b"_time": b"1000", f"{fresh}/a".encode(): b"1.5",
                                         f"{fresh}/b".encode(): str(i).encode()}))
            for i in range(1, 41)]
    many = Columns()
    taken, left = many.add_many(good)  # type: ignore[arg-type]
    assert len(taken) == 40 and not left
    assert many.names == [f"{fresh}/a", f"{fresh}/b"]
    assert many.value[:4] == [1.5, 1, 1.5, 2] and many.step[:2] == [1, 2]
    for bad_name in (b"\xff" + fresh.encode(), f"{fresh}\x01".encode()):
        bad = [(f"{i}-0".encode(), flatten({b"_rank": b"3", b"_step": str(i).encode(),
                                            b"_time": b"1000", bad_name: b"1.5"}))
               for i in range(1, 41)]
        taken, left = Columns().add_many(bad)  # type: ignore[arg-type]
        assert not taken and len(left) == 40
        with pytest.raises(ValueError):
            decode_entry(dict(zip(bad[0][1][0::2], bad[0][1][1::2])))
