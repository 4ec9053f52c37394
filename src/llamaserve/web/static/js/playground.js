import { ApiError, attempt, copy, el, flash, post, requireLogin } from "./api.js";

await requireLogin();

const $ = (id) => document.getElementById(id);
const history = [];  // the conversation so far: {role, content}
let key = null;  // this session's playground key: in this page's memory only
let running = null;  // AbortController of the request in flight
let lastSent = null;  // the body of the last request sent: the snippets show it until a new prompt is typed

async function mintKey() {
  key = (await post("/v1/dashboard/playground/key")).key;
}

/** Calls the public API with the playground key; mints a new key once if it expired. */
async function api(path, init = {}, retry = true) {
  const response = await fetch(path, {
    ...init,
    headers: { ...init.headers, Authorization: `Bearer ${key}` },
    credentials: "omit",  // a Bearer key, as any API client sends; no cookie
  });
  if (response.status === 401 && retry) {
    await mintKey();
    return api(path, init, false);
  }
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return response;
}

function settings() {
  return {
    model: $("model").value,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
}

function requestMessages(prompt) {
  const system = $("system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...history, { role: "user", content: prompt }];
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function snippets() {
  const draft = $("prompt").value.trim();
  const body = draft || !lastSent
    ? { ...settings(), messages: requestMessages(draft || "Hello!"), stream: true }
    : lastSent;
  const base = `${location.origin}/v1`;
  const curl = [
    `curl ${base}/chat/completions \\`,
    `  -H "Authorization: Bearer $LLAMASERVE_API_KEY" \\`,
    `  -H "Content-Type: application/json" \\`,
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
  const python = [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=os.environ["LLAMASERVE_API_KEY"])`,
    "stream = client.chat.completions.create(",
    `    model=${JSON.stringify(body.model)},`,
    `    messages=${JSON.stringify(body.messages, null, 4).replaceAll("\n", "\n    ")},`,
    `    temperature=${body.temperature},`,
    `    max_tokens=${body.max_tokens},`,
    "    stream=True,",
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    '        print(chunk.choices[0].delta.content or "", end="", flush=True)',
    "print()",
  ].join("\n");
  $("snippet-curl").textContent = curl;
  $("snippet-python").textContent = python;
}

function bubble(role, text) {
  const node = el("div", { class: `message ${role}` },
    el("div", { class: "role" }, role), el("div", { class: "text" }, text));
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node.querySelector(".text");
}

/** Reads an SSE stream of chat chunks, calling onDelta with each piece of text; returns the usage chunk's usage. */
async function readStream(response, onDelta) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) onDelta(text);
    }
  }
  return usage;
}

async function send(prompt) {
  const messages = requestMessages(prompt);
  bubble("user", prompt);
  const output = bubble("assistant", "");
  output.classList.add("streaming");
  running = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  let reply = "";
  try {
    const body = { ...settings(), messages, stream: true, stream_options: { include_usage: true } };
    lastSent = { ...settings(), messages, stream: true };
    snippets();
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: running.signal,
    });
    const usage = await readStream(response, (text) => {
      reply += text;
      output.textContent = reply;
    });
    if (usage) {
      $("chat-usage").textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`;
    }
  } catch (e) {
    if (e.name !== "AbortError") flash(e.message);
  } finally {
    output.classList.remove("streaming");
    output.parentElement.dataset.done = "1";
    running = null;
    $("send").disabled = false;
    $("stop").hidden = true;
  }
  history.push({ role: "user", content: prompt }, { role: "assistant", content: reply });
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || running) return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("chat-form").requestSubmit();
});
$("stop").addEventListener("click", () => running?.abort());
$("clear").addEventListener("click", () => {
  history.length = 0;
  lastSent = null;
  $("messages").replaceChildren();
  $("chat-usage").textContent = "";
  snippets();
});
$("temperature").addEventListener("input", () => ($("temperature-value").textContent = $("temperature").value));
for (const id of ["model", "system", "temperature", "max-tokens", "prompt"]) $(id).addEventListener("input", snippets);
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".tab")) other.classList.toggle("active", other === tab);
    $("snippet-curl").hidden = tab.dataset.tab !== "curl";
    $("snippet-python").hidden = tab.dataset.tab !== "python";
  });
}
$("copy-snippet").addEventListener("click", (event) => {
  const visible = $("snippet-curl").hidden ? $("snippet-python") : $("snippet-curl");
  attempt(() => copy(visible.textContent, event.target));
});

await attempt(async () => {
  await mintKey();
  const models = (await (await api("/v1/models")).json()).data;
  $("model").replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
  snippets();
  document.body.dataset.ready = "1";
});
