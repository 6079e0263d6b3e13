"""Managed fields and server-side apply.

A field set is a set of paths; each path is a tuple of the elements ``fieldsV1`` uses:
``f:NAME`` (a field), ``k:{"port":80,"protocol":"TCP"}`` (a list-map item by its keys) and
``v:VALUE`` (a member of a set-list, like finalizers). A path names a leaf it owns, or (for a
list-map item) the item itself.

Apply merges the applied configuration into the live object (maps recursively, list-maps item by
item by key, other lists replaced whole), gives the manager exactly the applied field set,
reports conflicts with other managers' differing values unless forced, and removes the fields
the manager applied before and applies no more, unless another manager owns them. Update
operations (create, replace, merge and strategic patches) take ownership of what they change.
"""

import copy
import datetime
import json

MISSING = object()

# Fields that are the object's identity or the server's bookkeeping, owned by nobody.
_UNMANAGED_TOP = {"apiVersion", "kind"}
_UNMANAGED_META = {
    "name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
    "managedFields", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "generateName",
}

# List-maps of built-in types, by the tail of their field path: their keys. A key field the
# object leaves out takes its schema default (protocol TCP) in the key, as the API server does.
_LIST_MAP_SUFFIXES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("containers", "ports"), ("containerPort", "protocol")),
    (("initContainers", "ports"), ("containerPort", "protocol")),
    (("containers",), ("name",)),
    (("initContainers",), ("name",)),
    (("ephemeralContainers",), ("name",)),
    (("env",), ("name",)),
    (("volumes",), ("name",)),
    (("volumeMounts",), ("mountPath",)),
    (("metadata", "ownerReferences"), ("uid",)),
    (("status", "conditions"), ("type",)),
]
_KEY_DEFAULTS = {"protocol": "TCP"}
_SET_LISTS = {("metadata", "finalizers")}


class Schema:
    """Which lists of one resource type are list-maps (and by which keys) or sets."""

    def __init__(self, kind: str, crd_list_maps: dict | None = None):
        self.kind = kind
        self.crd_list_maps = crd_list_maps

    def list_keys(self, names: tuple[str, ...]) -> tuple[str, ...] | None:
        if self.kind == "Service" and names == ("spec", "ports"):
            return ("port", "protocol")
        if self.crd_list_maps is not None:
            if names[:1] == ("metadata",):
                return dict(_LIST_MAP_SUFFIXES).get(names)
            return self.crd_list_maps.get(names)
        for suffix, keys in _LIST_MAP_SUFFIXES:
            if names[-len(suffix):] == suffix:
                return keys
        return None

    def is_set(self, names: tuple[str, ...]) -> bool:
        return names in _SET_LISTS


def item_key(item: dict, keys: tuple[str, ...]) -> str:
    values = {}
    for k in keys:
        v = item.get(k, _KEY_DEFAULTS.get(k))
        if v is not None:
            values[k] = v
    return "k:" + json.dumps(values, separators=(",", ":"), sort_keys=True)


def _managed_items(obj: dict, top: bool):
    for name, value in obj.items():
        if top and name in _UNMANAGED_TOP:
            continue
        yield name, value


def field_set(obj: dict, schema: Schema) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()

    def walk(value, path, names):
        if isinstance(value, dict) and value:
            for name, sub in value.items():
                if names == ("metadata",) and name in _UNMANAGED_META:
                    continue
                if not names and name in _UNMANAGED_TOP:
                    continue
                walk(sub, path + (f"f:{name}",), names + (name,))
            if not names:
                return
            return
        if isinstance(value, list) and value and path:
            keys = schema.list_keys(names)
            if keys and all(isinstance(i, dict) for i in value):
                for item in value:
                    item_path = path + (item_key(item, keys),)
                    out.add(item_path)
                    walk_item(item, item_path, names)
                return
            if schema.is_set(names) and all(not isinstance(i, (dict, list)) for i in value):
                for member in value:
                    out.add(path + ("v:" + json.dumps(member),))
                return
        if path:
            out.add(path)

    def walk_item(item, item_path, names):
        for name, sub in item.items():
            walk(sub, item_path + (f"f:{name}",), names + (name,))

    walk(obj, (), ())
    return out


