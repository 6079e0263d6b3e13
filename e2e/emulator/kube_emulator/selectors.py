"""Label and field selectors, as list and watch requests send them."""

import re

from .errors import bad_request

_SET = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector: str) -> list[str]:
    """Splits on commas outside parentheses: `a in (x,y),b` -> [`a in (x,y)`, `b`]."""
    parts, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_matcher(selector: str | None):
    """A predicate over a labels dict; None or empty selects everything."""
    if not selector:
        return lambda labels: True
    tests = []
    for term in _split(selector):
        if m := _SET.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                tests.append(lambda l, k=key, vs=values: l.get(k) in vs)
            else:
                tests.append(lambda l, k=key, vs=values: l.get(k) not in vs)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda l, k=key, v=value: l.get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in re.split(r"==?", term, maxsplit=1))
            tests.append(lambda l, k=key, v=value: l.get(k) == v)
        elif term.startswith("!"):
            tests.append(lambda l, k=term[1:].strip(): k not in l)
        elif re.fullmatch(r"[A-Za-z0-9_./-]+", term):
            tests.append(lambda l, k=term: k in l)
        else:
            raise bad_request(f"unable to parse requirement: {term!r}")
    return lambda labels: all(t(labels or {}) for t in tests)


def _field_value(obj: dict, path: str):
    value = obj
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def field_matcher(selector: str | None):
    """A predicate over whole objects: `metadata.name=x`, `spec.nodeName!=y`, comma-joined."""
    if not selector:
        return lambda obj: True
    tests = []
    for term in _split(selector):
        if "!=" in term:
            path, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda o, p=path, v=value: _field_value(o, p) != v)
        elif "=" in term:
            path, value = (s.strip() for s in re.split(r"==?", term, maxsplit=1))
            tests.append(lambda o, p=path, v=value: _field_value(o, p) == v)
        else:
            raise bad_request(f"invalid field selector: {term!r}")
    return lambda obj: all(t(obj) for t in tests)
