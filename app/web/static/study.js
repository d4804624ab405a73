// One study, live: summary, best trial, plots and the trial table, kept current by the event stream (or by
// incremental polling when streaming is not possible). With 10,000 trials the page loads the compact
// history once, curves only for a few trials, and the table one server-side page at a time.
/* global echarts */
import { ApiError, EventStream, download, el, formatDuration, formatValue, fragment, getJSON, mountSignIn,
         takeKeyFromFragment, throttle } from "./api.js";
import { curvesOption, historyOption, importanceOption, parallelOption, trialOption } from "./charts.js";

const STUDY_ID = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const BASE = `/studies/${encodeURIComponent(STUDY_ID)}`;
const TABLE_PAGE = 50;
const TOP_CURVES = 8;
const RECENT_CURVES = 6;
const POLL_MS = 3000;
const IMPORTANCE_EVERY_MS = 15000;
const PARAM_COLUMNS = 8;
const PARALLEL_AXES = 8;
const $ = (id) => document.getElementById(id);

const state = {
  study: null,
  objective: "value",
  direction: "maximize",
  epochs: 1,
  paramNames: [],
  importantFirst: [], // parameter names by importance, once known
  trials: new Map(), // number -> {number, state, value, duration_s, epochs_run, params}
  curves: new Map(), // number -> curve as GET /curves returns it
  selected: null,
  table: { sort: "number", order: "asc", cursors: [null], index: 0, next: null, state: "" },
  drawn: new Set(),
  stream: null,
  polling: null,
};

const charts = {};
function chart(id) {
  if (!charts[id]) {
    charts[id] = echarts.init($(id), null, { renderer: "canvas" });
    window.addEventListener("resize", () => charts[id].resize());
  }
  return charts[id];
}

function markDrawn(id) {
  if ($(id)) $(id).dataset.drawn = "true";
  state.drawn.add(id);
  const wanted = ["summary", "history-chart", "parallel-chart", "curves-chart", "importance-chart", "trials-table"];
  if (wanted.every((w) => state.drawn.has(w))) document.body.dataset.ready = "true";
}

function notice(text, error = false) {
  const box = $("notice");
  box.textContent = text;
  box.classList.toggle("error", error);
  box.classList.toggle("hidden", !text);
}

function failed(error) {
  if (error instanceof ApiError && error.status === 401) notice("Sign in with your API key to see this study.");
  else if (error instanceof ApiError && error.status === 404) notice("No such study among yours.", true);
  else notice(`Could not load: ${error.message}`, true);
}

// ---- summary, best trial, test metrics ------------------------------------------------------------------

