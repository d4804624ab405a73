// ECharts options for the study page, built from plain data; nothing here touches the network or the DOM.
import { escapeHTML, formatValue } from "./api.js";

export const COLORS = { complete: "#2f9e62", pruned: "#d08a1c", fail: "#d2453b", running: "#3b6fd8", best: "#1d2330" };
const PALETTE = ["#3b6fd8", "#2f9e62", "#d08a1c", "#8e44ad", "#16a2b8", "#c0392b", "#7f8c2d", "#e67e22",
                 "#34495e", "#d35490", "#1abc9c", "#95a5a6"];
const GRID = { left: 56, right: 24, top: 36, bottom: 40, containLabel: false };
const better = (direction) => (direction === "minimize" ? (a, b) => a < b : (a, b) => a > b);

/** Complete trials as points, pruned trials at their last epoch, and the best-so-far step line. */
export function historyOption(trials, { objective, direction }) {
  const complete = [];
  const pruned = [];
  const best = [];
  const isBetter = better(direction);
  let bestSoFar = null;
  let lastNumber = 0;
  for (const t of trials) {
    lastNumber = Math.max(lastNumber, t.number);
    if (t.value === null || t.value === undefined) continue;
    if (t.state === "complete") {
      complete.push([t.number, t.value]);
      if (bestSoFar === null || isBetter(t.value, bestSoFar)) {
        bestSoFar = t.value;
        best.push([t.number, bestSoFar]);
      }
    } else if (t.state === "pruned") {
      pruned.push([t.number, t.value]);
    }
  }
  if (bestSoFar !== null) best.push([lastNumber, bestSoFar]);
  const large = complete.length + pruned.length > 3000;
  return {
    animation: false,
    grid: { ...GRID, bottom: 56 },
    legend: { top: 0, data: ["complete", "pruned (last epoch)", "best so far"] },
    tooltip: { trigger: "item", formatter: (p) => `trial #${p.value[0]}<br>${escapeHTML(p.seriesName)}: ${formatValue(p.value[1])}` },
    xAxis: { type: "value", name: "trial", nameLocation: "middle", nameGap: 24, min: 0, max: Math.max(1, lastNumber) },
    yAxis: { type: "value", name: objective, scale: true },
    dataZoom: [{ type: "inside", xAxisIndex: 0 }, { type: "slider", xAxisIndex: 0, height: 14, bottom: 4 }],
    series: [
      { name: "complete", type: "scatter", data: complete, symbolSize: large ? 3 : 6, large,
        itemStyle: { color: COLORS.complete } },
      { name: "pruned (last epoch)", type: "scatter", data: pruned, symbolSize: large ? 3 : 5, large,
        itemStyle: { color: COLORS.pruned, opacity: 0.7 } },
      { name: "best so far", type: "line", step: "end", data: best, showSymbol: false, z: 5,
        lineStyle: { color: COLORS.best, width: 2 }, itemStyle: { color: COLORS.best } },
    ],
  };
}

