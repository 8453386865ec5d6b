"""The key reference of config/README.md, made from the config schema, so that the two never
disagree: every key with its type, default and description.

``python -m cellflow.config_docs`` rewrites the reference part of config/README.md (between
its two marker lines); a test checks that it is current.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cellflow.config import load_schema, resolve_ref

BEGIN = "<!-- key reference: made by `python -m cellflow.config_docs`; do not edit by hand -->"
END = "<!-- end of the key reference -->"
README = Path(__file__).resolve().parents[1] / "config" / "README.md"


def _type(node: Mapping[str, Any], root: Mapping[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(json.dumps(value) for value in node["enum"])
    if "const" in node:
        return json.dumps(node["const"])
    for choice in ("oneOf", "anyOf"):
        if choice in node:
            return " or ".join(_type(resolve_ref(branch, root), root) for branch in node[choice])
    kind = node.get("type", "object" if "properties" in node else "any")
    kinds = kind if isinstance(kind, list) else [kind]
    if "array" in kinds and "items" in node:
        items = resolve_ref(node["items"], root)
        kinds = [f"list of {_type(items, root)}" if k == "array" else k for k in kinds]
    return " or ".join(kinds)


def _default(node: Mapping[str, Any]) -> str:
    if "default" not in node or node["default"] in ({}, []):
        return ""
    text = json.dumps(node["default"])
    return text if len(text) <= 40 else text[:37] + "..."


def _description(node: Mapping[str, Any]) -> str:
    return re.sub(r"\s+", " ", node.get("description", "")).strip()


def key_rows(node: Mapping[str, Any], root: Mapping[str, Any], prefix: str = ""
             ) -> Iterator[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every key under ``node``, depth first."""
    node = resolve_ref(node, root)
    for name, child in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        resolved = resolve_ref(child, root)
        yield key, _type(resolved, root), _default(resolved), _description(resolved)
        yield from _children(resolved, root, key)
    # the reader options of each dataset kind, chosen by `kind` (if/then in the schema)
    for rule in node.get("allOf", []):
        options = rule.get("then", {}).get("properties", {}).get("options")
        kinds = rule.get("if", {}).get("properties", {}).get("kind", {})
        if options and "const" in kinds:
            yield from key_rows(options, root, f"{prefix}options.")


def _children(node: Mapping[str, Any], root: Mapping[str, Any], key: str
              ) -> Iterator[tuple[str, str, str, str]]:
    if "properties" in node or "allOf" in node:
        yield from key_rows(node, root, f"{key}.")
    elif isinstance(node.get("additionalProperties"), Mapping):
        value = resolve_ref(node["additionalProperties"], root)
        if "properties" in value or "allOf" in value:
            yield from key_rows(value, root, f"{key}.<name>.")
    elif node.get("type") == "array" and "items" in node:
        items = resolve_ref(node["items"], root)
        if "properties" in items:
            yield from key_rows(items, root, f"{key}[].")


def key_reference(schema: Mapping[str, Any] | None = None) -> str:
    """The reference as a Markdown table."""
    schema = schema or load_schema()
    lines = ["| key | type | default | what it sets |", "| --- | --- | --- | --- |"]
    for key, kind, default, description in key_rows(schema, schema):
        cells = [f"`{key}`", kind, f"`{default}`" if default else "", description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") if i != 1 else cell
                                       for i, cell in enumerate(cells)) + " |")
    return "\n".join(lines) + "\n"


def with_reference(readme: str, reference: str) -> str:
    """``readme`` with the part between the markers replaced by ``reference``."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"the README has no key reference markers ({BEGIN} ... {END})")
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{reference}{END}{tail}"


def main() -> int:
    README.write_text(with_reference(README.read_text(), key_reference()))
    print(f"wrote the key reference of {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
