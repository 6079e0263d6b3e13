"""Request paths of the Kubernetes API.

kmock 0.8's own parser reads ``/api/v1/namespaces`` and ``/api/v1/namespaces/NAME`` as a
namespace prefix with no resource (and fails on the first), so the emulator parses paths here
and hands kmock the result (see ``server.install_path_parser``).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiPath:
    group: str | None = None  # None: not a resource path (/api, /apis/GROUP, /version, ...)
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse(path: str) -> ApiPath:
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return ApiPath()
    namespace = None
    # namespaces/NS/PLURAL/... is a namespaced path; namespaces[/NAME[/SUB]] is the resource.
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return ApiPath(group, version)
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = "/".join(rest[2:]) or None
    return ApiPath(group, version, plural, namespace, name, sub)