function kv(container, entries) {
  container.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function renderSummary(study) {
  state.study = study;
  const spec = study.spec || state.spec || {};
  if (study.spec) state.spec = study.spec;
  const objectives = Array.isArray(spec.objective) ? spec.objective : spec.objective ? [spec.objective] : [];
  if (objectives.length) {
    state.objective = objectives[0].metric;
    state.direction = objectives[0].direction;
  }
  state.epochs = spec.budget ? spec.budget.epochs : state.epochs;
  document.title = `hpsearch · ${study.name}`;
  $("study-name").textContent = study.name;
  const badge = $("study-status");
  badge.textContent = study.status;
  badge.className = `badge ${study.status}`;
  const p = study.progress;
  const total = Math.max(1, p.n_trials);
  const [done, run] = $("progress").children;
  done.style.width = `${(100 * p.finished) / total}%`;
  run.style.left = done.style.width;
  run.style.width = `${(100 * p.running) / total}%`;
  $("progress-counts").textContent = `${p.finished}/${p.n_trials} finished · ${p.complete} complete · ${p.pruned} pruned · ${p.fail} failed` +
    (p.running ? ` · ${p.running} running` : "") + (p.waiting ? ` · ${p.waiting} waiting` : "");
  $("study-meta").textContent = [study.elapsed_s !== null ? formatDuration(study.elapsed_s) : null,
                                 study.stop_reason ? `stopped: ${study.stop_reason}` : null].filter(Boolean).join(" · ");
  renderBest(study.best_trial);
  renderTestMetrics(study.test_metrics);
  if (study.spec) {
    kv($("study-info"), [
      ["objective", objectives.map((o) => `${o.direction} ${o.metric}`).join(", ")],
      ["dataset", `${study.dataset} (${spec.task})`], ["model", study.model],
      ["sampler", spec.sampler ? spec.sampler.name : "—"], ["pruner", spec.pruner ? spec.pruner.name : "—"],
      ["epochs", String(state.epochs)], ["created", new Date(study.created_at).toLocaleString()],
      ["id", study.id],
    ]);
  }
  if (study.error) notice(`Study failed: ${study.error}`, true);
  markDrawn("summary");
}

function renderBest(best) {
  $("best-empty").classList.toggle("hidden", Boolean(best));
  $("best").classList.toggle("hidden", !best);
  if (!best) return;
  $("best-value").textContent = formatValue(best.value);
  $("best-value").dataset.value = String(best.value);
  const label = el("a", { href: "#", onclick: (e) => { e.preventDefault(); selectTrial(best.number); } },
    `trial #${best.number}`);
  $("best-label").replaceChildren(`${state.objective} · `, label);
  kv($("best-params"), Object.entries(best.params).map(([k, v]) => [k, formatValue(v)]));
}

function renderTestMetrics(metrics) {
  $("test-empty").classList.toggle("hidden", Boolean(metrics));
  if (!metrics) return;
  const flat = Object.entries(metrics).filter(([, v]) => typeof v !== "object");
  kv($("test-metrics"), flat.map(([k, v]) => [k, formatValue(v)]));
}

// ---- history and parallel coordinates (all trials, compact) ---------------------------------------------

function mergeHistory(h) {
  state.objective = h.objective;
  state.direction = h.direction;
  for (const name of h.param_names) if (!state.paramNames.includes(name)) state.paramNames.push(name);
  h.number.forEach((number, i) => {
    const params = {};
    for (const name of h.param_names) {
      const v = h.params[name][i];
      if (v !== null && v !== undefined) params[name] = v;
    }
    state.trials.set(number, { number, state: h.state[i], value: h.value[i], duration_s: h.duration_s[i],
                               epochs_run: h.epochs_run[i], params });
  });
}

/** After which number to ask for changes: before the first unfinished trial, else after the last one. */
function pollAfter() {
  let after = -1;
  let firstOpen = null;
  for (const t of state.trials.values()) {
    after = Math.max(after, t.number);
    if ((t.state === "running" || t.state === "waiting") && (firstOpen === null || t.number < firstOpen)) firstOpen = t.number;
  }
  return firstOpen === null ? after : firstOpen - 1;
}

async function loadHistory(after = -1) {
  let next = after;
  do {
    const h = await getJSON(`${BASE}/history?after=${next}`);
    mergeHistory(h);
    next = h.next_after;
  } while (next !== null);
}

function sortedTrials() {
  return [...state.trials.values()].sort((a, b) => a.number - b.number);
}

function drawHistory() {
  chart("history-chart").setOption(historyOption(sortedTrials(), state), { notMerge: true });
  markDrawn("history-chart");
}

function drawParallel() {
  const trials = sortedTrials();
  const complete = trials.filter((t) => t.state === "complete").length;
  if (!complete) {
    chart("parallel-chart").clear();
    $("parallel-note").textContent = "· no complete trial yet";
  } else {
    const ranked = state.importantFirst.filter((n) => state.paramNames.includes(n));
    const names = [...ranked, ...state.paramNames.filter((n) => !ranked.includes(n))];
    chart("parallel-chart").setOption(parallelOption(trials, { ...state, paramNames: names, maxAxes: PARALLEL_AXES }),
                                      { notMerge: true });
    $("parallel-note").textContent = complete > 2000 ? `· best 2,000 of ${complete.toLocaleString()}` : "";
  }
  markDrawn("parallel-chart");
}

// ---- learning curves ------------------------------------------------------------------------------------

async function loadCurves(numbers = []) {
  const params = new URLSearchParams({ top: String(TOP_CURVES), recent: String(RECENT_CURVES) });
  const wanted = [...new Set([...numbers, ...(state.selected !== null ? [state.selected] : [])])];
  if (wanted.length) params.set("numbers", wanted.join(","));
  const result = await getJSON(`${BASE}/curves?${params}`);
  state.curves = new Map(result.data.map((c) => [c.number, c]));
  drawCurves();
}

function drawCurves() {
  const curves = [...state.curves.values()].sort((a, b) => a.number - b.number);
  chart("curves-chart").setOption(curvesOption(curves, { ...state, selected: state.selected }), { notMerge: true });
  $("curves-note").textContent = curves.length ? `· best ${TOP_CURVES}, latest ${RECENT_CURVES} and the selected` : "";
  markDrawn("curves-chart");
}

function onEpoch(e) {
  const curve = state.curves.get(e.number);
  if (!curve) {
    // A running trial joins the plot with its first epoch, as long as few are shown.
    if (state.curves.size >= TOP_CURVES + RECENT_CURVES + 4) return;
    state.curves.set(e.number, { number: e.number, state: "running", value: null, attempt: e.attempt, epoch: [],
                                 val_metric: [], val_loss: [], train_loss: [] });
    return onEpoch(e);
  }
  if (curve.attempt !== e.attempt) Object.assign(curve, { attempt: e.attempt, epoch: [], val_metric: [], val_loss: [], train_loss: [] });
  curve.epoch.push(e.epoch);
  curve.val_metric.push(e.val_metric);
  curve.val_loss.push(e.val_loss);
  curve.train_loss.push(e.train_loss);
  redrawCurves();
}

// ---- importance -----------------------------------------------------------------------------------------

async function loadImportance() {
  try {
    const result = await getJSON(`${BASE}/importance`);
    $("importance-note").textContent = result.importances.length
      ? `${result.evaluator === "fanova" ? "fANOVA" : "PED-ANOVA"} over ${result.n_trials.toLocaleString()} complete trials`
      : `Not yet: ${result.reason}.`;
    chart("importance-chart").setOption(importanceOption(result.importances), { notMerge: true });
    const order = result.importances.map((i) => i.name).join();
    if (order && order !== state.importantFirst.join()) {
      state.importantFirst = result.importances.map((i) => i.name);
      if (state.drawn.has("parallel-chart")) drawParallel();
    }
  } catch (error) {
    $("importance-note").textContent = `Importance unavailable: ${error.message}`;
  }
  markDrawn("importance-chart");
}

// ---- the trial table ------------------------------------------------------------------------------------

const COLUMNS = [
  { key: "number", label: "#", sort: "number", num: true },
  { key: "state", label: "state" },
  { key: "value", label: "value", sort: "value", num: true },
  { key: "duration_s", label: "duration", sort: "duration", num: true, format: formatDuration },
  { key: "epochs_run", label: "epochs", num: true },
  { key: "attempt", label: "attempt", num: true },
];

function tableHead() {
  const t = state.table;
  const cells = COLUMNS.map((c) => el("th", {
    class: [c.sort ? "sortable" : "", t.sort === c.sort ? `sorted ${t.order}` : ""].join(" ").trim() || null,
    onclick: c.sort ? () => sortBy(c.sort) : null,
    title: c.sort ? "sort" : null,
  }, c.label));
  const params = state.paramNames.slice(0, PARAM_COLUMNS).map((name) => el("th", {}, name));
  $("trials-table").tHead.replaceChildren(el("tr", {}, ...cells, ...params));
}

function sortBy(key) {
  const t = state.table;
  if (t.sort === key) t.order = t.order === "asc" ? "desc" : "asc";
  else {
    t.sort = key;
    t.order = key === "value" && state.direction === "maximize" ? "desc" : "asc";
  }
  t.cursors = [null];
  t.index = 0;
  loadTable().catch(failed);
}

async function loadTable() {
  const t = state.table;
  const params = new URLSearchParams({ limit: String(TABLE_PAGE), sort: t.sort, order: t.order });
  const cursor = t.cursors[t.index];
  if (cursor) params.set("cursor", cursor);
  if (t.state) params.set("state", t.state);
  const page = await getJSON(`${BASE}/trials?${params}`);
  t.next = page.next_cursor;
  tableHead();
  const rows = page.data.map((trial) => el("tr", {
    "data-number": trial.number, class: trial.number === state.selected ? "selected" : null,
    // an enqueued configuration still waiting has no number (nor curves) until a worker claims it
    onclick: trial.number === null ? null : () => selectTrial(trial.number),
  },
  ...COLUMNS.map((c) => el("td", { class: c.num ? "num" : null },
    c.key === "state" ? el("span", { class: `badge ${trial.state}` }, trial.state)
      : (c.format || formatValue)(trial[c.key]))),
  ...state.paramNames.slice(0, PARAM_COLUMNS).map((name) => el("td", {}, formatValue((trial.params || {})[name])))));
  const body = $("trials-table").tBodies[0];
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: COLUMNS.length, class: "empty" }, "No trials yet.")));
  $("prev").disabled = t.index === 0;
  $("next").disabled = !t.next;
  const first = t.index * TABLE_PAGE + 1;
  $("trials-count").textContent = page.count
    ? `${first}–${first + page.data.length - 1} of ${page.count.toLocaleString()}` : "";
  markDrawn("trials-table");
}

