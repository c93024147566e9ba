"""Thirty JSON Schemas covering what structured outputs are asked for: nested objects, arrays with bounds,
enums, const, anyOf and oneOf, $ref/$defs, numbers with bounds, strings with patterns and lengths, nullable
types, optional properties. Each is bounded (every string, array and number has a limit), so that a model
choosing at random among the tokens the grammar allows can finish within a small token budget."""

from __future__ import annotations

from typing import Any

WORD = {"type": "string", "maxLength": 6}
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


CORPUS: list[dict[str, Any]] = [
    _object({"answer": {"enum": ["yes", "no", "maybe"]}}),
    _object({"kind": {"const": "point"}, "x": SMALL, "y": SMALL}),
    _object({"count": {"type": "integer", "minimum": -5, "maximum": 5}}),
    _object({"ok": {"type": "boolean"}, "code": {"type": "integer", "minimum": 100, "maximum": 599}}),
    _object({"user": _object({"name": WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120}})}),
    _object({"a": _object({"b": _object({"c": {"enum": [1, 2, 3]}})})}),
    _object({"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3}}),
    _object({"scores": {"type": "array", "items": SMALL, "minItems": 2, "maxItems": 2}}),
    _object({"code": {"type": "string", "minLength": 1, "maxLength": 5}}),
    _object({"plate": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}),
    _object({"pin": {"type": "string", "pattern": "^[0-9]{4}$"}, "name": {"type": "string", "maxLength": 3}}),
    _object({"value": {"anyOf": [SMALL, {"enum": ["none", "many"]}]}}),
    _object({"maybe": {"anyOf": [_object({"id": SMALL}), {"type": "null"}]}}),
    {
        "$defs": {"point": _object({"x": SMALL, "y": SMALL})},
        **_object({"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}),
    },
    {
        "$defs": {
            "colour": {"enum": ["red", "green", "blue"]},
            "pixel": _object({"at": SMALL, "colour": {"$ref": "#/$defs/colour"}}),
        },
        **_object({"pixels": {"type": "array", "items": {"$ref": "#/$defs/pixel"}, "maxItems": 2}}),
    },
    _object({"ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}}),
    _object({"note": {"type": ["string", "null"], "maxLength": 4}}),
    _object({"id": SMALL, "label": WORD, "extra": {"type": "boolean"}}, required=["id"]),
    _object({"any": {"enum": [1, "one", None, True]}}),
    _object(
        {
            "pair": {
                "type": "array",
                "prefixItems": [SMALL, {"enum": ["a", "b"]}],
                "items": False,
                "minItems": 2,
            }
        }
    ),
    _object(
        {
            "grid": {
                "type": "array",
                "items": {"type": "array", "items": {"enum": [0, 1]}, "minItems": 1, "maxItems": 2},
                "minItems": 1,
                "maxItems": 2,
            }
        }
    ),
    _object({"version": {"const": 2}, "mode": {"enum": ["fast", "slow"]}}),
    _object({"level": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
    _object({"day": {"type": "string", "format": "date"}}),
    _object(
        {"shape": {"oneOf": [_object({"circle": {"const": True}}), _object({"square": {"enum": [1, 2]}})]}}
    ),
    _object({"items": {"type": "array", "items": _object({"sku": WORD, "qty": SMALL}), "maxItems": 2}}),
    _object({"step": {"type": "integer", "minimum": 0, "maximum": 50, "multipleOf": 5}}),
    _object(
        {"temp": {"type": "number", "minimum": -10, "maximum": 40, "multipleOf": 0.5}, "unit": {"const": "C"}}
    ),
    {"anyOf": [_object({"error": {"enum": ["timeout", "denied"]}}), _object({"result": SMALL})]},
    _object(
        {
            "when": _object({"hour": {"type": "integer", "minimum": 0, "maximum": 23}}),
            "who": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"}, "maxItems": 2},
        }
    ),
]
assert len(CORPUS) == 30
