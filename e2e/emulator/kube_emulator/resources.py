"""The resource types the emulator serves: the built-in ones portpolicy, kubectl and the
samples use, and whatever CustomResourceDefinitions add once created."""

from dataclasses import dataclass, field

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    subresources: tuple[str, ...] = ()
    categories: list[str] = field(default_factory=list)
    # From a CRD: its additionalPrinterColumns, and list-map keys by field path (from the
    # schema's x-kubernetes-list-type: map).
    printer_columns: list[dict] | None = None
    list_map_keys: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    def discovery_entries(self) -> list[dict]:
        main = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": VERBS,
        }
        if self.short_names:
            main["shortNames"] = self.short_names
        if self.categories:
            main["categories"] = self.categories
        subs = [
            {
                "name": f"{self.plural}/{sub}",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }
            for sub in self.subresources
        ]
        return [main, *subs]


def _builtin() -> list[ResourceType]:
    R = ResourceType
    return [
        R("", "v1", "namespaces", "Namespace", False, "namespace", ["ns"], ("status",), ["all"]),
        R("", "v1", "nodes", "Node", False, "node", ["no"], ("status",)),
        R("", "v1", "pods", "Pod", True, "pod", ["po"], ("status",), ["all"]),
        R("", "v1", "services", "Service", True, "service", ["svc"], ("status",), ["all"]),
        R("", "v1", "endpoints", "Endpoints", True, "endpoints", ["ep"]),
        R("", "v1", "configmaps", "ConfigMap", True, "configmap", ["cm"]),
        R("", "v1", "secrets", "Secret", True, "secret"),
        R("", "v1", "serviceaccounts", "ServiceAccount", True, "serviceaccount", ["sa"]),
        R("", "v1", "events", "Event", True, "event", ["ev"]),
        R("apps", "v1", "daemonsets", "DaemonSet", True, "daemonset", ["ds"], ("status",), ["all"]),
        R("apps", "v1", "deployments", "Deployment", True, "deployment", ["deploy"], ("status",), ["all"]),
        R("apps", "v1", "statefulsets", "StatefulSet", True, "statefulset", ["sts"], ("status",), ["all"]),
        R("coordination.k8s.io", "v1", "leases", "Lease", True, "lease"),
        R("events.k8s.io", "v1", "events", "Event", True, "event", ["ev"]),
        R("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, "endpointslice"),
        R("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, "clusterrole"),
        R("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False, "clusterrolebinding"),
        R("rbac.authorization.k8s.io", "v1", "roles", "Role", True, "role"),
        R("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, "rolebinding"),
        R(
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            False,
            "mutatingwebhookconfiguration",
        ),
        R(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            "customresourcedefinition",
            ["crd", "crds"],
            ("status",),
        ),
    ]


def _list_map_keys(schema: dict, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Field paths of ``x-kubernetes-list-type: map`` lists in an openAPIV3Schema, with keys."""
    found: dict[tuple[str, ...], tuple[str, ...]] = {}
    if not isinstance(schema, dict):
        return found
    if schema.get("x-kubernetes-list-type") == "map":
        found[path] = tuple(schema.get("x-kubernetes-list-map-keys", []))
    for name, sub in (schema.get("properties") or {}).items():
        found.update(_list_map_keys(sub, path + (name,)))
    if isinstance(schema.get("items"), dict):
        found.update(_list_map_keys(schema["items"], path))
    return found


class Registry:
    """Resource types by (group, version, plural), with lookups by kind and discovery order."""

    def __init__(self):
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in _builtin():
            self.add(rt)

    def add(self, rt: ResourceType) -> None:
        self._types[rt.key] = rt

    def remove_group_resource(self, group: str, plural: str) -> None:
        for key in [k for k in self._types if k[0] == group and k[2] == plural]:
            del self._types[key]

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        for rt in self._types.values():
            if rt.api_version == api_version and rt.kind == kind:
                return rt
        return None

    def all(self) -> list[ResourceType]:
        return list(self._types.values())

    def groups(self) -> dict[str, list[str]]:
        """Group -> versions, in registration order (the first version is preferred)."""
        out: dict[str, list[str]] = {}
        for rt in self._types.values():
            versions = out.setdefault(rt.group, [])
            if rt.version not in versions:
                versions.append(rt.version)
        return out

    def register_crd(self, crd: dict) -> list[ResourceType]:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        group = spec.get("group", "")
        self.remove_group_resource(group, names.get("plural", ""))
        added = []
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
            rt = ResourceType(
                group=group,
                version=version["name"],
                plural=names.get("plural", ""),
                kind=names.get("kind", ""),
                namespaced=spec.get("scope") == "Namespaced",
                singular=names.get("singular", ""),
                short_names=list(names.get("shortNames", [])),
                subresources=tuple((version.get("subresources") or {}).keys()),
                categories=list(names.get("categories", [])),
                printer_columns=list(version.get("additionalPrinterColumns", [])),
                list_map_keys=_list_map_keys(schema),
            )
            self.add(rt)
            added.append(rt)
        return added
