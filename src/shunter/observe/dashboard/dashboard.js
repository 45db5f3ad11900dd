// shunter dashboard: polls the admin API's JSON (/stats every second, /topology and the
// dead-letter list less often) and draws the page. Plain DOM, no framework, no build step;
// every value from the API goes in through textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const DLQ_POLL_MS = 10000;
const TOPOLOGY_POLL_MS = 30000;
const SVG = "http://www.w3.org/2000/svg";

const state = {
  token: sessionStorage.getItem("shunter-token") || "",
  topology: [],
  previous: null, // the last /stats answer, for rates
  rates: {}, // caller -> {ok, errors} per second
  stats: null,
  selected: null, // dead-letter id shown in the detail pane
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n * 10) / 10);
}

function age(seconds) {
  if (!seconds) return "–";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + "s";
  if (seconds < 3600) return (seconds / 60).toFixed(1) + "m";
  return (seconds / 3600).toFixed(1) + "h";
}

function clock(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function when(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  return d.toLocaleDateString() === new Date().toLocaleDateString()
    ? d.toLocaleTimeString()
    : d.toLocaleString();
}

let noticeTimer = 0;

function notice(text, bad = false) {
  const box = $("#notice");
  box.hidden = !text;
  box.textContent = text || "";
  box.classList.toggle("bad", bad);
  clearTimeout(noticeTimer);
  if (text && !bad) noticeTimer = setTimeout(() => notice(""), 8000);
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (options.auth) headers.Authorization = "Bearer " + state.token;
  const resp = await fetch(path, { ...options, headers });
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    body = { error: resp.statusText };
  }
  if (!resp.ok) throw new Error(`${resp.status}: ${(body && body.error) || resp.statusText}`);
  return body;
}

// -- rates --------------------------------------------------------------------------------

const ERRORS = ["fast", "slow", "dlq"];

function updateRates(stats) {
  const prev = state.previous;
  if (prev) {
    const dt = Math.max(stats.time - prev.time, 0.001);
    for (const [caller, row] of Object.entries(stats.callers)) {
      const before = prev.callers[caller] || {};
      const errors = (r) => ERRORS.reduce((sum, k) => sum + (r[k] || 0), 0);
      state.rates[caller] = {
        ok: Math.max(0, ((row.ok || 0) - (before.ok || 0)) / dt),
        errors: Math.max(0, (errors(row) - errors(before)) / dt),
      };
    }
  }
  state.previous = stats;
}

// -- topology graph -----------------------------------------------------------------------

function topicLag(stats) {
  const out = {};
  for (const p of stats.partitions || []) {
    if (p.kind !== "source") continue;
    const t = (out[p.topic] = out[p.topic] || { lag: 0, seconds: 0, partitions: 0 });
    t.lag += p.lag || 0;
    t.seconds = Math.max(t.seconds, p.lag_seconds || 0);
    t.partitions += 1;
  }
  return out;
}

