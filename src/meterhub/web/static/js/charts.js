// Charts with uPlot (vendored, global `uPlot`): time lines for measurements, bars for energy.
// Each chart sits in a box of fixed height (reserved in CSS) and follows its width.

import { h, setText } from "./dom.js";
import { num, quantityText } from "./format.js";

export const COLORS = {
  a: "#d55e00", // phase A (Okabe-Ito vermillion)
  b: "#0072b2", // phase B (blue)
  c: "#009e73", // phase C (bluish green)
  temp: "#b4527f",
  energy: "#0b5cad",
  energyMonth: "#3b7a57",
};

const AXIS = {
  stroke: "#5a6574",
  grid: { stroke: "#edf0f4", width: 1 },
  ticks: { stroke: "#dde2e9", width: 1, size: 4 },
  font: "12px system-ui, sans-serif",
};
const PLOT_HEIGHT = 190;

const hm = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
const dm = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short" });

/** Time axis labels: "14:05" (the first one and midnights with the date below) or "21 Nov" over days. */
function timeAxis(u, splits) {
  const span = (u.scales.x.max ?? 0) - (u.scales.x.min ?? 0);
  let lastDay = null;
  return splits.map((v) => {
    const d = new Date(v * 1000);
    const day = d.toDateString();
    const newDay = day !== lastDay;
    lastDay = day;
    if (span > 36 * 3600) return d.getHours() === 0 && d.getMinutes() === 0 ? dm.format(d) : `${dm.format(d)}\n${hm.format(d)}`;
    return newDay ? `${hm.format(d)}\n${dm.format(d)}` : hm.format(d);
  });
}

/** The newest non-null value of a series (shown in the legend while the cursor is off the chart). */
function lastValue(arr) {
  for (let i = (arr || []).length - 1; i >= 0; i--) if (arr[i] !== null && arr[i] !== undefined) return [arr[i], i];
  return [null, null];
}

function lib() {
  if (!window.uPlot) throw new Error("uPlot did not load");
  return window.uPlot;
}

function widthOf(el) {
  return Math.max(200, Math.floor(el.clientWidth || el.getBoundingClientRect().width || 320));
}

class BaseChart {
  constructor(box) {
    this.box = box;
    this.overlay = h("div", { class: "chart-overlay", hidden: true });
    this.plot = null;
    this.observer = new ResizeObserver(() => {
      if (this.plot) {
        const w = widthOf(this.box);
        if (w !== this.plot.width) this.plot.setSize({ width: w, height: PLOT_HEIGHT });
      }
    });
    this.observer.observe(box);
  }

  message(text) {
    if (!this.overlay.isConnected) this.box.append(this.overlay);
    this.overlay.hidden = !text;
    setText(this.overlay, text || "");
  }

  destroy() {
    this.observer.disconnect();
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }
}

/** Isolated values (nulls on both sides) get a dot, since a line needs two neighbours. */
function hasIsolated(ys) {
  for (let i = 0; i < ys.length; i++) {
    if (ys[i] !== null && (i === 0 || ys[i - 1] === null) && (i === ys.length - 1 || ys[i + 1] === null)) return true;
  }
  return false;
}

/** A line chart over time. series: [{label, color}]; unit; decimals for the legend. */
export class LineChart extends BaseChart {
  constructor(box, { series, unit, decimals = 1, label }) {
    super(box);
    this.series = series;
    this.unit = unit;
    this.decimals = decimals;
    this.label = label;
    this.sparse = series.map(() => false);
  }

  build(data) {
    const uPlot = lib();
    const sparse = this.sparse;
    const opts = {
      width: widthOf(this.box),
      height: PLOT_HEIGHT,
      cursor: { drag: { x: true, y: false }, points: { size: 7 } },
      scales: { x: { time: true } },
      legend: { live: true },
      series: [
        { label: "Time", value: (u, v, si, idx) => (idx == null || v == null ? "latest" : `${dm.format(new Date(v * 1000))} ${hm.format(new Date(v * 1000))}`) },
        ...this.series.map((s, i) => ({
          label: s.label,
          stroke: s.color,
          width: 2,
          spanGaps: false,
          points: { show: () => sparse[i], size: 5, fill: s.color },
          value: (u, v, si, idx) => {
            const x = idx == null ? lastValue(u.data[si])[0] : v;
            return x == null ? "—" : quantityText(x, this.unit, { decimals: this.decimals });
          },
        })),
      ],
      axes: [
        { ...AXIS, space: 64, values: timeAxis },
        { ...AXIS, size: 58, values: (u, vals) => vals.map((v) => num(v, 2)) },
      ],
    };
    this.plot = new uPlot(opts, data, this.box);
    if (this.label) this.plot.root.setAttribute("aria-label", this.label);
    this.plot.root.setAttribute("role", "img");
  }

  /** xs: Unix seconds; ys: one array per series (null = no data in that bucket). */
  setData(xs, ys) {
    ys.forEach((arr, i) => {
      this.sparse[i] = hasIsolated(arr);
    });
    const data = [xs, ...ys];
    if (!this.plot) this.build(data);
    else this.plot.setData(data, true);
    const any = ys.some((arr) => arr.some((v) => v !== null));
    this.message(any ? "" : "No data in this range");
  }
}

/** A bar chart over labelled periods (days of a month, months of a year). */
export class BarChart extends BaseChart {
  constructor(box, { unit, color, label, name = "Consumption" }) {
    super(box);
    this.unit = unit;
    this.color = color;
    this.label = label;
    this.name = name;
    this.labels = [];
    this.titles = [];
  }

  build(data) {
    const uPlot = lib();
    const opts = {
      width: widthOf(this.box),
      height: PLOT_HEIGHT,
      cursor: { drag: { x: false, y: false }, points: { show: false } },
      scales: {
        x: { time: false, range: (u) => [-0.5, Math.max(0, (u.data[0] || []).length - 0.5)] },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
      },
      legend: { live: true },
      series: [
        {
          label: "Period",
          value: (u, v, si, idx) => {
            const i = idx == null ? lastValue(u.data[1])[1] : idx;
            return i == null ? "—" : this.titles[i] ?? "";
          },
        },
        {
          label: this.name,
          fill: `${this.color}cc`,
          stroke: this.color,
          width: 1,
          paths: uPlot.paths.bars({ size: [0.72, 44], align: 0 }),
          points: { show: false },
          value: (u, v, si, idx) => {
            const x = idx == null ? lastValue(u.data[si])[0] : v;
            return x == null ? "no data" : quantityText(x, this.unit);
          },
        },
      ],
      axes: [
        {
          ...AXIS,
          grid: { show: false },
          splits: (u) => {
            const n = this.labels.length;
            const step = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(u.bbox.width / devicePixelRatio / 34))));
            const out = [];
            for (let i = 0; i < n; i += step) out.push(i);
            return out;
          },
          values: (u, splits) => splits.map((i) => this.labels[i] ?? ""),
        },
        { ...AXIS, size: 58, values: (u, vals) => vals.map((v) => num(v, 2)) },
      ],
    };
    this.plot = new uPlot(opts, data, this.box);
    if (this.label) this.plot.root.setAttribute("aria-label", this.label);
    this.plot.root.setAttribute("role", "img");
  }

  /** labels: short axis labels; titles: legend text; values: numbers or null. */
  setData(labels, titles, values) {
    this.labels = labels;
    this.titles = titles;
    const data = [labels.map((_, i) => i), values];
    if (!this.plot) this.build(data);
    else this.plot.setData(data, true);
    const any = values.some((v) => v !== null);
    this.message(any ? "" : "No consumption recorded yet");
  }
}
