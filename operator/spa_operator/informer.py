"""The runs' Jobs and pods, watched by the operator itself: list, then watch from the list's resourceVersion, into
an index of their views (`JobView`/`PodView`) by run uid, namespace and name.

kopf keeps the runs (their reconcile daemons and the finalizer). Jobs and pods bring most of the watch events (a Job
two to four, each pod three), and kopf's processing of one event (cause detection, per-object memory, handler
invocation, logging) cost about as much CPU as a whole reconcile. Here an event costs its JSON decode, the few fields
the decision reads and a dict update; the run's reconciler is woken only when what it decides on changed.

The API server filters by label (only objects that carry a run uid are sent). The first list asks for
resourceVersion 0 (served from the API server's watch cache, as client-go's reflector does). After a dropped watch
the stream resumes from the last resourceVersion seen; when that is too old (410 Gone) the collection is listed again
(the most recent state), and an object missing from the new list counts as deleted. A watch silent for `idle_s`
(bookmarks arrive every minute, so silence means a dead connection) is resumed at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from spa_operator.kubeapi import ApiError, KubeApi, api_error, collection_path

V = TypeVar("V")
log = logging.getLogger("spa_operator")


class Informer(Generic[V]):
    """One kind of object (apiVersion and kind: batch/v1 Job, v1 Pod), in the given namespaces (all when none),
    carrying label `label`: each object's view by the uid its label names, its namespace and its name.

    `on_change(uid, namespace, name, view)` is called after the index took an event (view None: the object is
    gone)."""

    def __init__(self, api: KubeApi, api_version: str, kind: str, label: str, view: Callable[[dict[str, Any]], V],
                 on_change: Callable[[str, str, str, V | None], None], namespaces: Sequence[str] = (),
                 server_timeout_s: int = 300, retry_s: float = 1.0, idle_s: float = 70.0) -> None:
        self.api = api
        self.api_version, self.kind = api_version, kind
        self.label = label
        self.view = view
        self.on_change = on_change
        self.scopes: tuple[str | None, ...] = tuple(namespaces) or (None,)
        self.server_timeout_s = server_timeout_s
        self.retry_s = retry_s
        self.idle_s = idle_s
        self._where: dict[tuple[str, str], str] = {}  # (namespace, name) -> run uid
        self._by_run: dict[str, dict[tuple[str, str], V]] = {}  # run uid -> (namespace, name) -> view
        self._synced = {scope: asyncio.Event() for scope in self.scopes}

    # -- reading --------------------------------------------------------------------------------------------------

    def get(self, uid: str, namespace: str | None = None) -> tuple[V, ...]:
        """The views of run `uid`'s objects in `namespace` (a run's objects are in its own; one elsewhere that
        carries its uid, a copied label, is not its), or in every namespace."""
        found = self._by_run.get(uid)
        if not found:
            return ()
        return tuple(v for (ns, _), v in found.items() if namespace is None or ns == namespace)

    def __len__(self) -> int:
        return len(self._where)

    async def synced(self) -> None:
        """Wait until every namespace was listed once: from then on the index is complete."""
        for event in self._synced.values():
            await event.wait()

    def unsynced(self) -> list[str | None]:
        """The namespaces (None: all of them) not listed yet."""
        return [scope for scope, event in self._synced.items() if not event.is_set()]

    # -- watching -------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        await asyncio.gather(*(self._follow(scope) for scope in self.scopes))

    async def _follow(self, namespace: str | None) -> None:
        path = collection_path(self.api_version, self.kind, namespace)
        version: str | None = None
        list_from = "0"  # the watch cache; "" (most recent) after a 410
        while True:
            try:
                if version is None:
                    items, version = await self.api.list_objects(path, self.label, list_from)
                    self._relisted(namespace, items)
                    self._synced[namespace].set()
                async for kind, obj in self.api.watch(path, self.label, version, self.server_timeout_s, self.idle_s):
                    if kind == "ERROR":  # a Status object, sent in the stream
                        raise ApiError(int(obj.get("code") or 500), str(obj.get("reason") or "watch error"))
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        self._apply(kind, obj)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.status == 410:  # the version is too old (routine after a long watch): list again, now
                    version, list_from = None, ""
                    continue
                log.warning(f"watching {path} failed: {api_error(e)}; will retry")
                await asyncio.sleep(e.retry_after or self.retry_s)
            except TimeoutError:  # silent for idle_s: the connection died without closing; resume now
                log.info(f"watching {path}: nothing for {self.idle_s:g}s; reconnecting")
            except Exception as e:  # the API server went away: resume from the same version after a pause
                log.warning(f"watching {path} failed: {api_error(e)}; will retry")
                await asyncio.sleep(self.retry_s)

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if kind == "DELETED":
            self._forget(key)
            return
        uid = (meta.get("labels") or {}).get(self.label, "")
        old = self._where.get(key)
        if old is not None and old != uid:  # relabelled: gone from its old run
            self._forget(key)
        view = self.view(obj)
        self._where[key] = uid
        self._by_run.setdefault(uid, {})[key] = view
        self.on_change(uid, key[0], key[1], view)

    def _forget(self, key: tuple[str, str]) -> None:
        uid = self._where.pop(key, None)
        if uid is None:
            return
        views = self._by_run.get(uid, {})
        views.pop(key, None)
        if not views:
            self._by_run.pop(uid, None)
        self.on_change(uid, key[0], key[1], None)

    def _relisted(self, namespace: str | None, items: list[dict[str, Any]]) -> None:
        listed = {((o.get("metadata") or {}).get("namespace", ""), (o.get("metadata") or {}).get("name", ""))
                  for o in items}
        for key in [k for k in self._where if (namespace is None or k[0] == namespace) and k not in listed]:
            self._forget(key)  # deleted while the watch was down
        for obj in items:
            self._apply("ADDED", obj)
