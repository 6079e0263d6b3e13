"""Objects, resourceVersions, the event history and watches.

One counter gives every write its resourceVersion, as etcd's revision does. The history keeps
the last ``history_limit`` events; a watch from a resourceVersion older than that gets the
``410 Gone`` ERROR event the API server sends ("too old resource version"), and the client must
list again. Everything runs on one asyncio loop, so each write is atomic.
"""

import asyncio
import collections
import copy
from dataclasses import dataclass, field

from .selectors import field_matcher, label_matcher


@dataclass
class Event:
    rv: int
    resource: tuple[str, str]  # (group, plural)
    type: str  # ADDED, MODIFIED, DELETED
    object: dict
    previous: dict | None = None


@dataclass(eq=False)
class Watch:
    resource: tuple[str, str]
    namespace: str | None
    labels: str | None
    fields: str | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def __post_init__(self):
        self._labels = label_matcher(self.labels)
        self._fields = field_matcher(self.fields)

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self._labels(meta.get("labels") or {}) and self._fields(obj)

    def translate(self, event: Event) -> dict | None:
        """The event as this watch sees it: an object that starts or stops matching the
        selectors is ADDED or DELETED, as the API server's watch cache reports it."""
        now, before = self.matches(event.object), self.matches(event.previous)
        if event.type == "MODIFIED" and now and not before:
            return {"type": "ADDED", "object": event.object}
        if event.type == "MODIFIED" and before and not now:
            return {"type": "DELETED", "object": event.object}
        if now:
            return {"type": event.type, "object": event.object}
        return None


class Gone(Exception):
    pass


class Store:
    def __init__(self, history_limit: int = 5000):
        self.revision = 1000
        self._objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = collections.defaultdict(dict)
        self._history: collections.deque[Event] = collections.deque(maxlen=history_limit)
        self._watches: set[Watch] = set()

    # --- reads ------------------------------------------------------------------------------
    def get(self, resource, namespace, name) -> dict | None:
        obj = self._objects[resource].get((namespace or "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def select(self, resource, namespace=None, labels=None, fields=None) -> list[dict]:
        probe = Watch(resource, namespace, labels, fields)
        items = [o for o in self._objects[resource].values() if probe.matches(o)]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return copy.deepcopy(items)

    def objects_of(self, resource) -> list[dict]:
        return list(self._objects[resource].values())

    def oldest_watchable(self) -> int:
        """Watches may start from this resourceVersion or later."""
        if len(self._history) < (self._history.maxlen or 0):
            return 0
        return self._history[0].rv - 1

    # --- writes -----------------------------------------------------------------------------
    def _record(self, resource, type_, obj, previous) -> None:
        event = Event(self.revision, resource, type_, copy.deepcopy(obj), previous)
        self._history.append(event)
        for watch in list(self._watches):
            if watch.resource == resource and (seen := watch.translate(event)) is not None:
                watch.queue.put_nowait(seen)

    def put(self, resource, obj: dict) -> dict:
        """Creates or replaces ``obj``, giving it the next resourceVersion."""
        self.revision += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.revision)
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        previous = self._objects[resource].get(key)
        self._objects[resource][key] = obj
        self._record(resource, "MODIFIED" if previous else "ADDED", obj, previous)
        return copy.deepcopy(obj)

    def remove(self, resource, namespace, name) -> dict | None:
        obj = self._objects[resource].pop((namespace or "", name), None)
        if obj is None:
            return None
        self.revision += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self._record(resource, "DELETED", obj, obj)
        return obj

    def drop_resource(self, resource) -> None:
        """A CRD was deleted: its objects go with it."""
        for namespace, name in list(self._objects[resource]):
            self.remove(resource, namespace, name)

    def compact(self) -> None:
        """Forgets the event history, as etcd compaction does: older watches get 410."""
        self._history.clear()
        self._history.extend([Event(self.revision, ("", ""), "COMPACTED", {})] * (self._history.maxlen or 1))

    # --- watches ----------------------------------------------------------------------------
    def watch(self, resource, namespace, labels, fields, since: int | None) -> tuple[Watch, list[dict]]:
        """A new watch and the events it must first replay: every event after ``since``, or
        (``since`` None) every object that matches, as ADDED."""
        watch = Watch(resource, namespace, labels, fields)
        if since is None:
            backlog = [{"type": "ADDED", "object": o} for o in self.select(resource, namespace, labels, fields)]
        else:
            if since < self.oldest_watchable():
                raise Gone(f"too old resource version: {since} ({self.oldest_watchable() + 1})")
            backlog = [
                seen
                for e in self._history
                if e.rv > since and e.resource == resource and (seen := watch.translate(e)) is not None
            ]
        self._watches.add(watch)
        return watch, backlog

    def unwatch(self, watch: Watch) -> None:
        self._watches.discard(watch)
