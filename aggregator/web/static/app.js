// stackfleet's flame-graph page: reads the aggregator's JSON API and draws with d3-flame-graph.
// Plain browser JS on purpose (no build step): the vendored libraries are the only dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
let types = [];        // from /api/types
let chart = null;      // the current d3-flame-graph instance
let currentUnit = "count";
let autoTimer = null;
let searchSummary = "";  // shown in the details line when no frame is hovered
let latestRequest = 0;   // answers to older flame-graph requests are dropped, never drawn over newer ones
let fromUrl = null;      // hosts/service/pid of a shared link, applied once the selectors are filled

// ---- values in the profile type's unit -------------------------------------------------
function formatValue(v, unit) {
  if (unit === "nanoseconds") {
    if (v >= 1e9) return (v / 1e9).toFixed(2) + " s";
    if (v >= 1e6) return (v / 1e6).toFixed(2) + " ms";
    return (v / 1e3).toFixed(1) + " µs";
  }
  if (unit === "bytes") {
    const steps = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < steps.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : v) + " " + steps[i];
  }
  return Math.round(v).toLocaleString("en-US") + (unit === "count" ? "" : " " + unit);
}

function percent(part, whole) {
  return whole ? (100 * part / whole).toFixed(2) + "%" : "-";
}

// ---- the view's parameters, shared by the API calls, the downloads and the page URL ----------
function selectedHosts() {
  return Array.from($("hosts").selectedOptions).map((o) => o.value);
}

function timeParams() {
  if ($("range").value !== "custom") return { since: $("range").value, until: "now" };
  return { since: $("since").value || "15m", until: $("until").value || "now" };
}

function viewParams() {
  const p = new URLSearchParams({ type: $("type").value, value: $("value").value, ...timeParams() });
  selectedHosts().forEach((h) => p.append("host", h));
  if ($("service").value) p.set("service", $("service").value);
  if ($("pid").value) p.set("pid", $("pid").value);
  // Lock views show contention by default; other futex waits on request (shared/lock_waits.py).
  if ($("type").value === "lock" && $("lock-kind").value) p.append("label", "lock.wait.kind=" + $("lock-kind").value);
  return p;
}

// The baseline of a diff view: the same length of time just before, or another host.
function compareParams() {
  const mode = $("compare").value;
  if (mode === "host" && $("compare-host").value) return { compare_host: $("compare-host").value };
  if (mode !== "previous") return {};
  const preset = /^(\d+)([smhd])$/.exec($("range").value);
  if (preset) return { compare_since: 2 * preset[1] + preset[2], compare_until: $("range").value };
  const since = Date.parse($("since").value) / 1000;
  const until = $("until").value ? Date.parse($("until").value) / 1000 : Date.now() / 1000;
  if (!(since < until)) return {};
  return { compare_since: String(since - (until - since)), compare_until: String(since) };
}

