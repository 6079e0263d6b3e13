"""``kubectl get`` Table responses (``Accept: application/json;as=Table;g=meta.k8s.io;v=v1``).

Custom resources get a Name column and their CRD's ``additionalPrinterColumns`` (or Age when it
has none), with the API server's cell conversions: strings printed, integers and numbers as
numbers, dates as ages. Built-in types get the columns kubectl users know for the few the
project shows, and Name and Age otherwise.
"""

import datetime
import re

from .resources import ResourceType


def human_age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "<invalid>"
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if seconds < 0:
        return "<invalid>"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"


_STEP = re.compile(r'\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.]+)\s*==\s*["\']([^"\']*)["\']\)\]')


def json_path(obj, path: str) -> list:
    """The values a simple JSONPath (fields, [N] and [?(@.f=="v")] filters) selects."""
    values = [obj]
    position = 0
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    while position < len(path):
        m = _STEP.match(path, position)
        if not m:
            return []
        position = m.end()
        field, index, filter_field, filter_value = m.groups()
        out = []
        for v in values:
            if field is not None and isinstance(v, dict) and field in v:
                out.append(v[field])
            elif index is not None and isinstance(v, list) and int(index) < len(v):
                out.append(v[int(index)])
            elif filter_field is not None and isinstance(v, list):
                for item in v:
                    probe = item
                    for part in filter_field.split("."):
                        probe = probe.get(part) if isinstance(probe, dict) else None
                    if probe is not None and str(probe) == filter_value:
                        out.append(item)
        values = out
    return values


def _cell(column_type: str, value):
    if value is None:
        return None
    if column_type == "date":
        return human_age(value) if isinstance(value, str) else "<invalid>"
    if column_type == "integer":
        return value if isinstance(value, int) else None
    if column_type == "number":
        return value if isinstance(value, (int, float)) else None
    if column_type == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value, separators=(",", ":"))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _age(o):
    return human_age(o.get("metadata", {}).get("creationTimestamp"))


def _service_ports(o):
    ports = o.get("spec", {}).get("ports") or []
    text = [
        f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/{p.get('protocol', 'TCP')}"
        for p in ports
    ]
    return ",".join(text) or "<none>"


def _ready_condition(o):
    for c in o.get("status", {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return "Ready" if c.get("status") == "True" else "NotReady"
    return "Unknown"


# kind -> [(name, type, function)]
_BUILTIN: dict[str, list[tuple[str, str, object]]] = {
    "Service": [
        ("Type", "string", lambda o: o.get("spec", {}).get("type", "ClusterIP")),
        ("Cluster-IP", "string", lambda o: o.get("spec", {}).get("clusterIP", "<none>")),
        ("External-IP", "string", lambda o: ",".join(o.get("spec", {}).get("externalIPs") or []) or "<none>"),
        ("Port(s)", "string", _service_ports),
    ],
    "Node": [("Status", "string", _ready_condition)],
    "Namespace": [("Status", "string", lambda o: o.get("status", {}).get("phase", ""))],
    "Lease": [("Holder", "string", lambda o: o.get("spec", {}).get("holderIdentity", ""))],
    "Pod": [("Status", "string", lambda o: o.get("status", {}).get("phase", "Pending"))],
    "DaemonSet": [
        ("Desired", "integer", lambda o: o.get("status", {}).get("desiredNumberScheduled", 0)),
        ("Ready", "integer", lambda o: o.get("status", {}).get("numberReady", 0)),
    ],
    "EndpointSlice": [
        ("AddressType", "string", lambda o: o.get("addressType", "")),
        ("Ports", "string", lambda o: ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>"),
        (
            "Endpoints",
            "string",
            lambda o: ",".join(a for e in o.get("endpoints") or [] for a in e.get("addresses", [])) or "<unset>",
        ),
    ],
}


def _partial(obj: dict) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


def table(rt: ResourceType, items: list[dict], resource_version: str, include_object: str = "Metadata") -> dict:
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    if rt.printer_columns is not None:
        printer = rt.printer_columns or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]
        for c in printer:
            columns.append(
                {
                    "name": c["name"],
                    "type": c.get("type", "string"),
                    "format": c.get("format", ""),
                    "description": c.get("description", ""),
                    "priority": c.get("priority", 0),
                }
            )
        cells = lambda o: [
            (values[0] if (values := json_path(o, c["jsonPath"])) else None) for c in printer
        ]
        convert = [c.get("type", "string") for c in printer]
    else:
        builtin = _BUILTIN.get(rt.kind, []) + [("Age", "date", _age)]
        for name, type_, _ in builtin:
            columns.append(
                {"name": name, "type": "string" if type_ == "date" else type_, "format": "", "description": name, "priority": 0}
            )
        cells = lambda o: [fn(o) for _, _, fn in builtin]
        convert = ["string" if t == "date" else t for _, t, _ in builtin]
    rows = []
    for obj in items:
        raw = cells(obj)
        row = {"cells": [obj["metadata"]["name"]] + [_cell(t, v) for t, v in zip(convert, raw)]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = _partial(obj)
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns,
        "rows": rows,
    }


def partial_list(items: list[dict], resource_version: str) -> dict:
    return {
        "kind": "PartialObjectMetadataList",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "items": [_partial(o) for o in items],
    }


def partial(obj: dict) -> dict:
    return _partial(obj)
