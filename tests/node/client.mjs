// The official `openai` npm package against a running gateway. Run by tests/test_openai_clients.py:
//   SWARM_BASE_URL=http://127.0.0.1:8000/v1 SWARM_API_KEY=... SWARM_MODEL=... node client.mjs
// Prints one JSON object with what it saw; the Python test checks it.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.SWARM_BASE_URL,
  apiKey: process.env.SWARM_API_KEY,
  maxRetries: 0,
});
const model = process.env.SWARM_MODEL;
const messages = [{ role: "user", content: "Tell me about the swarm." }];
const common = { model, messages, max_tokens: 8, temperature: 0, seed: 3 };

const full = await client.chat.completions.create({ ...common, ignore_eos: true, logprobs: true, top_logprobs: 2 });

let streamed = "";
let usage = null;
let finish = null;
const stream = await client.chat.completions.create({
  ...common,
  ignore_eos: true,
  stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    streamed += choice.delta?.content ?? "";
    finish = choice.finish_reason ?? finish;
  }
}

let completion = "";
for await (const chunk of await client.completions.create({
  model, prompt: "The river", max_tokens: 5, temperature: 0, stream: true, ignore_eos: true,
})) {
  completion += chunk.choices[0]?.text ?? "";
}

let notFound = null;
try {
  await client.chat.completions.create({ ...common, model: "no-such-model" });
} catch (err) {
  notFound = { status: err.status, type: err.type ?? err.error?.type, isNotFound: err instanceof OpenAI.NotFoundError };
}

const models = (await client.models.list()).data.map((m) => m.id);

console.log(JSON.stringify({
  full: full.choices[0].message.content,
  fullFinish: full.choices[0].finish_reason,
  logprobs: full.choices[0].logprobs.content.length,
  streamed,
  finish,
  usage,
  completion,
  notFound,
  models,
}));
