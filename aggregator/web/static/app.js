// stackfleet's page: reads the aggregator's JSON API and draws a timeline (d3), a top-functions
// table and a flame graph (d3-flame-graph). Plain browser JS on purpose (no build step): the
// vendored libraries are the only dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
let types = [];        // from /api/types
let chart = null;      // the current d3-flame-graph instance
let currentUnit = "count";
let autoTimer = null;
let searchSummary = "";  // shown in the details line when no frame is hovered
let latestRequest = 0;   // answers to older flame-graph requests are dropped, never drawn over newer ones
let latestTimeline = 0;  // the same for the timeline
let fromUrl = null;      // hosts/service/pid of a shared link, applied once the pickers are filled
let hostNames = new Set();
let processes = new Map();   // picker label -> pid
let selection = null;        // {since, until} in unix seconds: the range dragged on the timeline
let topRows = [];            // the view's functions: {name, self, total}
let viewTotal = 0;
let topSort = { key: "self", descending: true };
let focused = null;          // the function clicked in the table: highlighted (exact name) and zoomed to
const TOP_ROWS_SHOWN = 300;  // more rows than this are reached by searching
const PROCESS_SUGGESTIONS = 2000;

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
  return Array.from($("host-chips").querySelectorAll("[data-host]")).map((c) => c.dataset.host);
}

function selectedPid() {
  const text = $("pid").value.trim();
  if (!text) return "";
  if (processes.has(text)) return String(processes.get(text));
  const pid = /^(\d+)(\s|$)/.exec(text);  // a typed pid, or a suggestion's label (it starts with the pid)
  return pid ? pid[1] : "";
}

// The range of the range picker (what the timeline shows).
function timeParams() {
  if ($("range").value !== "custom") return { since: $("range").value, until: "now" };
  return { since: $("since").value || "15m", until: $("until").value || "now" };
}

// The range of the flame graph and the table: the timeline's selection, else the whole range.
function viewRange() {
  if (!selection) return timeParams();
  return { since: selection.since.toFixed(3), until: selection.until.toFixed(3) };
}

function filterParams(range) {
  const p = new URLSearchParams({ type: $("type").value, value: $("value").value, ...range });
  selectedHosts().forEach((h) => p.append("host", h));
  if ($("service").value) p.set("service", $("service").value);
  if (selectedPid()) p.set("pid", selectedPid());
  // Lock views show contention by default; other futex waits on request (shared/lock_waits.py).
  if ($("type").value === "lock" && $("lock-kind").value) p.append("label", "lock.wait.kind=" + $("lock-kind").value);
  return p;
}

function viewParams() {
  return filterParams(viewRange());
}