/** The objective per epoch of a few trials; pruned ones dashed and marked where they were stopped. */
export function curvesOption(curves, { objective, epochs, selected }) {
  const series = curves.map((c, i) => ({
    name: `#${c.number}`,
    type: "line",
    data: c.epoch.map((e, k) => [e + 1, c.val_metric[k]]),
    showSymbol: false,
    triggerLineEvent: true,
    color: c.state === "pruned" ? COLORS.pruned : PALETTE[i % PALETTE.length],
    lineStyle: { width: c.number === selected ? 3.5 : 1.5, type: c.state === "pruned" ? "dashed" : "solid",
                 opacity: selected === null || c.number === selected ? 1 : 0.55 },
    z: c.number === selected ? 10 : 2,
  }));
  const cut = curves.filter((c) => c.state === "pruned" && c.epoch.length)
    .map((c) => ({ value: [c.epoch.at(-1) + 1, c.val_metric.at(-1)], number: c.number }));
  series.push({ name: "pruned here", type: "scatter", data: cut, symbol: "diamond", symbolSize: 10,
                itemStyle: { color: COLORS.pruned }, z: 11 });
  return {
    animation: false,
    grid: { ...GRID, right: 70 },
    legend: { type: "scroll", orient: "vertical", right: 0, top: 20, bottom: 20 },
    tooltip: { trigger: "item", formatter: (p) => `${escapeHTML(p.seriesName === "pruned here" ? `#${p.data.number} pruned` : p.seriesName)}<br>epoch ${p.value[0]}: ${formatValue(p.value[1])}` },
    xAxis: { type: "value", name: "epoch", nameLocation: "middle", nameGap: 24, min: 1, max: Math.max(epochs || 1, 1),
             minInterval: 1 },
    yAxis: { type: "value", name: objective, scale: true },
    series,
  };
}

/**
 * One line per complete trial (the best `limit`), one axis per parameter that varied (the first `maxAxes` in
 * the given order: most important first once importance is known), then the objective.
 */
export function parallelOption(trials, { paramNames, objective, direction, limit = 2000, maxAxes = 8 }) {
  const isBetter = better(direction);
  const complete = trials.filter((t) => t.state === "complete" && t.value !== null)
    .sort((a, b) => (isBetter(a.value, b.value) ? -1 : isBetter(b.value, a.value) ? 1 : a.number - b.number))
    .slice(0, limit);
  const axes = [];
  for (const name of paramNames) {
    if (axes.length >= maxAxes) break;
    const values = complete.map((t) => t.params[name]);
    if (values.some((v) => v === undefined || v === null)) continue; // conditional: not on every line
    const distinct = new Set(values.map((v) => String(v)));
    if (distinct.size < 2) continue;
    const numeric = values.every((v) => typeof v === "number");
    if (numeric) {
      const min = Math.min(...values);
      const max = Math.max(...values);
      axes.push({ name, type: min > 0 && max / min >= 100 ? "log" : "value", key: (t) => t.params[name] });
    } else {
      const data = [...distinct].sort();
      axes.push({ name, type: "category", data, key: (t) => String(t.params[name]) });
    }
  }
  axes.push({ name: objective, type: "value", key: (t) => t.value });
  const sorted = complete.map((t) => t.value).sort((a, b) => a - b);
  // The worst 5% are clipped: a few bad outliers would otherwise wash the rest into one colour.
  const clip = Math.floor(sorted.length * 0.05);
  const minimize = direction === "minimize";
  const [lo, hi] = minimize ? [sorted[0], sorted[sorted.length - 1 - clip]] : [sorted[clip], sorted.at(-1)];
  const colors = ["#c9d3e6", "#6c8fd6", "#2f9e62"];
  const opacity = [0.25, 0.9];
  return {
    animation: false,
    parallel: { left: 40, right: 60, top: 40, bottom: 56,
                parallelAxisDefault: { nameLocation: "end", nameGap: 12, nameTextStyle: { fontSize: 11 },
                                       axisLabel: { fontSize: 10 }, scale: true } },
    parallelAxis: axes.map((a, dim) => ({ dim, name: a.name, type: a.type, data: a.data })),
    visualMap: { type: "continuous", dimension: axes.length - 1, min: lo, max: hi, orient: "horizontal",
                 left: "center", bottom: 0, itemWidth: 10, itemHeight: 160, calculable: false,
                 text: [formatValue(hi), `${objective} ${formatValue(lo)}`],
                 inRange: minimize ? { color: colors.slice().reverse(), opacity: opacity.slice().reverse() }
                   : { color: colors, opacity } },
    // Best lines last, so they are drawn on top.
    series: [{ type: "parallel", lineStyle: { width: 1 }, progressive: 500,
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
export function trialOption(curve, { objective, epochs }) {
  const at = (ys) => curve.map((p) => [p.epoch + 1, ys(p)]);
  return {
    animation: false,
    grid: { left: 50, right: 50, top: 36, bottom: 30 },
    legend: { top: 0 },
    tooltip: { trigger: "axis" },
    xAxis: { type: "value", name: "epoch", min: 1, max: Math.max(epochs || 1, curve.length, 1), minInterval: 1 },
    yAxis: [{ type: "value", name: objective, scale: true }, { type: "value", name: "loss", scale: true }],
    series: [
      { name: objective, type: "line", data: at((p) => p.val_metric), itemStyle: { color: COLORS.complete } },
      { name: "val loss", type: "line", yAxisIndex: 1, data: at((p) => p.val_loss), itemStyle: { color: COLORS.fail } },
      { name: "train loss", type: "line", yAxisIndex: 1, data: at((p) => p.train_loss),
        lineStyle: { type: "dashed" }, itemStyle: { color: COLORS.pruned } },
    ],
  };
}
