"""Hypothesis strategies for harmony: hostile text, JSON-Schema-like values and whole conversations.

Everything generated can cross the official renderer's Python-to-Rust JSON boundary: no lone surrogates, no
NaN or Infinity. Everything else is fair game, including text that looks like special tokens, every Unicode
plane, CRLF and lone CR, and values of the wrong JSON type where a schema expects an object or a string.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from harmony.messages import (
    Author,
    ChannelConfig,
    Content,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespaceConfig,
    browser_tool_namespace,
    python_tool_namespace,
)

# -- text ----------------------------------------------------------------------------------------------------

SPECIAL_LOOKALIKES = [
    "<|end|>",
    "<|start|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
    "<|message|>",
    "<|reserved_200018|>",
    "<|endofprompt|>",
    "<|endoftext|>",
    "<|start|>assistant<|channel|>final<|message|>",
    "<|",
    "|>",
    "<|end",
]
WHITESPACE = [
    "\r\n",
    "\r",
    "\n",
    "\t",
    "\u2028",
    "\u2029",
    "\x0b",
    "\x0c",
    "\x85",
    "\x00",
    "\x1c",
    " ",
    "   ",
    "\u00a0",
    "\u3000",
    "\n\n",
    " \n",
    "\r\r\n",
    "\t\r\n ",
]
COMBINING = [
    "\u0301",
    "e\u0301",
    "a\u0300\u0301\u0302\u0303",
    "\u0915\u094d\u0937",  # Devanagari conjunct
    "\u1100\u1161\u11a8",  # Hangul jamo
    "\u05e9\u05c1\u05b8",  # Hebrew points
    "Z\u0351\u036b\u0343\u036a\u0302",
]
EMOJI = [
    "👩\u200d👩\u200d👧\u200d👦",
    "🧑🏿\u200d🚀",
    "🏳️\u200d🌈",
    "🇫🇷",
    "🇺🇳🇯🇵",
    "👍🏽",
    "❤️",
    "1️⃣",
    "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # tag sequence (plane 14)
    "💖",
]
WORDS = [
    "Hello",
    " world",
    "'s",
    "'LL",
    "I'm",
    "123456789",
    " 1.5e-7",
    "naïve café",
    "漢字かなカナ",
    "Ωμέγα",
    "مرحبا",
    "שלום",
    "ไทย",
    "ß",
    "İ",
    '{"location": "Paris, France", "days": 3}',
    '"quoted"',
    "back\\slash",
    "functions.get_weather",
    "to=",
    " to=assistant",
    "// comment",
    "analysis",
    "final",
    "a" * 40,
]
FRAGMENTS = SPECIAL_LOOKALIKES + WHITESPACE + COMBINING + EMOJI + WORDS + [""]


_SURROGATES = 0xE000 - 0xD800


def _scalar_value(i: int) -> str:
    """The i-th Unicode scalar value: code points in order, the surrogate range skipped."""
    return chr(i + _SURROGATES if i >= 0xD800 else i)


# Uniform over all code points, so every plane (0..16) is about equally likely, not mostly the BMP.
any_plane_char = st.integers(0, 0x10FFFF - _SURROGATES).map(_scalar_value)
any_char = st.characters(exclude_categories=("Cs",))
_piece = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(any_char, max_size=6),
    any_plane_char,
)


def texts(max_pieces: int = 6) -> st.SearchStrategy[str]:
    """Text made of hostile fragments and random characters of every plane (never a lone surrogate)."""
    return st.lists(_piece, max_size=max_pieces).map("".join)


text = texts()
short_text = st.one_of(st.sampled_from(WORDS + SPECIAL_LOOKALIKES + ["", " "]), texts(3))
maybe_text = st.none() | text


# -- JSON values and schemas ---------------------------------------------------------------------------------

SPECIAL_FLOATS = [
    1e-7,
    1e-6,
    1e-5,
    0.00001,
    0.0001,
    1e15,
    1e16,
    1.5e16,
    123456789012345680.0,
    -0.0,
    0.0,
    2.0,
    -1.5,
    0.1,
    1 / 3,
    5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    1e300,
    9007199254740993.0,
    float(2**64),
]
SPECIAL_INTS = [
    0,
    -1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    2**70,
    -(2**70),
    10**30,
]


# Numbers cross the oracle's JSON boundary, where serde_json parses some of them one unit in the last place
# off; harmony.schema.serde_json_number reproduces that, so any number may be generated.
json_floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(allow_nan=False, allow_infinity=False))
json_ints = st.one_of(st.sampled_from(SPECIAL_INTS), st.integers(), st.integers(-(2**80), 2**80))
json_scalars = st.one_of(st.none(), st.booleans(), json_ints, json_floats, short_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(short_text, inner, max_size=4),
    ),
    max_leaves=8,
)

TYPE_NAMES = ["object", "string", "number", "integer", "boolean", "array", "null", "foo", "Object", ""]
type_values = st.one_of(
    st.sampled_from(TYPE_NAMES),
    st.lists(st.one_of(st.sampled_from(TYPE_NAMES), json_scalars), max_size=4),
    json_scalars,
)
multi_line = st.lists(st.one_of(short_text, st.sampled_from(["\n", "\r\n", "\r", "\n\n"])), max_size=6).map(
    "".join
)
# A small pool makes equal descriptions (a property's and its first oneOf variant's) common.
descriptions = st.one_of(st.sampled_from(["same", "", "two\nlines"]), multi_line, json_scalars)
enum_strings = st.one_of(st.sampled_from(["a", "null", "nullish", "x y", '"q"', ""]), short_text)
enums = st.one_of(
    st.lists(enum_strings, max_size=4),  # string enums, sometimes empty
    st.lists(json_scalars, max_size=4),  # mixed
    st.just([]),
    json_scalars,  # not an array at all
)
examples = st.one_of(st.lists(st.one_of(short_text, json_values), max_size=4), json_scalars)
nullables = st.one_of(st.just(True), st.just(False), json_scalars)
property_names = st.one_of(
    st.sampled_from(["location", "unit", "id", "a", "b", "type", "properties", "", "x y", "<|end|>"]),
    short_text,
)
IGNORED_KEYS = ["format", "$ref", "anyOf", "allOf", "const", "minLength", "additionalProperties", "pattern"]

SCHEMA_KEYS = [
    "type",
    "description",
    "title",
    "enum",
    "default",
    "examples",
    "nullable",
    "items",
    "properties",
    "required",
    "oneOf",
    "ignored",
]


def _node(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One schema node whose sub-schemas (items, properties, oneOf variants) are drawn from `children`."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        keys = draw(st.lists(st.sampled_from(SCHEMA_KEYS), unique=True, max_size=7))
        schema: dict[str, Any] = {}
        if draw(st.booleans()):
            # Object-shaped nodes are the interesting ones: make them common.
            schema["type"] = "object"
            keys = [k for k in keys if k != "type"] + ["properties"]
        properties: dict[str, Any] = {}
        for key in dict.fromkeys(keys):
            if key == "type":
                schema["type"] = draw(type_values)
            elif key in ("description", "title"):
                schema[key] = draw(descriptions)
            elif key == "enum":
                schema["enum"] = draw(enums)
            elif key == "default":
                schema["default"] = draw(json_values)
            elif key == "examples":
                schema["examples"] = draw(examples)
            elif key == "nullable":
                schema["nullable"] = draw(nullables)
            elif key == "items":
                schema["items"] = draw(children)
            elif key == "properties":
                properties = draw(st.dictionaries(property_names, children, max_size=4))
                schema["properties"] = properties if draw(st.integers(0, 9)) else draw(json_scalars)
            elif key == "required":
                candidates = [*properties, "missing"] if properties else ["missing"]
                schema["required"] = draw(
                    st.one_of(
                        st.lists(st.one_of(st.sampled_from(candidates), json_scalars), max_size=4),
                        json_scalars,
                    )
                )
            elif key == "oneOf":
                schema["oneOf"] = draw(st.one_of(st.lists(children, max_size=3), json_scalars))
            else:
                schema[draw(st.sampled_from(IGNORED_KEYS))] = draw(json_values)
        return schema

    return build()


NON_DICT_SCHEMAS = [True, False, None, 0, 1.5, "object", [], [{"type": "string"}]]
non_dict_schemas = st.sampled_from(NON_DICT_SCHEMAS)
schemas: st.SearchStrategy[Any] = st.recursive(
    st.one_of(_node(non_dict_schemas), non_dict_schemas),
    lambda children: _node(st.one_of(children, non_dict_schemas)),
    max_leaves=10,
)
# For conversations (the schema test covers schemas in depth): realistic fixed ones, or one generated level.
FIXED_SCHEMAS: list[Any] = [
    {},
    {"type": "object"},
    {"type": "object", "properties": {}},
    {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["location"],
    },
    {
        "type": "object",
        "description": "Search options",
        "properties": {
            "query": {"type": "string", "title": "Query", "examples": ["weather", 3]},
            "filters": {
                "type": "object",
                "nullable": True,
                "properties": {"since": {"type": ["string", "null"], "default": "2024-01-01"}},
            },
            "mode": {"oneOf": [{"type": "string"}, {"type": "integer", "default": 1e16}], "description": "m"},
            "ids": {"type": "array", "items": {"type": "integer"}, "default": [1, 2.5, -0.0, 0.00001]},
        },
        "required": ["query", 7],
    },
    {"oneOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"type": "null"}]},
]
small_schemas: st.SearchStrategy[Any] = st.one_of(st.sampled_from(FIXED_SCHEMAS), _node(non_dict_schemas))


@st.composite
def one_of_properties(draw: st.DrawFn) -> dict[str, Any]:
    """A property holding a oneOf, its description often shared with (some of) its variants."""
    description = draw(descriptions)
    variants = draw(st.lists(schemas, max_size=3))
    for i, variant in enumerate(variants):
        shared = draw(st.integers(0, 2)) == 0 if i else draw(st.booleans())
        if isinstance(variant, dict) and shared:
            variants[i] = {**variant, "description": description}
    prop: dict[str, Any] = {"oneOf": variants}
    if draw(st.integers(0, 3)):
        prop["description"] = description
    for key, values in (
        ("default", json_values),
        ("title", descriptions),
        ("examples", examples),
        ("nullable", nullables),
        ("enum", enums),
        ("type", type_values),
    ):
        if draw(st.integers(0, 3)) == 0:
            prop[key] = draw(values)
    return prop


def top_level_schemas() -> st.SearchStrategy[Any]:
    """What a tool's `parameters` may hold: mostly objects, sometimes a oneOf, sometimes not a dict at all."""
    return st.one_of(
        schemas,
        st.builds(
            lambda props, req, desc: {"type": "object", "properties": props, "required": req, **desc},
            st.dictionaries(property_names, st.one_of(schemas, one_of_properties()), max_size=5),
            st.lists(st.one_of(property_names, json_scalars), max_size=3),
            st.one_of(st.just({}), st.builds(lambda d: {"description": d}, descriptions)),
        ),
        st.builds(lambda variants: {"oneOf": variants}, st.lists(schemas, max_size=4)),
        non_dict_schemas,
    )