// The baseline of a diff view: the same length of time just before, or another host.
function compareParams() {
  const mode = $("compare").value;
  if (mode === "host" && hostNames.has($("compare-host").value)) return { compare_host: $("compare-host").value };
  if (mode !== "previous") return {};
  const preset = /^(\d+)([smhd])$/.exec($("range").value);
  if (preset && !selection) return { compare_since: 2 * preset[1] + preset[2], compare_until: $("range").value };
  const since = selection ? selection.since : Date.parse($("since").value) / 1000;
  const until = selection ? selection.until : ($("until").value ? Date.parse($("until").value) / 1000 : Date.now() / 1000);
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

function fillList(datalist, values) {
  datalist.replaceChildren(...values.map((v) => new Option(v, v)));
}

// ---- host chips: each selected host is a removable chip; the input adds one ------------------
function addHostChip(host) {
  if (selectedHosts().includes(host)) return;
  const chip = document.createElement("button");
  chip.type = "button";
  chip.className = "chip";
  chip.dataset.host = host;
  chip.title = "remove " + host;
  chip.textContent = host + " ×";
  chip.addEventListener("click", () => { chip.remove(); refresh("view"); });
  $("host-chips").append(chip);
}

function setHostChips(hosts) {
  $("host-chips").replaceChildren();
  hosts.forEach(addHostChip);
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

async function loadPickers() {
  const labels = await api("api/hosts", new URLSearchParams({ type: $("type").value, ...timeParams() }));
  hostNames = new Set(labels.hosts);
  fillList($("host-options"), labels.hosts);
  fillList($("service-options"), labels.services);
  if (fromUrl) {
    setHostChips(fromUrl.hosts);
    $("service").value = fromUrl.service;
    $("pid").value = fromUrl.pid;
    fromUrl = null;
  }
  // A fleet has far more processes than hosts: suggest those of the chosen hosts, at most
  // PROCESS_SUGGESTIONS of them (a pid can always be typed).
  const chosen = new Set(selectedHosts());
  processes = new Map(labels.processes.filter((pr) => !chosen.size || chosen.has(pr.host))
    .slice(0, PROCESS_SUGGESTIONS).map((pr) => [`${pr.pid} ${pr.name} on ${pr.host}`, pr.pid]));
  fillList($("pid-options"), [...processes.keys()]);
}

async function loadTimeline() {
  const request = ++latestTimeline;
  const data = await api("api/timeline", filterParams(timeParams()));
  if (request !== latestTimeline) return;
  drawTimeline(data);
}

async function loadFlamegraph() {
  const params = viewParams();
  const request = ++latestRequest;
  const withBaseline = new URLSearchParams(params);  // (an object would keep only one of several hosts)
  Object.entries(compareParams()).forEach(([k, v]) => withBaseline.set(k, v));
  const data = await api("api/flamegraph", withBaseline);
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
  $("status").dataset.total = String(data.total);
  $("status").classList.remove("error");
  $("empty").hidden = data.total > 0;
  $("empty").textContent = "No samples in this range for this selection.";
  topRows = data.top;
  viewTotal = data.total;
  draw(data.tree, !!data.compare);
  drawTop();
}

// ---- the timeline: the whole range, a drag selects the part the graph and table show ---------
function drawTimeline(data) {
  const box = $("timeline");
  box.replaceChildren();
  const width = box.clientWidth || 1200, height = 70, axis = 18;
  const x = d3.scaleTime().domain([data.since_ns / 1e6, data.until_ns / 1e6]).range([0, width]);
  // Delta columns: a bar's height is its value per second of its bucket, so a bucket that holds
  // several intervals (an export that waited, a replica's uneven exports) is wider, not taller.
  // Gauge columns (in-use heap, live goroutines): the level at the bucket's end.
  const seconds = (p) => Math.max(1e-9, (p.end_ns - p.start_ns) / 1e9);
  const level = data.gauge ? (p) => p.value : (p) => p.value / seconds(p);
  const max = d3.max(data.points, level) || 1;
  const y = d3.scaleLinear().domain([0, max]).range([height, 4]);
  const label = data.gauge
    ? (p) => formatValue(p.value, data.unit)
    : (p) => `${formatValue(p.value, data.unit)} in ${seconds(p).toFixed(1)} s`;
  const svg = d3.select(box).append("svg").attr("width", width).attr("height", height + axis)
    .attr("data-since-ns", data.since_ns).attr("data-until-ns", data.until_ns);
  svg.append("g").attr("class", "bars").selectAll("rect").data(data.points).join("rect")
    .attr("x", (p) => x(p.start_ns / 1e6))
    .attr("width", (p) => Math.max(1, x(p.end_ns / 1e6) - x(p.start_ns / 1e6)))
    .attr("y", (p) => y(level(p)))
    .attr("height", (p) => height - y(level(p)))
    .attr("data-value", (p) => p.value)
    .append("title").text((p) => `${new Date(p.end_ns / 1e6).toLocaleTimeString()}: ${label(p)}`);
  svg.append("g").attr("class", "axis").attr("transform", `translate(0,${height})`)
    .call(d3.axisBottom(x).ticks(Math.max(2, Math.floor(width / 110))));
  const brush = d3.brushX().extent([[0, 0], [width, height]]).on("end", (event) => {
    if (!event.sourceEvent) return;  // moved by the code below, not by the user
    if (!event.selection) { clearSelection(); return; }
    const [a, b] = event.selection.map((px) => x.invert(px).getTime() / 1000);
    selection = { since: a, until: b };
    showSelection();
    refresh("graph");
  });
  const brushed = svg.append("g").attr("class", "brush").call(brush);
  if (selection) {
    const from = Math.max(0, x(selection.since * 1000)), to = Math.min(width, x(selection.until * 1000));
    if (to > from) brushed.call(brush.move, [from, to]);
  }
}

function showSelection() {
  $("clear-selection").hidden = !selection;
  $("selection").textContent = selection
    ? `selected ${new Date(selection.since * 1000).toLocaleTimeString()} – ${new Date(selection.until * 1000).toLocaleTimeString()}`
    : "drag on the timeline to select a range";
}

function clearSelection() {
  selection = null;
  showSelection();
  refresh("view");
}

// ---- the top table ----------------------------------------------------------------------
function drawTop() {
  const term = $("search").value.toLowerCase();
  const rows = topRows.filter((r) => !term || r.name.toLowerCase().includes(term));
  const { key, descending } = topSort;
  const sign = descending ? -1 : 1;
  rows.sort((a, b) => sign * (key === "name" ? a.name.localeCompare(b.name) : a[key] - b[key]) ||
    a.name.localeCompare(b.name));
  const shown = rows.slice(0, TOP_ROWS_SHOWN);
  $("top").tBodies[0].replaceChildren(...shown.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.name = r.name;
    tr.dataset.self = String(r.self);
    tr.dataset.total = String(r.total);
    if (r.name === focused) tr.classList.add("focused");
    const name = document.createElement("td");
    name.textContent = r.name;
    name.title = r.name;
    tr.append(name, numberCell(r.self), numberCell(r.total));
    tr.addEventListener("click", () => focusFunction(r.name));
    return tr;
  }));
  $("top-more").hidden = rows.length <= shown.length;
  $("top-more").textContent = `${rows.length - shown.length} more functions: search to narrow`;
  for (const th of $("top").tHead.rows[0].cells) {
    th.setAttribute("aria-sort", th.dataset.key !== key ? "none" : descending ? "descending" : "ascending");
  }
}

