// The Vercel AI SDK (`ai` with `@ai-sdk/openai`) against the server: a one-tool run of generateText or
// streamText through the Chat Completions or the Responses provider. Prints one JSON line: what the SDK returned.
// Usage: node ai_sdk.mjs BASE_URL MODEL chat|responses generate|stream
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, modelName, api, mode] = process.argv.slice(2);
const provider = createOpenAI({ baseURL, apiKey: "unused" });
const model = api === "chat" ? provider.chat(modelName) : provider.responses(modelName);
const calls = [];
const getWeather = tool({
  description: "Gets the current weather in a city.",
  inputSchema: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    calls.push({ city });
    return `sunny in ${city}`;
  },
});
const options = {
  model,
  tools: { get_weather: getWeather },
  prompt: "What is the weather in Paris?",
  stopWhen: stepCountIs(4),
  maxRetries: 0,
};

let result;
if (mode === "stream") {
  const errors = [];
  const streamed = streamText({ ...options, onError: ({ error }) => errors.push(String(error)) });
  const parts = {};
  for await (const part of streamed.fullStream) parts[part.type] = (parts[part.type] ?? 0) + 1;
  if (errors.length) throw new Error(errors.join("\n"));
  result = {
    text: await streamed.text,
    reasoning: await streamed.reasoningText,
    steps: (await streamed.steps).length,
    toolCalls: (await streamed.steps).flatMap((s) => s.toolCalls.map((c) => ({ name: c.toolName, input: c.input }))),
    finishReason: await streamed.finishReason,
    outputTokens: (await streamed.totalUsage).outputTokens,
    parts,
  };
} else {
  const done = await generateText(options);
  result = {
    text: done.text,
    reasoning: done.reasoningText,
    steps: done.steps.length,
    toolCalls: done.steps.flatMap((s) => s.toolCalls.map((c) => ({ name: c.toolName, input: c.input }))),
    finishReason: done.finishReason,
    outputTokens: done.totalUsage.outputTokens,
  };
}
console.log(JSON.stringify({ ...result, executed: calls }));
