// One study, live: summary, best trial, plots and the trial table, kept current by the event stream (or by
// incremental polling when streaming is not possible). With 10,000 trials the page loads the compact
// history once, curves only for a few trials, and the table one server-side page at a time.
/* global echarts */
import { ApiError, EventStream, apiKey, download, el, formatBytes, formatDuration, formatValue, fragment, getJSON,
         mountSignIn, postJSON, takeKeyFromFragment, throttle } from "./api.js";
import { bestComplete, chooseAxes, chooseColumns, curvesOption, historyData, historyOption, importanceOption, parallelOption,
         trialOption, varyingParams } from "./charts.js";

const STUDY_ID = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const BASE = `/studies/${encodeURIComponent(STUDY_ID)}`;
const TABLE_PAGE = 50;
const TOP_CURVES = 8;
const RECENT_CURVES = 6;
const POLL_MS = 3000;
const IMPORTANCE_EVERY_MS = 15000;
const PARAM_COLUMNS = 8;
const TABLE_MAX_PX = 560; // the trial table's scroll box, trimmed to whole rows
const PARALLEL_AXES = 8;
const PARALLEL_LINES = 2000;
const LIVE_MAX = 2000; // trials kept one by one before a fresh overview replaces them
const $ = (id) => document.getElementById(id);

const state = {
  study: null,
  objective: "value",
  direction: "maximize",
  epochs: 1,
  paramNames: [],
  paramKinds: {}, // name -> int | float | categorical
  logScale: null, // names sampled on a log scale
  searched: [], // names the spec gives a range or choices: always on the parallel plot unless the user unticks them
  importantFirst: [], // parameter names by importance, once known
  axesChosen: null, // the user's parallel axes; null = the automatic rule
  columnsChosen: null, // the user's trial-table parameter columns; null = searched first, then by importance
  parallelDrawn: null, // what the parallel plot shows now: its axes and lines
  basics: Promise.resolve(), // settles once the summary and the overview are drawn
  overview: null, // GET /history/overview: points, exact best-so-far steps, best trials
  top: new Map(), // number -> {number, state, value, params}: the overview's best trials
  live: new Map(), // number -> trial seen since the overview (events or polls)
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
  if (error instanceof ApiError && error.status === 401) {
    notice(apiKey() ? "That API key was rejected (revoked or mistyped): sign in with a valid key."
      : "Sign in with your API key to see this study.", Boolean(apiKey()));
  }
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
    (p.running ? ` · ${p.running} running` : "") + (p.waiting ? ` · ${p.waiting} waiting` : "") +
    (p.paused ? ` · ${p.paused} paused` : "");
  $("study-meta").textContent = [study.elapsed_s !== null ? formatDuration(study.elapsed_s) : null,
                                 study.stop_reason ? `stopped: ${study.stop_reason}` : null].filter(Boolean).join(" · ");
  renderBest(study.best_trial);
  renderTestMetrics(study.test_metrics);
  if (study.spec) {
    kv($("study-info"), [
      ["objective", objectives.map((o) => `${o.direction} ${o.metric}`).join(", ")],
      ["dataset", `${study.dataset} (${spec.task})`], ["model", study.model],
      ["sampler", spec.sampler ? spec.sampler.name : "—"], ["pruner", spec.pruner ? spec.pruner.name : "—"],
      ["epochs", String(state.epochs)], ["checkpoints", formatBytes(study.checkpoint_bytes)],
      ["created", new Date(study.created_at).toLocaleString()], ["id", study.id],
    ]);
  }
  if (study.error) notice(`Study failed: ${study.error}`, true);
  renderControls(study.status);
  markDrawn("summary");
}

