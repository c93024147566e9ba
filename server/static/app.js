"use strict";
// The chat page. It streams `POST /v1/responses` with fetch and a ReadableStream (EventSource cannot POST),
// continues a conversation with `previous_response_id`, and stops a request by aborting its fetch (the
// server cancels the request and frees its KV blocks when the client goes away).
//
// Model text never reaches the DOM as markup: the Markdown below builds elements with createElement and
// puts every piece of text in with textContent, and a link is made only for an http(s) URL.

const KEY_STORAGE = "gpt-oss-server.api-key";
const byId = (id) => document.getElementById(id);

function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

// -- Markdown, to DOM nodes --------------------------------------------------------------------------------

const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const LIST_ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+/;
const QUOTE = /^\s*>\s?/;
// Code spans, bold, italic, [links](url) and bare http(s) URLs, in that order of preference.
const INLINE =
  /`([^`\n]+)`|\*\*(?=\S)([^*]*?\S)\*\*|\*(?=[^\s*])([^*\n]*?[^\s*])\*|\[([^\]\n]+)\]\(([^()\s]+)\)|(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])/g;

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || LIST_ITEM.test(line) || QUOTE.test(line);
}

function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      i += 1;
      // An unclosed fence runs to the end: while an answer streams, its code block is still open.
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1;
      root.append(codeBlock(body.join("\n"), fence[2]));
    } else if (!line.trim()) {
      i += 1;
    } else if (HEADING.test(line)) {
      const [, marks, content] = line.match(HEADING);
      const heading = node("h" + Math.min(marks.length + 2, 6));
      appendInline(heading, content);
      root.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      root.append(node("hr"));
      i += 1;
    } else if (LIST_ITEM.test(line)) {
      const list = node(/^\s*\d/.test(line) ? "ol" : "ul");
      while (i < lines.length && LIST_ITEM.test(lines[i])) {
        const item = node("li");
        appendInline(item, lines[i].replace(LIST_ITEM, ""));
        list.append(item);
        i += 1;
      }
      root.append(list);
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
      const quote = node("blockquote");
      quote.append(renderMarkdown(quoted.join("\n")));
      root.append(quote);
    } else {
      const paragraph = [];
      while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i])) paragraph.push(lines[i++]);
      const p = node("p");
      appendInline(p, paragraph.join("\n"));
      root.append(p);
    }
  }
  return root;
}

function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
    const [, code, bold, italic, label, target, bare] = match;
    if (code !== undefined) {
      parent.append(node("code", "", code));
    } else if (bold !== undefined || italic !== undefined) {
      const emphasis = node(bold !== undefined ? "strong" : "em");
      appendInline(emphasis, bold !== undefined ? bold : italic);
      parent.append(emphasis);
    } else if (label !== undefined) {
      parent.append(link(label, target));
    } else {
      parent.append(link(bare, bare));
    }
    last = match.index + match[0].length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

// The URL if it is an absolute http(s) one, else null: `javascript:`, `data:` and relative URLs never
// become links.
function safeUrl(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function link(label, target) {
  const href = safeUrl(target);
  if (href === null) return document.createTextNode(label === target ? label : `${label} (${target})`);
  const anchor = node("a", "", label);
  anchor.href = href;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer nofollow";
  return anchor;
}

function codeBlock(code, language) {
  const block = node("div", "code-block");
  const bar = node("div", "code-bar");
  bar.append(node("span", "code-language", language || "text"), copyButton(() => code));
  const pre = node("pre");
  pre.append(node("code", "", code));
  block.append(bar, pre);
  return block;
}

// -- copying --------------------------------------------------------------------------------------------------

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on another host is not a secure context: the old way still works there.
  const area = node("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

function copyButton(getText) {
  const button = node("button", "copy", "Copy");
  button.type = "button";
  button.addEventListener("click", async () => {
    try {
      await copyText(getText());
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  return button;
}

// -- server-sent events over fetch --------------------------------------------------------------------------

// Yields {event, data} for each event of an SSE body (comments and keep-alive pings are skipped).
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let carriage = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    // Lines may end in \r\n, \r or \n; a \r at a chunk's end may be half of a \r\n, so it waits.
    let text = carriage + value;
    carriage = text.endsWith("\r") ? "\r" : "";
    if (carriage) text = text.slice(0, -1);
    buffer += text.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let content = colon < 0 ? "" : line.slice(colon + 1);
        if (content.startsWith(" ")) content = content.slice(1);
        if (field === "event") event = content;
        else if (field === "data") data.push(content);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

// -- settings -------------------------------------------------------------------------------------------------

const settings = {
  model: byId("model"),
  effort: byId("effort"),
  temperature: byId("temperature"),
  maxTokens: byId("max-tokens"),
  system: byId("system"),
  apiKey: byId("api-key"),
  python: byId("tool-python"),
  search: byId("tool-search"),
};

// The built-in tools the server runs (its /health says which): a tool it cannot run cannot be ticked.
async function loadTools() {
  let tools = {};
  try {
    const response = await fetch("/health");
    if (response.ok) tools = (await response.json()).builtin_tools || {};
  } catch {
    // no answer: both stay off
  }
  for (const [box, tool] of [
    [settings.python, tools.python],
    [settings.search, tools.browser],
  ]) {
    const available = Boolean(tool && tool.available);
    box.disabled = !available;
    if (!available) box.checked = false;
    box.closest("label").title = available ? "" : (tool && tool.reason) || "not enabled on this server";
  }
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = settings.apiKey.value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

function notify(message) {
  const notice = byId("notice");
  notice.textContent = message || "";
  notice.hidden = !message;
}

// The API's error message from an error response (the OpenAI envelope), or its status.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch {
    // not JSON: the status says enough
  }
  return `${response.status} ${response.statusText}`;
}

// Whether the settings were opened to ask for the key: closed again once the key works.
let askedForKey = false;

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (error) {
    notify(`Cannot reach the server: ${error.message}`);
    return;
  }
  if (response.status === 401) {
    notify("This server needs an API key: enter it under Settings.");
    askedForKey = askedForKey || !byId("settings").open;
    byId("settings").open = true;
    settings.apiKey.focus();
    return;
  }
  if (!response.ok) {
    notify(`Cannot list the models: ${await errorMessage(response)}`);
    return;
  }
  const { data } = await response.json();
  const chosen = settings.model.value;
  settings.model.replaceChildren(...data.map((model) => node("option", "", model.id)));
  if (data.some((model) => model.id === chosen)) settings.model.value = chosen;
  const note = data.map((model) => model.note).filter(Boolean).join(" ");
  byId("model-note").textContent = note;
  byId("model-note").hidden = !note;
  notify("");
  if (askedForKey) byId("settings").open = false;
  askedForKey = false;
}

// -- the conversation -----------------------------------------------------------------------------------------

// Each turn: {prompt, responseId (once the server stored its response), answer, element}.
const turns = [];
let running = null; // {controller} while a request streams

function setRunning(value) {
  running = value;
  byId("send").hidden = value !== null;
  byId("stop").hidden = value === null;
  document.body.classList.toggle("busy", value !== null);
}

function scrollToEnd() {
  const main = byId("conversation");
  main.scrollTop = main.scrollHeight;
}

// Whether the reader is at the end of the conversation: a stream follows them there, and leaves them be
// when they have scrolled up to read.
function atEnd() {
  const main = byId("conversation");
  return main.scrollHeight - main.scrollTop - main.clientHeight < 40;
}

// Where the next request continues from: the newest stored response, and the turns after it (stopped or
// failed ones, which the server did not store) sent again as input items.
function continuation(prompt) {
  let start = 0;
  let previous = null;
  for (let k = turns.length - 1; k >= 0; k -= 1) {
    if (turns[k].responseId) {
      previous = turns[k].responseId;
      start = k + 1;
      break;
    }
  }
  const input = [];
  for (const turn of turns.slice(start)) {
    input.push({ type: "message", role: "user", content: turn.prompt });
    if (turn.answer) input.push({ type: "message", role: "assistant", content: turn.answer });
  }
  input.push({ type: "message", role: "user", content: prompt });
  return { previous, input };
}

function requestBody(prompt) {
  const { previous, input } = continuation(prompt);
  const body = {
    model: settings.model.value,
    input,
    stream: true,
    store: true,
    reasoning: { effort: settings.effort.value },
  };
  if (previous) body.previous_response_id = previous;
  const system = settings.system.value.trim();
  if (system) body.instructions = system;
  const temperature = Number.parseFloat(settings.temperature.value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = Number.parseInt(settings.maxTokens.value, 10);
  if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_output_tokens = maxTokens;
  const tools = [];
  const include = [];
  if (settings.python.checked) {
    tools.push({ type: "code_interpreter", container: { type: "auto" } });
    include.push("code_interpreter_call.outputs");
  }
  if (settings.search.checked) {
    tools.push({ type: "web_search" });
    include.push("web_search_call.action.sources");
  }
  if (tools.length) Object.assign(body, { tools, include });
  return body;
}

function userBubble(turn) {
  const bubble = node("div", "user");
  const text = node("div", "user-text", turn.prompt);
  const actions = node("div", "actions");
  const edit = node("button", "edit", "Edit");
  edit.type = "button";
  edit.addEventListener("click", () => startEdit(turn, bubble, text, actions));
  actions.append(edit, copyButton(() => turn.prompt));
  bubble.append(text, actions);
  return bubble;
}

// Edit-and-resend: the edited prompt replaces this turn and drops every turn after it.
function startEdit(turn, bubble, text, actions) {
  const area = node("textarea", "edit-area");
  area.value = turn.prompt;
  area.rows = Math.min(10, turn.prompt.split("\n").length + 1);
  const resend = node("button", "resend", "Resend");
  const cancel = node("button", "", "Cancel");
  resend.type = cancel.type = "button";
  const editor = node("div", "editor");
  editor.append(area, resend, cancel);
  bubble.replaceChildren(editor);
  area.focus();
  cancel.addEventListener("click", () => bubble.replaceChildren(text, actions));
  resend.addEventListener("click", () => {
    const prompt = area.value.trim();
    if (!prompt) return;
    if (running) running.controller.abort();
    const index = turns.indexOf(turn);
    for (const dropped of turns.splice(index)) dropped.element.remove();
    send(prompt);
  });
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      resend.click();
    } else if (event.key === "Escape") {
      cancel.click();
    }
  });
}

// One output item of a response on the page: reasoning, a message, a function call, or a built-in tool's
// activity (any other item type, shown by its type and status).
function outputItem(item) {
  if (item.type === "reasoning") {
    const details = node("details", "reasoning");
    details.open = true;
    const summary = node("summary", "", "Reasoning");
    const body = node("div", "reasoning-text");
    details.append(summary, body);
    // Closed when the answer starts, unless the reader has opened or closed it by hand.
    const view = { element: details, text: "", touched: false };
    summary.addEventListener("click", () => (view.touched = true));
    view.update = () => {
      body.textContent = view.text;
      summary.textContent = `Reasoning · ${view.text.length} characters`;
    };
    return view;
  }
  if (item.type === "message") {
    const element = node("div", "answer");
    const view = { element, text: "" };
    view.update = () => element.replaceChildren(renderMarkdown(view.text));
    return view;
  }
  const element = node("div", "tool");
  const title = node("div", "tool-title");
  const detail = node("pre", "tool-detail");
  const output = node("pre", "tool-output");
  output.hidden = true;
  element.append(title, detail, output);
  const view = { element, text: "", item };
  view.update = () => {
    const current = view.item;
    title.textContent = `${toolName(current)} · ${current.status || "in_progress"}`;
    let action = current.action || current.query || "";
    if (current.type === "function_call") action = view.text;
    else if (current.type === "code_interpreter_call") action = current.code || view.text;
    else if (current.type === "web_search_call" && current.action) action = searchAction(current.action);
    detail.textContent = typeof action === "string" ? action : JSON.stringify(action, null, 2);
    const logs = (current.outputs || []).map((out) => out.logs || out.url || "").join("\n");
    output.textContent = logs;
    output.hidden = !logs;
  };
  return view;
}

function toolName(item) {
  if (item.type === "function_call") return `function call: ${item.name}`;
  if (item.type === "code_interpreter_call") return "python";
  if (item.type === "web_search_call") return "web search";
  return item.type.replace(/_/g, " ");
}

// A browser action as a line: what was searched, opened or looked for.
function searchAction(action) {
  if (action.type === "search") return `search: ${action.query || ""}`;
  if (action.type === "open_page") return `open: ${action.url || ""}`;
  if (action.type === "find_in_page") return `find: ${action.pattern || ""}${action.url ? ` in ${action.url}` : ""}`;
  return JSON.stringify(action);
}

function stats(usage, timing) {
  const parts = [];
  if (usage) {
    const reasoning = usage.output_tokens_details ? usage.output_tokens_details.reasoning_tokens : 0;
    parts.push(`${usage.input_tokens} in`, `${usage.output_tokens} out (${reasoning} reasoning)`);
    const cached = usage.input_tokens_details ? usage.input_tokens_details.cached_tokens : 0;
    if (cached) parts.push(`${cached} cached`);
  }
  if (timing.first !== null) {
    parts.push(`first token ${Math.round(timing.first - timing.start)} ms`);
    const seconds = (timing.end - timing.first) / 1000;
    if (usage && usage.output_tokens > 1 && seconds > 0) {
      parts.push(`${((usage.output_tokens - 1) / seconds).toFixed(1)} tokens/s`);
    }
  }
  parts.push(`${((timing.end - timing.start) / 1000).toFixed(2)} s`);
  return parts.join(" · ");
}

async function send(prompt) {
  const body = requestBody(prompt);
  const turn = { prompt, responseId: null, answer: "", element: node("section", "turn") };
  turns.push(turn);
  const assistant = node("div", "assistant");
  const status = node("div", "status", "waiting…");
  const actions = node("div", "actions");
  actions.append(copyButton(() => turn.answer));
  turn.element.append(userBubble(turn), assistant, status);
  byId("conversation").append(turn.element);
  scrollToEnd();

  const controller = new AbortController();
  setRunning({ controller });
  const views = new Map();
  const timing = { start: performance.now(), first: null, end: null };
  let usage = null;
  let outcome = "";
  let frame = 0;
  const dirty = new Set();
  const repaint = () => {
    frame = 0;
    const follow = atEnd();
    for (const view of dirty) view.update();
    dirty.clear();
    if (follow) scrollToEnd();
  };
  const changed = (view) => {
    dirty.add(view);
    if (!frame) frame = requestAnimationFrame(repaint);
  };
  const delta = (event) => {
    if (timing.first === null) {
      timing.first = performance.now();
      status.textContent = "streaming…";
    }
    const view = views.get(event.output_index);
    if (!view) return;
    view.text += event.delta;
    changed(view);
  };

  try {
    const response = await fetch("/v1/responses", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const { data } of serverSentEvents(response.body)) {
      const event = JSON.parse(data);
      switch (event.type) {
        case "response.output_item.added": {
          const view = outputItem(event.item);
          views.set(event.output_index, view);
          assistant.append(view.element);
          changed(view);
          break;
        }
        case "response.code_interpreter_call.interpreting":
        case "response.web_search_call.searching": {
          // A built-in tool is running: its card says so until its item is done.
          const view = views.get(event.output_index);
          if (view && view.item) {
            view.item.status = event.type.endsWith("interpreting") ? "interpreting" : "searching";
            changed(view);
          }
          break;
        }
        case "response.reasoning_text.delta":
        case "response.output_text.delta":
        case "response.function_call_arguments.delta":
        case "response.code_interpreter_call_code.delta":
          if (event.type === "response.output_text.delta") {
            for (const view of views.values()) {
              if (view.element.tagName === "DETAILS" && !view.touched) view.element.open = false;
            }
          }
          delta(event);
          break;
        case "response.output_item.done": {
          const view = views.get(event.output_index);
          if (view && view.item) {
            view.item = event.item;
            changed(view);
          }
          break;
        }
        case "response.completed":
        case "response.incomplete":
        case "response.failed": {
          const result = event.response;
          usage = result.usage;
          if (result.status !== "failed") turn.responseId = result.id;
          if (result.status === "incomplete") outcome = "cut at the token limit";
          if (result.error) outcome = `failed: ${result.error.message}`;
          break;
        }
        case "error":
          outcome = `failed: ${event.message || (event.error && event.error.message) || "error"}`;
          break;
        default:
          break;
      }
    }
  } catch (error) {
    outcome = error.name === "AbortError" ? "stopped" : `failed: ${error.message}`;
  } finally {
    if (frame) cancelAnimationFrame(frame);
    repaint();
    timing.end = performance.now();
    turn.answer = [...views.values()]
      .filter((view) => view.element.classList.contains("answer"))
      .map((view) => view.text)
      .join("\n\n");
    status.textContent = [outcome, stats(usage, timing)].filter(Boolean).join(" · ");
    status.classList.toggle("problem", outcome !== "");
    status.before(actions);
    if (running && running.controller === controller) setRunning(null);
  }
}

function newChat() {
  if (running) running.controller.abort();
  for (const turn of turns.splice(0)) turn.element.remove();
  notify("");
  byId("prompt").focus();
}

// -- wiring ------------------------------------------------------------------------------------------------------

function submit() {
  const area = byId("prompt");
  const prompt = area.value.trim();
  if (!prompt || running) return;
  if (!settings.model.value) {
    notify("No model to send to: check the API key under Settings.");
    return;
  }
  area.value = "";
  send(prompt);
}

byId("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
byId("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
byId("stop").addEventListener("click", () => running && running.controller.abort());
byId("new-chat").addEventListener("click", newChat);
settings.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
settings.apiKey.addEventListener("change", () => {
  const key = settings.apiKey.value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  loadModels();
});
loadModels();
loadTools();
byId("prompt").focus();