# -- messages ------------------------------------------------------------------------------------------------

CHANNELS = ["analysis", "commentary", "final", ""]
channel_names = st.one_of(st.sampled_from(CHANNELS), short_text)
tool_names = st.one_of(st.sampled_from(["get_weather", "lookup", "f", "search", "x_1"]), short_text)
tool_author_names = st.one_of(
    st.builds(lambda n: f"functions.{n}", tool_names),
    st.sampled_from(["python", "browser.search", "browser.open", "tool", "functions"]),
    short_text,
)
recipients = st.one_of(
    st.none(),
    st.just("all"),
    st.builds(lambda n: f"functions.{n}", tool_names),
    st.sampled_from(["python", "browser.search", "assistant", "user", "functions", ""]),
    short_text,
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(["<|constrain|>json", "json", "code", "<|constrain|>", "<|constrain|> json", "", " "]),
    st.builds(lambda rest: "<|constrain|>" + rest, short_text),
    short_text,
)
dates = st.one_of(st.none(), st.sampled_from(["2024-06", "2025-06-28", "2021-01-01", ""]), short_text)

line_texts = st.one_of(st.just(""), multi_line, text)
maybe_line_texts = st.none() | multi_line | text

tool_descriptions = st.builds(
    ToolDescription,
    tool_names,
    line_texts,
    st.one_of(st.none(), small_schemas),
)