function renderBest(best) {
  $("best-empty").classList.toggle("hidden", Boolean(best));
  $("best").classList.toggle("hidden", !best);
  if (!best) return;
  // The trial panel shows the best trial until the user picks one.
  if (state.started && state.selected === null) selectTrial(best.number, { link: false });
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

// ---- pause, resume, cancel ------------------------------------------------------------------------------

const ENDED = ["completed", "cancelled", "failed"];

function renderControls(status) {
  $("pause").classList.toggle("hidden", !["queued", "running"].includes(status));
  $("resume").classList.toggle("hidden", status !== "paused");
  $("cancel").classList.toggle("hidden", ENDED.includes(status));
  if (ENDED.includes(status)) $("cancel-confirm").classList.add("hidden");
}

/** POST pause, resume or cancel; the answer is the study as it now stands. */
async function changeState(action) {
  for (const id of ["pause", "resume", "cancel", "cancel-yes"]) $(id).disabled = true;
  try {
    renderSummary(await postJSON(`${BASE}/${action}`));
    $("cancel-confirm").classList.add("hidden");
  } catch (error) {
    notice(`Could not ${action} the study: ${error.message}`, true);
  } finally {
    for (const id of ["pause", "resume", "cancel", "cancel-yes"]) $(id).disabled = false;
  }
}

// ---- history and parallel coordinates (a bounded overview, then live trials) -------------------------------

/**
 * The overview: every finished trial's point (downsampled past a few thousand, with the best-so-far line
 * exact) and the best trials with their parameters. Trials that finish afterwards are kept one by one in
 * state.live and drawn on top, until there are enough of them to fetch a fresh overview.
 */
async function loadOverview() {
  const o = await getJSON(`${BASE}/history/overview`);
  state.overview = o;
  state.objective = o.objective;
  state.direction = o.direction;
  state.searched = o.searched;
  Object.assign(state.paramKinds, o.param_kinds);
  state.logScale = o.log_scale;
  for (const name of o.param_names) if (!state.paramNames.includes(name)) state.paramNames.push(name);
  state.top = new Map(o.top.number.map((number, i) => {
    const params = {};
    for (const name of o.param_names) {
      const v = o.top.params[name][i];
      if (v !== null && v !== undefined) params[name] = v;
    }
    return [number, { number, state: "complete", value: o.top.value[i], params }];
  }));
  // What the overview holds no longer needs to be kept one by one; open trials stay for polling.
  for (const [number, t] of state.live) {
    if (number <= (o.last_number ?? -1) && !["running", "waiting"].includes(t.state)) state.live.delete(number);
  }
}

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
    addLive({ number, state: h.state[i], value: h.value[i], params });
  });
}

/** A trial seen after the overview: kept for the plots unless the overview already drew it finished. */
function addLive(trial) {
  const o = state.overview;
  const finished = !["running", "waiting"].includes(trial.state);
  if (finished && o && trial.number <= (o.last_number ?? -1) && !state.live.has(trial.number)
      && !(o.first_open !== null && trial.number >= o.first_open)) return;
  state.live.set(trial.number, trial);
}

