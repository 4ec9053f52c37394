import { attempt, el, get, number, requireLogin, time } from "./api.js";

await requireLogin();

const RANGES = { "24h": { seconds: 86400, bucket: "hour" }, "7d": { seconds: 7 * 86400, bucket: "day" },
  "30d": { seconds: 30 * 86400, bucket: "day" } };
const COLORS = ["#4f6bed", "#e8833a", "#2ca58d", "#d64550", "#8e6bbf", "#c2a83e", "#3a9bd9", "#7a7a7a"];
const controls = ["range", "metric", "group"].map((id) => document.getElementById(id));
let chart = null;
let summary = null;

function keyLabel(prefix) {
  const key = summary.keys.find((k) => k.prefix === prefix);
  if (!key || key.playground) return key ? "playground" : `ls-${prefix}_…`;
  return key.name ? `${key.name} (ls-${prefix}_…)` : `ls-${prefix}_…`;
}

function value(row, metric) {
  if (metric === "requests") return row.requests;
  if (metric === "tokens") return row.prompt_tokens + row.completion_tokens;
  return row.cost_micro / 1e6;
}

function bucketLabel(start, seconds) {
  const d = new Date(start * 1000);
  return seconds === 3600
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toISOString().slice(0, 10);
}

function draw() {
  const metric = document.getElementById("metric").value;
  const group = document.getElementById("group").value;
  const step = summary.bucket_seconds;
  const starts = [];
  for (let t = Math.floor(summary.since / step) * step; t < summary.until; t += step) starts.push(t);
  const series = new Map();
  for (const row of summary.data) {
    const name = group === "model" ? row.model : keyLabel(row.key);
    if (!series.has(name)) series.set(name, new Array(starts.length).fill(0));
    const i = starts.indexOf(row.start);
    if (i >= 0) series.get(name)[i] += value(row, metric);
  }
  const datasets = [...series].map(([label, data], i) => ({
    label, data, backgroundColor: COLORS[i % COLORS.length], stack: "all",
  }));
  const data = { labels: starts.map((s) => bucketLabel(s, step)), datasets };
  if (chart) {
    chart.data = data;
    chart.update();
    return;
  }
  chart = new window.Chart(document.getElementById("chart"), {
    type: "bar",
    data,
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } },
      plugins: { legend: { position: "bottom" } },
    },
  });
}

function totals() {
  const sum = (f) => summary.data.reduce((total, row) => total + f(row), 0);
  document.getElementById("total-requests").textContent = number(sum((r) => r.requests));
  document.getElementById("total-tokens").textContent = number(sum((r) => r.prompt_tokens + r.completion_tokens));
  document.getElementById("total-spend").textContent = (sum((r) => r.cost_micro) / 1e6).toFixed(6);
  const label = document.getElementById("range").selectedOptions[0].textContent.toLowerCase();
  for (const node of document.querySelectorAll(".range-label")) node.textContent = label;
}

function keyName(r) {
  if (!r.key) return "—";
  if (r.key_name === "playground") return "playground";
  return r.key_name ? `${r.key_name} (ls-${r.key}_…)` : `ls-${r.key}_…`;
}

function recentRow(r) {
  return el(
    "tr",
    { "data-request-id": r.request_id },
    el("td", {}, time(r.created)),
    el("td", {}, r.model),
    el("td", {}, keyName(r)),
    el("td", { class: "num prompt-tokens" }, number(r.prompt_tokens)),
    el("td", { class: "num completion-tokens" }, number(r.completion_tokens)),
    el("td", { class: "num cost" }, r.cost),
    el("td", {}, el("span", { class: `badge ${r.status}` }, r.status)),
    el("td", { class: "num" }, `${number(r.latency_ms)} ms`),
  );
}

function fileLink(id, label) {
  return id ? el("a", { href: `/v1/dashboard/files/${id}/content`, download: "" }, label) : null;
}

function batchRow(b) {
  const counts = b.request_counts;
  const files = [fileLink(b.output_file_id, "output"), fileLink(b.error_file_id, "errors")].filter(Boolean);
  return el(
    "tr",
    { "data-batch-id": b.id },
    el("td", {}, time(b.created_at)),
    el("td", {}, b.id),
    el("td", {}, el("span", { class: `badge ${b.status}` }, b.status)),
    el("td", { class: "num" }, `${number(counts.completed + counts.failed)} / ${number(counts.total)}`),
    el("td", { class: "num" }, number(counts.failed)),
    el("td", { class: "num cost" }, b.cost),
    el("td", {}, ...files.flatMap((a, i) => (i ? [" · ", a] : [a]))),
  );
}

async function load() {
  const range = RANGES[document.getElementById("range").value];
  const since = Math.floor(Date.now() / 1000) - range.seconds;
  const [account, sum, recent, batches] = await Promise.all([
    get("/v1/dashboard/account"),
    get(`/v1/dashboard/usage/summary?since=${since}&bucket=${range.bucket}`),
    get("/v1/dashboard/usage?limit=50"),
    get("/v1/dashboard/batches"),
  ]);
  document.getElementById("balance").textContent = account.balance;
  const rpm = account.requests_per_minute ? `${account.requests_per_minute} requests/min` : "no rate limit";
  document.getElementById("plan").textContent = `plan ${account.plan} · ${rpm}`;
  summary = sum;
  totals();
  draw();
  document.querySelector("#recent tbody").replaceChildren(...recent.data.map(recentRow));
  document.getElementById("recent-empty").hidden = recent.data.length > 0;
  document.querySelector("#batches tbody").replaceChildren(...batches.data.map(batchRow));
  document.getElementById("batches-empty").hidden = batches.data.length > 0;
}

controls[0].addEventListener("change", () => attempt(load));
controls[1].addEventListener("change", draw);
controls[2].addEventListener("change", draw);
document.getElementById("refresh").addEventListener("click", () => attempt(load));
await attempt(load);
document.body.dataset.loaded = "1";