function numberCell(value) {
  const td = document.createElement("td");
  td.className = "num";
  td.textContent = `${formatValue(value, currentUnit)} (${percent(value, viewTotal)})`;
  return td;
}

// Zoom the graph to the function's widest frame and highlight all its frames (exact name).
function focusFunction(name) {
  focused = name;
  drawTop();
  if (!chart) return;
  chart.search(name);
  const root = d3.select("#chart").datum();
  let widest = null;
  root.each((d) => { if (d.data.name === name && (!widest || d.value > widest.value)) widest = d; });
  if (widest) chart.zoomTo(widest);
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
    // Plain substring match (the library's default is a regular expression); a function
    // focused from the table matches by its exact name.
    .setSearchMatch((d, term) => !!term && (focused !== null ? d.data.name === focused
      : d.data.name.toLowerCase().includes(term.toLowerCase())))
    .setSearchHandler((results, sum, all) => {
      searchSummary = results.length
        ? `search: ${results.length} frames, ${formatValue(sum, currentUnit)} (${percent(sum, all)})` : "search: no match";
      $("details").textContent = searchSummary;
    });
  if (diff) chart.setColorMapper(flamegraph.colorMapper.differentialColorMapper);
  d3.select("#chart").datum(tree).call(chart);
  if (focused !== null && topRows.some((r) => r.name === focused)) {
    focusFunction(focused);
  } else {
    focused = null;
    if ($("search").value) chart.search($("search").value);
  }
}

// what: "all" (types too), "view" (pickers, timeline and graph), "graph" (the selected range only)
async function refresh(what) {
  try {
    if (what === "all") await loadTypes();
    if (what !== "graph") {
      await loadPickers();
      await Promise.all([loadTimeline(), loadFlamegraph()]);
    } else {
      await loadFlamegraph();
    }
  } catch (err) {
    $("status").textContent = "error: " + err.message;
    $("status").classList.add("error");
  }
}

// ---- wiring ------------------------------------------------------------------------------
function toLocalInput(seconds) {
  const d = new Date(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// A shared link: a preset range (since=15m) or an absolute one (unix seconds) as a custom range.
function restoreFromUrl() {
  const p = new URLSearchParams(location.search);
  fromUrl = { hosts: p.getAll("host"), service: p.get("service") || "", pid: p.get("pid") || "" };
  const since = p.get("since"), until = p.get("until") || "now";
  if (since && [...$("range").options].some((o) => o.value === since) && until === "now") {
    $("range").value = since;
  } else if (since && /^\d+(\.\d+)?$/.test(since)) {
    $("range").value = "custom";
    $("custom-range").hidden = false;
    $("since").value = toLocalInput(Number(since));
    if (/^\d+(\.\d+)?$/.test(until)) $("until").value = toLocalInput(Math.ceil(Number(until)));
  }
}

function onPickerChange(input, valid) {
  input.addEventListener("change", () => {
    const ok = !input.value || valid(input.value);
    input.classList.toggle("invalid", !ok);
    if (ok) refresh("view");
  });
}

$("type").addEventListener("change", () => { fillValues(); refresh("view"); });
$("value").addEventListener("change", () => refresh("view"));
$("lock-kind").addEventListener("change", () => refresh("view"));
$("host-input").addEventListener("change", () => {
  const host = $("host-input").value.trim();
  if (!hostNames.has(host)) { $("host-input").classList.toggle("invalid", !!host); return; }
  $("host-input").classList.remove("invalid");
  $("host-input").value = "";
  addHostChip(host);
  refresh("view");
});
onPickerChange($("service"), (v) => [...$("service-options").options].some((o) => o.value === v));
onPickerChange($("pid"), () => selectedPid() !== "");
$("range").addEventListener("change", () => {
  $("custom-range").hidden = $("range").value !== "custom";
  selection = null;
  showSelection();
  refresh("view");
});
$("compare").addEventListener("change", () => {
  $("compare-host").hidden = $("compare").value !== "host";
  refresh("graph");
});
$("compare-host").addEventListener("change", () => refresh("graph"));
$("since").addEventListener("change", () => { selection = null; showSelection(); refresh("view"); });
$("until").addEventListener("change", () => { selection = null; showSelection(); refresh("view"); });
$("refresh").addEventListener("click", () => refresh("view"));
$("clear-selection").addEventListener("click", clearSelection);
$("search").addEventListener("input", () => {
  focused = null;
  drawTop();
  if (!chart) return;
  if ($("search").value) {
    chart.search($("search").value);
  } else {
    searchSummary = "";
    chart.clear();
  }
});
$("reset-zoom").addEventListener("click", () => chart && chart.resetZoom());
for (const th of $("top").tHead.rows[0].cells) {
  th.addEventListener("click", () => {
    const key = th.dataset.key;
    // a new column starts largest first (names: A to Z); the same column again flips the order
    topSort = topSort.key === key ? { key, descending: !topSort.descending } : { key, descending: key !== "name" };
    drawTop();
  });
}
$("auto").addEventListener("change", () => {
  clearInterval(autoTimer);
  if ($("auto").checked) autoTimer = setInterval(() => refresh("view"), 10000);
});

restoreFromUrl();
refresh("all");
