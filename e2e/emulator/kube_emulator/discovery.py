"""Discovery documents: /version, /api, /apis, /apis/GROUP and group/version resource lists,
in the legacy (unaggregated) form every client falls back to."""

from .errors import ApiError
from .resources import Registry

VERSION = {
    "major": "1",
    "minor": "34",
    "gitVersion": "v1.34.0-portpolicy-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.24",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def api_versions(server_address: str) -> dict:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _group(name: str, versions: list[str]) -> dict:
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def api_groups(registry: Registry) -> dict:
    groups = [_group(name, versions) for name, versions in registry.groups().items() if name]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(registry: Registry, name: str) -> dict:
    versions = registry.groups().get(name)
    if not versions or not name:
        raise _not_found()
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, versions)}


def resource_list(registry: Registry, group: str, version: str) -> dict:
    types = [rt for rt in registry.all() if rt.group == group and rt.version == version]
    if not types:
        raise _not_found()
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [entry for rt in types for entry in rt.discovery_entries()],
    }


def openapi_v3(registry: Registry, group_version: str) -> dict:
    """Just enough OpenAPI v3 for kubectl to see that the server validates fields itself
    (the ``fieldValidation`` parameter of each PATCH), so it sends ``fieldValidation=Strict``
    instead of downloading schemas to validate on the client. No schemas are published."""
    by_gv: dict[str, list] = {}
    for rt in registry.all():
        by_gv.setdefault(f"api/{rt.version}" if not rt.group else f"apis/{rt.group}/{rt.version}", []).append(rt)
    if not group_version:
        return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}"} for gv in by_gv}}
    if group_version not in by_gv:
        raise _not_found()
    doc_paths = {}
    for rt in by_gv[group_version]:
        scope = "/namespaces/{namespace}" if rt.namespaced else ""
        doc_paths[f"/{group_version}{scope}/{rt.plural}/{{name}}"] = {
            "patch": {
                "x-kubernetes-group-version-kind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {},
            }
        }
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": VERSION["gitVersion"]}, "paths": doc_paths}


def route(registry: Registry, path: str, server_address: str) -> dict:
    parts = [p for p in path.strip("/").split("/") if p]
    if parts == ["version"]:
        return VERSION
    if parts == ["api"]:
        return api_versions(server_address)
    if parts == ["apis"]:
        return api_groups(registry)
    if len(parts) == 2 and parts[0] == "api":
        return resource_list(registry, "", parts[1])
    if len(parts) == 2 and parts[0] == "apis":
        return api_group(registry, parts[1])
    if len(parts) == 3 and parts[0] == "apis":
        return resource_list(registry, parts[1], parts[2])
    if parts[:2] == ["openapi", "v3"]:
        return openapi_v3(registry, "/".join(parts[2:]))
    if parts in (["healthz"], ["readyz"], ["livez"]):
        return "ok"
    raise _not_found()
