// The playground (docs/playground.md): a client of the service's OpenAI API, like any other, plus a live view
// fed by GET stats. URLs are relative to the page (served at <prefix>/playground/), so that the page works under
// any route prefix, through Serve's proxy or straight from an ingress replica.
"use strict";

const API = new URL("../v1/", location.href);
const STATS = new URL("stats", location.href);
const STATS_PERIOD_MS = 1000;

const $ = (id) => document.getElementById(id);
const tokenInfo = new WeakMap(); // token span -> [{token, logprob, top}] for its tooltip
let controller = null; // the running request's AbortController
let replicaDollarsPerHour = 0; // from the live view: what one worker replica costs

// ---------------------------------------------------------------------- the API key
// A service with api_keys answers 401 without one (docs/serving.md, "Security and limits"). The page asks for
// the key when that happens and keeps it for this tab only (sessionStorage); the live view never asks.
const KEY_STORE = "gpt2serve-api-key";

async function api(url, init = {}, ask = true) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = { ...(init.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    const r = await fetch(url, { ...init, headers });
    if (r.status !== 401 || !ask) return r;
    const given = window.prompt(key ? "That API key was refused. API key:" : "This service needs an API key:");
    if (!given || !given.trim()) return r; // cancelled: the 401's own message is shown
    sessionStorage.setItem(KEY_STORE, given.trim());
  }
}

// ---------------------------------------------------------------------- models
async function loadModels() {
  try {
    const r = await api(new URL("models", API));
    const body = await r.json();
    if (!r.ok) throw new Error(apiMessage(body, r));
    // Every id is listed: the base model, then each LoRA adapter the service serves.
    $("model").replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
  } catch (e) {
    showError(`could not list the models: ${e.message}`);
  }
}

// ---------------------------------------------------------------------- one request
function requestBody() {
  const body = {
    model: $("model").value || undefined, prompt: $("prompt").value, stream: true,
    stream_options: { include_usage: true }, logprobs: 1,
  };
  // An empty box leaves the field out (the API's default). Nothing is checked here: the API's own message
  // for a bad value is the one to show.
  for (const [id, field] of [["temperature", "temperature"], ["top-p", "top_p"], ["top-k", "top_k"],
    ["max-tokens", "max_tokens"], ["seed", "seed"]]) {
    const raw = $(id).value.trim();
    if (raw !== "") body[field] = Number(raw);
  }
  const stop = $("stop-sequences").value.split("\n").filter((s) => s !== "")
    .map((s) => s.replaceAll("\\n", "\n").replaceAll("\\t", "\t"));
  if (stop.length) body.stop = stop;
  return body;
}

async function generate() {
  if (controller) controller.abort();
  const mine = controller = new AbortController();
  const run = { sent: performance.now(), first: null, end: null, tokens: 0, usage: null, finish: null };
  clearError();
  $("output").replaceChildren();
  setState("running");
  showRequestStats(run);
  let state = "done";
  try {
    const r = await api(new URL("completions", API), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()),
      signal: mine.signal,
    });
    if (!r.ok) {
      const text = await r.text();
      let body = null;
      try { body = JSON.parse(text); } catch { /* not JSON: shown as it is */ }
      throw new Error(body ? apiMessage(body, r) : `HTTP ${r.status}: ${text}`);
    }
    await readEvents(r.body, (event) => {
      if (event.error) throw new Error(event.error.message); // a failure after the headers: the last event
      onChunk(run, event);
    });
  } catch (e) {
    if (e.name === "AbortError") {
      state = "stopped";
    } else {
      state = "error";
      showError(e.message);
    }
  } finally {
    run.end = performance.now();
    if (controller === mine) {
      controller = null;
      setState(state);
    }
    showRequestStats(run);
  }
}

// Server-sent events from a fetch body: "data: {json}" blocks separated by a blank line, up to "data: [DONE]".
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice("data: ".length);
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function onChunk(run, event) {
  if (event.usage) run.usage = event.usage;
  for (const choice of event.choices) {
    if (run.first === null) run.first = performance.now();
    const lp = choice.logprobs;
    run.tokens += lp ? lp.tokens.length : 0;
    appendTokens(choice.text, lp);
    if (choice.finish_reason) run.finish = choice.finish_reason;
  }
  showRequestStats(run);
}

function appendTokens(text, lp) {
  const tokens = lp ? lp.tokens.map((token, i) => ({
    token, logprob: lp.token_logprobs[i], top: lp.top_logprobs[i] })) : [];
  if (tokens.length && tokens.map((t) => t.token).join("") === text) {
    $("output").append(...tokens.map((t) => tokenSpan(t.token, [t])));
  } else if (text || tokens.length) {
    // The chunk's text is not its tokens' (text that may begin a stop string is held back for a later chunk,
    // or a character spans tokens): one span, every token in its tooltip.
    $("output").append(tokenSpan(text, tokens));
  }
}

