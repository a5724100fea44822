// The MATRIZ dashboard: everything arrives pushed over server-sent events (/api/events):
// `snapshot` (the observability worker's stats, every second), `nodes` (node summaries as
// they are seen, with refusal and error counts by reason) and `alert` (burn-rate alerts).
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY = 300;          // snapshots kept per emit point for the chart
const MAX_NODES = 50;        // kept in the (scrolling) recent nodes table
const history = new Map();    // emit point -> [{t, p50, p95, p99, sla}]
let reasons = {};
let lastSnapshot = null;
let chartChosen = false;      // the person picked an emit point: keep it

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fmt(ms) { return ms == null ? "—" : Number(ms).toFixed(ms < 10 ? 2 : 1); }

function renderPoints() {
  if (!lastSnapshot) return;
  const body = $("points").querySelector("tbody");
  const names = Object.keys(lastSnapshot.emit_points).sort();
  body.replaceChildren();
  if (!names.length) {
    const tr = document.createElement("tr");
    tr.append(cell("No calls yet.", "muted"));
    tr.firstChild.colSpan = 10;
    body.append(tr);
  }
  for (const name of names) {
    const p = lastSnapshot.emit_points[name];
    const refused = Object.entries(p.outcomes)
      .filter(([o]) => o !== "ok" && o !== "error").reduce((n, [, c]) => n + c, 0);
    const byReason = Object.entries(reasons[name] || {})
      .sort((a, b) => b[1] - a[1]).map(([r, c]) => r + " " + c).join(", ");
    const tr = document.createElement("tr");
    tr.dataset.emitPoint = name;
    const over = p.sla_p95_ms != null && p.count > 0 && p.p95_ms > p.sla_p95_ms;
    tr.append(cell(name, "mono"), cell(p.count, "num count"), cell(p.errors, "num errors"),
              cell(refused, "num refused"), cell(byReason || "—", "reasons"),
              cell(fmt(p.p50_ms), "num"), cell(fmt(p.p95_ms), "num"), cell(fmt(p.p99_ms), "num"),
              cell(fmt(p.sla_p95_ms), "num"));
    const status = document.createElement("td");
    const pill = document.createElement("span");
    pill.className = "pill " + (!p.sla_ok ? "bad" : over ? "warn" : "ok");
    pill.textContent = !p.sla_ok ? "alert firing" : over ? "p95 over SLA" : "ok";
    status.append(pill);
    tr.append(status);
    body.append(tr);
  }
  const select = $("chart-point");
  const chosen = select.value;
  if (select.options.length !== names.length) {
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    select.value = chosen;
  }
  if (!chartChosen) {  // follow the busiest emit point until the person picks one
    const busiest = names.slice().sort((a, b) =>
      lastSnapshot.emit_points[b].count - lastSnapshot.emit_points[a].count)[0];
    select.value = busiest || "";
  }
}

function recordHistory(snapshot) {
  const t = Date.now();
  for (const [name, p] of Object.entries(snapshot.emit_points)) {
    if (!history.has(name)) history.set(name, []);
    const series = history.get(name);
    series.push({ t, p50: p.p50_ms, p95: p.p95_ms, p99: p.p99_ms, sla: p.sla_p95_ms });
    if (series.length > HISTORY) series.shift();
  }
}

function renderChart() {
  const svg = $("chart");
  const series = history.get($("chart-point").value) || [];
  svg.replaceChildren();
  if (series.length < 1) return;
  const W = 1000, H = 220, left = 48, bottom = 20, top = 8;
  const max = Math.max(1, ...series.flatMap((s) => [s.p99, s.sla || 0])) * 1.1;
  const t0 = series[0].t, t1 = Math.max(series[series.length - 1].t, t0 + 1000);
  const x = (t) => left + (W - left - 8) * (t - t0) / (t1 - t0);
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
  };
  for (const frac of [0, 0.5, 1]) {
    const v = max * frac;
    add("line", { x1: left, x2: W, y1: y(v), y2: y(v), stroke: "#d9dde5" });
    add("text", { x: 4, y: y(v) + 4 }, v.toFixed(1) + " ms");
  }
  const line = (key, color) => add("polyline", {
    fill: "none", stroke: color, "stroke-width": 2, "vector-effect": "non-scaling-stroke",
    points: series.map((s) => x(s.t) + "," + y(s[key])).join(" "),
  });
  if (series[series.length - 1].sla != null) {
    const sla = series[series.length - 1].sla;
    add("line", { x1: left, x2: W, y1: y(sla), y2: y(sla), stroke: "#b42318",
                  "stroke-dasharray": "6 4", "stroke-width": 1.5 });
  }
  line("p50", "#2b59c3"); line("p95", "#b54708"); line("p99", "#7a2bc3");
  add("text", { x: left, y: H - 4 }, new Date(t0).toLocaleTimeString());
  add("text", { x: W - 70, y: H - 4 }, new Date(t1).toLocaleTimeString());
}

function onSnapshot(event) {
  lastSnapshot = JSON.parse(event.data);
  recordHistory(lastSnapshot);
  renderPoints();
  renderChart();
  $("updated").textContent = "updated " + new Date().toLocaleTimeString() +
    " · " + lastSnapshot.workers + " observability worker(s)";
}

function onNodes(event) {
  const message = JSON.parse(event.data);
  reasons = message.reasons || {};
  const body = $("nodes").querySelector("tbody");
  for (const n of message.nodes) {
    const tr = document.createElement("tr");
    tr.dataset.emitPoint = n.emit_point;
    tr.dataset.outcome = n.outcome;
    const outcome = n.outcome + (n.reason ? " (" + n.reason + ")" : "");
    tr.append(cell(new Date(n.ts).toLocaleTimeString()), cell(n.emit_point, "mono"),
              cell(outcome, "outcome"), cell(fmt(n.latency_ms), "num"),
              cell(n.subject_pseudonym ? n.subject_pseudonym.slice(0, 16) + "…" : "—", "mono"));
    if (n.subject_pseudonym) tr.lastChild.title = n.subject_pseudonym;
    body.prepend(tr);
  }
  while (body.children.length > MAX_NODES) body.lastChild.remove();
  renderPoints();
}

function onAlert(event) {
  const a = JSON.parse(event.data);
  const list = $("alerts");
  if (list.firstChild && list.firstChild.classList && list.firstChild.classList.contains("muted")) {
    list.replaceChildren();
  }
  const li = document.createElement("li");
  li.dataset.state = a.state;
  const pill = document.createElement("span");
  pill.className = "pill " + (a.state === "firing" ? "bad" : "ok");
  pill.textContent = a.state;
  li.append(pill, " " + a.severity + " · ", Object.assign(document.createElement("code"),
    { textContent: a.emit_point }),
    " · burn " + Number(a.long_burn_rate).toFixed(1) + " / " + Number(a.short_burn_rate).toFixed(1) +
    " (threshold " + a.burn_rate_threshold + ") · budget left " +
    (100 * a.error_budget_remaining).toFixed(1) + "% · " + new Date(a.ts).toLocaleTimeString());
  list.prepend(li);
}

document.addEventListener("DOMContentLoaded", () => {
  const source = new EventSource("/api/events");
  source.addEventListener("snapshot", onSnapshot);
  source.addEventListener("nodes", onNodes);
  source.addEventListener("alert", onAlert);
  source.onopen = () => { $("connection").className = "pill ok"; $("connection").textContent = "live"; };
  source.onerror = () => { $("connection").className = "pill warn"; $("connection").textContent = "reconnecting…"; };
  $("chart-point").addEventListener("change", () => { chartChosen = true; renderChart(); });
});