// ---- one trial ------------------------------------------------------------------------------------------

async function selectTrial(number) {
  state.selected = number;
  history.replaceState(null, "", `${location.pathname}${location.search}#trial=${number}`);
  for (const row of $("trials-table").tBodies[0].rows) row.classList.toggle("selected", Number(row.dataset.number) === number);
  try {
    const trial = await getJSON(`${BASE}/trials/${number}`);
    $("detail-empty").classList.add("hidden");
    $("detail").classList.remove("hidden");
    $("detail-title").textContent = `#${trial.number}`;
    $("detail").dataset.number = String(trial.number);
    chart("detail-chart").resize();
    chart("detail-chart").setOption(trialOption(trial.curve, state), { notMerge: true });
    kv($("detail-info"), [
      ["state", trial.state], ["value", formatValue(trial.value)],
      ["duration", formatDuration(trial.duration_s)], ["epochs", `${trial.epochs_run ?? "—"} (best ${trial.best_epoch ?? "—"})`],
      ["attempt", String(trial.attempt)], ["worker", `${trial.worker_id ?? "—"} · ${trial.device ?? "—"}`],
      ["source", trial.source],
      ...Object.entries(trial.params || {}).map(([k, v]) => [k, formatValue(v)]),
      ...Object.entries(trial.metrics || {}).map(([k, v]) => [k, formatValue(v)]),
    ]);
    $("detail-error").classList.toggle("hidden", !trial.error);
    $("detail-error").textContent = trial.error || "";
    if (!state.curves.has(number)) await loadCurves([number]);
    else drawCurves();
  } catch (error) {
    failed(error);
  }
}