/** After which number to ask for changes: before the first unfinished trial, else after the last one. */
function pollAfter() {
  const o = state.overview;
  let after = o && o.last_number !== null ? o.last_number : -1;
  let firstOpen = o ? o.first_open : null;
  for (const t of state.live.values()) {
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

function liveTrials() {
  return [...state.live.values()].sort((a, b) => a.number - b.number);
}

function drawHistory() {
  if (!state.overview) return;
  const data = historyData(state.overview, liveTrials(), state.direction);
  chart("history-chart").setOption(historyOption(data, state), { notMerge: true });
  const o = state.overview;
  $("history-note").textContent = o.sampled
    ? `· ${(o.complete.length + o.pruned.length).toLocaleString()} of ${(o.with_value.complete + o.with_value.pruned).toLocaleString()} points (downsampled: every region and extreme kept); best so far exact`
    : "";
  markDrawn("history-chart");
}

/** The lines of the parallel plot: the overview's best trials and the trials that finished since. */
function parallelTrials() {
  const byNumber = new Map(state.top);
  for (const t of state.live.values()) if (t.state === "complete") byNumber.set(t.number, t);
  return bestComplete([...byNumber.values()], state.direction, PARALLEL_LINES);
}

function drawParallel() {
  const lines = parallelTrials();
  if (!lines.length) {
    chart("parallel-chart").clear();
    state.parallelDrawn = null;
    $("parallel-note").textContent = "· no complete trial yet";
    $("axes-picker").classList.add("hidden");
  } else {
    const varying = varyingParams(lines, state.paramNames);
    const { names, rule } = chooseAxes({ varying, searched: state.searched, importantFirst: state.importantFirst,
                                         chosen: state.axesChosen, max: PARALLEL_AXES });
    // Redrawing 2,000 lines is the page's costliest draw: skip it when the lines and axes are the same
    // (a streamed trial rarely enters the best 2,000 of a large study).
    const drawn = `${names.join()}|${lines.map((t) => t.number).join()}`;
    if (drawn !== state.parallelDrawn) {
      chart("parallel-chart").setOption(parallelOption(lines, { ...state, axes: names, limit: PARALLEL_LINES }),
                                        { notMerge: true });
      state.parallelDrawn = drawn;
    }
    const total = (state.overview ? state.overview.with_value.complete : 0)
      + [...state.live.values()].filter((t) => t.state === "complete" && !state.top.has(t.number)).length;
    $("parallel-note").textContent = `· ${rule}` + (total > lines.length
      ? ` · best ${lines.length.toLocaleString()} of ${total.toLocaleString()} trials` : "");
    $("parallel-chart").dataset.axes = names.join(",");
    renderAxesPicker(varying, names);
  }
  markDrawn("parallel-chart");
}

/** Checkboxes, one per parameter that varied: ticking any switches from the automatic rule to the user's. */
function renderAxesPicker(varying, shown) {
  $("axes-picker").classList.remove("hidden");
  const boxes = varying.map((name) => el("label", {},
    el("input", { type: "checkbox", value: name, checked: shown.includes(name),
                  onchange: () => {
                    state.axesChosen = [...$("axes-list").querySelectorAll("input:checked")].map((i) => i.value);
                    drawParallel();
                  } }),
    ` ${name}${state.searched.includes(name) ? " (searched)" : ""}`));
  $("axes-list").replaceChildren(...boxes);
}

// ---- learning curves ------------------------------------------------------------------------------------

async function loadCurves(numbers = []) {
  const params = new URLSearchParams({ top: String(TOP_CURVES), recent: String(RECENT_CURVES) });
  const wanted = [...new Set([...numbers, ...(state.selected !== null ? [state.selected] : [])])];
  if (wanted.length) params.set("numbers", wanted.join(","));
  const result = await getJSON(`${BASE}/curves?${params}`);
  await state.basics;
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
    await state.basics;
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

/** Where the study's scheduler pauses trials (ASHA's rungs, PBT's boundaries): who reached each, waits there,
 * went on. Hidden for a study without a scheduler. */
async function loadRungs() {
  try {
    const result = await getJSON(`${BASE}/rungs`);
    $("rungs-panel").classList.toggle("hidden", !result.scheduler);
    if (!result.scheduler) return;
    const pbt = result.scheduler === "pbt";
    $("rungs-note").textContent = pbt
      ? "pbt: members pause at each boundary until all reach it; the worst continue from the best's checkpoints"
      : "asha: trials pause at each rung; the top 1/eta are promoted from their checkpoints";
    $("rungs-went-on").textContent = pbt ? "continued" : "promoted";
    $("rungs-body").replaceChildren(...result.rungs.map((r) => el("tr", {},
      ...[r.epoch, r.reached, r.paused, r.promoted].map((n) => el("td", { class: "num" }, String(n))))));
  } catch (error) {
    $("rungs-note").textContent = `Rungs unavailable: ${error.message}`;
  }
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
  const params = tableParams().map((name) => el("th", {}, name));
  $("trials-table").tHead.replaceChildren(el("tr", {}, ...cells, ...params));
  renderColumnPicker();
}

function tableParams() {
  return chooseColumns({ names: state.paramNames, searched: state.searched, importantFirst: state.importantFirst,
                         chosen: state.columnsChosen, max: PARAM_COLUMNS });
}

/** Checkboxes, one per parameter, like the parallel plot's axes: ticking any makes the columns the user's. */
function renderColumnPicker() {
  const shown = tableParams();
  $("columns-picker").classList.toggle("hidden", !state.paramNames.length);
  $("columns-list").replaceChildren(...state.paramNames.map((name) => el("label", {},
    el("input", { type: "checkbox", value: name, checked: shown.includes(name),
                  onchange: () => {
                    state.columnsChosen = [...$("columns-list").querySelectorAll("input:checked")].map((i) => i.value);
                    loadTable().catch(failed);
                  } }),
    ` ${name}${state.searched.includes(name) ? " (searched)" : ""}`)));
}

/** The scroll box ends at a row's edge: a row cut in half reads as a broken table. */
function fitTableHeight() {
  const table = $("trials-table");
  const wrap = table.parentElement;
  const row = table.tBodies[0].rows[0];
  if (!row || !row.offsetHeight) return;
  const head = table.tHead.offsetHeight;
  const rows = Math.max(1, Math.floor((TABLE_MAX_PX - head) / row.offsetHeight));
  wrap.style.maxHeight = `${head + rows * row.offsetHeight + (wrap.offsetHeight - wrap.clientHeight)}px`;
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
  await state.basics;
  t.next = page.next_cursor;
  tableHead();
  const rows = page.data.map((trial) => el("tr", {
    "data-number": trial.number, class: trial.number === state.selected ? "selected" : null,
    // an enqueued configuration still waiting has no number (nor curves) until a worker claims it
    onclick: trial.number === null ? null : () => {
      selectTrial(trial.number);
      $("detail-panel").scrollIntoView({ block: "nearest" });
    },
  },
  ...COLUMNS.map((c) => el("td", { class: c.num ? "num" : null },
    c.key === "state" ? el("span", { class: `badge ${trial.state}` }, trial.state)
      : (c.format || formatValue)(trial[c.key]))),
  ...tableParams().map((name) => el("td", {}, formatValue((trial.params || {})[name])))));
  const body = $("trials-table").tBodies[0];
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: COLUMNS.length, class: "empty" }, "No trials yet.")));
  fitTableHeight();
  $("prev").disabled = t.index === 0;
  $("next").disabled = !t.next;
  const first = t.index * TABLE_PAGE + 1;
  $("trials-count").textContent = page.count
    ? `${first}–${first + page.data.length - 1} of ${page.count.toLocaleString()}` : "";
  markDrawn("trials-table");
}

