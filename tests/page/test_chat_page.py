"""The chat page, used in headless Chromium as a person would: it streams, stops, continues, and stays safe."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route

from tests.page.conftest import KEY, PageServer, metrics_value

TIMEOUT_MS = 60_000
REASONING = "The user greets me. I should greet them back and show a tiny example of code."
ANSWER = (
    "Hello! Here is **a small example** in Python:\n\n"
    '```python\nprint("hello from gpt-oss")\n```\n\n'
    "See the [docs](https://example.com/docs) for more."
)


def harmony(answer: str, reasoning: str | None = None) -> str:
    analysis = f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant" if reasoning else ""
    return f"{analysis}<|channel|>final<|message|>{answer}<|return|>"


@pytest.fixture
def page(browser: Browser, page_server: PageServer, request: pytest.FixtureRequest) -> Iterator[Page]:
    """The chat page, opened and given the API key through its own field, with its models loaded."""
    options: dict[str, Any] = getattr(request, "param", {})
    context = browser.new_context(**options)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(page_server.base_url + "/")
    # Without the key the model list is refused: the page says so and opens its settings for the key.
    page.wait_for_selector("#settings[open]")
    assert "API key" in page.inner_text("#notice")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # `change`: the key is stored and the models fetched
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert page.input_value("#model") == "gpt-oss-test"
    page.wait_for_selector("#settings:not([open])")  # opened to ask for the key, closed once it works
    yield page
    context.close()


def send(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def wait_done(page: Page, turn: int) -> str:
    """The status line of the `turn`th turn (1-based) once its request has ended."""
    status = f".turn:nth-child({turn}) .status"
    page.wait_for_function(
        "s => { const e = document.querySelector(s); return e && / s$/.test(e.textContent); }", arg=status
    )
    return page.inner_text(status)


def test_reasoning_and_answer_render_progressively(
    page: Page, page_server: PageServer, artifacts: Path
) -> None:
    page_server.say(harmony(ANSWER, REASONING), seconds_per_token=0.04)
    # Every change to the conversation is recorded as (reasoning length, answer length).
    page.evaluate(
        """() => {
            window.states = [];
            const length = (selector) => {
                const element = document.querySelector(selector);
                return element ? element.textContent.length : 0;
            };
            new MutationObserver(() => window.states.push(
                [length('.turn .reasoning-text'), length('.turn .answer')]
            )).observe(document.querySelector('#conversation'),
                       {childList: true, subtree: true, characterData: true});
        }"""
    )
    send(page, "Hi there")
    status = wait_done(page, 1)

    states: list[list[int]] = page.evaluate("() => window.states")
    distinct = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    thinking = {r for r, a in distinct if r and not a}
    answering = {a for _, a in distinct if a}
    assert len(thinking) >= 3, distinct  # the reasoning grew on the page before any answer
    assert len(answering) >= 3, distinct  # and so did the answer: not one final paint
    assert distinct[-1][0] == len(REASONING)

    turn = page.locator(".turn").first
    assert turn.locator(".reasoning summary").inner_text() == f"Reasoning · {len(REASONING)} characters"
    assert turn.locator(".reasoning-text").text_content() == REASONING
    assert turn.locator(".answer strong").inner_text() == "a small example"
    assert turn.locator(".answer pre code").inner_text() == 'print("hello from gpt-oss")'
    assert turn.locator(".answer .code-language").inner_text() == "python"
    assert turn.locator(".answer a").get_attribute("href") == "https://example.com/docs"
    # Usage and speed: tokens in and out, time to first token, tokens/s, the whole time.
    for part in (" in", " out (", " reasoning)", "first token ", " tokens/s", " s"):
        assert part in status, status
    # The reasoning stays readable on demand: it closed when the answer began, and opens when clicked.
    assert turn.locator(".reasoning").get_attribute("open") is None
    turn.locator(".reasoning summary").click()
    assert turn.locator(".reasoning").get_attribute("open") is not None
    page.screenshot(path=str(artifacts / "chat-page.png"))


@pytest.mark.parametrize("page", [{"viewport": {"width": 390, "height": 844}}], indirect=True)
def test_a_conversation_continues_is_edited_and_restarts(
    page: Page, page_server: PageServer, artifacts: Path
) -> None:
    bodies: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/responses") else None,
    )
    page_server.say(harmony("First answer."))
    # Shift+Enter is a new line, not a send.
    page.fill("#prompt", "line one")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "line two")
    assert page.input_value("#prompt") == "line one\nline two"
    page.press("#prompt", "Enter")
    wait_done(page, 1)
    assert page.input_value("#prompt") == ""
    assert "previous_response_id" not in bodies[0]
    assert bodies[0]["input"] == [{"type": "message", "role": "user", "content": "line one\nline two"}]
    assert bodies[0]["reasoning"] == {"effort": "medium"}

    page_server.say(harmony("Second answer."))
    send(page, "Second")
    wait_done(page, 2)
    first_id = bodies[1]["previous_response_id"]
    stored = httpx.get(
        f"{page_server.base_url}/v1/responses/{first_id}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert stored.json()["output"][-1]["content"][0]["text"] == "First answer."

    # Edit-and-resend: the second turn is replaced, continuing from the first again.
    page_server.say(harmony("Edited answer."))
    page.locator(".turn").nth(1).locator(".edit").click()
    page.fill(".edit-area", "Second, edited")
    page.click(".resend")
    wait_done(page, 2)
    assert bodies[2]["previous_response_id"] == first_id
    assert bodies[2]["input"] == [{"type": "message", "role": "user", "content": "Second, edited"}]
    assert page.locator(".turn").count() == 2
    assert page.locator(".turn").nth(1).locator(".user-text").inner_text() == "Second, edited"
    assert page.locator(".turn").nth(1).locator(".answer").inner_text() == "Edited answer."

    # A phone-width screen: nothing wider than the screen.
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(artifacts / "chat-page-phone.png"))

    page.click("#new-chat")
    assert page.locator(".turn").count() == 0
    send(page, "Fresh start")
    wait_done(page, 1)
    assert "previous_response_id" not in bodies[3]
    assert len(bodies[3]["input"]) == 1


def test_stop_ends_the_request_and_frees_its_kv_blocks(page: Page, page_server: PageServer) -> None:
    page_server.say(harmony("word " * 600), seconds_per_token=0.03)
    send(page, "Say many words")
    page.wait_for_function("() => (document.querySelector('.turn .answer')?.textContent.length ?? 0) > 20")
    assert page_server.engine.scheduler.requests, "the request runs in the engine while it streams"
    assert page.is_visible("#stop")
    assert not page.is_visible("#send")
    page.click("#stop")
    status = wait_done(page, 1)
    assert status.startswith("stopped"), status
    assert page_server.idle(timeout=20), "the engine still holds the stopped request or its blocks"
    assert metrics_value(page_server.base_url, "gpt_oss_kv_cache_usage_ratio") == 0.0
    assert metrics_value(page_server.base_url, "gpt_oss_requests_running") == 0.0
    assert page.is_visible("#send")
    assert not page.is_visible("#stop")

    # The server did not store the stopped response: the next request sends that turn again as input.
    stopped_answer = page.locator(".turn .answer").inner_text()
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/responses") else None)
    page_server.say(harmony("Done."))
    send(page, "Go on")
    wait_done(page, 2)
    assert "previous_response_id" not in bodies[0]
    roles = [(item["role"], item["content"]) for item in bodies[0]["input"]]
    assert roles[0] == ("user", "Say many words")
    assert roles[1][0] == "assistant"
    assert roles[1][1].strip() == stopped_answer.strip()
    assert roles[2] == ("user", "Go on")


def test_a_function_call_shows_as_it_is_made(page: Page, page_server: PageServer) -> None:
    page_server.say(
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris", "unit": "celsius"}<|call|>',
        seconds_per_token=0.04,
    )
    page.evaluate(
        """() => {
            window.calls = [];
            new MutationObserver(() => {
                const detail = document.querySelector('.turn .tool-detail');
                if (detail) window.calls.push(detail.textContent);
            }).observe(document.querySelector('#conversation'),
                       {childList: true, subtree: true, characterData: true});
        }"""
    )
    # The page offers no function tools of its own, and the server returns no call to a tool the request did
    # not offer: the request is given one on its way, as a frontend with tools would send it.
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}

    def offer_tool(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, "tools": [weather]}))

    page.route("**/v1/responses", offer_tool)
    send(page, "Weather in Paris?")
    wait_done(page, 1)
    tool = page.locator(".turn .tool")
    assert tool.locator(".tool-title").inner_text() == "function call: get_weather · completed"
    assert tool.locator(".tool-detail").inner_text() == '{"city": "Paris", "unit": "celsius"}'
    arguments = set(page.evaluate("() => window.calls"))
    assert len(arguments) >= 3, arguments  # the arguments appeared as they were generated


def test_a_python_call_shows_its_code_and_output(page: Page, page_server: PageServer) -> None:
    """With the python tool ticked, the request enables it, and the call's card shows the code as the model
    writes it, then the sandbox's output, before the answer that follows it."""
    page_server.say_steps(
        [
            "<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant to=python<|channel|>analysis"
            "<|message|>print(6 * 7)<|call|>",
            "<|channel|>final<|message|>It is 42.<|return|>",
        ],
        seconds_per_token=0.03,
    )
    page.click("#settings summary")
    # This server runs python but has no browser backend: /health says so, and the page follows it.
    page.wait_for_function("() => !document.querySelector('#tool-python').disabled")
    assert page.is_disabled("#tool-search")
    page.check("#tool-python")
    with page.expect_request("**/v1/responses") as sent:
        send(page, "What is 6 * 7?")
    body = json.loads(sent.value.post_data or "{}")
    assert body["tools"] == [{"type": "code_interpreter", "container": {"type": "auto"}}]
    status = wait_done(page, 1)
    assert "failed" not in status, status
    tool = page.locator(".turn .tool")
    assert tool.locator(".tool-title").inner_text() == "python · completed"
    assert tool.locator(".tool-detail").inner_text() == "print(6 * 7)"
    assert tool.locator(".tool-output").inner_text().strip() == "42"
    assert page.locator(".turn .answer").inner_text() == "It is 42."


