"""JSON Schema to the TypeScript-like signatures gpt-oss saw in training, quirks included.

The model was trained on the official renderer's output, so every oddity of that renderer is reproduced on
purpose (descriptions printed twice for nested objects, unescaped string defaults, oneOf layouts, ...): a
signature printed any other way is text the model never saw. Values that are not JSON objects behave as the
official renderer's `serde_json::Value::get` does: every key lookup on them finds nothing.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

_MISSING = object()


def _get(value: Any, key: str) -> Any:
    """`value[key]` for a JSON object, `_MISSING` for anything else or an absent key."""
    if isinstance(value, dict):
        return value.get(key, _MISSING)
    return _MISSING


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_array(value: Any) -> bool:
    return isinstance(value, list)


def _is_enum(schema: Any) -> bool:
    enum = _get(schema, "enum")
    return _is_array(enum) and len(enum) > 0


def _has(schema: Any, key: str) -> bool:
    return isinstance(schema, dict) and key in schema


def format_float(x: float) -> str:
    """Shortest round-trip float text in the layout of Rust's `ryu` crate (what serde_json prints).

    Plain notation for decimal exponents -5..15 (`0.00001`, `1e-6`, `1000000000000000.0`, `1e16`), otherwise
    `d.ddde±x` without a `+` and without zero padding. Python's `repr` gives the same shortest digits.
    """
    if not math.isfinite(x):
        return "null"  # serde_json serializes non-finite floats as null
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    assert isinstance(exponent, int)
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    point = length + exponent  # where the decimal point falls relative to the digits
    if exponent >= 0 and point <= 16:
        body = digits + "0" * exponent + ".0"
    elif 0 < point <= 16:
        body = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        body = "0." + "0" * -point + digits
    elif length == 1:
        body = f"{digits}e{point - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign + body


_U64_MAX = 2**64 - 1
_POW10 = [float(f"1e{i}") for i in range(309)]
_JSON_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")


def _serde_float(positive: bool, significand: int, exponent: int) -> float:
    """serde_json's fast (not correctly rounded) decimal-to-float step: significand times a power of ten."""
    value = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            value = value * _POW10[exponent] if exponent >= 0 else value / _POW10[-exponent]
            if math.isinf(value):
                raise ValueError("a number in the schema is out of range")
            break
        if value == 0.0:
            break
        if exponent >= 0:
            raise ValueError("a number in the schema is out of range")
        value /= 1e308
        exponent += 308
    return value if positive else -value


def serde_json_number(value: int | float) -> int | float:
    """The number the official renderer sees for a Python number.

    The official Python package hands schemas to its Rust core as JSON text, and serde_json (without its
    `float_roundtrip` feature) parses decimals with a fast method that is sometimes one unit in the last
    place off, and turns integers beyond 64 bits into floats. The model was trained on what that printed, so
    we print the same: about one float in ten would otherwise differ in its last digit.
    """
    match = _JSON_NUMBER.fullmatch(json.dumps(value))
    assert match is not None
    sign, integer, fraction, exp = match.groups()
    significand, exponent, overflowed = 0, 0, False
    for ch in integer:
        if overflowed or significand * 10 + int(ch) > _U64_MAX:
            overflowed = True
            exponent += 1  # digits past u64 are dropped, each scaling by ten
        else:
            significand = significand * 10 + int(ch)
    for ch in fraction or "":
        if overflowed or significand * 10 + int(ch) > _U64_MAX:
            overflowed = True  # dropped without scaling
        else:
            significand = significand * 10 + int(ch)
            exponent -= 1
    if exp is not None:
        exponent += int(exp)
    if not (overflowed or fraction is not None or exp is not None):
        if not sign:
            return significand
        return -significand if significand <= 2**63 else -float(significand)
    return _serde_float(not sign, significand, exponent)


def json_compact(value: Any) -> str:
    """serde_json's compact `Display` of a JSON value: no spaces, key order kept, non-ASCII raw."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "null"  # serde_json serializes non-finite floats as null
    if isinstance(value, int | float):
        # Integers that fit u64 or i64 stay integers; the rest is parsed, and printed, as floats.
        parsed = serde_json_number(value)
        return str(parsed) if isinstance(parsed, int) else format_float(parsed)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ",".join(json_compact(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(
                f"{json.dumps(str(k), ensure_ascii=False)}:{json_compact(v)}" for k, v in value.items()
            )
            + "}"
        )
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _format_default(default: Any, schema: Any) -> str:
    if _is_str(default):
        # String defaults are printed raw (no escaping); quoted unless the schema is an enum.
        return f"default: {default}" if _is_enum(schema) else f'default: "{default}"'
    return f"default: {json_compact(default)}"


def _with_nullable(rendered: str, schema: Any) -> str:
    # A substring test, as upstream: an enum containing "nullish" gets no `| null`.
    if _get(schema, "nullable") is True and "null" not in rendered:
        return rendered + " | null"
    return rendered


# The deepest nesting of JSON values a schema may have. Rendering recurses once per level, so without a bound
# a schema nested a few hundred levels (valid JSON, and small) raises RecursionError.
MAX_SCHEMA_DEPTH = 64


class SchemaTooDeep(ValueError):
    """The schema nests deeper than `MAX_SCHEMA_DEPTH`."""


def nesting_depth(value: Any) -> int:
    """How deep JSON `value` nests (a scalar is 0, `{}` and `[]` are 1), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            deepest = max(deepest, depth + 1)
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
            deepest = max(deepest, depth + 1)
    return deepest


