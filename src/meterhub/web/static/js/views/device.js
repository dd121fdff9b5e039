// One device: key figures and every data point (live over server-sent events), charts per phase and
// of temperature (history API, downsampled), energy per day and per month, alarms, and the command
// panel built from the product model.

import { ApiError, api, download, isAdmin, model as getModel, openStream, qs } from "../api.js";
import { BarChart, COLORS, LineChart } from "../charts.js";
import { fill, flash, h, setText, throttle } from "../dom.js";
import { ago, dpQuantity, duration, energy, fullTime, num, quantityText, time } from "../format.js";
import { refreshAlarmBadge } from "../shell.js";
import { ALARM_DPS, alarmRow } from "./alarms.js";
import { errorBox, learnModel, presenceBadge, renderValue } from "./common.js";

// Read-write in the document, but measurements: setting one overwrites what the meter measured.
// Offered apart from the real settings (limits, switches), as calibration behind a confirmation.
const CALIBRATION = new Set(["voltage_current", "leakage_current", "power_effective", "power_reactive", "power_factor", "supply_frequency", "electric_total", "electric_daily", "electric_month", "residual_electricity"]);

const RANGES = {
  hour: { label: "1 hour", seconds: 3600, buckets: 60, refresh: 5000 },
  day: { label: "24 hours", seconds: 86400, buckets: 96, refresh: 60000 },
  week: { label: "7 days", seconds: 7 * 86400, buckets: 168, refresh: 300000 },
};
const PHASES = [
  { dp: 30, name: "A", color: COLORS.a },
  { dp: 31, name: "B", color: COLORS.b },
  { dp: 32, name: "C", color: COLORS.c },
];
const PHASE_CHARTS = [
  { field: "voltage", title: "Voltage", unit: "V", decimals: 1 },
  { field: "current", title: "Current", unit: "A", decimals: 3 },
  { field: "power", title: "Power", unit: "W", decimals: 0 },
];
const TEMP_DP = 10;
const ENERGY_DPS = [44, 50, 45, 46];
/** Seconds to wait for a commanded value to come back in a report before saying so. */
const CONFIRM_WAIT = 15;
const COMMAND_TIMEOUT = 10;

// --- command values: real units in the form, raw integers on the wire -----------------------------

/** The raw integer the API expects for a value data point, or {error} in words. */
export function toRaw(dp, text) {
  const unit = dp.display_unit ? ` ${dp.display_unit}` : "";
  const factor = 10 ** (dp.scale || 0);
  const trimmed = String(text ?? "").trim();
  if (trimmed === "") return { error: "Enter a number." };
  const real = Number(trimmed);
  if (!Number.isFinite(real)) return { error: `“${trimmed}” is not a number.` };
  const exact = real * factor;
  const raw = Math.round(exact);
  const fraction = /^[-+]?\d*\.(\d+)$/.exec(trimmed);
  const decimals = fraction ? fraction[1].replace(/0+$/, "").length : 0;
  if (decimals > (dp.scale || 0) || Math.abs(raw - exact) > 1e-9 * Math.max(1, Math.abs(exact))) {
    return { error: `Too many decimals: ${dp.name} takes at most ${dp.scale || 0} decimal place${dp.scale === 1 ? "" : "s"}.` };
  }
  const lo = dp.min / factor;
  const hi = dp.max / factor;
  const range = `${num(lo, dp.scale)} to ${num(hi, dp.scale)}${unit}`;
  if (dp.min !== null && raw < dp.min) {
    return { error: `Out of range: ${num(real, dp.scale)}${unit} is below the minimum. Allowed: ${range}.` };
  }
  if (dp.max !== null && raw > dp.max) {
    return { error: `Out of range: ${num(real, dp.scale)}${unit} is above the maximum. Allowed: ${range}.` };
  }
  const step = dp.step || 1;
  if (step !== 1 && (raw - (dp.min || 0)) % step !== 0) {
    return { error: `Not a valid step: use multiples of ${num(step / factor, dp.scale)}${unit} from ${num(lo, dp.scale)}.` };
  }
  return { raw, real };
}