// ---- live updates ---------------------------------------------------------------------------------------

const redrawCurves = throttle(drawCurves, 1000);
const redrawTrials = throttle(() => { drawHistory(); drawParallel(); }, 1500);
const refreshTable = throttle(() => { if (state.table.index === 0) loadTable().catch(() => {}); }, 3000);
const refreshImportance = throttle(() => loadImportance(), IMPORTANCE_EVERY_MS);
const refreshCurves = throttle(() => loadCurves().catch(() => {}), 5000);

function onEvent(kind, data) {
  if (kind === "study_status") {
    renderSummary({ ...data, spec: state.spec });
  } else if (kind === "trial_started") {
    const known = state.trials.get(data.number);
    state.trials.set(data.number, { ...(known || { params: {}, value: null }), number: data.number, state: "running" });
    refreshTable();
  } else if (kind === "epoch") {
    onEpoch(data);
  } else if (kind === "trial_finished") {
    state.trials.set(data.number, { number: data.number, state: data.state, value: data.value,
                                    duration_s: data.duration_s, epochs_run: data.epochs_run, params: data.params || {} });
    for (const name of Object.keys(data.params || {})) if (!state.paramNames.includes(name)) state.paramNames.push(name);
    const curve = state.curves.get(data.number);
    if (curve) Object.assign(curve, { state: data.state, value: data.value });
    redrawTrials();
    refreshTable();
    refreshImportance();
    refreshCurves();
  }
}

