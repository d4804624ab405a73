// ECharts options for the study page, built from plain data; nothing here touches the network or the DOM.
import { escapeHTML, formatValue } from "./api.js";

export const COLORS = { complete: "#2f9e62", pruned: "#d08a1c", fail: "#d2453b", running: "#3b6fd8", best: "#1d2330" };
const PALETTE = ["#3b6fd8", "#2f9e62", "#d08a1c", "#8e44ad", "#16a2b8", "#c0392b", "#7f8c2d", "#e67e22",
                 "#34495e", "#d35490", "#1abc9c", "#95a5a6"];
const GRID = { left: 56, right: 24, top: 36, bottom: 40, containLabel: false };
const better = (direction) => (direction === "minimize" ? (a, b) => a < b : (a, b) => a > b);

/**
 * Insert one trial into the best-so-far steps (every trial that beats all those numbered before it), in place:
 * trials finish out of order, so a late one can become a step and hide later steps it beats. A tie keeps
 * the earlier trial. Returns the steps.
 */
export function addToBest(steps, number, value, direction) {
  const isBetter = better(direction);
  let i = 0;
  while (i < steps.length && steps[i][0] < number) i += 1;
  if (i < steps.length && steps[i][0] === number) return steps; // already a step
  if (i > 0 && !isBetter(value, steps[i - 1][1])) return steps;
  let j = i;
  while (j < steps.length && !isBetter(steps[j][1], value)) j += 1;
  steps.splice(i, j - i, [number, value]);
  return steps;
}

/**
 * The history plot's data: the overview's points (every trial, or a downsample of a large study) plus the
 * trials that finished since, and the best-so-far steps with those trials added.
 */
export function historyData(overview, liveTrials, direction) {
  const complete = overview.complete.slice();
  const pruned = overview.pruned.slice();
  const best = overview.best.map((p) => p.slice());
  let lastNumber = overview.last_number ?? 0;
  for (const t of liveTrials) {
    lastNumber = Math.max(lastNumber, t.number);
    if (t.value === null || t.value === undefined) continue;
    if (t.state === "complete") {
      complete.push([t.number, t.value]);
      addToBest(best, t.number, t.value, direction);
    } else if (t.state === "pruned") {
      pruned.push([t.number, t.value]);
    }
  }
  return { complete, pruned, best, lastNumber };
}

/** Complete trials as points, pruned trials at their last epoch, and the best-so-far step line. */
export function historyOption({ complete, pruned, best, lastNumber }, { objective }) {
  const line = best.length ? [...best, [Math.max(lastNumber, best.at(-1)[0]), best.at(-1)[1]]] : [];
  const large = complete.length + pruned.length > 3000;
  // Room after the last trial, so its point is drawn whole inside the plot.
  const pad = Math.max(1, Math.ceil(lastNumber * 0.02));
  return {
    animation: false,
    grid: { ...GRID, right: 28, bottom: 56 },
    legend: { top: 0, data: ["complete", "pruned (last epoch)", "best so far"] },
    tooltip: { trigger: "item", formatter: (p) => `trial #${p.value[0]}<br>${escapeHTML(p.seriesName)}: ${formatValue(p.value[1])}` },
    xAxis: { type: "value", name: "trial", nameLocation: "middle", nameGap: 24, min: 0, max: Math.max(1, lastNumber + pad),
             axisLabel: { formatter: (v) => (v > lastNumber ? "" : String(v)) } },
    yAxis: { type: "value", name: objective, scale: true },
    dataZoom: [{ type: "inside", xAxisIndex: 0 }, { type: "slider", xAxisIndex: 0, height: 14, bottom: 4 }],
    series: [
      { name: "complete", type: "scatter", data: complete, symbolSize: large ? 3 : 6, large,
        itemStyle: { color: COLORS.complete } },
      { name: "pruned (last epoch)", type: "scatter", data: pruned, symbolSize: large ? 3 : 5, large,
        itemStyle: { color: COLORS.pruned, opacity: 0.7 } },
      { name: "best so far", type: "line", step: "end", data: line, showSymbol: false, z: 5,
        lineStyle: { color: COLORS.best, width: 2 }, itemStyle: { color: COLORS.best } },
    ],
  };
}

