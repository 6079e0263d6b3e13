"""The kmock handler that serves the Kubernetes API from the store.

kmock parses each request (and keeps it in its request list) and runs the reactions registered
on it; the emulator's ``serve`` is its fallback reaction, so a test may still put its own
reactions in front (``handler['get /api/v1/nodes'] << 500``). Every request is also written to
a JSON-lines request log (listener, verb, resource, field manager, response code), which is how
the system e2e counts what each operator replica wrote.
"""

import asyncio
import copy
import json
import time
import traceback

import kmock
import yaml
from kmock._internal import parsing, rendering

from . import discovery, fields, objects, patches, paths, tables
from .errors import ApiError, already_exists, bad_request, conflict, invalid, method_not_allowed, not_found
from .errors import unsupported_media_type
from .resources import Registry, ResourceType
from .store import Gone, Store

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
JSON = {"Content-Type": "application/json"}


def install_path_parser() -> None:
    """Teaches kmock 0.8 the paths of the namespaces resource itself (see ``paths``)."""

    def parse_path(path: str) -> parsing.ParsedPath:
        p = paths.parse(path)
        return parsing.ParsedPath(p.group, p.version, p.plural, p.namespace, p.name, p.subresource)

    parsing.parse_path = parse_path


def _accepts(request, what: str) -> bool:
    return f"as={what};" in request.headers.get("Accept", "").replace(" ", "") + ";"


def _manager(request, default_operation: str) -> str:
    manager = request.params.get("fieldManager")
    if manager:
        return manager
    # The API server's default: the user agent up to its first slash.
    agent = request.headers.get("User-Agent", "unknown")
    return agent.split("/", 1)[0] or default_operation


class _Seeding:
    """What a create reads of its request (the field manager), for ``ApiServer.seed``."""

    def __init__(self, manager: str):
        self.params = {"fieldManager": manager}
        self.headers: dict[str, str] = {}