def to_fields_v1(paths: set[tuple[str, ...]]) -> dict:
    root: dict = {}
    owned: set[int] = set()
    for path in sorted(paths):
        node = root
        for element in path:
            node = node.setdefault(element, {})
        owned.add(id(node))

    def finish(node: dict) -> dict:
        children = {k: finish(v) for k, v in node.items()}
        if children and id(node) in owned:
            children["."] = {}
        return children

    return finish(root)


def from_fields_v1(fields: dict) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()

    def walk(node: dict, path: tuple[str, ...]):
        children = {k: v for k, v in node.items() if k != "."}
        if path and (not children or "." in node):
            out.add(path)
        for k, v in children.items():
            walk(v if isinstance(v, dict) else {}, path + (k,))

    walk(fields or {}, ())
    return out


def _find_item(items: list, element: str, keys: tuple[str, ...]):
    for i, item in enumerate(items):
        if isinstance(item, dict) and item_key(item, keys) == element:
            return i
    return None


def get_at(obj, path: tuple[str, ...], schema: Schema):
    value, names = obj, ()
    for element in path:
        kind, _, rest = element.partition(":")
        if kind == "f":
            if not isinstance(value, dict) or rest not in value:
                return MISSING
            value, names = value[rest], names + (rest,)
        elif kind == "k":
            keys = schema.list_keys(names)
            if not isinstance(value, list) or not keys:
                return MISSING
            i = _find_item(value, element, keys)
            if i is None:
                return MISSING
            value = value[i]
        elif kind == "v":
            member = json.loads(rest)
            if not isinstance(value, list) or member not in value:
                return MISSING
            value = member
    return value


def remove_at(obj: dict, path: tuple[str, ...], schema: Schema) -> None:
    """Removes the field, item or set member at ``path``, and maps left empty on the way."""
    trail = []  # (container, key-or-index)
    value, names = obj, ()
    for element in path:
        kind, _, rest = element.partition(":")
        if kind == "f":
            if not isinstance(value, dict) or rest not in value:
                return
            trail.append((value, rest))
            value, names = value[rest], names + (rest,)
        elif kind == "k":
            keys = schema.list_keys(names)
            i = _find_item(value, element, keys) if isinstance(value, list) and keys else None
            if i is None:
                return
            trail.append((value, i))
            value = value[i]
        elif kind == "v":
            member = json.loads(rest)
            if not isinstance(value, list) or member not in value:
                return
            trail.append((value, value.index(member)))
            value = member
    container, key = trail.pop()
    del container[key]
    # Maps and lists emptied by the removal go too (not the object's top-level sections).
    while trail and len(trail) > 1:
        parent, k = trail.pop()
        if parent[k] in ({}, []):
            del parent[k]
        else:
            break


def merge(live, applied, schema: Schema, names: tuple[str, ...] = ()):
    """The applied configuration merged into the live value."""
    if isinstance(live, dict) and isinstance(applied, dict):
        out = dict(live)
        for k, v in applied.items():
            out[k] = merge(live.get(k, MISSING), v, schema, names + (k,))
        return out
    if isinstance(live, list) and isinstance(applied, list):
        keys = schema.list_keys(names)
        if keys and all(isinstance(i, dict) for i in live + applied):
            out = [copy.deepcopy(i) for i in live]
            for item in applied:
                i = _find_item(out, item_key(item, keys), keys)
                if i is None:
                    out.append(copy.deepcopy(item))
                else:
                    out[i] = merge(out[i], item, schema, names)
            return out
        if schema.is_set(names):
            return list(live) + [m for m in applied if m not in live]
    return copy.deepcopy(applied)


def _entries(obj: dict) -> list[dict]:
    return obj.get("metadata", {}).get("managedFields") or []


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_entries(obj: dict, entries: list[tuple[dict, set]]) -> None:
    out = []
    for entry, paths in entries:
        if not paths:
            continue  # a manager that owns nothing is no longer listed
        e = dict(entry)
        e["fieldsType"] = "FieldsV1"
        e["fieldsV1"] = to_fields_v1(paths)
        out.append(e)
    meta = obj.setdefault("metadata", {})
    if out:
        meta["managedFields"] = out
    else:
        meta.pop("managedFields", None)


def _parsed(obj: dict) -> list[tuple[dict, set]]:
    return [(e, from_fields_v1(e.get("fieldsV1", {}))) for e in _entries(obj)]


