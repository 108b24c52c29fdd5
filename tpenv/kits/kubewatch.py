"""Kubernetes watches for the kube kit: :class:`Watch` (a list call's watch as an async
iterator, read by a daemon thread, re-opened when the server ends it, resumed from the last
resourceVersion, listed again from now on a 410) and :func:`tracked` (events applied to a
uid -> object map before the consumer sees them). Kube.watch() makes them; apart from kube.py
because the thread and its queue are a concern of their own.
"""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator, Callable

from tpenv.kits import kubepkg

kubepkg.prepare()  # before the first kubernetes import: see kubepkg
from kubernetes.client.rest import ApiException  # noqa: E402


async def tracked(events: AsyncIterator[tuple[str, dict[str, Any]]],
                  into: dict[str, dict[str, Any]]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Watch events, each applied to ``into`` (uid → object) before it is yielded, so the
    consumer always sees the current set of objects (e.g. a workload's pods) with the event."""
    async for kind, obj in events:
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            into.pop(uid, None)
        else:
            into[uid] = obj
        yield kind, obj


_STOP = object()


class Watch:
    """One watch: a daemon thread reading the chunked response, an asyncio queue to the consumer.

    ``wrap(exception, what)``: the kube kit's error wrapping (kube.wrap_api_error), applied to
    what ends the watch; ``on_close(watch)``: the owner forgets it (Kube keeps its open watches)."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kw: dict, what: Any, *,
                 wrap: Callable[[Exception, Any], Exception], on_close: Callable[["Watch"], None]) -> None:
        self._fn, self._args, self._kw, self._what = fn, args, kw, what
        self._wrap, self._on_close = wrap, on_close
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._resp: Any = None
        # A daemon thread, not to_thread: the default executor would hold asyncio.run's exit.
        self._thread = threading.Thread(target=self._run, name=f"watch {what}", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more

    def _run(self) -> None:
        rv = self._kw.pop("resource_version", None)
        try:
            while not self._stop.is_set():
                resp = self._fn(*self._args, watch=True, resource_version=rv, timeout_seconds=300,
                                allow_watch_bookmarks=True, _preload_content=False,
                                _request_timeout=(10, 330), **self._kw)
                self._resp = resp
                buf = b""
                for chunk in resp.stream(65536, decode_content=True):
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        obj = ev.get("object") or {}
                        if ev.get("type") == "ERROR":
                            if obj.get("code") == 410:  # resourceVersion too old: list again from now
                                rv = None
                                break
                            raise ApiException(status=obj.get("code", 500), reason=obj.get("message"))
                        rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                        if ev.get("type") != "BOOKMARK":
                            self._put((ev["type"], obj))
                resp.release_conn()
        except Exception as e:  # noqa: BLE001 - handed to the consumer, wrapped
            if not self._stop.is_set():
                wrapped = self._wrap(e, self._what)
                if wrapped is not e:
                    wrapped.__cause__ = e
                self._put(wrapped)
        finally:
            self._put(_STOP)

    def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        while True:
            item = await self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        resp = self._resp
        if resp is not None:
            # Unblocks the thread's read at once instead of at the server's timeout.
            try:
                resp.shutdown()
            except Exception:  # noqa: BLE001 - best effort on an already broken response
                pass
        self._on_close(self)

    async def __aenter__(self) -> "Watch":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["Watch", "tracked"]