class ApiServer:
    def __init__(self, history_limit: int = 5000, bookmark_seconds: float = 10.0, log_path: str | None = None):
        self.registry = Registry()
        self.store = Store(history_limit)
        self.services = objects.ServiceRegistry(lambda: self.store.objects_of(("", "services")))
        self.bookmark_seconds = bookmark_seconds
        self.listeners: dict[int, str] = {}  # local port -> listener name
        self._log = open(log_path, "a", buffering=1) if log_path else None
        self.handler = kmock.RawHandler()
        self.handler.fallback << self.serve
        for name in DEFAULT_NAMESPACES:
            ns = objects.prepare_create(self.registry.get("", "v1", "namespaces"), {"metadata": {"name": name}}, None)
            self.store.put(("", "namespaces"), ns)

    def seed(self, objects, manager: str) -> int:
        """Creates ``objects`` (each with apiVersion and kind) as POSTs by ``manager`` would,
        before any client connects: defaulting, the Service registry's admission, managedFields,
        one resourceVersion and one watch event each. Clients then see an API server that
        started on a full store, and list and watch it through the API as usual; the request
        log has no entries for these. Returns how many were created."""
        request, count = _Seeding(manager), 0
        for obj in objects:
            rt = self.registry.by_kind(obj.get("apiVersion"), obj.get("kind"))
            if rt is None:
                raise ValueError(f"no resource type for {obj.get('apiVersion')} {obj.get('kind')}")
            self._create(request, rt, (obj.get("metadata") or {}).get("namespace"), obj)
            count += 1
        return count

    # --- the one entry point ------------------------------------------------------------------
    async def serve(self, request: kmock.Request):
        started = time.time()
        path = paths.parse(request.url.path)
        entry = {
            "t": round(started, 3),
            "listener": self._listener(request),
            "method": request.method.value,
            "path": request.url.path,
            "query": request.url.query_string,
            "resource": path.plural,
            "group": path.group,
            "namespace": path.namespace,
            "name": path.name,
            "subresource": path.subresource,
            "fieldManager": request.params.get("fieldManager"),
            "userAgent": request.headers.get("User-Agent"),
        }
        try:
            if path.plural is None:
                if request.method.value != "GET":
                    raise method_not_allowed(f"{request.method.value} is not allowed on {request.url.path}")
                code, body = 200, discovery.route(self.registry, request.url.path, self._address(request))
                entry["verb"] = "discover"
            else:
                rt = self.registry.get(path.group, path.version, path.plural)
                if rt is None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                code, body = await self._resource(request, rt, path, entry)
        except ApiError as e:
            code, body = e.code, e.status()
            entry["reason"] = e.reason
            entry["message"] = e.message
        except Exception as e:  # a bug of the emulator: say so, as the API server would
            traceback.print_exc()
            code, body = 500, ApiError(500, "InternalError", f"emulator: {e!r}").status()
            entry["reason"] = "InternalError"
            entry["message"] = repr(e)
        entry["code"] = code
        self._write_log(entry)
        return rendering.Response(status=code, headers=JSON, payload=body)

    def _listener(self, request) -> str:
        try:
            port = request._raw_request.transport.get_extra_info("sockname")[1]
        except (AttributeError, TypeError, IndexError):
            return "unknown"
        return self.listeners.get(port, str(port))

    def _address(self, request) -> str:
        return request.headers.get("Host", "127.0.0.1")

    def _write_log(self, entry: dict) -> None:
        if self._log:
            self._log.write(json.dumps(entry, separators=(",", ":")) + "\n")

    # --- resources ----------------------------------------------------------------------------
    async def _resource(self, request, rt: ResourceType, path: paths.ApiPath, entry: dict):
        method = request.method.value
        watching = request.params.get("watch") in ("true", "1")
        if path.subresource and path.subresource not in rt.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace = path.namespace if rt.namespaced else None
        if method == "GET" and (watching or path.name is None):
            entry["verb"] = "watch" if watching else "list"
            if watching:
                return 200, self._watch(request, rt, namespace, path.name)
            return 200, self._list(request, rt, namespace)
        if method == "GET":
            entry["verb"] = "get"
            return 200, self._shape(request, self._get(rt, namespace, path.name))
        body = self._body(request)
        if method == "POST" and path.name is None:
            entry["verb"] = "create"
            return 201, self._create(request, rt, namespace, body)
        if method == "PUT" and path.name:
            entry["verb"] = "update"
            self._note_lease(entry, rt, body)
            return 200, self._update(request, rt, namespace, path.name, path.subresource, body)
        if method == "PATCH" and path.name:
            entry["verb"] = "patch"
            self._note_lease(entry, rt, body)
            return self._patch(request, rt, namespace, path.name, path.subresource, body)
        if method == "DELETE" and path.name:
            entry["verb"] = "delete"
            return 200, self._delete(rt, namespace, path.name, body)
        if method == "DELETE":
            entry["verb"] = "deletecollection"
            return 200, self._delete_collection(request, rt, namespace)
        raise method_not_allowed(f"{method} is not allowed on {request.url.path}")

    def _note_lease(self, entry: dict, rt: ResourceType, body) -> None:
        if rt.kind == "Lease" and isinstance(body, dict):
            entry["holder"] = (body.get("spec") or {}).get("holderIdentity")

    def _body(self, request):
        if not request.body:
            return None
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        try:
            if content_type == "application/apply-patch+yaml":
                return yaml.safe_load(request.body)
            return json.loads(request.body)
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"the request body is not valid {content_type}: {e}")

    def _get(self, rt: ResourceType, namespace, name) -> dict:
        obj = self.store.get((rt.group, rt.plural), namespace, name)
        if obj is None:
            raise not_found(rt.plural, name, rt.group)
        return obj

    def _shape(self, request, obj: dict) -> dict:
        if _accepts(request, "PartialObjectMetadata"):
            return tables.partial(obj)
        return obj

    def _list(self, request, rt: ResourceType, namespace) -> dict:
        items = self.store.select(
            (rt.group, rt.plural), namespace, request.params.get("labelSelector"), request.params.get("fieldSelector")
        )
        rv = str(self.store.revision)
        if _accepts(request, "Table"):
            return tables.table(rt, items, rv, request.params.get("includeObject", "Metadata"))
        if _accepts(request, "PartialObjectMetadataList"):
            return tables.partial_list(items, rv)
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": {"resourceVersion": rv}, "items": items}

    # --- watch --------------------------------------------------------------------------------
    def _watch(self, request, rt: ResourceType, namespace, name):
        params = request.params
        field_selector = params.get("fieldSelector")
        if name:
            field_selector = ",".join(filter(None, [field_selector, f"metadata.name={name}"]))
        rv = params.get("resourceVersion")
        initial = params.get("sendInitialEvents") == "true"
        since = None if rv in (None, "", "0") or initial else int(rv)
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params.get("timeoutSeconds") or 1800)
        partial = _accepts(request, "PartialObjectMetadata")
        try:
            watch, backlog = self.store.watch(
                (rt.group, rt.plural), namespace, params.get("labelSelector"), field_selector, since
            )
        except Gone as e:
            gone = ApiError(410, "Expired", str(e)).status()
            return self._stream_once({"type": "ERROR", "object": gone})

        def shaped(event: dict) -> dict:
            if partial and event["type"] != "BOOKMARK":
                return {"type": event["type"], "object": tables.partial(event["object"])}
            return event

        def bookmark(annotations: dict | None = None) -> dict:
            meta = {"resourceVersion": str(self.store.revision)}
            if annotations:
                meta["annotations"] = annotations
            return {"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}}

        async def stream():
            try:
                # Sends the headers at once, before any event (clients wait for them).
                yield b""
                for event in backlog:
                    yield shaped(event)
                if initial:
                    yield bookmark({"k8s.io/initial-events-end": "true"})
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    wait = min(left, self.bookmark_seconds) if bookmarks else left
                    try:
                        event = await asyncio.wait_for(watch.queue.get(), wait)
                    except asyncio.TimeoutError:
                        if bookmarks and deadline - time.monotonic() > 0:
                            yield bookmark()
                        continue
                    yield shaped(event)
            finally:
                self.store.unwatch(watch)

        return stream()

    async def _stream_once(self, event: dict):
        yield b""
        yield event

    # --- writes -------------------------------------------------------------------------------
    def _schema(self, rt: ResourceType) -> fields.Schema:
        return fields.Schema(rt.kind, rt.list_map_keys if rt.printer_columns is not None else None)

    def _check_namespace(self, rt: ResourceType, namespace):
        if rt.namespaced and self.store.get(("", "namespaces"), None, namespace) is None:
            raise not_found("namespaces", namespace)

    def _check_body(self, rt: ResourceType, body, name=None) -> dict:
        if not isinstance(body, dict):
            raise bad_request("the request body must be an object")
        if body.get("kind") not in (None, rt.kind) or body.get("apiVersion") not in (None, rt.api_version):
            raise bad_request(
                f"the body is a {body.get('apiVersion')} {body.get('kind')}, not a {rt.api_version} {rt.kind}"
            )
        meta = body.get("metadata") or {}
        if name and meta.get("name") not in (None, name):
            raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
        return body

    def _admit(self, rt: ResourceType, obj: dict, old: dict | None) -> dict:
        """The registry's own step after defaulting: allocations and their validation."""
        if not obj.get("metadata", {}).get("name"):
            raise invalid(rt.kind, "", [("metadata.name", "Required value: name or generateName is required")])
        if rt.kind == "Service":
            obj = self.services.allocate(obj, old)
        return obj

    def _create(self, request, rt: ResourceType, namespace, body, manager=None) -> dict:
        body = self._check_body(rt, body)
        namespace = namespace or (body.get("metadata") or {}).get("namespace") or "default"
        self._check_namespace(rt, namespace)
        obj = objects.prepare_create(rt, objects.default(rt, body), namespace)
        name = obj["metadata"]["name"] if obj["metadata"].get("name") else ""
        if name and self.store.get((rt.group, rt.plural), obj["metadata"].get("namespace"), name) is not None:
            raise already_exists(rt.plural, name, rt.group)
        sent = copy.deepcopy(obj)
        obj = self._admit(rt, obj, None)
        if manager is None:
            fields.record_update(None, obj, sent, _manager(request, "Update"), rt.api_version, self._schema(rt))
        stored = self.store.put((rt.group, rt.plural), obj)
        self._after_write(rt, stored)
        return stored

    def _check_version(self, rt: ResourceType, body: dict, live: dict) -> None:
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != live["metadata"]["resourceVersion"]:
            raise conflict(
                rt.plural,
                live["metadata"]["name"],
                "the object has been modified; please apply your changes to the latest version and try again",
                rt.group,
            )

    def _save(self, request, rt: ResourceType, live: dict, new: dict, subresource, manager_op: str | None) -> dict:
        """Carries identity over, admits, records ownership (Update operations) and stores; an
        object whose deletion waited only on finalizers goes once the last one is removed."""
        new = objects.carry_over(rt, live, new, subresource)
        if subresource != "status":
            new = objects.default(rt, new)
            new["metadata"] = new.get("metadata", {})
            new = self._admit(rt, new, live)
        if manager_op == "Update":
            fields.record_update(live, new, None, _manager(request, "Update"), rt.api_version, self._schema(rt), subresource)
        if new == live:
            return live  # nothing changed: no new resourceVersion, no event (as the API server does)
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            removed = self.store.remove((rt.group, rt.plural), meta.get("namespace"), meta["name"])
            self._after_delete(rt, removed)
            return removed
        stored = self.store.put((rt.group, rt.plural), new)
        self._after_write(rt, stored)
        return stored

    def _update(self, request, rt: ResourceType, namespace, name, subresource, body) -> dict:
        body = self._check_body(rt, body, name)
        live = self._get(rt, namespace, name)
        self._check_version(rt, body, live)
        body = copy.deepcopy(body)
        body.setdefault("metadata", {})["managedFields"] = live["metadata"].get("managedFields")
        return self._save(request, rt, live, body, subresource, "Update")

    def _patch(self, request, rt: ResourceType, namespace, name, subresource, body):
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type == "application/apply-patch+yaml":
            return self._apply(request, rt, namespace, name, subresource, body)
        live = self._get(rt, namespace, name)
        if content_type == "application/merge-patch+json":
            new = patches.json_merge(live, body)
        elif content_type == "application/strategic-merge-patch+json":
            if rt.printer_columns is not None:
                raise unsupported_media_type(content_type)
            new = patches.strategic_merge(live, body)
        elif content_type == "application/json-patch+json":
            new = patches.json_patch(live, body)
        else:
            raise unsupported_media_type(content_type)
        if isinstance(body, dict):
            self._check_version(rt, body, live)
        new.setdefault("metadata", {})["managedFields"] = live["metadata"].get("managedFields")
        return 200, self._save(request, rt, live, new, subresource, "Update")

    def _apply(self, request, rt: ResourceType, namespace, name, subresource, body):
        body = self._check_body(rt, body, name)
        if not body.get("apiVersion") or not body.get("kind"):
            raise bad_request("an applied configuration needs apiVersion and kind")
        manager = request.params.get("fieldManager")
        if not manager:
            raise invalid(rt.kind, name, [("fieldManager", "Required value: is required for apply patch")])
        force = request.params.get("force") == "true"
        schema = self._schema(rt)
        live = self.store.get((rt.group, rt.plural), namespace, name)
        if live is None and subresource:
            raise not_found(rt.plural, name, rt.group)
        if live is not None:
            self._check_version(rt, body, live)
        try:
            merged = fields.apply(live, body, manager, rt.api_version, schema, force, subresource, subresource)
        except fields.ApplyConflict as e:
            causes = [f'conflict with "{m}": {p}' for m, p in e.conflicts]
            raise ApiError(
                409,
                "Conflict",
                f"Apply failed with {len(causes)} conflict{'s' if len(causes) > 1 else ''}: " + "; ".join(causes),
                {"causes": [{"reason": "FieldManagerConflict", "message": c} for c in causes]},
            )
        if live is None:
            merged.setdefault("metadata", {})["name"] = name
            obj = objects.prepare_create(rt, objects.default(rt, merged), namespace)
            obj["metadata"]["managedFields"] = merged["metadata"].get("managedFields")
            self._check_namespace(rt, obj["metadata"].get("namespace"))
            obj = self._admit(rt, obj, None)
            stored = self.store.put((rt.group, rt.plural), obj)
            self._after_write(rt, stored)
            return 201, stored
        return 200, self._save(request, rt, live, merged, subresource, None)

    def _delete(self, rt: ResourceType, namespace, name, body) -> dict:
        live = self._get(rt, namespace, name)
        preconditions = (body or {}).get("preconditions") or {}
        if preconditions.get("resourceVersion") not in (None, live["metadata"]["resourceVersion"]) or (
            preconditions.get("uid") not in (None, live["metadata"]["uid"])
        ):
            raise conflict(rt.plural, name, "the precondition of the delete does not hold", rt.group)
        meta = live["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return live
            live["metadata"]["deletionTimestamp"] = objects.now()
            live["metadata"]["deletionGracePeriodSeconds"] = 0
            stored = self.store.put((rt.group, rt.plural), live)
            return stored
        removed = self.store.remove((rt.group, rt.plural), namespace, name)
        self._after_delete(rt, removed)
        return removed

    def _delete_collection(self, request, rt: ResourceType, namespace) -> dict:
        items = self.store.select(
            (rt.group, rt.plural), namespace, request.params.get("labelSelector"), request.params.get("fieldSelector")
        )
        deleted = [self._delete(rt, o["metadata"].get("namespace"), o["metadata"]["name"], None) for o in items]
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": {}, "items": deleted}

    # --- consequences -------------------------------------------------------------------------
    def _after_write(self, rt: ResourceType, obj: dict) -> None:
        if rt.kind == "CustomResourceDefinition":
            self.registry.register_crd(obj)

    def _after_delete(self, rt: ResourceType, obj: dict | None) -> None:
        if obj is None:
            return
        if rt.kind == "CustomResourceDefinition":
            spec = obj.get("spec", {})
            plural = spec.get("names", {}).get("plural", "")
            self.store.drop_resource((spec.get("group", ""), plural))
            self.registry.remove_group_resource(spec.get("group", ""), plural)
        self._collect_garbage(obj["metadata"].get("uid"))

    def _collect_garbage(self, owner_uid: str | None) -> None:
        """Background deletion of dependents whose every owner is gone (the garbage
        collector's effect, at once rather than eventually)."""
        if not owner_uid:
            return
        live_uids = {
            o["metadata"].get("uid") for rt in self.registry.all() for o in self.store.objects_of((rt.group, rt.plural))
        }
        for rt in self.registry.all():
            for obj in list(self.store.objects_of((rt.group, rt.plural))):
                owners = obj["metadata"].get("ownerReferences") or []
                uids = {o.get("uid") for o in owners}
                if owner_uid in uids and not (uids & live_uids):
                    meta = obj["metadata"]
                    try:
                        self._delete(rt, meta.get("namespace"), meta["name"], None)
                    except ApiError:
                        pass