// ---- one trial ------------------------------------------------------------------------------------------

/** Show one trial in the panel; `link` puts it in the URL fragment (not for the best trial shown at first). */
async function selectTrial(number, { link = true } = {}) {
  state.selected = number;
  if (link) history.replaceState(null, "", `${location.pathname}${location.search}#trial=${number}`);
  for (const row of $("trials-table").tBodies[0].rows) row.classList.toggle("selected", Number(row.dataset.number) === number);
  try {
    const trial = await getJSON(`${BASE}/trials/${number}`);
    $("detail-empty").classList.add("hidden");
    $("detail").classList.remove("hidden");
    $("detail-title").textContent = `#${trial.number}`;
    $("detail-why").textContent = link ? "" : "· the best so far";
    $("detail").dataset.number = String(trial.number);
    chart("detail-chart").resize();
    const exploits = (trial.schedule || []).filter((s) => s.source != null);
    chart("detail-chart").setOption(trialOption(trial.curve, state, exploits), { notMerge: true });
    renderTrialControls(trial);
    kv($("detail-info"), [
      ["state", trialState(trial)],
      ["value", formatValue(trial.value)],
      ["duration", formatDuration(trial.duration_s)], ["epochs", `${trial.epochs_run ?? "—"} (best ${trial.best_epoch ?? "—"})`],
      ["attempt", String(trial.attempt)], ["worker", `${trial.worker_id ?? "—"} · ${trial.device ?? "—"}`],
      ["source", trial.source],
      ...Object.entries(trial.params || {}).map(([k, v]) => [k, formatValue(v)]),
      ...scheduleRows(trial.schedule),
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

/** A PBT member's schedule, one row per step after its start: whose checkpoint, and the values that changed. */
function scheduleRows(schedule) {
  return (schedule || []).slice(1).map((step, i) => {
    const before = schedule[i].params;
    const changed = Object.entries(step.params).filter(([k, v]) => before[k] !== v)
      .map(([k, v]) => `${k} ${formatValue(v)}`).join(", ");
    return [`after epoch ${step.epoch}`, `#${step.source}'s checkpoint of epoch ${step.source_epoch}; ${changed || "same values"}`];
  });
}

function trialState(trial) {
  if (trial.pause_requested_at) return `${trial.state} (pausing at its next epoch)`;
  if (trial.rung && state.spec?.scheduler?.name === "pbt") {
    return `${trial.state} (at epoch ${trial.rung}, until every member reaches it)`;
  }
  if (trial.rung) return `${trial.state} (at rung ${trial.rung}, until its scheduler promotes it)`;
  if (trial.epochs_target) return `${trial.state} (extending to epoch ${trial.epochs_target})`;
  return trial.state;
}

/** Pause a waiting or running trial; resume a paused one, or call off a pause not carried out yet; extend a
 * complete one that keeps its checkpoint. */
function renderTrialControls(trial) {
  const pausing = Boolean(trial.pause_requested_at);
  $("trial-pause").classList.toggle("hidden", pausing || !["waiting", "running"].includes(trial.state));
  $("trial-resume").classList.toggle("hidden", !pausing && trial.state !== "paused");
  $("trial-extend-box").classList.toggle("hidden", trial.state !== "complete" || trial.checkpoint_epoch == null);
}

const TRIAL_BUTTONS = ["trial-pause", "trial-resume", "trial-extend"];

async function controlTrial(action, body = undefined) {
  const number = Number($("detail").dataset.number);
  for (const id of TRIAL_BUTTONS) $(id).disabled = true;
  try {
    renderTrialControls(await postJSON(`${BASE}/trials/${number}/${action}`, body));
    await selectTrial(number);
    refreshTable();
    if (action === "extend") load();  // a completed study runs again: stream it anew
  } catch (error) {
    notice(`Could not ${action} trial ${number}: ${error.message}`, true);
  } finally {
    for (const id of TRIAL_BUTTONS) $(id).disabled = false;
  }
}

// ---- live updates ---------------------------------------------------------------------------------------

const redrawCurves = throttle(drawCurves, 1000);
const redrawTrials = throttle(() => {
  if (state.live.size > LIVE_MAX) refreshOverview();
  drawHistory();
  drawParallel();
}, 1500);
const refreshOverview = throttle(() => loadOverview().then(() => { drawHistory(); drawParallel(); }).catch(() => {}),
                                 10000);
const refreshTable = throttle(() => { if (state.table.index === 0) loadTable().catch(() => {}); }, 3000);
const refreshImportance = throttle(() => loadImportance(), IMPORTANCE_EVERY_MS);
const refreshCurves = throttle(() => loadCurves().catch(() => {}), 5000);
const refreshRungs = throttle(() => loadRungs(), 3000);

function onEvent(kind, data) {
  if (kind === "study_status") {
    renderSummary({ ...data, spec: state.spec });
  } else if (kind === "trial_started") {
    const known = state.live.get(data.number);
    state.live.set(data.number, { ...(known || { params: {}, value: null }), number: data.number, state: "running" });
    refreshTable();
    refreshRungs();
  } else if (kind === "epoch") {
    onEpoch(data);
  } else if (kind === "trial_finished") {
    state.live.set(data.number, { number: data.number, state: data.state, value: data.value, params: data.params || {} });
    for (const name of Object.keys(data.params || {})) if (!state.paramNames.includes(name)) state.paramNames.push(name);
    const curve = state.curves.get(data.number);
    if (curve) Object.assign(curve, { state: data.state, value: data.value });
    redrawTrials();
    refreshTable();
    refreshImportance();
    refreshCurves();
    refreshRungs();
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
      const before = JSON.stringify([...state.live.values()].map((t) => [t.number, t.state]));
      await loadHistory(pollAfter());
      redrawTrials();
      if (JSON.stringify([...state.live.values()].map((t) => [t.number, t.state])) !== before) { refreshTable(); refreshImportance(); refreshCurves(); refreshRungs(); }
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
    // Every read starts at once; the table, curves and importance wait for the summary and overview only
    // to draw (they need the objective, the epochs and the parameter names).
    let basicsDrawn;
    state.basics = new Promise((resolve) => { basicsDrawn = resolve; });
    const rest = Promise.all([loadTable(), loadCurves(), loadImportance(), loadRungs()]);
    const [study] = await Promise.all([getJSON(BASE), loadOverview()]);
    renderSummary(study);
    drawHistory();
    drawParallel();
    basicsDrawn();
    await rest;
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
$("pause").addEventListener("click", () => changeState("pause"));
$("trial-pause").addEventListener("click", () => controlTrial("pause"));
$("trial-resume").addEventListener("click", () => controlTrial("resume"));
$("trial-extend").addEventListener("click",
  () => controlTrial("extend", { epochs: Number($("trial-extend-epochs").value) }));
$("resume").addEventListener("click", () => changeState("resume"));
$("cancel").addEventListener("click", () => $("cancel-confirm").classList.remove("hidden"));
$("cancel-no").addEventListener("click", () => $("cancel-confirm").classList.add("hidden"));
$("cancel-yes").addEventListener("click", () => changeState("cancel"));
$("axes-auto").addEventListener("click", () => { state.axesChosen = null; drawParallel(); });
$("columns-auto").addEventListener("click", () => { state.columnsChosen = null; loadTable().catch(failed); });
$("csv").addEventListener("click", () => download(`${BASE}/trials.csv`, `study-${STUDY_ID}-trials.csv`).catch(failed));
load().then(() => {
  state.started = true;
  if (Number.isInteger(linkedTrial)) selectTrial(linkedTrial);
  else if (state.study && state.study.best_trial) selectTrial(state.study.best_trial.number, { link: false });
  chart("curves-chart").on("click", (p) => {
    const number = p.seriesName === "pruned here" ? p.data.number : Number(String(p.seriesName).slice(1));
    if (Number.isInteger(number)) selectTrial(number);
  });
  chart("history-chart").on("click", (p) => { if (Array.isArray(p.value)) selectTrial(p.value[0]); });
});
