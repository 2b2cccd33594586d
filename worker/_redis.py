"""What the worker asks of a Redis client: the commands it sends, and nothing more.

Every worker module takes a :class:`RedisClient`, so mypy checks each call against this list
and a new command is a visible change here. ``redis.Redis`` and ``redis.RedisCluster`` both
satisfy it (mypy checks that at the bottom of this module; ``tests/test_boundaries.py`` checks
that both take every command, by name).

Parameter types are redis-py's own (``KeyT`` is ``bytes | str | memoryview``); replies are
what redis-py's synchronous client declares. Three are ``Any`` on purpose: XREADGROUP's
reply, whose shape the worker itself chooses (``raw_reply`` keeps Redis's RESP lists; a
cluster client parses them); a script's reply, which is whatever its Lua returns; and
HGETALL's, bytes to bytes from the worker's client (it never decodes), which redis-py's type
(``bytes | str`` both sides, for either decode mode) cannot say. Commands queued
on a :class:`Pipeline` answer only through ``execute()``, so their own return is ``object``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from redis.typing import (
    ConsumerT,
    EncodableT,
    ExpiryT,
    FieldT,
    GroupT,
    KeyT,
    ScriptTextT,
    StreamIdT,
    StreamRangeResponse,
)

from pluto.streams import GroupReader

__all__ = ["Pipeline", "RedisClient", "Script"]


class Script(Protocol):
    """A Lua script registered once (EVALSHA, falling back to EVAL after a Redis restart)."""

    def __call__(self, keys: Sequence[KeyT] | None = None,
                 args: Iterable[EncodableT] | None = None,
                 client: Any = None) -> Any: ...  # client: a pipeline of the same connection


class Pipeline(Protocol):
    """A non-transactional pipeline: commands queue, ``execute`` sends them in one round trip."""

    def __len__(self) -> int: ...

    def __enter__(self) -> Pipeline: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None: ...

    def execute(self, raise_on_error: bool = True) -> list[Any]: ...

    def execute_command(self, *args: Any, **options: Any) -> object: ...

    def expire(self, name: KeyT, time: ExpiryT) -> object: ...

    def hgetall(self, name: KeyT) -> object: ...

    def hset(self, name: KeyT, key: FieldT | None = None, value: EncodableT | None = None,
             mapping: Mapping[FieldT, EncodableT] | None = None) -> object: ...

    def type(self, name: KeyT) -> object: ...

    def xack(self, name: KeyT, groupname: GroupT, *ids: StreamIdT) -> object: ...

    def xadd(self, name: KeyT, fields: dict[FieldT, EncodableT], id: StreamIdT = "*",
             maxlen: int | None = None, approximate: bool = True) -> object: ...


class RedisClient(GroupReader, Protocol):
    """The commands the worker sends (plus :class:`GroupReader`'s, for its gauges)."""

    # streams and the consumer group
    def xreadgroup(self, groupname: str, consumername: str, streams: dict[KeyT, StreamIdT],
                   count: int | None = None, block: int | None = None) -> Any: ...

    def xack(self, name: KeyT, groupname: GroupT, *ids: StreamIdT) -> int: ...

    def xautoclaim(self, name: KeyT, groupname: GroupT, consumername: ConsumerT,
                   min_idle_time: int, start_id: StreamIdT = "0-0",
                   count: int | None = None, justid: bool = False) -> list[Any]: ...

    def xgroup_create(self, name: KeyT, groupname: GroupT, id: StreamIdT = "$",
                      mkstream: bool = False) -> bool: ...

    def xgroup_delconsumer(self, name: KeyT, groupname: GroupT,
                           consumername: ConsumerT) -> int: ...

    def xinfo_stream(self, name: KeyT) -> dict[str, Any]: ...

    def xinfo_consumers(self, name: KeyT, groupname: GroupT) -> list[dict[str, Any]]: ...

    def xrevrange(self, name: KeyT, max: StreamIdT = "+", min: StreamIdT = "-",
                  count: int | None = None) -> StreamRangeResponse | None: ...

    def xtrim(self, name: KeyT, maxlen: int | None = None, approximate: bool = True,
              minid: StreamIdT | None = None) -> int: ...

    # hashes, sets and plain keys (members, heartbeats, the ledger, the runs set)
    def hset(self, name: KeyT, key: FieldT | None = None, value: EncodableT | None = None,
             mapping: Mapping[FieldT, EncodableT] | None = None) -> int: ...

    def hget(self, name: KeyT, key: FieldT) -> bytes | str | None: ...

    def hgetall(self, name: KeyT) -> dict[Any, Any]: ...  # bytes to bytes: see the top

    def hvals(self, name: KeyT) -> list[bytes | str]: ...

    def hdel(self, name: KeyT, *keys: FieldT) -> int: ...

    def sadd(self, name: KeyT, *values: FieldT) -> int: ...

    def srem(self, name: KeyT, *values: FieldT) -> int: ...

    def sismember(self, name: KeyT, value: str) -> int: ...

    def smembers(self, name: KeyT) -> set[bytes | str]: ...

    def set(self, name: KeyT, value: EncodableT,
            ex: ExpiryT | None = None) -> bool | str | bytes | None: ...

    def exists(self, *names: KeyT) -> int: ...

    # the connection itself
    def pipeline(self, transaction: bool = True) -> Pipeline: ...

    def register_script(self, script: ScriptTextT) -> Script: ...

    def set_response_callback(self, command: str, callback: Callable[..., Any]) -> None: ...

    def close(self) -> None: ...


if TYPE_CHECKING:  # mypy proves both redis-py clients satisfy the protocol; nothing runs
    import redis

    def _satisfied(single: redis.Redis, cluster: redis.RedisCluster) -> list[RedisClient]:
        return [single, cluster]