XSS_ANSWER = (
    'Look: <img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> '
    "[click me](javascript:window.pwned=3) [data](data:text/html;base64,PHNjcmlwdD4=) "
    '[fine](https://example.com/a) **bold <b onmouseover="window.pwned=4">x</b>**'
)


# The page's Content-Security-Policy would block inline handlers anyway: it is bypassed here so that what is
# tested is the page's own rule, model text into the DOM as text only.
@pytest.mark.parametrize("page", [{"bypass_csp": True}], indirect=True)
def test_markup_in_model_output_never_runs(page: Page, page_server: PageServer) -> None:
    page_server.say(harmony(XSS_ANSWER, reasoning='<img src=x onerror="window.pwned=5">'))
    send(page, "Show me something")
    wait_done(page, 1)
    page.wait_for_timeout(500)  # a broken image's error event would have fired by now
    assert page.evaluate("() => window.pwned") is None
    turn = page.locator(".turn").first
    assert turn.locator("img, script, b, iframe, object").count() == 0
    assert [a.get_attribute("href") for a in turn.locator("a").all()] == ["https://example.com/a"]
    answer = turn.locator(".answer").inner_text()
    assert '<img src=x onerror="window.pwned=1">' in answer
    assert "click me (javascript:window.pwned=3)" in answer
    assert turn.locator(".reasoning-text").text_content() == '<img src=x onerror="window.pwned=5">'
    # The control: in this very page, the same markup set as HTML does run.
    page.evaluate(
        """() => { const d = document.createElement('div');
                   d.innerHTML = '<img src=x onerror="window.control=1">'; document.body.append(d); }"""
    )
    page.wait_for_function("() => window.control === 1")


