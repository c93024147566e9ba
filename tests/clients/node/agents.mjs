// The OpenAI Agents SDK for JavaScript (`@openai/agents`) against the server: a one-tool agent through the
// Responses or the Chat Completions model, run plain or streamed. Prints one JSON line: what the run returned.
// Usage: node agents.mjs BASE_URL MODEL responses|chat plain|stream
import { Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, run, setTracingDisabled, tool } from "@openai/agents";
import OpenAI from "openai";
import { z } from "zod";

const [baseURL, modelName, api, mode] = process.argv.slice(2);
setTracingDisabled(true);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const model =
  api === "chat" ? new OpenAIChatCompletionsModel(client, modelName) : new OpenAIResponsesModel(client, modelName);
const calls = [];
const getWeather = tool({
  name: "get_weather",
  description: "Gets the current weather in a city.",
  parameters: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    calls.push({ city });
    return `sunny in ${city}`;
  },
});
const agent = new Agent({
  name: "weather",
  instructions: "Answer with the tool's help.",
  model,
  tools: [getWeather],
});

// The reasoning as gpt-oss's compatibility test looks for it: in each raw chat completion's
// `choices[0].message.reasoning`, in each raw response's reasoning items' `reasoning_text` parts, and, streamed,
// in the raw chunks' `delta.reasoning` or the `response.reasoning_text.delta` events.
function rawReasoning(raw) {
  const data = raw.providerData ?? {};
  if (api === "chat") return [data.choices?.[0]?.message?.reasoning].filter(Boolean);
  return (data.output ?? [])
    .filter((item) => item.type === "reasoning")
    .flatMap((item) => (item.content ?? []).map((part) => part.text));
}

const prompt = "What is the weather in Paris?";
let result;
const streamedReasoning = [];
if (mode === "stream") {
  result = await run(agent, prompt, { stream: true, maxTurns: 4 });
  for await (const event of result) {
    if (event.type !== "raw_model_stream_event" || event.data.type !== "model") continue;
    const raw = event.data.event;
    if (api === "chat" && raw.choices?.[0]?.delta?.reasoning) streamedReasoning.push(raw.choices[0].delta.reasoning);
    if (api === "responses" && raw.type === "response.reasoning_text.delta") streamedReasoning.push(raw.delta);
  }
  await result.completed;
  if (result.error) throw result.error;
} else {
  result = await run(agent, prompt, { maxTurns: 4 });
}
const items = result.newItems.map((item) => item.type);
console.log(
  JSON.stringify({
    finalOutput: result.finalOutput,
    items,
    toolCalls: result.newItems
      .filter((item) => item.type === "tool_call_item")
      .map((item) => ({ name: item.rawItem.name, arguments: JSON.parse(item.rawItem.arguments) })),
    executed: calls,
    reasoning: result.rawResponses.flatMap(rawReasoning),
    streamedReasoning: streamedReasoning.join(""),
  }),
);