function setLive(text, on) {
  $("live").textContent = text;
  $("live").classList.toggle("on", on);
}

function startStream() {
  state.stream = new EventStream(`${BASE}/events`, {
    onEvent,
    onOpen: () => setLive("live", true),
    onClose: (why) => setLive(why === "end" ? "finished" : why === "reconnecting" ? "reconnecting…" : "offline", false),
    onFallback: () => startPolling(),
  });
  state.stream.run();
}

/** Without a stream: the summary and the trials changed since the first unfinished one, every few seconds. */
function startPolling() {
  setLive("polling", true);
  const poll = async () => {
    try {
      const study = await getJSON(BASE);
      renderSummary(study);
      const before = state.trials.size;
      await loadHistory(pollAfter());
      redrawTrials();
      if (state.trials.size !== before) { refreshTable(); refreshImportance(); refreshCurves(); }
      if (["completed", "cancelled", "failed"].includes(study.status) && !study.progress.running) {
        setLive("finished", false);
        return;
      }
    } catch { /* keep trying */ }
    state.polling = setTimeout(poll, POLL_MS);
  };
  state.polling = setTimeout(poll, POLL_MS);
}

// ---- start ----------------------------------------------------------------------------------------------

async function load() {
  notice("");
  try {
    // Stream first: whatever happens while the rest loads arrives as events and is merged by number.
    if (state.stream) state.stream.stop();
    startStream();
    const study = await getJSON(BASE);
    renderSummary(study);
    await loadHistory();
    drawHistory();
    drawParallel();
    await Promise.all([loadTable(), loadCurves(), loadImportance()]);
  } catch (error) {
    failed(error);
  }
}

const linkedTrial = Number.parseInt(fragment().get("trial") ?? "", 10);
takeKeyFromFragment();
mountSignIn($("signin"), load);
$("state-filter").addEventListener("change", (e) => {
  Object.assign(state.table, { state: e.target.value, cursors: [null], index: 0 });
  loadTable().catch(failed);
});
$("next").addEventListener("click", () => {
  const t = state.table;
  if (!t.next) return;
  t.cursors[t.index + 1] = t.next;
  t.index += 1;
  loadTable().catch(failed);
});
$("prev").addEventListener("click", () => {
  const t = state.table;
  if (t.index === 0) return;
  t.index -= 1;
  loadTable().catch(failed);
});
$("csv").addEventListener("click", () => download(`${BASE}/trials.csv`, `study-${STUDY_ID}-trials.csv`).catch(failed));
load().then(() => {
  if (Number.isInteger(linkedTrial)) selectTrial(linkedTrial);
  chart("curves-chart").on("click", (p) => {
    const number = p.seriesName === "pruned here" ? p.data.number : Number(String(p.seriesName).slice(1));
    if (Number.isInteger(number)) selectTrial(number);
  });
  chart("history-chart").on("click", (p) => { if (Array.isArray(p.value)) selectTrial(p.value[0]); });
});