CROSS_ORIGIN_CALLS = """async ({api, key, model}) => {
    const out = {};
    const auth = {"Content-Type": "application/json", "Authorization": "Bearer " + key};
    const call = async (name, path, init) => {
        try {
            const response = await fetch(api + path, init);
            out[name] = {status: response.status, requestId: response.headers.get("x-request-id"),
                         text: await response.text()};
        } catch (error) {
            out[name] = {error: error.name};
        }
    };
    await call("models", "/v1/models", {headers: auth});
    await call("responses", "/v1/responses", {method: "POST", headers: auth,
        body: JSON.stringify({model, input: "Hi", stream: true})});
    await call("wrongKey", "/v1/models", {headers: {"Authorization": "Bearer wrong"}});
    return out;
}"""


def test_a_page_on_another_origin_calls_the_api_only_with_cors(
    browser: Browser, page_server: PageServer
) -> None:
    page_server.say(harmony("Hello, other origin."))
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(page_server.other_origin + "/")
    arguments = {"key": KEY, "model": "gpt-oss-test"}

    allowed = page.evaluate(CROSS_ORIGIN_CALLS, {**arguments, "api": page_server.base_url})
    assert allowed["models"]["status"] == 200, allowed
    assert allowed["models"]["requestId"].startswith("req-")  # an exposed header
    assert allowed["responses"]["status"] == 200, allowed
    assert "event: response.completed" in allowed["responses"]["text"]
    assert "Hello, other origin." in allowed["responses"]["text"]
    # A refusal is readable too: the page learns it has the wrong key, not just "network error".
    assert allowed["wrongKey"]["status"] == 401
    assert "invalid_api_key" in allowed["wrongKey"]["text"]

    refused = page.evaluate(CROSS_ORIGIN_CALLS, {**arguments, "api": page_server.no_cors_url})
    assert refused == {name: {"error": "TypeError"} for name in ("models", "responses", "wrongKey")}
    # That server answers the same call from outside a browser: only CORS stood in the page's way.
    direct = httpx.get(page_server.no_cors_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert direct.status_code == 200
    context.close()