/** Epochs are numbered from 1 (0 would be the initial weights): the axis ends at the budget or the last one drawn. */
export function lastEpoch(epochs, budget) {
  return Math.max(budget || 1, 1, ...epochs.filter((e) => Number.isFinite(e)));
}

/** The objective per epoch of a few trials; pruned ones dashed and marked where they were stopped. */
export function curvesOption(curves, { objective, epochs, selected }) {
  const series = curves.map((c, i) => ({
    name: `#${c.number}`,
    type: "line",
    data: c.epoch.map((e, k) => [e, c.val_metric[k]]),
    showSymbol: false,
    triggerLineEvent: true,
    color: c.state === "pruned" ? COLORS.pruned : PALETTE[i % PALETTE.length],
    lineStyle: { width: c.number === selected ? 3.5 : 1.5, type: c.state === "pruned" ? "dashed" : "solid",
                 opacity: selected === null || c.number === selected ? 1 : 0.55 },
    z: c.number === selected ? 10 : 2,
  }));
  const cut = curves.filter((c) => c.state === "pruned" && c.epoch.length)
    .map((c) => ({ value: [c.epoch.at(-1), c.val_metric.at(-1)], number: c.number }));
  series.push({ name: "pruned here", type: "scatter", data: cut, symbol: "diamond", symbolSize: 10,
                itemStyle: { color: COLORS.pruned }, z: 11 });
  return {
    animation: false,
    grid: { ...GRID, right: 96 },
    legend: { type: "scroll", orient: "vertical", right: 0, top: 20, bottom: 20 },
    tooltip: { trigger: "item", formatter: (p) => `${escapeHTML(p.seriesName === "pruned here" ? `#${p.data.number} pruned` : p.seriesName)}<br>epoch ${p.value[0]}: ${formatValue(p.value[1])}` },
    xAxis: { type: "value", name: "epoch", nameLocation: "middle", nameGap: 24, min: 1, max: lastEpoch(curves.map((c) => c.epoch.at(-1)), epochs),
             minInterval: 1 },
    yAxis: { type: "value", name: objective, scale: true },
    series,
  };
}

export const PARALLEL_COLORS = ["#8a9bbd", "#2f62c9", "#e8590c"];

/** The best `limit` complete trials, best first (a tie keeps the earlier trial). */
export function bestComplete(trials, direction, limit = 2000) {
  const isBetter = better(direction);
  return trials.filter((t) => t.state === "complete" && t.value !== null && t.value !== undefined)
    .sort((a, b) => (isBetter(a.value, b.value) ? -1 : isBetter(b.value, a.value) ? 1 : a.number - b.number))
    .slice(0, limit);
}

/** Parameters that can be an axis: set on every line (not conditional) and with two values at least. */
export function varyingParams(lines, names) {
  return names.filter((name) => {
    const values = lines.map((t) => t.params[name]);
    return values.length && values.every((v) => v !== undefined && v !== null) && new Set(values.map(String)).size > 1;
  });
}

/**
 * Which axes to draw and the rule, in words: the user's choice when there is one; otherwise every parameter
 * the spec searched, then the most important (or, before importance is known, the documented order) up to
 * `max`.
 */
/** The trial table's parameter columns: the user's, else the searched first, then by importance, then the
 *  rest in the documented order, at most `max`. */
export function chooseColumns({ names, searched = [], importantFirst = [], chosen = null, max = 8 }) {
  if (chosen) return names.filter((n) => chosen.includes(n));
  const mine = names.filter((n) => searched.includes(n));
  const ranked = importantFirst.filter((n) => names.includes(n) && !mine.includes(n));
  return [...mine, ...ranked, ...names.filter((n) => !mine.includes(n) && !ranked.includes(n))].slice(0, max);
}

export function chooseAxes({ varying, searched = [], importantFirst = [], chosen = null, max = 8 }) {
  if (chosen) {
    const names = varying.filter((n) => chosen.includes(n));
    return { names, rule: `${names.length} of ${varying.length} parameters, as chosen` };
  }
  const mine = varying.filter((n) => searched.includes(n));
  const ranked = importantFirst.filter((n) => varying.includes(n) && !mine.includes(n));
  const rest = varying.filter((n) => !mine.includes(n) && !ranked.includes(n));
  const others = [...ranked, ...rest].slice(0, Math.max(0, max - mine.length));
  const names = varying.filter((n) => mine.includes(n) || others.includes(n)); // documented order
  if (names.length === varying.length) return { names, rule: `all ${names.length} parameters that varied` };
  const parts = [mine.length ? `the ${mine.length} searched in the spec` : null,
                 !others.length ? null : importantFirst.length ? `the ${others.length} most important`
                   : `the first ${others.length} in the documented order`];
  return { names, rule: `${names.length} of ${varying.length} parameters: ${parts.filter(Boolean).join(" and ")}` };
}

/** Axis tick text: powers of ten as 1e-7, other tiny or huge numbers in short exponent form. */
export function formatTick(value) {
  if (value === 0 || !Number.isFinite(value)) return String(value);
  const abs = Math.abs(value);
  if (abs >= 1e-3 && abs < 1e5) return formatValue(value, 4);
  const exponent = Math.floor(Math.log10(abs) + 1e-9);
  const mantissa = Number((value / 10 ** exponent).toPrecision(2));
  return `${mantissa}e${exponent}`;
}

/**
 * One line per complete trial (the best `limit`), one axis per named parameter, then the objective.
 * Categorical parameters are category axes even when their choices are numbers (batch size 64, 128), in
 * numeric order; parameters sampled on a log scale get a log axis.
 */
export function parallelOption(trials, { axes: names, paramKinds = {}, logScale = null, objective, direction,
                                         limit = 2000 }) {
  const complete = bestComplete(trials, direction, limit);
  const axes = [];
  for (const name of names) {
    const values = complete.map((t) => t.params[name]);
    const numeric = values.every((v) => typeof v === "number");
    if (numeric && paramKinds[name] !== "categorical") {
      const min = Math.min(...values);
      const max = Math.max(...values);
      // The space says which parameters are sampled on a log scale; without it, two decades or more.
      const log = min > 0 && (logScale ? logScale.includes(name) : max / min >= 100);
      axes.push({ name, type: log ? "log" : "value", key: (t) => t.params[name],
                  axisLabel: { formatter: formatTick } });
    } else {
      const distinct = [...new Set(values.map((v) => String(v)))];
      const data = numeric ? distinct.sort((a, b) => Number(a) - Number(b)) : distinct.sort();
      axes.push({ name, type: "category", data, key: (t) => String(t.params[name]), axisLabel: { interval: 0 } });
    }
  }
  axes.push({ name: objective, type: "value", key: (t) => t.value, axisLabel: { formatter: formatTick } });
  const sorted = complete.map((t) => t.value).sort((a, b) => a - b);
  // The worst 5% are clipped: a few bad outliers would otherwise wash the rest into one colour.
  const clip = Math.floor(sorted.length * 0.05);
  const minimize = direction === "minimize";
  const [lo, hi] = minimize ? [sorted[0], sorted[sorted.length - 1 - clip]] : [sorted[clip], sorted.at(-1)];
  // Worst to best: grey-blue, blue, orange; even the worst lines stay visible, and the best stand out.
  const colors = PARALLEL_COLORS;
  const opacity = [0.5, 1];
  return {
    animation: false,
    // Margins wide enough for the outer axes' names and category labels; names alternate above and below
    // the axes so neighbours never overlap.
    parallel: { left: 90, right: 90, top: 44, bottom: 64,
                parallelAxisDefault: { nameLocation: "end", nameGap: 10, nameTextStyle: { fontSize: 11 },
                                       axisLabel: { fontSize: 10, backgroundColor: "rgba(255,255,255,0.75)",
                                                    padding: [1, 2] }, scale: true } },
    parallelAxis: axes.map((a, dim) => ({ dim, name: a.name, type: a.type, data: a.data,
                                          axisLabel: { fontSize: 10, backgroundColor: "rgba(255,255,255,0.75)",
                                                       padding: [1, 2], ...a.axisLabel },
                                          nameLocation: dim % 2 ? "start" : "end", nameGap: dim % 2 ? 14 : 10 })),
    visualMap: { type: "continuous", dimension: axes.length - 1, min: lo, max: hi, orient: "horizontal",
                 left: "center", bottom: 0, itemWidth: 10, itemHeight: 160, calculable: false,
                 text: [formatValue(hi), `${objective} ${formatValue(lo)}`],
                 inRange: minimize ? { color: colors.slice().reverse(), opacity: opacity.slice().reverse() }
                   : { color: colors, opacity } },
    // Best lines last, so they are drawn on top.
    series: [{ type: "parallel", lineStyle: { width: 1.5 }, progressive: 500,
               data: complete.slice().reverse().map((t) => axes.map((a) => a.key(t))) }],
  };
}

/** Horizontal bars, the most important parameter on top. */
export function importanceOption(importances) {
  const rows = [...importances].reverse();
  return {
    animation: false,
    grid: { left: 110, right: 40, top: 10, bottom: 30 },
    tooltip: { trigger: "item", formatter: (p) => `${escapeHTML(p.name)}: ${formatValue(p.value, 3)}` },
    xAxis: { type: "value", max: 1, name: "importance", nameLocation: "middle", nameGap: 22 },
    yAxis: { type: "category", data: rows.map((r) => r.name), axisLabel: { fontSize: 11 } },
    series: [{ type: "bar", data: rows.map((r) => r.importance), itemStyle: { color: "#3b6fd8" },
               label: { show: true, position: "right", formatter: (p) => formatValue(p.value, 2) } }],
  };
}

/** One trial's curves: the objective on the left axis, losses on the right. */
/** A trial's curves; `exploits` (a PBT member's schedule steps taken from another member) mark where its
 * curve continues from a copied checkpoint. */
export function trialOption(curve, { objective, epochs }, exploits = []) {
  const at = (ys) => curve.map((p) => [p.epoch, ys(p)]);
  const jumps = exploits.map((s) => ({ xAxis: s.epoch, label: { formatter: `from #${s.source}` } }));
  return {
    animation: false,
    grid: { left: 50, right: 50, top: 36, bottom: 40 },
    legend: { top: 0 },
    tooltip: { trigger: "axis" },
    // The name under the axis: at its end it ran into the right axis's first tick ("0 epoch").
    xAxis: { type: "value", name: "epoch", nameLocation: "middle", nameGap: 24, min: 1,
             max: lastEpoch(curve.map((p) => p.epoch), epochs), minInterval: 1 },
    yAxis: [{ type: "value", name: objective, scale: true }, { type: "value", name: "loss", scale: true }],
    series: [
      { name: objective, type: "line", data: at((p) => p.val_metric), itemStyle: { color: COLORS.complete },
        markLine: { symbol: "none", silent: true, lineStyle: { type: "dotted" }, data: jumps } },
      { name: "val loss", type: "line", yAxisIndex: 1, data: at((p) => p.val_loss), itemStyle: { color: COLORS.fail } },
      { name: "train loss", type: "line", yAxisIndex: 1, data: at((p) => p.train_loss),
        lineStyle: { type: "dashed" }, itemStyle: { color: COLORS.pruned } },
    ],
  };
}