function drawGraph(stats) {
  const graph = $("#graph");
  const rows = state.topology;
  const topics = [...new Set(rows.map((r) => r.topic))];
  const categories = [...new Set(rows.map((r) => r.category))];
  const callers = [...new Set(rows.map((r) => r.caller))];
  const nodeH = 54, gap = 10;
  const height = Math.max(topics.length, categories.length, callers.length) * (nodeH + gap) + gap;
  graph.style.height = Math.max(height, 80) + "px";
  const width = graph.clientWidth || 1000;
  const nodeW = Math.min(260, width * 0.26);
  const colX = [8, (width - nodeW) / 2, width - nodeW - 8];
  const place = (list, col) => {
    const total = list.length * (nodeH + gap) - gap;
    const top = (Math.max(height, 80) - total) / 2;
    return Object.fromEntries(list.map((name, i) => [name, { x: colX[col], y: top + i * (nodeH + gap) }]));
  };
  const at = { topic: place(topics, 0), category: place(categories, 1), caller: place(callers, 2) };
  graph.replaceChildren();
  graph.setAttribute("viewBox", `0 0 ${width} ${Math.max(height, 80)}`);
  const edges = new Set();
  for (const r of rows) {
    edges.add(`topic|${r.topic}|category|${r.category}`);
    edges.add(`category|${r.category}|caller|${r.caller}`);
  }
  for (const e of edges) {
    const [k1, n1, k2, n2] = e.split("|");
    const a = at[k1][n1], b = at[k2][n2];
    const x1 = a.x + nodeW, y1 = a.y + nodeH / 2, x2 = b.x, y2 = b.y + nodeH / 2;
    const mid = (x1 + x2) / 2;
    graph.append(svg("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}` }));
  }
  const lags = topicLag(stats);
  const node = (kind, name, lines, extra = "") => {
    const { x, y } = at[kind][name];
    const g = svg("g", { class: `node ${kind} ${extra}`, "data-name": name, transform: `translate(${x},${y})` });
    g.append(svg("rect", { width: nodeW, height: nodeH, rx: 5 }));
    g.append(svg("text", { x: 8, y: 17, class: "title" }, name));
    lines.forEach(([text, cls], i) => g.append(svg("text", { x: 8, y: 33 + i * 14, class: `sub ${cls || ""}` }, text)));
    graph.append(g);
  };
  for (const t of topics) {
    const l = lags[t];
    node("topic", t, [
      [l ? `lag ${fmt(l.lag)} msgs · oldest ${age(l.seconds)}` : "no partition assigned here"],
      [l ? `${l.partitions} partitions on this instance` : ""],
    ]);
  }
  for (const c of categories) {
    const subs = rows.filter((r) => r.category === c);
    const where = subs.find((r) => r.where);
    node("category", c, [[where ? `where ${where.where}` : `${new Set(subs.map((r) => r.caller)).size} subscribers`]]);
  }
  for (const c of callers) {
    const row = (stats.callers || {})[c] || {};
    const rate = state.rates[c] || { ok: 0, errors: 0 };
    const failing = rate.errors > 0;
    const lines = [
      [`${fmt(rate.ok)} ok/s · ${fmt(rate.errors)} err/s · dlq ${fmt(row.dlq || 0)}`, failing ? "bad" : ""],
      [`backlog ${fmt(row.backlog || 0)} · lag ${fmt(row.lag || 0)}${row.paused ? " · PAUSED" : ""}`],
    ];
    node("caller", c, lines, row.paused ? "paused" : failing ? "failing" : "");
  }
}

// -- tables -------------------------------------------------------------------------------

// Rows are updated in place (not rebuilt) so that a click on a button is never lost to a
// redraw between mouse down and mouse up.
const CALLER_CELLS = ["caller", "category", "ok-rate", "err-rate", "ok", "retries", "dlq", "lag",
  "backlog", "oldest", "state"];

function callerRow(caller) {
  let tr = document.querySelector(`#callers tbody tr[data-caller="${CSS.escape(caller)}"]`);
  if (tr) return tr;
  tr = el("tr", { "data-caller": caller });
  for (const name of CALLER_CELLS) {
    const numeric = !["caller", "category", "state"].includes(name);
    tr.append(el("td", { class: `${numeric ? "num " : ""}${name}` }));
  }
  const button = el("button", { class: "toggle", "data-caller": caller });
  button.addEventListener("click", () => pauseResume(caller, button.dataset.action));
  tr.append(el("td", {}, button));
  $("#callers tbody").append(tr);
  return tr;
}

function setCell(tr, name, text, cls = "") {
  const td = tr.querySelector("td." + name);
  if (td.textContent !== text) td.textContent = text;
  const numeric = !["caller", "category", "state"].includes(name);
  td.className = `${numeric ? "num " : ""}${name} ${cls}`.trim();
}

function drawCallers(stats) {
  const rows = Object.values(stats.callers || {}).sort((a, b) => a.caller.localeCompare(b.caller));
  for (const r of rows) {
    const tr = callerRow(r.caller);
    const rate = state.rates[r.caller] || { ok: 0, errors: 0 };
    tr.classList.toggle("paused", !!r.paused);
    setCell(tr, "caller", r.caller);
    setCell(tr, "category", r.category || "");
    setCell(tr, "ok-rate", fmt(rate.ok));
    setCell(tr, "err-rate", fmt(rate.errors), rate.errors > 0 ? "bad" : "");
    setCell(tr, "ok", String(r.ok || 0));
    setCell(tr, "retries", String((r.fast || 0) + (r.slow || 0)));
    setCell(tr, "dlq", String(r.dlq || 0), r.dlq ? "bad" : "");
    setCell(tr, "lag", String(r.lag || 0));
    setCell(tr, "backlog", String(r.backlog || 0));
    setCell(tr, "oldest", age(r.oldest_pending_seconds));
    setCell(tr, "state", r.paused ? "paused" : "running", r.paused ? "state-paused" : "good");
    const button = tr.querySelector("button.toggle");
    button.dataset.action = r.paused ? "resume" : "pause";
    button.textContent = r.paused ? "Resume" : "Pause";
    button.disabled = !state.token;
    button.title = state.token ? "" : "enter the admin token first";
  }
}

function fingerprintCell(f) {
  // "KeyError at dir/file.py:12 in func": the type on top, the failing line under it
  const [type, line] = f.fingerprint.split(/ at (.+)/s);
  const td = el("td", { class: "wrap fingerprint", title: f.example.error || "" }, el("span", { class: "fp-type" }, type));
  if (line) {
    // break a long path after its slashes, never inside a name
    const span = el("span", { class: "fp-line" });
    line.split("/").forEach((part, i) => {
      if (i) span.append("/", document.createElement("wbr"));
      span.append(part);
    });
    td.append(" at ", span);
  }
  return td;
}

function drawFingerprints(stats) {
  const rows = stats.fingerprints || [];
  const body = $("#fingerprints tbody");
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "dim" }, "no failures yet")));
    return;
  }
  body.replaceChildren(
    ...rows.slice(0, 30).map((f) =>
      el(
        "tr",
        { "data-caller": f.caller },
        el("td", {}, f.caller || "(none)"),
        fingerprintCell(f),
        el("td", { class: "num count" }, String(f.count)),
        el("td", { class: "seen" }, `${clock(f.first_seen * 1000)}–${clock(f.last_seen * 1000)}`),
        el("td", {}, f.example.topic ? `${f.example.topic}[${f.example.partition}]@${f.example.offset}` : ""),
      ),
    ),
  );
}