function tokenSpan(text, tokens) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text;
  if (tokens.length) {
    tokenInfo.set(span, tokens);
    const p = Math.exp(Math.min(...tokens.map((t) => t.logprob)));
    span.style.setProperty("--p", p.toFixed(3)); // the CSS tints unlikely tokens
  }
  return span;
}

function stopRequest() {
  if (controller) controller.abort(); // the service sees the disconnect and frees the request's KV blocks
}

// ---------------------------------------------------------------------- display
function setState(state) {
  document.body.dataset.state = state;
  $("generate").disabled = state === "running";
  $("stop").disabled = state !== "running";
  $("status").textContent = { idle: "", running: "generating…", done: "", stopped: "stopped", error: "" }[state];
}

function showRequestStats(run) {
  const now = run.end ?? performance.now();
  const tokens = run.usage ? run.usage.completion_tokens : run.tokens;
  $("ttft").textContent = run.first === null ? "–" : `${(run.first - run.sent).toFixed(0)} ms`;
  $("tokens").textContent = run.first === null ? "–" : String(tokens);
  // Decode speed: the tokens after the first, over the time since the first.
  $("tps").textContent = tokens > 1 && now > run.first ? (1000 * (tokens - 1) / (now - run.first)).toFixed(1) : "–";
  $("cost").textContent = run.first === null ? "–"
    : `≤ $${((now - run.sent) / 3.6e6 * replicaDollarsPerHour).toPrecision(3)}`;
  $("finish").textContent = run.end === null ? "…" : (run.finish ?? document.body.dataset.state);
}

function apiMessage(body, r) {
  return body && body.error && body.error.message ? body.error.message : `HTTP ${r.status}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// The tooltip: each token's logprob and the most likely token at its position (the request asks for one).
function showTip(event) {
  const tokens = tokenInfo.get(event.target);
  if (!tokens) return;
  const lines = [];
  for (const t of tokens) {
    const p = 100 * Math.exp(t.logprob);
    lines.push(`${JSON.stringify(t.token)}  logprob ${t.logprob.toFixed(3)}  (p ${p.toFixed(1)}%)`);
    const [best, bestLp] = Object.entries(t.top).sort((a, b) => b[1] - a[1])[0] ?? [null, null];
    lines.push(best === null || best === t.token ? "  the most likely token"
      : `  most likely: ${JSON.stringify(best)}  logprob ${bestLp.toFixed(3)}`);
  }
  const tip = $("tip");
  tip.textContent = lines.join("\n");
  const box = event.target.getBoundingClientRect();
  tip.style.left = `${window.scrollX + box.left}px`;
  tip.style.top = `${window.scrollY + box.bottom + 4}px`;
  tip.hidden = false;
}

// ---------------------------------------------------------------------- live view
async function pollStats() {
  try {
    const r = await api(STATS, {}, false);
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    showLive(await r.json());
    $("live").classList.remove("stale");
  } catch {
    $("live").classList.add("stale"); // keep the last numbers, greyed out, and try again
  } finally {
    setTimeout(pollStats, STATS_PERIOD_MS);
  }
}

function showLive(s) {
  replicaDollarsPerHour = s.replica_dollars_per_hour;
  const fmt = (x, digits) => (x === null ? "–" : x.toFixed(digits));
  $("live-running").textContent = String(s.running);
  $("live-queued").textContent = String(s.waiting.queue);
  $("live-waiting").textContent = String(s.waiting.engines);
  $("live-kv").textContent = `${s.kv.used_blocks} / ${s.kv.total_blocks} (${s.kv.usage_perc.toFixed(1)}%)`;
  $("live-kv-bar").style.width = `${s.kv.usage_perc}%`;
  $("live-tps").textContent = fmt(s.rates.output_tokens_per_s, 1);
  $("live-cost").textContent = s.rates.dollars_per_1m_output_tokens === null ? "–"
    : `$${s.rates.dollars_per_1m_output_tokens.toFixed(2)}`;
  $("live-age").textContent = `(rates over ${s.rates.window_s.toFixed(0)} s)`;
  $("live-workers").replaceChildren(...s.workers.map((w) => {
    const row = document.createElement("tr");
    for (const cell of [w.id, w.running, w.waiting, `${w.free_blocks} / ${w.total_blocks}`]) {
      row.insertCell().textContent = String(cell);
    }
    return row;
  }));
}

// ---------------------------------------------------------------------- wiring
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stopRequest);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !controller) generate();
});
$("output").addEventListener("mouseover", showTip);
$("output").addEventListener("mouseout", () => { $("tip").hidden = true; });
setState("idle");
loadModels();
pollStats();