async function api(path, params) {
  const res = await fetch(path + "?" + params.toString());
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function setOptions(select, values, keep) {
  const previous = new Set(keep);
  select.replaceChildren(...values.map(([value, label]) => {
    const o = new Option(label, value);
    o.selected = previous.has(value);
    return o;
  }));
}

// ---- loading ---------------------------------------------------------------------------
async function loadTypes() {
  types = (await api("api/types", new URLSearchParams(timeParams()))).types;
  const wanted = new URLSearchParams(location.search).get("type");
  const first = types.find((t) => t.name === wanted) || types.find((t) => t.has_data) || types[0];
  setOptions($("type"), types.map((t) => [t.name, t.name + (t.has_data ? "" : " (no data)")]), [first.name]);
  fillValues();
}

function fillValues() {
  const t = types.find((x) => x.name === $("type").value);
  setOptions($("value"), t.values.map((v) => [v.name, `${v.name} (${v.unit})`]), [t.values[0].name]);
  $("lock-kind-label").hidden = t.name !== "lock";
}

async function loadSelectors() {
  const p = new URLSearchParams({ type: $("type").value, ...timeParams() });
  const labels = await api("api/hosts", p);
  const keep = fromUrl || { hosts: selectedHosts(), service: $("service").value, pid: $("pid").value };
  fromUrl = null;
  setOptions($("hosts"), labels.hosts.map((h) => [h, h]), keep.hosts);
  setOptions($("compare-host"), labels.hosts.map((h) => [h, h]), [$("compare-host").value]);
  const service = keep.service, pid = keep.pid;
  setOptions($("service"), [["", "all"], ...labels.services.map((s) => [s, s])], [service]);
  setOptions($("pid"), [["", "all"], ...labels.processes.map((pr) => [String(pr.pid), `${pr.name} [${pr.pid}] on ${pr.host}`])], [pid]);
}

async function loadFlamegraph() {
  const params = viewParams();
  const request = ++latestRequest;
  const data = await api("api/flamegraph", new URLSearchParams({ ...Object.fromEntries(params), ...compareParams() }));
  if (request !== latestRequest) return;  // the user changed the view meanwhile: a newer answer will draw
  currentUnit = data.unit;
  history.replaceState(null, "", "?" + params.toString());
  $("download-pprof").href = "api/download/pprof?" + params.toString();
  $("download-otlp").href = "api/download/otlp?" + params.toString();
  const what = data.value === data.type ? data.type : `${data.type} ${data.value}`;
  $("status").textContent = `${what}: ${formatValue(data.total, data.unit)} total, ` +
    `${data.exports} exports, ${new Date(data.since_ns / 1e6).toLocaleString()} – ${new Date(data.until_ns / 1e6).toLocaleString()}`;
  if (data.compare) {
    const c = data.compare;
    $("status").textContent += ` — compared with ${c.hosts.length ? c.hosts.join(", ") : "all hosts"}, ` +
      `${new Date(c.since_ns / 1e6).toLocaleString()} – ${new Date(c.until_ns / 1e6).toLocaleString()} ` +
      `(${formatValue(c.total, data.unit)}); red: larger share now, blue: smaller`;
  }
  $("status").classList.remove("error");
  $("empty").hidden = data.total > 0;
  $("empty").textContent = "No samples in this range for this selection.";
  draw(data.tree, !!data.compare);
}

// ---- the flame graph -------------------------------------------------------------------
function deltaText(d) {
  if (d.data.delta === undefined) return "";
  const sign = d.data.delta > 0 ? "+" : d.data.delta < 0 ? "−" : "±";
  return `\nvs baseline ${sign}${formatValue(Math.abs(d.data.delta), currentUnit)}`;
}

function draw(tree, diff) {
  if (chart) chart.destroy();  // also removes its tooltip element
  $("chart").replaceChildren();
  const total = tree.value;
  const tip = flamegraph.tooltip.defaultFlamegraphTooltip().text((d) =>
    `${d.data.name}\ntotal ${formatValue(d.data.value, currentUnit)} (${percent(d.data.value, total)})` +
    `\nself  ${formatValue(d.data.self, currentUnit)} (${percent(d.data.self, total)})` + deltaText(d));
  chart = flamegraph.default()
    .width($("chart").clientWidth || 1200)
    .cellHeight(18)
    .minFrameSize(1)
    .transitionDuration(250)
    .tooltip(tip)
    .setLabelHandler((d) => `${d.data.name}: total ${formatValue(d.data.value, currentUnit)} ` +
      `(${percent(d.data.value, total)}), self ${formatValue(d.data.self, currentUnit)}`)
    .setDetailsHandler((text) => { $("details").textContent = text || searchSummary; })
    // Plain substring match: the library's default treats the term as a regular expression.
    .setSearchMatch((d, term) => !!term && d.data.name.toLowerCase().includes(term.toLowerCase()))
    .setSearchHandler((results, sum, all) => {
      searchSummary = results.length
        ? `search: ${results.length} frames, ${formatValue(sum, currentUnit)} (${percent(sum, all)})` : "search: no match";
      $("details").textContent = searchSummary;
    });
  if (diff) chart.setColorMapper(flamegraph.colorMapper.differentialColorMapper);
  d3.select("#chart").datum(tree).call(chart);
  if ($("search").value) chart.search($("search").value);
}

async function refresh(what) {
  try {
    if (what === "all") await loadTypes();
    if (what !== "graph") await loadSelectors();
    await loadFlamegraph();
  } catch (err) {
    $("status").textContent = "error: " + err.message;
    $("status").classList.add("error");
  }
}

// ---- wiring ------------------------------------------------------------------------------
function restoreFromUrl() {
  const p = new URLSearchParams(location.search);
  fromUrl = { hosts: p.getAll("host"), service: p.get("service") || "", pid: p.get("pid") || "" };
  const since = p.get("since");
  if (since && [...$("range").options].some((o) => o.value === since) && (p.get("until") || "now") === "now") {
    $("range").value = since;
  }
}

$("type").addEventListener("change", () => { fillValues(); refresh("selectors"); });
$("value").addEventListener("change", () => refresh("graph"));
$("lock-kind").addEventListener("change", () => refresh("graph"));
$("hosts").addEventListener("change", () => refresh("graph"));
$("service").addEventListener("change", () => refresh("graph"));
$("pid").addEventListener("change", () => refresh("graph"));
$("range").addEventListener("change", () => {
  $("custom-range").hidden = $("range").value !== "custom";
  refresh("selectors");
});
$("compare").addEventListener("change", () => {
  $("compare-host").hidden = $("compare").value !== "host";
  refresh("graph");
});
$("compare-host").addEventListener("change", () => refresh("graph"));
$("since").addEventListener("change", () => refresh("selectors"));
$("until").addEventListener("change", () => refresh("selectors"));
$("refresh").addEventListener("click", () => refresh("selectors"));
$("search").addEventListener("input", () => {
  if (!chart) return;
  if ($("search").value) {
    chart.search($("search").value);
  } else {
    searchSummary = "";
    chart.clear();
  }
});
$("reset-zoom").addEventListener("click", () => chart && chart.resetZoom());
$("auto").addEventListener("change", () => {
  clearInterval(autoTimer);
  if ($("auto").checked) autoTimer = setInterval(() => refresh("selectors"), 10000);
});

restoreFromUrl();
refresh("all");