function drawPartitions(stats) {
  const rows = (stats.partitions || []).slice().sort((a, b) =>
    a.kind.localeCompare(b.kind) || a.topic.localeCompare(b.topic) || a.partition - b.partition);
  const body = $("#partitions tbody");
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colSpan: 7, class: "dim" }, "no partition assigned")));
    return;
  }
  body.replaceChildren(
    ...rows.map((p) =>
      el(
        "tr",
        { "data-topic": p.topic, "data-partition": String(p.partition) },
        el("td", {}, p.topic),
        el("td", { class: "num" }, String(p.partition)),
        el("td", {}, p.kind),
        el("td", { class: "num lag" }, p.lag === null ? "?" : String(p.lag)),
        el("td", { class: "num" }, age(p.lag_seconds)),
        el("td", { class: "num" }, String(p.in_flight)),
        el("td", { class: "wrap " + (p.stalled ? "bad" : p.held ? "warn" : "dim"), title: p.held },
          p.stalled ? `STALLED ${age(p.stuck_seconds)}: ${p.held}` : p.held || "moving"),
      ),
    ),
  );
}

// -- pause / resume -----------------------------------------------------------------------

async function pauseResume(caller, action) {
  try {
    const answer = await api(`/callers/${encodeURIComponent(caller)}/${action}`, { method: "POST", auth: true });
    notice(`caller ${answer.caller} is ${answer.paused ? "paused" : "running"}`);
  } catch (err) {
    notice(`${action} ${caller} failed: ${err.message}`, true);
  }
  await refresh();
}

// -- dead letters -------------------------------------------------------------------------

function dlqQuery() {
  const q = new URLSearchParams({ limit: "50" });
  const caller = $("#dlq-caller").value;
  if (caller) q.set("caller", caller === "(none)" ? "" : caller);
  if ($("#dlq-error").value.trim()) q.set("error", $("#dlq-error").value.trim());
  if ($("#dlq-since").value.trim()) q.set("since", $("#dlq-since").value.trim());
  return q;
}

async function loadDeadLetters() {
  let answer;
  try {
    answer = await api("/deadletters?" + dlqQuery());
  } catch (err) {
    $("#dlq-count").textContent = `(${err.message})`;
    return;
  }
  $("#dlq-count").textContent = `newest ${answer.records.length} of ${answer.total} on ${answer.topic}`;
  const records = answer.records.slice().reverse(); // newest first
  const ids = records.map((d) => d.id).join(",");
  const body = $("#dlq-list tbody");
  if (body.dataset.ids === ids) return;
  body.dataset.ids = ids;
  body.replaceChildren(
    ...records.map((d) => {
      const tr = el(
        "tr",
        { "data-id": d.id, class: d.id === state.selected ? "selected" : "" },
        el("td", {}, d.id),
        el("td", {}, when(d.timestamp_ms)),
        el("td", {}, d.caller || "(none)"),
        el("td", {}, d.stage || ""),
        el("td", { class: "wrap", title: d.error || d.problem || "" }, d.error_type || d.problem || ""),
        el("td", {}, d.origin_topic ? `${d.origin_topic}[${d.origin_partition}]@${d.origin_offset}` : ""),
      );
      tr.addEventListener("click", () => showDeadLetter(d.id));
      return tr;
    }),
  );
}

