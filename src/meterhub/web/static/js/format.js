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

/** Watts as [text, unit]: W below 1 kW, kW below 1 MW, then MW. */
export function power(watts) {
  if (watts === null || watts === undefined || !Number.isFinite(watts)) return ["—", "W"];
  const a = Math.abs(watts);
  if (a >= 1e6) return [fixed(watts / 1e6, 2), "MW"];
  if (a >= 1e3) return [fixed(watts / 1e3, 2), "kW"];
  return [fixed(watts, 0), "W"];
}

/** kWh as [text, unit]: kWh below 10 MWh, then MWh. */
export function energy(kwh) {
  if (kwh === null || kwh === undefined || !Number.isFinite(kwh)) return ["—", "kWh"];
  if (Math.abs(kwh) >= 10000) return [fixed(kwh / 1000, 2), "MWh"];
  return [fixed(kwh, Math.abs(kwh) >= 100 ? 1 : 2), "kWh"];
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