def namespaces(*, function_tools: bool) -> st.SearchStrategy[dict[str, ToolNamespaceConfig]]:
    """A tools dict: optionally a `functions` namespace, plus other namespaces with or without tools."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, ToolNamespaceConfig]:
        result: dict[str, ToolNamespaceConfig] = {}
        if function_tools and draw(st.integers(0, 3)):
            result["functions"] = ToolNamespaceConfig(
                "functions", draw(maybe_line_texts), draw(st.lists(tool_descriptions, max_size=3))
            )
        for _ in range(draw(st.integers(0, 2))):
            name = draw(
                st.one_of(st.sampled_from(["browser", "python", "zeta", "alpha", "Beta", "ß"]), short_text)
            )
            key = name if draw(st.integers(0, 4)) else draw(short_text)  # the key usually equals the name
            result[key] = ToolNamespaceConfig(
                name, draw(maybe_line_texts), draw(st.lists(tool_descriptions, max_size=2))
            )
        return result

    return build()


@st.composite
def system_contents(draw: st.DrawFn) -> SystemContent:
    tools = draw(
        st.one_of(
            st.none(),
            st.just({}),
            st.sampled_from(
                [
                    {"browser": browser_tool_namespace()},
                    {"python": python_tool_namespace()},
                    {"python": python_tool_namespace(), "browser": browser_tool_namespace()},
                ]
            ),
            namespaces(function_tools=True),  # functions in the system message do not set the flag
        )
    )
    channel_config = draw(
        st.one_of(
            st.none(),
            st.just(ChannelConfig()),
            st.builds(ChannelConfig, st.lists(channel_names, max_size=4), st.booleans()),
        )
    )
    return SystemContent(
        model_identity=draw(st.one_of(st.just(SystemContent().model_identity), maybe_text)),
        reasoning_effort=draw(st.one_of(st.none(), st.sampled_from(ReasoningEffort))),
        knowledge_cutoff=draw(dates),
        conversation_start_date=draw(dates),
        channel_config=channel_config,
        tools=tools,
    )


developer_contents = st.builds(
    DeveloperContent,
    instructions=maybe_text,
    tools=st.one_of(st.none(), st.just({}), namespaces(function_tools=True)),
)


def _contents(first: st.SearchStrategy[Content]) -> st.SearchStrategy[list[Content]]:
    """Usually the one content item; sometimes followed by extra text items, sometimes no content at all."""
    return st.one_of(
        first.map(lambda c: [c]),
        st.builds(
            lambda c, extra: [c, *extra], first, st.lists(text.map(TextContent), min_size=1, max_size=2)
        ),
        st.just([]),
    )


text_content = text.map(TextContent)
optional_name = st.one_of(st.none(), short_text)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    role = draw(st.sampled_from(Role))
    if role is Role.SYSTEM:
        return Message(Author(role, draw(st.none() | short_text)), draw(_contents(system_contents())))
    if role is Role.DEVELOPER:
        return Message(Author(role), draw(_contents(st.one_of(developer_contents, text_content))))
    if role is Role.USER:
        return Message(
            Author(role, draw(optional_name)),
            draw(_contents(text_content)),
            channel=draw(st.one_of(st.none(), st.none(), channel_names)),
            recipient=draw(st.one_of(st.none(), recipients)),
        )
    if role is Role.ASSISTANT:
        return Message(
            Author(role, draw(st.one_of(st.none(), st.none(), short_text))),
            draw(_contents(text_content)),
            channel=draw(st.one_of(st.sampled_from([*CHANNELS, None]), channel_names)),
            recipient=draw(recipients),
            content_type=draw(content_types),
        )
    return Message(
        Author(Role.TOOL, draw(tool_author_names)),
        draw(_contents(text_content)),
        channel=draw(st.one_of(st.none(), channel_names)),
        recipient=draw(st.one_of(st.none(), recipients)),
        content_type=draw(st.one_of(st.none(), content_types)),
    )


@st.composite
def conversations(draw: st.DrawFn) -> list[Message]:
    """A system and developer prefix (each optional), then a random mix of messages of every role."""
    prefix: list[Message] = []
    if draw(st.booleans()):
        prefix.append(Message(Author(Role.SYSTEM), [draw(system_contents())]))
    if draw(st.booleans()):
        prefix.append(Message(Author(Role.DEVELOPER), [draw(developer_contents)]))
    return prefix + draw(st.lists(messages(), max_size=6))