async function showDeadLetter(id) {
  state.selected = id;
  for (const tr of document.querySelectorAll("#dlq-list tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.id === id);
  }
  const pane = $("#dlq-detail");
  let d;
  try {
    d = await api("/deadletters/" + encodeURIComponent(id));
  } catch (err) {
    pane.replaceChildren(el("p", { class: "bad" }, err.message));
    return;
  }
  const fields = [
    ["record", `${d.topic} ${d.id}, ${when(d.timestamp_ms)}`],
    ["caller", d.caller || "(none)"],
    ["stage", d.stage],
    ["error", `${d.error_type || ""}: ${d.error || d.problem || ""}`],
    ["origin", `${d.origin_topic}[${d.origin_partition}]@${d.origin_offset}`],
    ["attempt", d.attempt],
    ["key", d.key === null ? "(none)" : d.key],
  ];
  const dl = el("dl");
  for (const [k, v] of fields) dl.append(el("dt", {}, k), el("dd", {}, v ?? ""));
  const to = el("select", { id: "replay-to" });
  const names = Object.keys((state.stats && state.stats.callers) || {}).sort();
  for (const name of names) to.append(el("option", { value: name, selected: name === d.caller }, name));
  const replayButton = el("button", { id: "replay", disabled: !state.token }, "Replay to");
  replayButton.addEventListener("click", () => replay(d.id, to.value));
  pane.replaceChildren(
    el("div", { class: "actions" }, replayButton, to, el("span", { class: "dim" }, state.token ? "" : "(token needed)")),
    dl,
    el("h3", {}, "traceback"),
    el("pre", { class: "traceback" }, d.traceback || "(no Python traceback for this failure)"),
    el("h3", {}, `payload (${d.payload_bytes} bytes)`),
    el("pre", { class: "payload" }, d.payload === null ? "(none: a tombstone)" : d.payload),
  );
}

async function replay(id, to) {
  try {
    const answer = await api("/deadletters/replay", {
      method: "POST",
      auth: true,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ to, ids: [id] }),
    });
    const refused = answer.refused.map((r) => `${r.id}: ${r.reason}`).join("; ");
    notice(`replayed ${answer.written} record(s) to ${answer.to}` + (refused ? `; refused ${refused}` : ""), !!refused);
  } catch (err) {
    notice(`replay failed: ${err.message}`, true);
  }
}

function fillCallerFilter() {
  const select = $("#dlq-caller");
  const current = select.value;
  const names = [...new Set(state.topology.map((r) => r.caller))].sort();
  select.replaceChildren(el("option", { value: "" }, "any"), ...names.map((n) => el("option", { value: n }, n)),
    el("option", { value: "(none)" }, "(none: rejected, crash)"));
  select.value = current;
}

// -- the loop -----------------------------------------------------------------------------

async function refresh() {
  let stats;
  try {
    stats = await api("/stats");
  } catch (err) {
    $("#state").textContent = "unreachable";
    $("#state").className = "pill bad";
    return;
  }
  state.stats = stats;
  updateRates(stats);
  $("#group").textContent = "group " + stats.group;
  const stalled = (stats.partitions || []).some((p) => p.stalled);
  $("#state").textContent = stalled ? "partition stalled" : "live";
  $("#state").className = "pill " + (stalled ? "bad" : "ok");
  $("#updated").textContent = "updated " + new Date(stats.time * 1000).toLocaleTimeString();
  drawGraph(stats);
  drawCallers(stats);
  drawFingerprints(stats);
  drawPartitions(stats);
}

async function loadTopology() {
  try {
    state.topology = await api("/topology");
    fillCallerFilter();
  } catch (_) {
    /* the next poll tries again */
  }
}

function showToken() {
  $("#token-state").textContent = state.token ? "token set" : "read-only";
}

function init() {
  showToken();
  $("#token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("#token").value.trim();
    sessionStorage.setItem("shunter-token", state.token);
    $("#token").value = "";
    showToken();
    refresh();
  });
  $("#dlq-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    loadDeadLetters();
  });
  window.addEventListener("resize", () => state.stats && drawGraph(state.stats));
  loadTopology().then(() => {
    refresh();
    loadDeadLetters();
  });
  setInterval(refresh, POLL_MS);
  setInterval(loadTopology, TOPOLOGY_POLL_MS);
  setInterval(() => $("#dlq-auto").checked && loadDeadLetters(), DLQ_POLL_MS);
}

document.addEventListener("DOMContentLoaded", init);
