// Pieces shared by the views: alarm labels and levels, presence badges, value rendering.

import { badge, h } from "../dom.js";
import { ago, dpQuantity, fullTime, humanize, quantityText, time } from "../format.js";

export const LEVELS = ["urgent", "serious", "general"];

const THRESHOLD_NAMES = {
  overvoltage: "Overvoltage",
  undervoltage: "Undervoltage",
  over_temp: "Over temperature",
  power_limit: "Power above limit",
  leakage: "Leakage current",
};

/** label -> description from the fault data points of the models (filled by loadAlarmLabels). */
const faultDescriptions = new Map();
/** data point code -> display unit, from the models (for the measured value in alarm details). */
const unitsByCode = new Map();

export function learnModel(model) {
  for (const dp of model.data_points || []) {
    if (dp.type === "value" && dp.display_unit && !unitsByCode.has(dp.code)) unitsByCode.set(dp.code, dp.display_unit);
    if (dp.type === "fault") {
      for (const l of dp.labels || []) if (l.description) faultDescriptions.set(l.label, l.description);
    }
  }
}

export function alarmName(alarm) {
  if (alarm.kind === "threshold" && THRESHOLD_NAMES[alarm.label]) return THRESHOLD_NAMES[alarm.label];
  const d = faultDescriptions.get(alarm.label);
  return d ? humanize(d) : humanize(alarm.label);
}

export function alarmDetail(alarm) {
  const d = alarm.details;
  if (!d || typeof d !== "object") return null;
  if (d.measure && d.limit !== undefined) {
    const unit = unitsByCode.get(d.measure) || "";
    return `${humanize(d.measure)} ${quantityText(d.value, unit)} ${d.rule || ""} limit ${quantityText(d.limit, unit)}`;
  }
  return null;
}

export function levelBadge(level) {
  if (!level) return badge("no level", "unknown", "The meter reported no alarm level");
  return badge(level, level);
}

export function presenceBadge(online, title) {
  return online ? badge("Online", "ok", title) : badge("Offline", "off", title);
}

export function connectionBadge(connected) {
  return connected ? badge("Connected", "ok") : badge("Disconnected", "off");
}

export function timeCell(t, { relative = false } = {}) {
  return h("td", { class: "time", title: fullTime(t) }, t ? (relative ? ago(t) : time(t)) : "—");
}

/** A latest value (or live report) as display text and unit, following the data point type. */
export function renderValue(dp, value) {
  if (value === null || value === undefined) return { text: "—", unit: "" };
  const type = dp?.type;
  if (type === "value" && typeof value === "number") {
    // The digits the data point's resolution and unit justify ("207.0 V", not "207.0000 V"), in the
    // unit people use (A rather than 30000 mA); the reading in the document's unit and raw in the title.
    return { ...dpQuantity(dp, value), numeric: true };
  }
  if (type === "bool") return { text: value ? "On" : "Off", unit: "" };
  if (type === "enum") {
    const label = (dp.labels || []).find((l) => l.label === value);
    return { text: String(value), unit: "", title: label?.description || "" };
  }
  if (type === "fault") {
    const list = Array.isArray(value) ? value : [];
    if (!list.length) return { text: "None", unit: "" };
    const names = list.map((l) => {
      const d = (dp.labels || []).find((x) => x.label === l)?.description;
      return d ? humanize(d) : humanize(l);
    });
    return { text: names.join(", "), unit: "", fault: true };
  }
  if (dp?.layout === "phase" && value && typeof value === "object") {
    const parts = [quantityText(value.voltage, "V"), quantityText(value.current, "A"), quantityText(value.power, "W")];
    if (value.electricity !== null && value.electricity !== undefined) parts.push(quantityText(value.electricity, "kWh"));
    return { text: parts.join(" · "), unit: "" };
  }
  if (value && typeof value === "object") {
    const text = value.hex !== undefined ? `0x${value.hex}` : JSON.stringify(value);
    return { text: text.length > 60 ? `${text.slice(0, 57)}…` : text, unit: "", title: text };
  }
  return { text: String(value), unit: "" };
}

/** "Previous" / "Next" paging for a Page response. */
export function pager(page, onOffset) {
  const { total, limit, offset } = page;
  const from = total ? offset + 1 : 0;
  const to = Math.min(offset + limit, total);
  const prev = h("button", { type: "button", class: "btn btn-secondary btn-small", disabled: offset === 0, onclick: () => onOffset(Math.max(0, offset - limit)) }, "Previous");
  const next = h("button", { type: "button", class: "btn btn-secondary btn-small", disabled: to >= total, onclick: () => onOffset(offset + limit) }, "Next");
  return h("div", { class: "pager" }, h("span", { class: "tnum" }, `${from}–${to} of ${total}`), prev, next);
}

/** An element that shows an error message (role=alert) or nothing. */
export function errorBox() {
  const el = h("div", { class: "notice error", role: "alert", hidden: true });
  el.show = (msg) => {
    el.textContent = msg || "";
    el.hidden = !msg;
  };
  return el;
}