def _same_entry(e: dict, manager: str, operation: str, subresource: str | None) -> bool:
    return (
        e.get("manager") == manager
        and e.get("operation") == operation
        and e.get("subresource") == subresource
    )


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[tuple[str, str]]):
        super().__init__("apply conflicts")
        self.conflicts = conflicts  # (manager, field path as text)


def path_text(path: tuple[str, ...]) -> str:
    out = ""
    for element in path:
        kind, _, rest = element.partition(":")
        out += f".{rest}" if kind == "f" else f"[{rest}]"
    return out


def apply(
    live: dict | None,
    applied: dict,
    manager: str,
    api_version: str,
    schema: Schema,
    force: bool,
    subresource: str | None = None,
    section: str | None = None,
) -> dict:
    """Server-side apply of ``applied`` by ``manager`` onto ``live`` (None: create).

    ``section``: the only top-level field a subresource apply may touch (``status``).
    """
    live = copy.deepcopy(live) if live is not None else {}
    if section:
        applied = {k: v for k, v in applied.items() if k in (section, "apiVersion", "kind", "metadata")}
        applied["metadata"] = {
            k: v for k, v in applied.get("metadata", {}).items() if k in ("name", "namespace", "resourceVersion")
        }
    new_paths = field_set(applied, schema)
    entries = _parsed(live)
    old_paths: set = set()
    for entry, paths in entries:
        if _same_entry(entry, manager, "Apply", subresource):
            old_paths = paths

    conflicts = []
    for entry, paths in entries:
        if _same_entry(entry, manager, "Apply", subresource):
            continue
        for path in new_paths & paths:
            mine, theirs = get_at(applied, path, schema), get_at(live, path, schema)
            if theirs is not MISSING and mine != theirs and not isinstance(mine, (dict, list)):
                conflicts.append((entry.get("manager", ""), path_text(path)))
    if conflicts and not force:
        raise ApplyConflict(conflicts)

    result = merge(live, {k: v for k, v in applied.items() if k not in ("apiVersion", "kind")}, schema)
    # Another manager's leaves set to other values by force are no longer theirs; list-map
    # items themselves stay shared.
    taken = set()
    for entry, paths in entries:
        if _same_entry(entry, manager, "Apply", subresource):
            continue
        for path in new_paths & paths:
            mine = get_at(applied, path, schema)
            if not isinstance(mine, (dict, list)) and mine != get_at(live, path, schema):
                taken.add(path)
    others: set = set()
    kept = []
    for entry, paths in entries:
        if _same_entry(entry, manager, "Apply", subresource):
            continue
        paths = paths - taken
        others |= paths
        kept.append((entry, paths))
    for path in sorted(old_paths - new_paths, key=len, reverse=True):
        if path in others or any(o[: len(path)] == path for o in others):
            continue
        remove_at(result, path, schema)
    entry = {"manager": manager, "operation": "Apply", "apiVersion": api_version, "time": _now()}
    if subresource:
        entry["subresource"] = subresource
    kept.append((entry, new_paths))
    _write_entries(result, kept)
    return result


def record_update(
    old: dict | None,
    new: dict,
    request_body: dict | None,
    manager: str,
    api_version: str,
    schema: Schema,
    subresource: str | None = None,
) -> None:
    """Gives ``manager`` (operation Update) the fields this write changed, taking them from
    others; fields the write removed are nobody's. ``request_body``: on create, what the
    client sent (defaults included): fields the server allocates later stay unowned."""
    before = field_set(old, schema) if old else set()
    after = field_set(request_body if old is None and request_body is not None else new, schema)
    def changed_by_write(path) -> bool:
        was, now = get_at(old, path, schema), get_at(new, path, schema)
        if isinstance(now, dict):  # a list-map item itself: new, or not changed as a whole
            return was is MISSING
        return was != now

    changed = {p for p in after if old is None or changed_by_write(p)}
    removed = before - field_set(new, schema)
    entries = _parsed(old) if old else []
    out, mine = [], set()
    for entry, paths in entries:
        if _same_entry(entry, manager, "Update", subresource):
            mine = paths
            continue
        out.append((entry, paths - changed - removed))
    entry = {"manager": manager, "operation": "Update", "apiVersion": api_version, "time": _now()}
    if subresource:
        entry["subresource"] = subresource
    out.append((entry, (mine | changed) - removed))
    _write_entries(new, out)
