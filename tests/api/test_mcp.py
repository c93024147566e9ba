"""Remote MCP servers as tools, through the real app and engine: a small MCP server (the `mcp` library's own
server side, streamable HTTP) runs on loopback, which the app may reach only through its test allowlist
(`mcp_allow`); the model (forced, one script per engine request of the tool loop) calls its tools."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import openai_harmony as oh
import pytest
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from openai.types.responses import Response, ResponseStreamEvent

from server.app import create_app
from server.mcp_tools import McpServerSpec, McpTools, _tool_problem
from server.protocol import ResponsesTool
from server.settings import ServerSettings
from tests.api.conftest import MODEL, Served, _hook, recorded_prompts, serve_in_thread, tiny_engine
from tests.api.test_builtin_tools import EVENT, checked, client_for
from tools.mcp_client import GuardedNetwork, McpConnector, McpFailure, McpPolicy, McpTool

# The notes `remember` was called with, in order (the MCP server runs on a thread of this process).
REMEMBERED: list[str] = []


def mcp_server() -> MCPServer:
    server = MCPServer("calc")

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def remember(note: str) -> str:
        """Store a note (changes the server's state)."""
        REMEMBERED.append(note)
        return f"stored: {note}"

    @server.tool()
    def explode(reason: str) -> str:
        """Always fails."""
        raise ValueError(f"exploded: {reason}")

    @server.tool(name="two words")
    def badly_named() -> str:
        """A name no harmony recipient can hold: left out of the listing, saying so."""
        return "never"

    @server.tool()
    async def slow() -> str:
        """Takes its time."""
        await asyncio.sleep(3)
        return "finally"

    return server


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    # The server's own DNS-rebinding check admits loopback and the name one test reaches it by.
    hosts = ["127.0.0.1:*", "mcp.invalid:*"]
    app = mcp_server().streamable_http_app(transport_security=TransportSecuritySettings(allowed_hosts=hosts))
    with serve_in_thread(app) as base:
        yield base + "/mcp"


@pytest.fixture(scope="module")
def mcp_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The app allowed to reach loopback MCP servers (the deployment allowlist, as an intranet would use)."""
    engine, encoding = tiny_engine(tmp_path_factory.mktemp("mcp-model"), max_model_len=8192)
    settings = ServerSettings(
        served_model_name=MODEL,
        conversation_date="2026-11-27",
        mcp_allow=["127.0.0.0/8"],
        mcp_timeout=10.0,
        max_builtin_tool_calls=4,
    )
    app = create_app(engine, settings, encoding=encoding, processors_hook=_hook(encoding))
    with serve_in_thread(app) as base:
        yield Served(base, engine, encoding, app)


def mcp_tool(url: str, **fields: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": "calc", "server_url": url, "require_approval": "never", **fields}


def call(tool: str, arguments: str) -> str:
    """The model's call to an MCP tool, as it writes it after `<|start|>assistant`."""
    return f" to=calc.{tool}<|channel|>commentary <|constrain|>json<|message|>{arguments}<|call|>"


def final(text: str) -> str:
    return f"<|channel|>final<|message|>{text}<|return|>"


def create(served: Served, scripts: list[str], tools: list[dict[str, Any]], **fields: Any) -> Response:
    fields.setdefault("input", "add 2 and 3")
    return client_for(served).responses.create(
        model=MODEL, tools=tools, extra_body={"test_force": scripts}, **fields
    )


def test_tools_are_listed_declared_and_called(
    mcp_app: Served, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = recorded_prompts(mcp_app, monkeypatch)
    response = checked(
        create(mcp_app, [call("add", '{"a": 2, "b": 3}'), final("It is 5.")], [mcp_tool(mcp_url)])
    )
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["mcp_list_tools", "mcp_call", "message"]
    listed, called = response.output[0], response.output[1]
    assert listed.server_label == "calc"
    assert {tool.name for tool in listed.tools} == {"add", "remember", "explode", "slow"}
    assert listed.error == (
        "tools left out, unusable: two words: the name is not 1 to 128 letters, digits, '_', '.' or '-'"
    )
    add = next(tool for tool in listed.tools if tool.name == "add")
    assert add.annotations["readOnlyHint"] is True
    assert called.name == "add"
    assert called.server_label == "calc"
    assert json.loads(called.arguments) == {"a": 2, "b": 3}
    assert called.output == "5"
    assert called.error is None
    assert called.status == "completed"
    assert response.output_text == "It is 5."
    # The system message declares the server as a namespace; the model read the call and its result as
    # harmony renders them, and the second prompt extends the first.
    first, second = prompts
    system = mcp_app.encoding.decode(first)
    assert "# Tools\n\n## calc\n\nnamespace calc {\n\n// Add two integers.\ntype add = (_: {\n" in system
    assert "// Always fails.\ntype explode = (_: {\n// Reason\n//\nreason: string,\n}) => any;" in system
    assert second[: len(first)] == first
    assert mcp_app.encoding.decode(second[len(first) :]) == (
        call("add", '{"a": 2, "b": 3}')
        + "<|start|>calc.add to=assistant<|channel|>commentary<|message|>5<|end|><|start|>assistant"
    )
    assert response.tools[0].type == "mcp"
    assert "headers" not in response.tools[0].model_dump(exclude_none=True)


def test_the_sdk_events_in_order(mcp_app: Served, mcp_url: str) -> None:
    with client_for(mcp_app).responses.stream(
        model=MODEL,
        input="add",
        tools=[mcp_tool(mcp_url)],
        extra_body={"test_force": [call("add", '{"a": 40, "b": 2}'), final("42")]},
    ) as stream:
        events: list[ResponseStreamEvent] = list(stream)
    for event in events:
        assert EVENT.validate_python(event.model_dump(warnings=False)).type == event.type
    kinds = [e.type for e in events if "mcp" in e.type or e.type.startswith("response.output_item")]
    assert kinds[:4] == [
        "response.output_item.added",
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.output_item.done",
    ]
    mcp = kinds[4:-2]
    assert mcp[:2] == ["response.output_item.added", "response.mcp_call.in_progress"]
    assert set(mcp[2:-3]) == {"response.mcp_call_arguments.delta"}
    assert mcp[-3:] == [
        "response.mcp_call_arguments.done",
        "response.mcp_call.completed",
        "response.output_item.done",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.mcp_call_arguments.delta")
    assert json.loads(deltas) == {"a": 40, "b": 2}
    final_response = events[-1].response
    assert [item.type for item in final_response.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert final_response.output[1].output == "42"


def test_approval_is_asked_then_the_call_runs_when_approved(
    mcp_app: Served, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = [mcp_tool(mcp_url, require_approval="always")]
    asked = checked(create(mcp_app, [call("remember", '{"note": "milk"}')], tools))
    assert asked.status == "completed"
    assert [item.type for item in asked.output] == ["mcp_list_tools", "mcp_approval_request"]
    request = asked.output[1]
    assert (request.server_label, request.name) == ("calc", "remember")
    assert json.loads(request.arguments) == {"note": "milk"}

    prompts = recorded_prompts(mcp_app, monkeypatch)
    approval = {"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}
    approved = checked(
        create(mcp_app, [final("Noted.")], tools, input=[approval], previous_response_id=asked.id)
    )
    # The chain's listing is used again (no new mcp_list_tools item), the approved call ran first.
    assert [item.type for item in approved.output] == ["mcp_call", "message"]
    ran = approved.output[0]
    assert ran.approval_request_id == request.id
    assert ran.output == "stored: milk"
    assert ran.status == "completed"
    assert mcp_app.encoding.decode(prompts[0]).endswith(
        '<|start|>assistant to=calc.remember<|channel|>commentary <|constrain|>json<|message|>{"note": "milk"}'
        "<|call|><|start|>calc.remember to=assistant<|channel|>commentary<|message|>stored: milk<|end|>"
        "<|start|>assistant"
    )
    # An approval request is answered once.
    with pytest.raises(openai.BadRequestError) as caught:
        create(mcp_app, [final("again")], tools, input=[approval], previous_response_id=approved.id)
    assert caught.value.body["param"] == "input[0].approval_request_id"


def test_a_refused_approval_runs_nothing_and_the_model_is_told(
    mcp_app: Served, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = [mcp_tool(mcp_url, require_approval="always")]
    asked = create(mcp_app, [call("remember", '{"note": "x"}')], tools)
    prompts = recorded_prompts(mcp_app, monkeypatch)
    refusal = {
        "type": "mcp_approval_response",
        "approval_request_id": asked.output[1].id,
        "approve": False,
        "reason": "not today",
    }
    answer = create(mcp_app, [final("OK.")], tools, input=[refusal], previous_response_id=asked.id)
    assert [item.type for item in answer.output] == ["message"]
    assert mcp_app.encoding.decode(prompts[0]).endswith(
        "<|message|>The user did not approve this call. Reason: not today<|end|><|start|>assistant"
    )


def test_the_approval_filter_and_allowed_tools(mcp_app: Served, mcp_url: str) -> None:
    # Read-only tools run without asking; the others ask. Only the allowed tools are listed and callable.
    tools = [
        mcp_tool(
            mcp_url,
            require_approval={"never": {"read_only": True}},
            allowed_tools=["add", "remember"],
        )
    ]
    response = checked(
        create(
            mcp_app,
            [call("add", '{"a": 1, "b": 1}'), call("explode", '{"reason": "x"}'), call("remember", "{}")],
            tools,
        )
    )
    assert [item.type for item in response.output] == [
        "mcp_list_tools",
        "mcp_call",
        "mcp_call",
        "mcp_approval_request",
    ]
    assert {tool.name for tool in response.output[0].tools} == {"add", "remember"}
    assert response.output[1].output == "2"
    refused = response.output[2]
    assert refused.name == "explode"
    assert refused.status == "failed"
    assert refused.error.type == "mcp_protocol_error"
    assert response.output[3].name == "remember"


def test_tool_errors_and_bad_arguments_are_failed_items_and_the_turn_goes_on(
    mcp_app: Served, mcp_url: str
) -> None:
    response = checked(
        create(
            mcp_app,
            [call("explode", '{"reason": "test"}'), call("add", "not json"), final("Both failed.")],
            [mcp_tool(mcp_url)],
        )
    )
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["mcp_list_tools", "mcp_call", "mcp_call", "message"]
    failed, bad = response.output[1], response.output[2]
    assert failed.status == "failed"
    assert failed.error.type == "mcp_tool_execution_error"
    assert "explode" in failed.output
    assert bad.status == "failed"
    assert bad.error.type == "mcp_protocol_error"
    assert bad.error.message == "the arguments are not a JSON object"
    assert response.output_text == "Both failed."


def test_an_unreachable_server_is_a_424_naming_the_field(mcp_app: Served) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        create(mcp_app, [final("x")], [mcp_tool("http://127.0.0.1:9/mcp")])
    assert caught.value.status_code == 424
    assert caught.value.body["type"] == "external_connector_error"
    assert caught.value.body["param"] == "tools[0].server_url"
    assert "calc" in caught.value.body["message"]


def test_without_the_allowlist_a_loopback_server_is_refused(served: Served, mcp_url: str) -> None:
    """The plain app (no `mcp_allow`): the guard refuses the loopback server before anything is sent."""
    with pytest.raises(openai.BadRequestError) as caught:
        create(served, [final("x")], [mcp_tool(mcp_url)])
    assert caught.value.body["param"] == "tools[0].server_url"
    assert "not a public address (loopback)" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("tool", "param"),
    [
        ({"type": "mcp", "server_url": "http://x/"}, "tools[0].server_label"),
        ({"type": "mcp", "server_label": "python", "server_url": "http://x/"}, "tools[0].server_label"),
        ({"type": "mcp", "server_label": "calc"}, "tools[0].server_url"),
        ({"type": "mcp", "server_label": "calc", "server_url": "ftp://x/"}, "tools[0].server_url"),
        ({"type": "mcp", "server_label": "calc", "server_url": "http://u:p@x/"}, "tools[0].server_url"),
        (
            {
                "type": "mcp",
                "server_label": "calc",
                "server_url": "http://x/",
                "require_approval": "sometimes",
            },
            "tools[0].require_approval",
        ),
    ],
)
def test_bad_mcp_tools_are_400s_naming_the_field(served: Served, tool: dict[str, Any], param: str) -> None:
    response = httpx.post(
        served.base_url + "/v1/responses", json={"model": MODEL, "input": "hi", "tools": [tool]}, timeout=30
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_an_approval_for_no_known_request_is_a_400(mcp_app: Served, mcp_url: str) -> None:
    approval = {"type": "mcp_approval_response", "approval_request_id": "mcpr_nope", "approve": True}
    with pytest.raises(openai.BadRequestError) as caught:
        create(mcp_app, [final("x")], [mcp_tool(mcp_url)], input=[approval])
    assert caught.value.body["param"] == "input[0].approval_request_id"


# -- the guard and the pieces, without the app ---------------------------------------------------------------


def test_the_guard_refuses_private_and_metadata_addresses_and_names_resolving_to_them() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return {"intranet.example": ["10.1.2.3"], "mixed.example": ["93.184.216.34", "::1"]}.get(
            host, ["93.184.216.34"]
        )

    network = GuardedNetwork(McpPolicy(), resolver)

    async def refused(host: str, port: int = 443) -> str:
        with pytest.raises(McpFailure) as caught:
            await network.vetted(host, port)
        assert caught.value.kind == "refused"
        return caught.value.message

    async def main() -> None:
        assert "loopback" in await refused("127.0.0.1")
        assert "not a public address" in await refused("::1")
        assert "link-local" in await refused("169.254.169.254")
        assert "private" in await refused("10.0.0.1")
        assert "private" in await refused("intranet.example")
        assert "not a public address" in await refused("mixed.example")
        assert "non-canonical" in await refused("2130706433")
        assert "port 8080" in await refused("public.example", 8080)
        assert await network.vetted("public.example", 443) == [ipaddress.ip_address("93.184.216.34")]
        allowed = GuardedNetwork(McpPolicy(allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),)), resolver)
        assert await allowed.vetted("intranet.example", 8080) == [ipaddress.ip_address("10.1.2.3")]

    asyncio.run(main())


def test_a_tool_whose_name_or_schema_cannot_be_shown_is_said_so() -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"x": deep}}
    assert _tool_problem(McpTool("deep", "", deep)) is not None
    assert _tool_problem(McpTool("list", "", {"type": "array"})) is not None
    assert _tool_problem(McpTool("new\nline", "", {"type": "object"})) is not None
    assert (
        _tool_problem(McpTool("ok", "", {"type": "object", "properties": {"a": {"type": "string"}}})) is None
    )


def test_the_approval_rules() -> None:
    settings = ServerSettings()
    tools = McpTools(settings, McpConnector())
    read, write = McpTool("r", "", {}, {"readOnlyHint": True}), McpTool("w", "", {})

    def spec(**fields: Any) -> McpServerSpec:
        tool = ResponsesTool.model_validate(
            {"type": "mcp", "server_label": "s", "server_url": "https://mcp.example/", **fields}
        )
        return tools.specs([tool])[0]

    assert spec().needs_approval(read)  # OpenAI's default: always ask
    assert not spec(require_approval="never").needs_approval(write)
    by_name = spec(require_approval={"never": {"tool_names": ["w"]}})
    assert not by_name.needs_approval(write)
    assert by_name.needs_approval(read)
    always = spec(require_approval={"always": {"tool_names": ["r"]}, "never": {"read_only": True}})
    assert always.needs_approval(read)
    assert not spec(allowed_tools={"read_only": True}).allows(write)
    assert spec(allowed_tools={"read_only": True}).allows(read)


def test_a_name_connects_to_the_address_the_guard_vetted(mcp_url: str) -> None:
    """The URL's host is resolved by the guard (here a test resolver: no DNS), and the socket goes to that
    address; the allowlist admits it, so the listing works under the name."""
    port = urlsplit(mcp_url).port
    resolved: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    connector = McpConnector(McpPolicy(allowed_networks=loopback), resolver=resolver)
    tools = asyncio.run(connector.list_tools(f"http://mcp.invalid:{port}/mcp", {}))
    assert "add" in {tool.name for tool in tools}
    assert set(resolved) == {"mcp.invalid"}


def test_a_call_past_the_time_limit_is_a_504_error(mcp_url: str) -> None:
    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    connector = McpConnector(McpPolicy(allowed_networks=loopback, timeout_s=1.0))
    started = time.monotonic()
    with pytest.raises(McpFailure) as caught:
        asyncio.run(connector.call_tool(mcp_url, {}, "slow", {}))
    assert time.monotonic() - started < 2.5
    assert (caught.value.kind, caught.value.code) == ("http_error", 504)
    assert caught.value.as_item_error()["type"] == "http_error"


def test_an_approval_answered_twice_in_one_request_runs_nothing(mcp_app: Served, mcp_url: str) -> None:
    tools = [mcp_tool(mcp_url, require_approval="always")]
    asked = create(mcp_app, [call("remember", '{"note": "twice"}')], tools)
    approval = {"type": "mcp_approval_response", "approval_request_id": asked.output[1].id, "approve": True}
    with pytest.raises(openai.BadRequestError) as caught:
        create(mcp_app, [final("x")], tools, input=[approval, approval], previous_response_id=asked.id)
    assert caught.value.body["param"] == "input[1].approval_request_id"
    assert "twice" not in REMEMBERED
    with pytest.raises(openai.NotFoundError) as missing:
        create(mcp_app, [final("x")], tools, input=[approval], previous_response_id="resp_gone")
    assert missing.value.body["param"] == "previous_response_id"


def test_an_answer_past_the_size_cap_is_an_error(mcp_url: str) -> None:
    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    connector = McpConnector(McpPolicy(allowed_networks=loopback, max_response_bytes=2000))
    with pytest.raises(McpFailure) as caught:
        asyncio.run(connector.call_tool(mcp_url, {}, "remember", {"note": "x" * 5000}))
    assert (caught.value.kind, caught.value.code) == ("http_error", 502)
    assert "larger than 2000 bytes" in caught.value.message


# -- earlier turns' MCP calls in later prompts -------------------------------------------------------------


def official_prompt(listed: Any, turns: list[Any]) -> list[int]:
    """openai-harmony's prompt for a conversation with the `calc` server's listed tools declared as a
    namespace (as the server declares them), `turns` its messages after the system message."""
    tools = [oh.ToolDescription.new(t.name, t.description, parameters=t.input_schema) for t in listed.tools]
    system = (
        oh.SystemContent.new()
        .with_conversation_start_date("2026-11-27")
        .with_tools(oh.ToolNamespaceConfig(name="calc", description=None, tools=tools))
    )
    conversation = oh.Conversation.from_messages(
        [oh.Message.from_role_and_content(oh.Role.SYSTEM, system), *turns]
    )
    official = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    return official.render_conversation_for_completion(conversation, oh.Role.ASSISTANT)


def official_call(tool: str, arguments: str, result: str) -> list[Any]:
    """An MCP call and the tool's answer as harmony renders them: both on the commentary channel."""
    recipient = f"calc.{tool}"
    sent = oh.Message.from_role_and_content(oh.Role.ASSISTANT, arguments)
    read = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, recipient), result)
    return [
        sent.with_channel("commentary").with_recipient(recipient).with_content_type("<|constrain|>json"),
        read.with_channel("commentary").with_recipient("assistant"),
    ]


def user(text: str) -> Any:
    return oh.Message.from_role_and_content(oh.Role.USER, text)


def answered(text: str) -> Any:
    return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel("final")


def test_a_chain_shows_earlier_mcp_calls_and_approved_ones_once_as_harmony_renders_them(
    mcp_app: Served, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turn 1 calls a tool that needs no approval; turn 2 asks for one that does, turn 3 approves it, and
    turn 4's prompt is openai-harmony's rendering of the whole conversation: each call and its answer once,
    where it was made (turn 3's prompt already ended with the approved call)."""
    tools = [mcp_tool(mcp_url, require_approval={"never": {"read_only": True}})]
    prompts = recorded_prompts(mcp_app, monkeypatch)
    first = checked(create(mcp_app, [call("add", '{"a": 2, "b": 3}'), final("It is 5.")], tools))
    listed = first.output[0]
    asked = checked(
        create(
            mcp_app,
            [call("remember", '{"note": "bread"}')],
            tools,
            input="Remember bread",
            previous_response_id=first.id,
        )
    )
    assert [item.type for item in asked.output] == ["mcp_approval_request"]
    approval = {"type": "mcp_approval_response", "approval_request_id": asked.output[0].id, "approve": True}
    approved = checked(
        create(mcp_app, [final("Noted.")], tools, input=[approval], previous_response_id=asked.id)
    )
    assert [item.type for item in approved.output] == ["mcp_call", "message"]
    last = checked(create(mcp_app, [final("Both.")], tools, input="And?", previous_response_id=approved.id))
    assert last.output_text == "Both."
    added = [user("add 2 and 3"), *official_call("add", '{"a": 2, "b": 3}', "5"), answered("It is 5.")]
    remembered = [user("Remember bread"), *official_call("remember", '{"note": "bread"}', "stored: bread")]
    assert prompts[-2] == official_prompt(listed, [*added, *remembered])
    assert prompts[-1] == official_prompt(listed, [*added, *remembered, answered("Noted."), user("And?")])
    shown = mcp_app.encoding.decode(prompts[-1])
    assert shown.count('{"note": "bread"}<|call|>') == 1
    assert shown.count("stored: bread") == 1
    assert REMEMBERED.count("bread") == 1


def test_a_refused_call_is_shown_once_in_later_turns(
    mcp_app: Served, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = [mcp_tool(mcp_url, require_approval="always")]
    asked = checked(create(mcp_app, [call("remember", '{"note": "eggs"}')], tools, input="Remember eggs"))
    listed = asked.output[0]
    refusal = {
        "type": "mcp_approval_response",
        "approval_request_id": asked.output[1].id,
        "approve": False,
        "reason": "not today",
    }
    refused = checked(create(mcp_app, [final("OK.")], tools, input=[refusal], previous_response_id=asked.id))
    prompts = recorded_prompts(mcp_app, monkeypatch)
    checked(create(mcp_app, [final("Fine.")], tools, input="Why?", previous_response_id=refused.id))
    told = "The user did not approve this call. Reason: not today"
    expected = official_prompt(
        listed,
        [
            user("Remember eggs"),
            *official_call("remember", '{"note": "eggs"}', told),
            answered("OK."),
            user("Why?"),
        ],
    )
    assert prompts[0] == expected
    assert "eggs" not in REMEMBERED


def test_mcp_calls_a_client_sends_back_are_shown_from_their_arguments_and_output(
    mcp_app: Served, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = [mcp_tool(mcp_url)]
    ran = checked(
        create(
            mcp_app,
            [
                call("add", '{"a": 4, "b": 5}'),
                call("explode", '{"reason": "why"}'),
                final("9, and a failure."),
            ],
            tools,
            store=False,
        )
    )
    listed, added, exploded = ran.output[0], ran.output[1], ran.output[2]
    assert exploded.status == "failed"
    history = [
        {"role": "user", "content": "add 2 and 3"},
        *[item.model_dump(exclude_none=True) for item in ran.output],
        {"role": "user", "content": "And?"},
    ]
    prompts = recorded_prompts(mcp_app, monkeypatch)
    checked(create(mcp_app, [final("Done.")], tools, input=history, store=False))
    expected = official_prompt(
        listed,
        [
            user("add 2 and 3"),
            *official_call("add", '{"a": 4, "b": 5}', added.output),
            *official_call("explode", '{"reason": "why"}', f"The tool failed: {exploded.output}"),
            answered("9, and a failure."),
            user("And?"),
        ],
    )
    assert added.output == "9"
    assert prompts[0] == expected


def test_calls_answered_together_keep_their_order_in_later_turns(
    mcp_app: Served, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two approval requests answered in one request, the first approved and the second refused: a later
    turn shows them in that order, as the answering turn's prompt had them (not the refusal first because
    it has no `mcp_call` item)."""
    tools = [mcp_tool(mcp_url, require_approval="always")]
    first = checked(create(mcp_app, [call("remember", '{"note": "A"}')], tools, input="Remember A"))
    listed = first.output[0]
    second = checked(
        create(
            mcp_app,
            [call("remember", '{"note": "B"}')],
            tools,
            input="Also B",
            previous_response_id=first.id,
        )
    )
    answers = [
        {"type": "mcp_approval_response", "approval_request_id": first.output[1].id, "approve": True},
        {"type": "mcp_approval_response", "approval_request_id": second.output[0].id, "approve": False},
    ]
    prompts = recorded_prompts(mcp_app, monkeypatch)
    done = checked(create(mcp_app, [final("Done.")], tools, input=answers, previous_response_id=second.id))
    assert [item.type for item in done.output] == ["mcp_call", "message"]
    checked(create(mcp_app, [final("So.")], tools, input="And?", previous_response_id=done.id))
    conversation = [
        user("Remember A"),
        user("Also B"),
        *official_call("remember", '{"note": "A"}', "stored: A"),
        *official_call("remember", '{"note": "B"}', "The user did not approve this call."),
    ]
    assert prompts[0] == official_prompt(listed, conversation)
    assert prompts[1] == official_prompt(listed, [*conversation, answered("Done."), user("And?")])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"extra_body": {"logit_bias": {"not a token": 1}}}, "logit_bias"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"tool_choice": {"type": "function", "name": "missing"}}, "tool_choice"),
    ],
)
def test_a_refused_request_runs_no_approved_call(
    mcp_app: Served, mcp_url: str, fields: dict[str, Any], param: str
) -> None:
    """Every check that can refuse the request comes before the calls it approves run: the server records
    nothing for a refused one, and the approval can still be given by a correct request."""
    tools = [mcp_tool(mcp_url, require_approval="always")]
    note = f"refused {param}"
    asked = checked(create(mcp_app, [call("remember", json.dumps({"note": note}))], tools))
    approval = {"type": "mcp_approval_response", "approval_request_id": asked.output[1].id, "approve": True}
    body = {**fields.pop("extra_body", {}), "test_force": [final("Noted.")]}
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(mcp_app).responses.create(
            model=MODEL,
            tools=tools,
            input=[approval],
            previous_response_id=asked.id,
            extra_body=body,
            **fields,
        )
    assert caught.value.body["param"] == param
    assert note not in REMEMBERED
    approved = checked(
        create(mcp_app, [final("Noted.")], tools, input=[approval], previous_response_id=asked.id)
    )
    assert approved.output[0].output == f"stored: {note}"
    assert REMEMBERED.count(note) == 1


def test_an_approved_answer_that_fills_the_context_ends_the_response_incomplete(
    tmp_path: Path, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks count the approved call but not its answer (not known until it has run): an answer that
    leaves no room is not a refusal after the fact but a response that ends at once, as the tool loop's."""
    engine, encoding = tiny_engine(tmp_path, max_model_len=1024)
    settings = ServerSettings(
        served_model_name=MODEL, conversation_date="2026-11-27", mcp_allow=["127.0.0.0/8"], mcp_timeout=10.0
    )
    app = create_app(engine, settings, encoding=encoding, processors_hook=_hook(encoding))
    with serve_in_thread(app) as base:
        served = Served(base, engine, encoding, app)
        tools = [mcp_tool(mcp_url, require_approval="always", allowed_tools=["remember"])]
        note = " ".join(["overflow"] * 600)
        asked = checked(create(served, [call("remember", json.dumps({"note": note}))], tools))
        approval = {
            "type": "mcp_approval_response",
            "approval_request_id": asked.output[1].id,
            "approve": True,
        }
        prompts = recorded_prompts(served, monkeypatch)
        ended = checked(create(served, [final("x")], tools, input=[approval], previous_response_id=asked.id))
    assert prompts == []  # nothing left to generate
    assert ended.status == "incomplete"
    assert ended.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in ended.output] == ["mcp_call"]
    assert ended.output[0].output == f"stored: {note}"


def test_a_tool_choice_naming_an_mcp_server_or_tool_forces_that_call(mcp_app: Served, mcp_url: str) -> None:
    reasoning = "<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant"
    choice = {"type": "mcp", "server_label": "calc", "name": "add"}
    response = checked(
        create(
            mcp_app,
            [reasoning + call("add", '{"a": 2, "b": 3}'), final("It is 5.")],
            [mcp_tool(mcp_url)],
            tool_choice=choice,
        )
    )
    assert [item.type for item in response.output] == ["mcp_list_tools", "reasoning", "mcp_call", "message"]
    assert response.output[2].output == "5"
    assert response.tool_choice.model_dump(exclude_none=True) == choice
    # The choice is held by the turn's grammar: an answer without the call, or a call to another of the
    # server's tools than the one named, cannot be sampled.
    for script in ([final("No call.")], [call("remember", '{"note": "x"}')]):
        with pytest.raises(openai.InternalServerError, match="no token can be sampled"):
            create(mcp_app, script, [mcp_tool(mcp_url)], tool_choice=choice)
    # Naming the server alone forces a call to any of its tools.
    response = checked(
        create(
            mcp_app,
            [call("remember", '{"note": "forced"}'), final("Stored.")],
            [mcp_tool(mcp_url)],
            tool_choice={"type": "mcp", "server_label": "calc"},
        )
    )
    assert [item.type for item in response.output] == ["mcp_list_tools", "mcp_call", "message"]


def test_a_tool_choice_naming_an_mcp_server_not_among_the_tools_is_a_400(
    mcp_app: Served, mcp_url: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        create(
            mcp_app,
            [final("x")],
            [mcp_tool(mcp_url)],
            tool_choice={"type": "mcp", "server_label": "other"},
        )
    assert raised.value.body["param"] == "tool_choice.server_label"


def test_allowed_tools_may_list_an_mcp_server_or_tool(mcp_app: Served, mcp_url: str) -> None:
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "mcp", "server_label": "calc", "name": "add"}],
    }
    response = checked(
        create(
            mcp_app, [call("add", '{"a": 1, "b": 1}'), final("2.")], [mcp_tool(mcp_url)], tool_choice=choice
        )
    )
    assert [item.type for item in response.output] == ["mcp_list_tools", "mcp_call", "message"]
    for script in ([final("No call.")], [call("remember", '{"note": "x"}')]):
        with pytest.raises(openai.InternalServerError, match="no token can be sampled"):
            create(mcp_app, script, [mcp_tool(mcp_url)], tool_choice=choice)
    unknown = {**choice, "tools": [{"type": "mcp", "server_label": "nope"}]}
    with pytest.raises(openai.BadRequestError) as raised:
        create(mcp_app, [final("x")], [mcp_tool(mcp_url)], tool_choice=unknown)
    assert raised.value.body["param"] == "tool_choice.tools[0].server_label"
