"""PATCH bodies other than server-side apply: JSON merge patch (RFC 7386), JSON patch
(RFC 6902, through the ``jsonpatch`` package kmock depends on) and strategic merge patch as
kubectl sends it for built-in types (merge keys from the Go types' patchMergeKey tags, and the
``$patch``, ``$setElementOrder``, ``$retainKeys`` and ``$deleteFromPrimitiveList`` directives)."""

import copy

import jsonpatch

from .errors import ApiError, bad_request

# patchMergeKey of the lists kubectl's strategic patches touch, by the tail of the field path.
_MERGE_KEYS: list[tuple[tuple[str, ...], str]] = [
    (("spec", "ports"), "port"),
    (("containers", "ports"), "containerPort"),
    (("initContainers", "ports"), "containerPort"),
    (("containers",), "name"),
    (("initContainers",), "name"),
    (("env",), "name"),
    (("volumes",), "name"),
    (("volumeMounts",), "mountPath"),
    (("ownerReferences",), "uid"),
    (("conditions",), "type"),
    (("imagePullSecrets",), "name"),
]
_MERGED_PRIMITIVE_LISTS = {("metadata", "finalizers")}


def json_merge(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = json_merge(out.get(k), v)
    return out


def _missing_or_null(target, path: str) -> bool:
    try:
        return jsonpatch.JsonPointer(path).resolve(target) is None
    except jsonpatch.JsonPointerException:
        return True


def json_patch(target, operations):
    if not isinstance(operations, list):
        raise bad_request("a JSON patch is a list of operations")
    # As the API server's JSON patch library does (and kube-runtime's finalizer helper relies
    # on), `test` against null passes for a path that does not exist.
    kept = []
    for op in operations:
        if isinstance(op, dict) and op.get("op") == "test" and op.get("value") is None:
            if not _missing_or_null(target, op.get("path", "")):
                raise ApiError(422, "Invalid", f"the JSON patch test at {op.get('path')} failed")
            continue
        kept.append(op)
    try:
        return jsonpatch.apply_patch(target, kept)
    except jsonpatch.JsonPatchTestFailed as e:
        raise ApiError(422, "Invalid", f"the JSON patch test failed: {e}")
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
        raise bad_request(f"the JSON patch cannot be applied: {e}")


def _merge_key(names: tuple[str, ...]) -> str | None:
    for suffix, key in _MERGE_KEYS:
        if names[-len(suffix):] == suffix:
            return key
    return None


def strategic_merge(target, patch, names: tuple[str, ...] = ()):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    out = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k.startswith("$setElementOrder/") or k in ("$retainKeys", "$patch"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            field = k.split("/", 1)[1]
            out[field] = [x for x in out.get(field, []) if x not in v]
            continue
        if v is None:
            out.pop(k, None)
            continue
        path = names + (k,)
        current = out.get(k)
        key = _merge_key(path)
        if isinstance(v, list) and key and isinstance(current, list):
            out[k] = _merge_list(current, v, key, path)
        elif isinstance(v, list) and path in _MERGED_PRIMITIVE_LISTS and isinstance(current, list):
            out[k] = current + [x for x in v if x not in current]
        elif isinstance(v, dict):
            merged = strategic_merge(current, v, path)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
        else:
            out[k] = copy.deepcopy(v)
    if retain is not None:
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(current: list, patch: list, key: str, names: tuple[str, ...]) -> list:
    out = [copy.deepcopy(i) for i in current]
    for item in patch:
        if not isinstance(item, dict):
            raise bad_request(f"{'.'.join(names)}: a strategic merge list item must be an object")
        index = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del out[index]
            continue
        if index is None:
            out.append({k: v for k, v in item.items() if not k.startswith("$")})
        else:
            out[index] = strategic_merge(out[index], item, names)
    return out
