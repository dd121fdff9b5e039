// Formatting of numbers, units and times for people (the browser's locale and time zone).

const numberFormats = new Map();

function numberFormat(min, max) {
  const key = `${min}/${max}`;
  let f = numberFormats.get(key);
  if (!f) {
    f = new Intl.NumberFormat(undefined, { minimumFractionDigits: min, maximumFractionDigits: max });
    numberFormats.set(key, f);
  }
  return f;
}

/** A number with exactly `decimals` fraction digits (a fixed width while values stream). */
export function fixed(x, decimals) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return "—";
  return numberFormat(decimals, decimals).format(Number(x));
}

/** A number with up to `max` fraction digits. */
export function num(x, max = 2) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return "—";
  return numberFormat(0, max).format(Number(x));
}

/** Fraction digits to show for a data point of this scale. */
export function decimalsFor(scale) {
  return Math.max(0, Math.min(Number(scale) || 0, 4));
}

// --- quantities: the one place that decides digits and units for people ----------------------------

/** Fraction digits worth showing per unit (a meter's 0.0001 V resolution is noise to a reader). */
const UNIT_DECIMALS = { V: 1, A: 2, mA: 0, W: 0, kW: 2, MW: 2, Wh: 0, kWh: 2, MWh: 2, kVA: 2, kvar: 2, "°C": 1, Hz: 2, s: 1, min: 1, "%": 1 };
/** Bigger units, used from the given size on: [from unit, factor, to unit, from size]. */
const UP = [
  ["mA", 1000, "A", 1000, false], // always: 30000 mA reads 30.00 A
  ["W", 1000, "kW", 1000, true], // only where space is short (tiles, summaries): 5.04 kW
  ["kW", 1000, "MW", 1000, true],
  ["kWh", 1000, "MWh", 10000, true],
];

function isNumber(x) {
  return x !== null && x !== undefined && x !== "" && Number.isFinite(Number(x));
}

/**
 * A number in a unit for people: {text, unit}. The unit may change to a bigger one (mA -> A always,
 * W -> kW and kWh -> MWh with `compact`); the digits follow the shown unit (UNIT_DECIMALS), at most
 * `maxDecimals` (the data point's resolution). Without a known unit: up to 2 decimals, no trailing zeros.
 */
export function quantity(x, unit = "", { compact = false, maxDecimals = 4, decimals } = {}) {
  if (!isNumber(x)) return { text: "—", unit: unit || "" };
  let value = Number(x);
  let u = unit || "";
  let resolution = maxDecimals;
  for (const [from, factor, to, size, onlyCompact] of UP) {
    if (u === from && Math.abs(value) >= size && (compact || !onlyCompact)) {
      value /= factor;
      u = to;
      resolution += Math.log10(factor);
    }
  }
  if (decimals !== undefined) return { text: fixed(value, decimals), unit: u };
  const wanted = UNIT_DECIMALS[u];
  if (wanted === undefined) return { text: num(value, Math.min(2, resolution)), unit: u };
  return { text: fixed(value, Math.max(0, Math.min(wanted, resolution))), unit: u };
}

/** "5.04 kW": a quantity as one string. */
export function quantityText(x, unit, opts) {
  const q = quantity(x, unit, opts);
  return q.unit ? `${q.text} ${q.unit}` : q.text;
}

/**
 * A value data point's raw integer for people: {text, unit, title}. Scaled by the data point's scale,
 * digits by its resolution and unit, the reading in the document's unit and the raw form in `title`.
 */
export function dpQuantity(dp, raw, opts = {}) {
  const scale = Number(dp?.scale) || 0;
  const step = Number(dp?.step) || 1;
  const scaled = scale ? raw / 10 ** scale : raw;
  // Decimals the data point can carry at all: its scale, less what a coarser step rules out.
  const resolution = Math.max(0, scale - Math.floor(Math.log10(step) + 1e-9));
  const rawUnit = dp?.display_unit || "";
  const q = quantity(scaled, rawUnit, { ...opts, maxDecimals: resolution });
  const title = `${num(scaled, decimalsFor(scale))}${rawUnit ? ` ${rawUnit}` : ""} (raw ${raw}, scale ${scale})`;
  return { ...q, title };
}

/** Watts as [text, unit]: W below 1 kW, kW below 1 MW, then MW. */
export function power(watts) {
  const q = quantity(watts, "W", { compact: true });
  return [q.text, q.unit];
}

/** kWh as [text, unit]: kWh below 10 MWh, then MWh. */
export function energy(kwh) {
  const q = quantity(kwh, "kWh", { compact: true });
  return [q.text, q.unit];
}

// 24-hour clock everywhere: compact in tables and chart axes, unambiguous for operators.
const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, {
  day: "numeric", month: "short", hour: "2-digit", minute: "2-digit", hourCycle: "h23",
});
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium", hourCycle: "h23" });

/** Unix seconds -> "14:03:22" today, "21 Nov, 14:03" otherwise. */
export function time(t) {
  if (!t) return "—";
  const d = new Date(t * 1000);
  const now = new Date();
  if (d.toDateString() === now.toDateString()) return timeFmt.format(d);
  return dateTimeFmt.format(d);
}

/** Unix seconds -> full date and time (for title attributes). */
export function fullTime(t) {
  if (!t) return "";
  return fullFmt.format(new Date(t * 1000));
}

/** Unix seconds -> "12 s ago", "5 min ago", "3 h ago", "2 d ago". */
export function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** "overload_alarm" -> "Overload alarm" (when no description is known). */
export function humanize(label) {
  const text = String(label ?? "").replace(/_/g, " ").trim();
  return text ? text[0].toUpperCase() + text.slice(1) : "";
}

/** Seconds -> "0.42 s" / "120 ms". */
export function duration(s) {
  if (s === null || s === undefined) return "";
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${num(s, 2)} s`;
}
