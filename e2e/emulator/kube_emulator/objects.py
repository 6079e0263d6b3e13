"""What the API server does to an object as it is written: identity and bookkeeping, the
defaults of the types portpolicy cares about, and the Service registry's allocations (cluster
IPs, nodePorts, health-check nodePorts) with its validation of them."""

import copy
import datetime
import ipaddress
import random
import uuid

from .errors import invalid
from .resources import ResourceType

NODE_PORT_RANGE = range(30000, 32768)
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")
# Nodes may carry status on create; other types with a status subresource have it cleared.
_STATUS_ON_CREATE = {"Node", "Namespace"}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default(rt: ResourceType, obj: dict) -> dict:
    """The defaults the API server's decoding applies (before field ownership is recorded)."""
    obj = copy.deepcopy(obj)
    obj["apiVersion"] = rt.api_version
    obj["kind"] = rt.kind
    if rt.kind == "Service":
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            spec.setdefault("internalTrafficPolicy", "Cluster")
        if spec["type"] in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "port" in port:
                    port.setdefault("targetPort", port["port"])
    elif rt.kind in ("Pod", "DaemonSet", "Deployment"):
        pod_spec = obj.get("spec", {}) if rt.kind == "Pod" else obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or []):
            for port in c.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
    return obj


def prepare_create(rt: ResourceType, obj: dict, namespace: str | None) -> dict:
    meta = obj.setdefault("metadata", {})
    if rt.namespaced:
        meta["namespace"] = namespace or meta.get("namespace") or "default"
    else:
        meta.pop("namespace", None)
    if not meta.get("name") and meta.get("generateName"):
        meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now()
    meta["generation"] = 1
    for k in ("resourceVersion", "deletionTimestamp", "selfLink"):
        meta.pop(k, None)
    if "status" in rt.subresources and rt.kind not in _STATUS_ON_CREATE:
        obj.pop("status", None)
    if rt.kind == "Namespace":
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["status"] = {"phase": "Active"}
    if rt.kind == "CustomResourceDefinition":
        names = obj.get("spec", {}).get("names", {})
        obj["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in obj.get("spec", {}).get("versions", []) if v.get("storage")],
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now()}
                for t, r, m in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                )
            ],
        }
    return obj


def carry_over(rt: ResourceType, old: dict, new: dict, subresource: str | None) -> dict:
    """What an update cannot change: identity, and the status or everything-but-status
    depending on whether it went through the status subresource. Bumps the generation when
    anything but metadata and status changed."""
    new = copy.deepcopy(new)
    new["apiVersion"], new["kind"] = rt.api_version, rt.kind
    meta, old_meta = new.setdefault("metadata", {}), old.get("metadata", {})
    for k in ("name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp"):
        if k in old_meta:
            meta[k] = old_meta[k]
        else:
            meta.pop(k, None)
    if subresource == "status":
        status = new.get("status")
        new = {k: copy.deepcopy(v) for k, v in old.items() if k != "status"}
        new["metadata"]["managedFields"] = meta.get("managedFields", old_meta.get("managedFields"))
        if status is not None:
            new["status"] = status
        return new
    if "status" in rt.subresources:
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)
    changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
        k: v for k, v in old.items() if k not in ("metadata", "status")
    }
    if changed:
        meta["generation"] = int(old_meta.get("generation", 1)) + 1
    return new


