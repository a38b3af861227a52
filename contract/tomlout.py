"""A minimal TOML writer for our own config shape (tables of scalars and lists, one array of tables).

tomllib only reads; this is the few lines needed to write the run directory's frozen config.
"""
from __future__ import annotations

import json
import math


def dumps(doc: dict) -> str:
    """Render {section: {key: value}} and {name: [{key: value}, ...]} as TOML."""
    out: list[str] = []
    for name, body in doc.items():
        if isinstance(body, dict):
            out.append(f"\n[{name}]")
            out.extend(f"{key} = {_value(v)}" for key, v in body.items())
        elif isinstance(body, list):
            for table in body:
                out.append(f"\n[[{name}]]")
                out.extend(f"{key} = {_value(v)}" for key, v in table.items())
        else:
            raise TypeError(f"top-level TOML entry {name!r} must be a table or an array of tables")
    return "\n".join(out).lstrip("\n") + "\n"


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return ("-" if v < 0 else "") + ("nan" if math.isnan(v) else "inf")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