/** A command failure in words: what happened and what the code means. */
export function commandError(err) {
  if (!(err instanceof ApiError)) return err.message || "The command failed.";
  const code = err.code;
  const msg = err.message;
  if (err.status === 0) return msg;
  if (err.status === 403) return "Not allowed: sending commands needs an admin token.";
  if (err.status === 409 || code === 2001) return "Not sent: the meter is offline (2001). Try again when it is back online.";
  if (err.status === 504) return `No answer from the meter within ${COMMAND_TIMEOUT} s (timeout). It may still apply the command.`;
  if (code === 1101) return `Refused, value out of range (1101): ${msg}`;
  if (code === 1102) return "Refused: the value is empty (1102).";
  if (code === 1103) return `Refused, wrong type of value (1103): ${msg}`;
  if (code === 2002) return `Refused, not supported by this meter (2002): ${msg}`;
  if (code === 2003) return "Refused: the device does not exist (2003).";
  if (err.status === 502) return `The meter answered with an error: ${msg}`;
  return `Failed (${err.status}${code ? `, code ${code}` : ""}): ${msg}`;
}

// --- the view -------------------------------------------------------------------------------------

export async function deviceView(main, { params, signal }) {
  const cid = params[0];
  const path = `/api/v1/devices/${encodeURIComponent(cid)}`;
  let device = await api(path, { signal });
  let model = null;
  try {
    model = await getModel(device.model);
    learnModel(model);
  } catch (err) {
    if (err.name === "AbortError") throw err;
  }
  const dpById = new Map((model?.data_points || []).map((dp) => [dp.id, dp]));
  /** dp id -> {value, t} of the newest report. */
  const latest = new Map();
  for (const v of device.values) {
    latest.set(Number(v.dp_id), { value: v.raw, t: v.t });
    if (!dpById.has(Number(v.dp_id))) {
      dpById.set(Number(v.dp_id), { id: Number(v.dp_id), code: v.code || `dp ${v.dp_id}`, name: v.name || `Data point ${v.dp_id}`, type: v.type, display_unit: v.display_unit, scale: 0, writable: false });
    }
  }
  const titleText = () => device.device_name || cid;
  document.title = `${titleText()} · meterhub`;

  // --- header ---
  const presence = h("span", { id: "presence" });
  const h1 = h("h1", { class: "device-title" }, h("span", { id: "device-name" }, titleText()), presence);
  const lastReport = h("span", { id: "last-report", class: "tnum" });
  const renderPresence = () => {
    const p = device.presence;
    const title = p.since ? `${p.online ? "Online" : "Offline"} since ${fullTime(p.since)}${p.cause ? ` (${p.cause})` : ""}` : "";
    fill(presence, presenceBadge(p.online, title));
  };
  const renderLastReport = () => {
    let newest = 0;
    for (const v of latest.values()) newest = Math.max(newest, v.t || 0);
    setText(lastReport, newest ? `last report ${time(newest)} (${ago(newest)})` : "no reports yet");
    lastReport.title = fullTime(newest);
  };
  renderPresence();
  renderLastReport();
  const head = h(
    "div",
    { class: "page-head" },
    h(
      "div",
      null,
      h("div", { class: "crumbs" }, h("a", { href: "#/devices" }, "Devices"), " / "),
      h1,
      h(
        "div",
        { class: "sub" },
        h("span", { class: "mono" }, cid),
        h("span", null, "gateway ", h("a", { href: `#/gateways/${encodeURIComponent(device.gateway_id)}` }, device.gateway_id)),
        h("span", null, model ? model.name : device.model),
        device.install_location ? h("span", null, device.install_location) : null,
        lastReport,
      ),
    ),
  );

  // --- key figures ---
  const tileDefs = [
    { dp: 3, label: "Power" },
    { dp: 5, label: "Voltage" },
    { dp: 7, label: "Current" },
    { dp: TEMP_DP, label: "Temperature" },
    { dp: latest.has(44) || !latest.has(50) ? 44 : 50, label: "Energy total" },
    { dp: 1, label: "Switch", kind: "switch" },
  ].filter((t) => dpById.has(t.dp));
  const tiles = new Map();
  for (const t of tileDefs) {
    const value = h("div", { class: "tile-value" }, "—");
    const foot = h("div", { class: "tile-foot" }, "\u00a0");
    const el = h("section", { class: "tile", "aria-label": t.label, "data-dp": t.dp }, h("div", { class: "tile-label" }, t.label), value, foot);
    tiles.set(t.dp, { ...t, el, value, foot });
  }
  const renderTile = (dpId, animate) => {
    const t = tiles.get(dpId);
    if (!t) return;
    const dp = dpById.get(dpId);
    const v = latest.get(dpId);
    let text = "—";
    let unit = "";
    if (v && v.value !== null && v.value !== undefined) {
      // Tiles are narrow: the compact unit (5.04 kW, 12.50 MWh), the exact reading in the title.
      const r = dp.type === "value" && typeof v.value === "number" ? dpQuantity(dp, v.value, { compact: true }) : renderValue(dp, v.value);
      text = r.text;
      unit = r.unit;
      t.value.title = r.title || "";
    }
    fill(t.value, text, unit ? [" ", h("span", { class: "unit" }, unit)] : null);
    if (t.kind === "switch") t.el.className = `tile ${v ? (v.value ? "ok" : "") : ""}`;
    fill(t.foot, v ? `${time(v.t)}` : "no report yet");
    t.foot.title = v ? fullTime(v.t) : "";
    if (animate) flash(t.value);
  };
  tiles.forEach((_, dpId) => renderTile(dpId, false));

  // --- data point table ---
  const dpBody = h("tbody");
  const dpRows = new Map();
  const unreported = h("p", { class: "small muted" });
  const dpRow = (dpId) => {
    const dp = dpById.get(dpId);
    const valueCell = h("td", { class: "value" });
    const unitCell = h("td", { class: "unit" });
    const timeCellEl = h("td", { class: "time" });
    const row = h(
      "tr",
      { "data-dp": dpId, "data-code": dp.code },
      h("td", null, dp.name, h("span", { class: "sub code" }, `${dp.code} · dp ${dpId}`)),
      valueCell,
      unitCell,
      timeCellEl,
    );
    row.update = (animate) => {
      const v = latest.get(dpId);
      const r = renderValue(dp, v?.value);
      valueCell.className = r.numeric ? "value" : "value text-value";
      if (r.fault) valueCell.classList.add("fault-on");
      setText(valueCell, r.text);
      valueCell.title = r.title || "";
      setText(unitCell, r.unit);
      setText(timeCellEl, v ? time(v.t) : "—");
      timeCellEl.title = v ? fullTime(v.t) : "";
      if (animate) flash(valueCell);
    };
    row.update(false);
    return row;
  };
  const renderDpTable = () => {
    const ids = [...latest.keys()].filter((id) => dpById.has(id)).sort((a, b) => a - b);
    dpRows.clear();
    fill(dpBody, ids.map((id) => {
      const row = dpRow(id);
      dpRows.set(id, row);
      return row;
    }));
    const never = [...dpById.keys()].filter((id) => !latest.has(id)).length;
    setText(unreported, never ? `${never} more data point${never === 1 ? "" : "s"} of the model not reported yet.` : "");
    if (!ids.length) dpBody.append(h("tr", null, h("td", { colspan: 4, class: "empty" }, "This meter has not reported any value yet.")));
  };
  renderDpTable();

  // --- charts ---
  let range = "hour";
  const rangeGroup = h(
    "div",
    { class: "segmented", role: "radiogroup", "aria-label": "Chart range" },
    Object.entries(RANGES).map(([key, r]) => [
      h("input", { type: "radio", name: "chart-range", id: `range-${key}`, value: key, checked: key === range }),
      h("label", { for: `range-${key}` }, r.label),
    ]),
  );
  const phaseDps = PHASES.filter((p) => dpById.has(p.dp));
  const chartDefs = [];
  if (phaseDps.length) {
    for (const c of PHASE_CHARTS) chartDefs.push({ ...c, id: `chart-${c.field}`, kind: "phase" });
  }
  if (dpById.has(TEMP_DP)) {
    const dp = dpById.get(TEMP_DP);
    chartDefs.push({ id: "chart-temperature", title: "Temperature", unit: dp.display_unit || "°C", decimals: 1, kind: "temp" });
  }
  const chartPanels = chartDefs.map((c) => {
    c.box = h("div", { class: "chart-box", id: c.id });
    c.hint = h("span", { class: "hint" });
    return h("div", { class: "chart-panel" }, h("div", { class: "chart-title" }, h("h3", null, `${c.title} (${c.unit})`), c.hint), c.box);
  });
  const chartsError = errorBox();

  // --- energy ---
  const dayBox = h("div", { class: "chart-box bars", id: "chart-energy-day" });
  const monthBox = h("div", { class: "chart-box bars", id: "chart-energy-month" });
  const dayTotal = h("span", { class: "hint tnum", id: "energy-month-total" });
  const monthTotal = h("span", { class: "hint tnum", id: "energy-year-total" });
  const energyNotes = h("div", { class: "small muted energy-notes" });

  // --- alarms ---
  const alarmsBox = h("div", null, h("p", { class: "empty" }, "Loading…"));

  // --- commands ---
  const controls = buildControls();

  fill(
    main,
    head,
    tiles.size ? h("div", { class: "tiles", id: "key-figures" }, [...tiles.values()].map((t) => t.el)) : null,
    chartDefs.length
      ? h(
          "section",
          { class: "panel", "aria-labelledby": "charts-h" },
          h("div", { class: "panel-head" }, h("h2", { id: "charts-h" }, "Measurements"), rangeGroup),
          chartsError,
          h("div", { class: "grid grid-2" }, chartPanels),
        )
      : null,
    h(
      "div",
      { class: "grid grid-2 section" },
      h("section", { class: "panel chart-panel", "aria-labelledby": "energy-day-h" }, h("div", { class: "chart-title" }, h("h2", { id: "energy-day-h" }, "Energy per day (kWh)"), dayTotal), dayBox, energyNotes),
      h("section", { class: "panel chart-panel", "aria-labelledby": "energy-month-h" }, h("div", { class: "chart-title" }, h("h2", { id: "energy-month-h" }, "Energy per month (kWh)"), monthTotal), monthBox),
    ),
    h(
      "div",
      { class: "grid grid-main" },
      h(
        "section",
        { class: "panel", "aria-labelledby": "dps-h" },
        h("div", { class: "panel-head" }, h("h2", { id: "dps-h" }, "Data points"), h("span", { class: "hint" }, "Live: values update as the meter reports"), csvButton(cid)),
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { class: "dp-table", id: "dp-table" },
            h("caption", { class: "visually-hidden" }, "Latest value of each data point"),
            h("thead", null, h("tr", null, h("th", { scope: "col" }, "Data point"), h("th", { scope: "col", class: "num" }, "Value"), h("th", { scope: "col" }, "Unit"), h("th", { scope: "col" }, "Reported"))),
            dpBody,
          ),
        ),
        unreported,
      ),
      h(
        "div",
        { class: "stack" },
        controls.panel,
        h("section", { class: "panel", "aria-labelledby": "dev-alarms-h" }, h("div", { class: "panel-head" }, h("h2", { id: "dev-alarms-h" }, "Alarms"), h("a", { href: `#/alarms?state=&cid=${encodeURIComponent(cid)}` }, "All alarms of this device")), alarmsBox),
      ),
    ),
  );

  // --- loading ---
  const charts = new Map();
  const guard = (p, box) =>
    p.catch((err) => {
      if (err.name === "AbortError") return;
      if (box) box.show(err.message);
      else console.warn(err);
    });

  async function history(dp, params) {
    const r = RANGES[range];
    const to = Date.now() / 1000;
    return api(`${path}/history/${dp}${qs({ from: (to - r.seconds).toFixed(0), to: to.toFixed(0), buckets: r.buckets, ...params })}`, { signal });
  }

  async function loadCharts() {
    const jobs = chartDefs.map(async (c) => {
      if (c.kind === "phase") {
        const results = await Promise.all(phaseDps.map((p) => history(p.dp, { field: c.field })));
        const xs = results[0].buckets.map((b) => b.start);
        let series = phaseDps.map((p, i) => ({ label: `Phase ${p.name}`, color: p.color, ys: results[i].buckets.map((b) => b.avg) }));
        const withData = series.filter((s) => s.ys.some((v) => v !== null));
        if (withData.length) series = withData;
        draw(c, xs, series);
        setText(c.hint, `${RANGES[range].label}, ${num(results[0].interval / 60, 1)} min buckets`);
      } else {
        const r = await history(TEMP_DP, {});
        draw(c, r.buckets.map((b) => b.start), [{ label: "Temperature", color: COLORS.temp, ys: r.buckets.map((b) => b.avg) }]);
        setText(c.hint, `${RANGES[range].label}, ${num(r.interval / 60, 1)} min buckets`);
      }
    });
    await Promise.all(jobs);
    chartsError.show("");
  }

  function draw(c, xs, series) {
    const key = series.map((s) => s.label).join("|");
    let chart = charts.get(c.id);
    if (chart && chart.key !== key) {
      chart.destroy();
      chart = null;
    }
    if (!chart) {
      fill(c.box);
      chart = new LineChart(c.box, { series, unit: c.unit, decimals: c.decimals, label: `${c.title} over the last ${RANGES[range].label}` });
      chart.key = key;
      charts.set(c.id, chart);
    }
    chart.setData(xs, series.map((s) => s.ys));
  }

  let dayChart = null;
  let monthChart = null;
  async function loadEnergy() {
    const [days, months] = await Promise.all([api(`${path}/energy${qs({ period: "day" })}`, { signal }), api(`${path}/energy${qs({ period: "month" })}`, { signal })]);
    if (!dayChart) dayChart = new BarChart(dayBox, { unit: "kWh", color: COLORS.energy, label: "Energy per day this month" });
    if (!monthChart) monthChart = new BarChart(monthBox, { unit: "kWh", color: COLORS.energyMonth, label: "Energy per month this year" });
    const dayFmt = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", year: "numeric", timeZone: days.timezone });
    const monthFmt = new Intl.DateTimeFormat(undefined, { month: "short", timeZone: months.timezone });
    const monthLong = new Intl.DateTimeFormat(undefined, { month: "long", year: "numeric", timeZone: months.timezone });
    dayChart.setData(
      days.buckets.map((b) => String(Number(b.period.slice(8, 10)))),
      days.buckets.map((b) => dayFmt.format(new Date(b.start * 1000))),
      days.buckets.map((b) => b.consumption_kwh),
    );
    monthChart.setData(
      months.buckets.map((b) => monthFmt.format(new Date(b.start * 1000))),
      months.buckets.map((b) => monthLong.format(new Date(b.start * 1000))),
      months.buckets.map((b) => b.consumption_kwh),
    );
    const [dt, du] = energy(days.total_kwh);
    const [mt, mu] = energy(months.total_kwh);
    setText(dayTotal, `this month ${dt} ${du}`);
    setText(monthTotal, `this year ${mt} ${mu}`);
    const events = [...days.events];
    const source = days.source ? `From ${days.source.code} (dp ${days.source.dp_id}).` : "No cumulative energy reading yet.";
    fill(
      energyNotes,
      source,
      events.length ? ` Meter events this month: ${events.map((e) => `${e.kind} on ${time(e.t)} (${quantityText(e.before_kwh, "kWh")} → ${quantityText(e.after_kwh, "kWh")})`).join("; ")}.` : "",
    );
  }

  async function loadAlarms() {
    const page = await api(`/api/v1/alarms${qs({ cid, limit: 10 })}`, { signal });
    if (!page.items.length) {
      fill(alarmsBox, h("p", { class: "empty", id: "device-alarms-empty" }, "No alarms for this device."));
      return;
    }
    const onAck = (updated) => {
      const row = alarmsBox.querySelector(`tr[data-alarm="${updated.id}"]`);
      if (row) row.replaceWith(alarmRow(updated, { showDevice: false, onAck }));
    };
    const rows = page.items.map((a) => alarmRow(a, { showDevice: false, onAck }));
    fill(
      alarmsBox,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "alarm-table" },
          h("caption", { class: "visually-hidden" }, "Alarms of this device"),
          h("thead", null, h("tr", null, ["Level", "Alarm", "State", "Raised", "Cleared", "Acknowledged"].map((x) => h("th", { scope: "col" }, x)))),
          h("tbody", null, rows),
        ),
      ),
      page.total > page.items.length ? h("p", { class: "small muted" }, `${page.total - page.items.length} older alarm${page.total - page.items.length === 1 ? "" : "s"} on the alarms page.`) : null,
    );
  }

  async function reloadDevice() {
    device = await api(path, { signal });
    latest.clear();
    for (const v of device.values) latest.set(Number(v.dp_id), { value: v.raw, t: v.t });
    setText(document.getElementById("device-name"), titleText());
    renderPresence();
    renderLastReport();
    renderDpTable();
    tiles.forEach((_, dpId) => renderTile(dpId, false));
    controls.refresh();
  }

  const reloadCharts = throttle(() => guard(loadCharts(), chartsError), RANGES.hour.refresh);
  const reloadEnergy = throttle(() => guard(loadEnergy()), 30000, 1000);
  const reloadAlarms = throttle(() => guard(loadAlarms().then(refreshAlarmBadge)), 1000, 300);

  for (const input of rangeGroup.querySelectorAll("input")) {
    input.addEventListener("change", () => {
      range = input.value;
      for (const c of charts.values()) c.destroy();
      charts.clear();
      guard(loadCharts(), chartsError);
    });
  }

  // Charts and energy load in the background: the live values are on screen at once.
  guard(loadCharts(), chartsError);
  guard(loadEnergy());
  guard(loadAlarms());

  // --- live ---
  let lastChartReload = 0;
  function onReport(ev) {
    const dpId = ev.dp;
    const prev = latest.get(dpId);
    if (prev && prev.t > ev.t) return; // a buffered older report: history only
    latest.set(dpId, { value: ev.value, t: ev.t });
    if (!dpById.has(dpId)) dpById.set(dpId, { id: dpId, code: ev.code, name: ev.code, type: ev.type, display_unit: ev.display_unit, scale: 0, writable: false });
    const row = dpRows.get(dpId);
    if (row) row.update(true);
    else renderDpTable();
    renderTile(dpId, true);
    renderLastReport();
    controls.onReport(dpId, ev.value, ev.t);
    if (PHASES.some((p) => p.dp === dpId) || dpId === TEMP_DP) {
      const now = Date.now();
      if (now - lastChartReload >= RANGES[range].refresh) {
        lastChartReload = now;
        reloadCharts();
      }
    }
    if (ENERGY_DPS.includes(dpId)) reloadEnergy();
    if (ALARM_DPS.includes(dpId)) reloadAlarms();
  }
  const stream = openStream(
    { cid },
    {
      onEvent(kind, ev) {
        if (kind === "report") onReport(ev);
        else if (kind === "presence") {
          device.presence = { online: ev.online, since: ev.at, cause: ev.cause };
          renderPresence();
          flash(presence);
          controls.refresh();
        } else if (kind === "sync") {
          device.device_name = ev.name ?? device.device_name;
          setText(document.getElementById("device-name"), titleText());
        }
      },
      onResync: (initial) => {
        guard(reloadDevice());
        if (initial) return; // charts, energy and alarms were just loaded
        reloadCharts();
        reloadEnergy();
        reloadAlarms();
      },
    },
  );
  const ticker = setInterval(renderLastReport, 10000);
  const poll = setInterval(reloadAlarms, 30000);

  return () => {
    stream.close();
    clearInterval(ticker);
    clearInterval(poll);
    reloadCharts.cancel();
    reloadEnergy.cancel();
    reloadAlarms.cancel();
    controls.destroy();
    for (const c of charts.values()) c.destroy();
    if (dayChart) dayChart.destroy();
    if (monthChart) monthChart.destroy();
  };

  // --- the command panel ----------------------------------------------------------------------------

  function buildControls() {
    const writable = [...dpById.values()]
      .filter((dp) => dp.writable && ["bool", "enum", "value", "string"].includes(dp.type))
      .sort((a, b) => (b.type === "bool") - (a.type === "bool") || a.id - b.id);
    const rows = new Map();
    const waits = new Map(); // dp id -> {value, status, timer}
    const admin = isAdmin();
    const fieldset = h("fieldset", { disabled: !admin, id: "command-panel" });
    const note = admin
      ? null
      : h("p", { class: "notice", id: "command-readonly" }, "Read-only token: the command panel is disabled. Sign in with an admin token to send commands.");
    const offlineNote = h("p", { class: "notice warn", id: "command-offline", hidden: true }, "The meter is offline: commands are refused (2001) until it reports again.");

    const setStatus = (row, kind, text) => {
      row.status.className = `control-status ${kind}`;
      row.status.textContent = text;
    };

    async function send(dp, row, raw, shown) {
      if (CALIBRATION.has(dp.code) && !window.confirm(`Calibrate ${dp.name}: overwrite the meter's measured value with ${shown}?`)) {
        setStatus(row, "pending", "Not sent: calibration cancelled.");
        return;
      }
      const old = waits.get(dp.id);
      if (old) clearTimeout(old.timer);
      waits.delete(dp.id);
      row.busy(true);
      setStatus(row, "pending", `Sending ${shown}…`);
      try {
        const r = await api(`${path}/commands`, { method: "POST", body: { dp: dp.id, value: raw, timeout: COMMAND_TIMEOUT } });
        const current = latest.get(dp.id);
        if (current && sameValue(current.value, raw)) {
          setStatus(row, "ok", `Done: the meter reports ${shown} (accepted in ${duration(r.elapsed)}).`);
          row.busy(false);
          return;
        }
        setStatus(row, "ok", `The meter accepted ${shown} (${duration(r.elapsed)}); waiting for it to report the new value…`);
        const timer = setTimeout(() => {
          waits.delete(dp.id);
          row.busy(false);
          setStatus(row, "pending", `The meter accepted ${shown} but has not reported the new value within ${CONFIRM_WAIT} s.`);
        }, CONFIRM_WAIT * 1000);
        waits.set(dp.id, { value: raw, shown, timer });
      } catch (err) {
        if (err.name === "AbortError") return;
        row.busy(false);
        setStatus(row, "error", commandError(err));
      }
    }

    for (const dp of writable) {
      const labelId = `cmd-label-${dp.id}`;
      const status = h("div", { class: "control-status", role: "status", "aria-live": "polite", id: `cmd-status-${dp.id}` });
      const label = h("div", { class: "control-label" }, h("span", { id: labelId }, dp.name), " ", h("span", { class: "code" }, dp.code));
      const row = { dp, status };
      let input;
      let body;
      if (dp.type === "bool") {
        const stateText = h("span", { class: "state" }, "—");
        input = h("button", { type: "button", class: "switch", role: "switch", "aria-checked": "false", "aria-labelledby": labelId, id: `cmd-${dp.code}` }, h("span", { class: "track" }, h("span", { class: "thumb" })), stateText);
        row.show = () => {
          const v = latest.get(dp.id);
          input.setAttribute("aria-checked", v && v.value === true ? "true" : "false");
          setText(stateText, v ? (v.value ? "On" : "Off") : "Unknown");
        };
        input.addEventListener("click", () => {
          const v = latest.get(dp.id);
          const next = !(v && v.value === true);
          send(dp, row, next, next ? "On" : "Off");
        });
        body = input;
      } else if (dp.type === "enum") {
        input = h("select", { id: `cmd-${dp.code}`, "aria-labelledby": labelId }, (dp.labels || []).map((l) => h("option", { value: l.label }, l.description ? `${l.label} — ${l.description}` : l.label)));
        const current = h("span", { class: "current" });
        const button = h("button", { type: "submit", class: "btn btn-small" }, "Set");
        row.show = () => {
          const v = latest.get(dp.id);
          setText(current, v ? `now ${v.value}` : "");
          if (v && document.activeElement !== input && !row.dirty) input.value = v.value;
        };
        input.addEventListener("change", () => {
          row.dirty = true;
        });
        body = h("form", { class: "control-input", novalidate: true, onsubmit: (e) => (e.preventDefault(), send(dp, row, input.value, input.value)) }, input, button, current);
        row.button = button;
      } else if (dp.type === "value") {
        const factor = 10 ** (dp.scale || 0);
        input = h("input", {
          type: "number",
          inputmode: "decimal",
          id: `cmd-${dp.code}`,
          "aria-labelledby": labelId,
          "aria-describedby": `cmd-range-${dp.id} cmd-status-${dp.id}`,
          step: (dp.step || 1) / factor,
          min: dp.min !== null ? dp.min / factor : null,
          max: dp.max !== null ? dp.max / factor : null,
        });
        const current = h("span", { class: "current" });
        const button = h("button", { type: "submit", class: "btn btn-small" }, "Set");
        const unit = dp.display_unit || "";
        row.show = () => {
          const v = latest.get(dp.id);
          const now = v && typeof v.value === "number" ? dpQuantity(dp, v.value) : null;
          setText(current, now ? `now ${now.text}${now.unit ? ` ${now.unit}` : ""}` : "");
          current.title = now ? now.title : "";
          input.placeholder = v && typeof v.value === "number" ? String(v.value / factor) : "";
        };
        const submit = (e) => {
          e.preventDefault();
          const result = toRaw(dp, input.value);
          if (result.error) {
            input.setAttribute("aria-invalid", "true");
            setStatus(row, "error", `${result.error} Not sent.`);
            input.focus();
            return;
          }
          input.removeAttribute("aria-invalid");
          send(dp, row, result.raw, `${num(result.real, dp.scale)}${unit ? ` ${unit}` : ""}`);
        };
        input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
        body = h("form", { class: "control-input", novalidate: true, onsubmit: submit }, input, h("span", { class: "unit" }, unit), button, current);
        row.range = h("div", { class: "control-range", id: `cmd-range-${dp.id}` }, `${num(dp.min / factor, dp.scale)} to ${num(dp.max / factor, dp.scale)}${unit ? ` ${unit}` : ""}, step ${num((dp.step || 1) / factor, dp.scale)}`);
        row.button = button;
      } else {
        input = h("input", { type: "text", id: `cmd-${dp.code}`, "aria-labelledby": labelId, maxlength: dp.max_length || 255 });
        const current = h("span", { class: "current" });
        const button = h("button", { type: "submit", class: "btn btn-small" }, "Set");
        row.show = () => {
          const v = latest.get(dp.id);
          setText(current, v ? `now “${v.value}”` : "");
        };
        body = h("form", { class: "control-input", novalidate: true, onsubmit: (e) => (e.preventDefault(), send(dp, row, input.value, `“${input.value}”`)) }, input, button, current);
        row.button = button;
      }
      row.busy = (on) => {
        if (on) input.setAttribute("aria-busy", "true");
        else input.removeAttribute("aria-busy");
        if (row.button) row.button.disabled = on;
        if (dp.type === "bool") input.disabled = on;
      };
      row.el = h("div", { class: "control-row", "data-dp": dp.id, "data-code": dp.code }, label, body, row.range || null, status);
      row.show();
      rows.set(dp.id, row);
    }

    const switches = [...rows.values()].filter((r) => r.dp.type === "bool").map((r) => r.el);
    const settings = [...rows.values()].filter((r) => r.dp.type !== "bool" && !CALIBRATION.has(r.dp.code)).map((r) => r.el);
    const calibration = [...rows.values()].filter((r) => r.dp.type !== "bool" && CALIBRATION.has(r.dp.code)).map((r) => r.el);
    fill(
      fieldset,
      switches,
      settings.length
        ? h("details", { class: "settings", id: "settings-group" }, h("summary", null, `Settings (${settings.length})`), settings)
        : null,
      calibration.length
        ? h("details", { class: "settings calibration", id: "calibration-group" }, h("summary", null, `Calibration (${calibration.length})`), h("p", { class: "small muted" }, "Measured values: setting one overwrites the meter's own reading. Each asks for confirmation."), calibration)
        : null,
    );
    const panel = h(
      "section",
      { class: "panel", "aria-labelledby": "cmd-h" },
      h("div", { class: "panel-head" }, h("h2", { id: "cmd-h" }, "Control"), h("span", { class: "hint" }, "Values in real units; sent as the raw integers the meter expects")),
      note,
      offlineNote,
      rows.size ? fieldset : h("p", { class: "empty" }, "This model has no data points that take commands."),
    );

    const refresh = () => {
      offlineNote.hidden = device.presence.online;
      for (const row of rows.values()) row.show();
    };
    refresh();
    return {
      panel,
      refresh,
      onReport(dpId, value, t) {
        const row = rows.get(dpId);
        if (!row) return;
        row.show();
        const wait = waits.get(dpId);
        if (wait && sameValue(wait.value, value)) {
          clearTimeout(wait.timer);
          waits.delete(dpId);
          row.busy(false);
          setStatus(row, "ok", `Done: the meter reports ${wait.shown} (${time(t)}).`);
        }
      },
      destroy() {
        for (const w of waits.values()) clearTimeout(w.timer);
      },
    };
  }
}

function sameValue(a, b) {
  return a === b || JSON.stringify(a) === JSON.stringify(b);
}

/** "Download CSV": the device's reports of the last 7 days (GET /devices/{cid}/history.csv). */
function csvButton(cid) {
  const button = h("button", { type: "button", class: "btn btn-secondary btn-small", id: "history-csv", title: "Every report of the last 7 days, values in real units (raw in its own column)" }, "Download CSV");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await download(`/api/v1/devices/${encodeURIComponent(cid)}/history.csv`, `${cid}-history.csv`);
      button.textContent = "Download CSV";
    } catch (err) {
      button.textContent = `Download failed: ${err.message || err}`;
    } finally {
      button.disabled = false;
    }
  });
  return button;
}