def json_schema_to_typescript(schema: Any, indent: str = "") -> str:
    """Render a JSON Schema as the TypeScript-like type used in harmony tool signatures.

    `SchemaTooDeep` (a ValueError) for a schema nested deeper than `MAX_SCHEMA_DEPTH`."""
    depth = nesting_depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaTooDeep(f"the schema nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are rendered")
    return _typescript(schema, indent)


def _typescript(schema: Any, indent: str) -> str:
    one_of = _get(schema, "oneOf")
    if _is_array(one_of):
        return _top_level_one_of(one_of, indent)

    type_ = _get(schema, "type")
    if _is_array(type_):
        names = ["number" if t == "integer" else t for t in type_ if _is_str(t)]
        return " | ".join(names) if names else "any"
    if type_ == "object":
        return _object(schema, indent)
    if type_ == "string":
        enum = _get(schema, "enum")
        if _is_array(enum):
            values = [f'"{e}"' for e in enum if _is_str(e)]
            if values:
                return " | ".join(values)
        return "string"
    if type_ in ("number", "integer"):
        return "number"
    if type_ == "boolean":
        return "boolean"
    if type_ == "array":
        items = _get(schema, "items")
        return "Array<any>" if items is _MISSING else _typescript(items, indent) + "[]"
    return "any"


def _top_level_one_of(variants: list[Any], indent: str) -> str:
    out = []
    for variant in variants:
        out.append(f"\n{indent} | ")
        out.append(_with_nullable(_typescript(variant, indent + "   "), variant))
        comments = []
        description = _get(variant, "description")
        if _is_str(description):
            comments.append(description)
        default = _get(variant, "default")
        if default is not _MISSING:
            if _is_str(default) and not _is_enum(variant):
                comments.append(f'default: "{default}"')
            else:
                comments.append(f"default: {json_compact(default)}")
        if comments:
            out.append(" // " + " ".join(comments))
    return "".join(out)


def _object(schema: dict[str, Any], indent: str) -> str:
    description = _get(schema, "description")
    out = [f"{indent}// {description}\n" if _is_str(description) else "", "{\n"]
    properties = _get(schema, "properties")
    if isinstance(properties, dict):
        required_list = _get(schema, "required")
        required = {r for r in required_list if _is_str(r)} if _is_array(required_list) else set()
        for key, prop in properties.items():
            out.append(_property(key, prop, "" if key in required else "?", indent))
    out.append(indent + "}")
    return "".join(out)


def _property(key: str, prop: Any, optional: str, indent: str) -> str:
    out = []
    title = _get(prop, "title")
    if _is_str(title):
        out.append(f"{indent}// {title}\n{indent}//\n")
    description = _get(prop, "description")
    if not _has(prop, "oneOf") and _is_str(description):
        out.append(f"{indent}// {description}\n")
    examples = _get(prop, "examples")
    if _is_array(examples) and examples:
        out.append(f"{indent}// Examples:\n")
        out.extend(f'{indent}// - "{e}"\n' for e in examples if _is_str(e))

    one_of = _get(prop, "oneOf")
    if _is_array(one_of):
        out.append(_property_one_of(key, prop, one_of, optional, indent))
        return "".join(out)

    rendered = _with_nullable(_typescript(prop, indent + "    "), prop)
    out.append(f"{indent}{key}{optional}: {rendered},")
    default = _get(prop, "default")
    if not _has(prop, "oneOf") and default is not _MISSING:
        out.append(" // " + _format_default(default, prop))
    out.append("\n")
    return "".join(out)


def _property_one_of(key: str, prop: Any, variants: list[Any], optional: str, indent: str) -> str:
    out = []
    description = _get(prop, "description")
    prop_description = description if _is_str(description) else None
    # The property's description is not repeated above when the first variant already carries it.
    skip = (
        prop_description is not None
        and bool(variants)
        and _get(variants[0], "description") == prop_description
    )
    above = False
    if not skip and prop_description is not None:
        out.append(f"{indent}// {prop_description}\n")
        above = True
    default = _get(prop, "default")
    if default is not _MISSING:
        out.append(f"{indent}// {_format_default(default, prop)}\n")
    out.append(f"{indent}{key}{optional}:\n")
    for i, variant in enumerate(variants):
        out.append(f"{indent} | ")
        out.append(_with_nullable(_typescript(variant, indent + "   "), variant))
        comments = []
        if not (i == 0 and above):
            variant_description = _get(variant, "description")
            if _is_str(variant_description) and variant_description != prop_description:
                comments.append(variant_description)
        variant_default = _get(variant, "default")
        if variant_default is not _MISSING:
            comments.append(_format_default(variant_default, variant))
        if comments:
            out.append(" // " + " ".join(comments))
        out.append("\n")
    out.append(f"{indent},\n")
    return "".join(out)