class ServiceRegistry:
    """Cluster IPs and nodePorts in use, as the API server's allocators hold them."""

    def __init__(self, store_services):
        self._services = store_services  # callable -> iterable of live Service objects

    def _taken_node_ports(self, skip: tuple[str, str]) -> set[int]:
        taken = set()
        for svc in self._services():
            meta = svc.get("metadata", {})
            if (meta.get("namespace"), meta.get("name")) == skip:
                continue
            spec = svc.get("spec", {})
            for p in spec.get("ports") or []:
                if p.get("nodePort"):
                    taken.add(int(p["nodePort"]))
            if spec.get("healthCheckNodePort"):
                taken.add(int(spec["healthCheckNodePort"]))
        return taken

    def _taken_ips(self, skip: tuple[str, str]) -> set[str]:
        return {
            s["spec"].get("clusterIP")
            for s in self._services()
            if (s["metadata"].get("namespace"), s["metadata"].get("name")) != skip and s.get("spec")
        }

    def allocate(self, svc: dict, old: dict | None) -> dict:
        """Validates and fills in cluster IP and node ports; ``old``: the Service before an update."""
        meta, spec = svc["metadata"], svc.setdefault("spec", {})
        key = (meta.get("namespace"), meta.get("name"))
        kind_name = meta.get("name", "")
        old_spec = (old or {}).get("spec", {})
        causes = []
        needs_node_ports = spec.get("type") in ("NodePort", "LoadBalancer") and not (
            spec.get("type") == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is False
        )
        if spec.get("type") != "ExternalName":
            if not spec.get("clusterIP") and old_spec.get("clusterIP"):
                spec["clusterIP"] = old_spec["clusterIP"]
                spec["clusterIPs"] = old_spec.get("clusterIPs", [old_spec["clusterIP"]])
            elif old_spec.get("clusterIP") and spec["clusterIP"] != old_spec["clusterIP"]:
                causes.append(("spec.clusterIP", "field is immutable"))
            if not spec.get("clusterIP"):
                taken = self._taken_ips(key)
                hosts = list(SERVICE_CIDR.hosts())[10:]
                spec["clusterIP"] = next(str(ip) for ip in hosts if str(ip) not in taken)
                spec["clusterIPs"] = [spec["clusterIP"]]
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
        # Only NodePort and LoadBalancer Services hold or check node ports; a ClusterIP one
        # skips the scan of every Service (quadratic when 10,000 are created in a row).
        taken = self._taken_node_ports(key) if spec.get("type") in ("NodePort", "LoadBalancer") else set()
        seen: set[int] = set()
        for i, port in enumerate(spec.get("ports") or []):
            if not isinstance(port, dict):
                continue
            node_port = port.get("nodePort")
            if not node_port and needs_node_ports:
                # An update that leaves an allocated nodePort out keeps it (by port and protocol).
                for old_port in old_spec.get("ports") or []:
                    if (old_port.get("port"), old_port.get("protocol", "TCP")) == (
                        port.get("port"),
                        port.get("protocol", "TCP"),
                    ) and old_port.get("nodePort"):
                        node_port = port["nodePort"] = old_port["nodePort"]
            if node_port:
                if not needs_node_ports:
                    causes.append((f"spec.ports[{i}].nodePort", "may not be used when `type` is 'ClusterIP'"))
                elif not isinstance(node_port, int) or node_port not in NODE_PORT_RANGE:
                    causes.append(
                        (
                            f"spec.ports[{i}].nodePort",
                            f"Invalid value: {node_port}: provided port is not in the valid range. "
                            "The range of valid ports is 30000-32767",
                        )
                    )
                elif node_port in taken or node_port in seen:
                    causes.append(
                        (f"spec.ports[{i}].nodePort", f"Invalid value: {node_port}: provided port is already allocated")
                    )
                seen.add(node_port if isinstance(node_port, int) else -1)
        if causes:
            raise invalid("Service", kind_name, causes)
        if needs_node_ports:
            for port in spec.get("ports") or []:
                if isinstance(port, dict) and not port.get("nodePort"):
                    free = [p for p in NODE_PORT_RANGE if p not in taken and p not in seen]
                    port["nodePort"] = random.choice(free)
                    seen.add(port["nodePort"])
        else:
            for port in spec.get("ports") or []:
                if isinstance(port, dict):
                    port.pop("nodePort", None)
        local = spec.get("externalTrafficPolicy") == "Local" and spec.get("type") == "LoadBalancer"
        if local:
            if not spec.get("healthCheckNodePort"):
                spec["healthCheckNodePort"] = old_spec.get("healthCheckNodePort") or random.choice(
                    [p for p in NODE_PORT_RANGE if p not in taken and p not in seen]
                )
        else:
            spec.pop("healthCheckNodePort", None)
        return svc
