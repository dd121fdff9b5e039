// Fleet overview: gateways, devices online, active alarms by level, total power now, energy today and
// this month; the fleet's power over the last 24 hours and its energy per hour or day; the meters that
// went silent. Numbers follow the fleet stream (presence, gateway and power reports) and a slow poll.

import { api, everyModel, openStream, pool, qs } from "../api.js";
import { BarChart, COLORS, LineChart } from "../charts.js";
import { fill, flash, h, setText, table, throttle } from "../dom.js";
import { ago, energy, fullTime, power, quantityText, time } from "../format.js";
import { refreshAlarmBadge } from "../shell.js";
import { LEVELS, alarmName, connectionBadge, learnModel, levelBadge, timeCell } from "./common.js";

/** Devices whose latest power is fetched one by one (the API has no fleet total). */
const POWER_DEVICE_CAP = 300;
const POWER_DP = 3;
const FAULT_DPS = [19, 20];

function tile(label, { id, accent, twoLines = false } = {}) {
  const value = h("div", { class: "tile-value", id: id && `${id}-value` }, "—");
  const foot = h("div", { class: twoLines ? "tile-foot two-lines" : "tile-foot", id: id && `${id}-foot` }, "\u00a0");
  const el = h("section", { class: `tile ${accent || ""}`, "aria-label": label, id }, h("div", { class: "tile-label" }, label), value, foot);
  el.set = (text, unit, footText, cls) => {
    fill(value, text, unit ? [" ", h("span", { class: "unit" }, unit)] : null);
    if (footText !== undefined) fill(foot, footText || "\u00a0");
    if (cls !== undefined) el.className = `tile ${cls}`;
  };
  return el;
}

/** Seconds -> "45 s", "12 min", "3 h 5 min", "2 d 4 h". */
function span(s) {
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

/** "2026-11-01" -> "November 2026" (a calendar date, read without time zone shifts). */
function monthTitle(key) {
  const [y, m] = key.split("-").map(Number);
  if (!y || !m) return key;
  return new Intl.DateTimeFormat(undefined, { month: "long", year: "numeric", timeZone: "UTC" }).format(new Date(Date.UTC(y, m - 1, 1)));
}

export async function overviewView(main, { signal }) {
  document.title = "Overview · meterhub";
  const tiles = {
    gateways: tile("Gateways connected", { id: "tile-gateways" }),
    devices: tile("Devices online", { id: "tile-devices" }),
    alarms: tile("Active alarms", { id: "tile-alarms", twoLines: true }),
    power: tile("Total power now", { id: "tile-power" }),
    today: tile("Energy today", { id: "tile-energy-today" }),
    month: tile("Energy this month", { id: "tile-energy-month" }),
  };
  const alarmsBox = h("div", null, h("p", { class: "empty" }, "Loading…"));
  const silentBox = h("div", null, h("p", { class: "empty" }, "Loading…"));
  const powerBox = h("div", { class: "chart-box", id: "chart-fleet-power" });
  const energyBox = h("div", { class: "chart-box bars", id: "chart-fleet-energy" });
  const powerHint = h("span", { class: "hint", id: "fleet-power-hint" }, "last 24 hours");
  const energyHint = h("span", { class: "hint", id: "fleet-energy-hint" });
  let energyPeriod = "hour";
  const periodGroup = h(
    "div",
    { class: "segmented", role: "radiogroup", "aria-label": "Energy per" },
    [
      ["hour", "Hour"],
      ["day", "Day"],
    ].map(([value, label]) => [
      h("input", { type: "radio", name: "fleet-energy-period", id: `fleet-energy-${value}`, value, checked: value === energyPeriod }),
      h("label", { for: `fleet-energy-${value}` }, label),
    ]),
  );
  const gatewaysBox = h("div", null, h("p", { class: "empty" }, "Loading…"));
  fill(
    main,
    h("div", { class: "page-head" }, h("div", null, h("h1", null, "Fleet overview"), h("div", { class: "sub" }, h("span", { id: "overview-updated" }, "")))),
    h("div", { class: "tiles" }, Object.values(tiles)),
    h(
      "div",
      { class: "grid grid-2 section" },
      h("section", { class: "panel chart-panel", "aria-labelledby": "ov-power" }, h("div", { class: "chart-title" }, h("h2", { id: "ov-power" }, "Fleet power (kW)"), powerHint), powerBox),
      h("section", { class: "panel chart-panel", "aria-labelledby": "ov-energy" }, h("div", { class: "chart-title" }, h("h2", { id: "ov-energy" }, "Fleet energy (kWh)"), periodGroup), energyBox, h("p", { class: "small muted energy-notes" }, energyHint)),
    ),
    h(
      "div",
      { class: "grid grid-2 section" },
      h("section", { class: "panel", "aria-labelledby": "ov-alarms" }, h("div", { class: "panel-head" }, h("h2", { id: "ov-alarms" }, "Active alarms"), h("a", { href: "#/alarms" }, "All alarms")), alarmsBox),
      h("section", { class: "panel", "aria-labelledby": "ov-gws" }, h("div", { class: "panel-head" }, h("h2", { id: "ov-gws" }, "Gateways"), h("a", { href: "#/gateways" }, "All gateways")), gatewaysBox),
    ),
    h("section", { class: "panel section", id: "ov-silent", "aria-labelledby": "ov-silent-h" }, h("div", { class: "panel-head" }, h("h2", { id: "ov-silent-h" }, "Silent meters"), h("span", { class: "hint" }, "Online but not reporting for 3× their usual interval, or offline")), silentBox),
  );
  everyModel().then((models) => models.forEach(learnModel)).catch(() => {});

  const powerByCid = new Map();
  let powerNote = "";
  let powerCapped = false;

  const showPower = () => {
    if (powerCapped) {
      tiles.power.set("n/a", "", powerNote, "");
      return;
    }
    let total = 0;
    for (const w of powerByCid.values()) total += w;
    const [text, unit] = powerByCid.size ? power(total) : ["—", ""];
    tiles.power.set(text, unit, `${powerByCid.size} meter${powerByCid.size === 1 ? "" : "s"} reporting`);
  };

  async function latestPower(cid) {
    try {
      const d = await api(`/api/v1/devices/${encodeURIComponent(cid)}`, { signal });
      const v = (d.values || []).find((x) => x.dp_id === String(POWER_DP));
      if (v && v.scaled !== null && d.presence?.online) powerByCid.set(cid, v.scaled);
      else powerByCid.delete(cid);
    } catch (err) {
      if (err.name === "AbortError") throw err;
    }
  }

  async function loadPower() {
    const first = await api(`/api/v1/devices${qs({ online: true, limit: 1000 })}`, { signal });
    if (first.total > POWER_DEVICE_CAP) {
      powerCapped = true;
      powerNote = `${first.total} meters online: too many to add up here`;
      showPower();
      return;
    }
    powerCapped = false;
    const cids = first.items.map((d) => d.cid);
    for (const cid of [...powerByCid.keys()]) if (!cids.includes(cid)) powerByCid.delete(cid);
    await pool(cids, 6, latestPower);
    showPower();
  }

  async function loadCounts() {
    const [gwAll, gwOn, devOn, devOff] = await Promise.all([
      api("/api/v1/gateways?limit=1000", { signal }),
      api("/api/v1/gateways?connected=true&limit=1", { signal }),
      api("/api/v1/devices?online=true&limit=1", { signal }),
      api("/api/v1/devices?online=false&limit=1", { signal }),
    ]);
    const gwTotal = gwAll.total;
    tiles.gateways.set(`${gwOn.total}`, `of ${gwTotal}`, gwTotal - gwOn.total ? `${gwTotal - gwOn.total} disconnected` : "all connected", gwTotal - gwOn.total ? "warn" : "ok");
    const devTotal = devOn.total + devOff.total;
    tiles.devices.set(`${devOn.total}`, `of ${devTotal}`, devOff.total ? `${devOff.total} offline` : "none offline", devOff.total ? "warn" : "ok");
    renderGateways(gwAll.items);
  }

  function renderGateways(items) {
    if (!items.length) {
      fill(gatewaysBox, h("p", { class: "empty" }, "No gateway has connected yet."));
      return;
    }
    const rows = items.slice(0, 8).map((g) =>
      h(
        "tr",
        null,
        h("td", null, h("a", { href: `#/gateways/${encodeURIComponent(g.gateway_id)}` }, g.gateway_id)),
        h("td", null, connectionBadge(g.connected)),
        h("td", { class: "num" }, `${g.devices_online} / ${g.device_count}`),
        timeCell(g.last_seen, { relative: true }),
      ),
    );
    fill(gatewaysBox, table(["Gateway", "State", h("th", { class: "num", scope: "col" }, "Online / devices"), "Last seen"], rows, { caption: "Gateways" }));
    if (items.length > 8) gatewaysBox.append(h("p", { class: "small muted" }, `and ${items.length - 8} more`));
  }

  async function loadAlarms() {
    const [active, ...levels] = await Promise.all([
      api("/api/v1/alarms?active=true&limit=8", { signal }),
      ...LEVELS.map((l) => api(`/api/v1/alarms?active=true&level=${l}&limit=1`, { signal })),
    ]);
    const counts = LEVELS.map((l, i) => `${levels[i].total} ${l}`);
    const unlevelled = active.total - levels.reduce((sum, p) => sum + p.total, 0);
    if (unlevelled > 0) counts.push(`${unlevelled} without level`);
    const cls = levels[0].total ? "bad" : active.total ? "warn" : "ok";
    tiles.alarms.set(`${active.total}`, "", counts.join(" · "), cls);
    if (!active.items.length) {
      fill(alarmsBox, h("p", { class: "empty" }, "No active alarms."));
    } else {
      const rows = active.items.map((a) =>
        h(
          "tr",
          null,
          h("td", null, levelBadge(a.level)),
          h("td", null, alarmName(a)),
          h("td", null, h("a", { href: `#/devices/${encodeURIComponent(a.cid)}` }, a.cid)),
          h("td", { class: "time", title: fullTime(a.raised_at) }, time(a.raised_at)),
        ),
      );
      fill(alarmsBox, table(["Level", "Alarm", "Device", "Raised"], rows, { caption: "Active alarms" }));
    }
    refreshAlarmBadge();
  }

  async function loadEnergy() {
    const gws = await api("/api/v1/gateways?limit=1000", { signal });
    const withDevices = gws.items.filter((g) => g.device_count > 0);
    const parts = await pool(withDevices, 4, (g) =>
      api(`/api/v1/energy${qs({ gateway: g.gateway_id, period: "day" })}`, { signal }).catch((err) => {
        if (err.name === "AbortError") throw err;
        return null;
      }),
    );
    let today = null;
    let month = null;
    let devices = 0;
    for (const p of parts) {
      if (!p) continue;
      const last = p.buckets[p.buckets.length - 1];
      if (last && last.consumption_kwh !== null) today = (today || 0) + last.consumption_kwh;
      if (p.total_kwh !== null) month = (month || 0) + p.total_kwh;
      devices += p.devices.filter((d) => d.total_kwh !== null).length;
    }
    const [tText, tUnit] = energy(today);
    const [mText, mUnit] = energy(month);
    tiles.today.set(tText, tUnit, devices ? `from ${devices} meter${devices === 1 ? "" : "s"}` : "no readings yet");
    const monthName = parts[0] ? monthTitle(parts[0].from) : "";
    tiles.month.set(mText, mUnit, monthName ? `${monthName} so far` : "no readings yet");
  }

  let powerChart = null;
  let energyChart = null;
  async function loadFleetPower() {
    const r = await api(`/api/v1/fleet/power${qs({ hours: 24, buckets: 96 })}`, { signal });
    if (!powerChart) powerChart = new LineChart(powerBox, { series: [{ label: "Fleet", color: COLORS.energy }], unit: "kW", decimals: 2, label: "Fleet power over the last 24 hours" });
    powerChart.setData(
      r.buckets.map((b) => b.start + r.interval / 2),
      [r.buckets.map((b) => (b.power_w === null ? null : b.power_w / 1000))],
    );
    const newest = [...r.buckets].reverse().find((b) => b.power_w !== null);
    setText(powerHint, newest ? `last 24 hours · ${newest.devices} meter${newest.devices === 1 ? "" : "s"}` : "last 24 hours");
  }

  async function loadFleetEnergy() {
    const period = energyPeriod;
    const r = await api(`/api/v1/fleet/energy${qs({ period })}`, { signal });
    if (period !== energyPeriod) return; // switched meanwhile
    if (!energyChart) energyChart = new BarChart(energyBox, { unit: "kWh", color: COLORS.energyMonth, label: "Fleet energy over time" });
    const hourFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", hourCycle: "h23", timeZone: r.timezone });
    const dayFmt = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", timeZone: r.timezone });
    const longFmt = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", hour: period === "hour" ? "2-digit" : undefined, minute: period === "hour" ? "2-digit" : undefined, hourCycle: "h23", timeZone: r.timezone });
    energyChart.setData(
      r.buckets.map((b) => (period === "hour" ? hourFmt : dayFmt).format(new Date(b.start * 1000))),
      r.buckets.map((b) => longFmt.format(new Date(b.start * 1000))),
      r.buckets.map((b) => b.consumption_kwh),
    );
    const what = period === "hour" ? "the last 48 hours" : "the last 14 days";
    setText(energyHint, r.total_kwh === null ? `No readings in ${what}.` : `${quantityText(r.total_kwh, "kWh", { compact: true })} in ${what}, from ${r.devices_with_data} of ${r.devices} meters.`);
  }

  async function loadSilent() {
    let r;
    try {
      r = await api("/api/v1/fleet/silent?limit=20", { signal });
    } catch (err) {
      if (err.name === "AbortError" || err.status !== 422) throw err;
      fill(silentBox, h("p", { class: "empty" }, err.message)); // too large a fleet for this list
      return;
    }
    if (!r.items.length) {
      fill(silentBox, h("p", { class: "empty", id: "silent-empty" }, "No silent meters: every online meter reports as usual."));
      return;
    }
    const rows = r.items.map((m) =>
      h(
        "tr",
        { "data-silent": m.cid },
        h("td", null, h("a", { href: `#/devices/${encodeURIComponent(m.cid)}` }, m.name || m.cid), m.name ? h("span", { class: "sub" }, m.cid) : null),
        h("td", null, h("a", { href: `#/gateways/${encodeURIComponent(m.gateway_id)}` }, m.gateway_id)),
        h("td", null, m.online ? h("span", { class: "badge warn" }, "Online, silent") : h("span", { class: "badge off" }, "Offline")),
        h("td", { class: "time", title: fullTime(m.last_report) }, m.last_report ? ago(m.last_report) : "never"),
        h("td", { class: "num silent-for", title: m.usual_interval ? `usually every ${quantityText(m.usual_interval, "s")}` : "" }, span(m.silent_for)),
      ),
    );
    fill(silentBox, table(["Meter", "Gateway", "State", "Last report", h("th", { class: "num", scope: "col" }, "Silent for")], rows, { caption: "Silent meters" }), r.total > r.items.length ? h("p", { class: "small muted" }, `and ${r.total - r.items.length} more`) : null);
  }

  for (const input of periodGroup.querySelectorAll("input")) {
    input.addEventListener("change", () => {
      energyPeriod = input.value;
      if (energyChart) {
        energyChart.destroy();
        energyChart = null;
        fill(energyBox);
      }
      guard(loadFleetEnergy());
    });
  }

  const stamp = () => {
    const el = document.getElementById("overview-updated"); // null once the view was left
    if (el) setText(el, `Updated ${time(Date.now() / 1000)}`);
  };
  const guard = (p) =>
    p.catch((err) => {
      if (err.name !== "AbortError") console.warn(err);
    });
  const stampSoon = throttle(stamp, 1000); // the tiles changed live: "Updated" moves with them
  const reloadCounts = throttle(() => guard(loadCounts()).then(stamp), 1000);
  const reloadAlarms = throttle(() => guard(loadAlarms()).then(stamp), 1500);
  const reloadSilent = throttle(() => guard(loadSilent()).then(stamp), 2000);
  const reloadAll = () => {
    guard(Promise.all([loadCounts(), loadAlarms(), loadPower(), loadEnergy(), loadSilent(), loadFleetPower(), loadFleetEnergy()])).then(stamp);
  };

  await Promise.all([loadCounts(), loadAlarms()]);
  stamp();
  guard(loadPower());
  guard(loadEnergy());
  guard(loadSilent());
  guard(loadFleetPower());
  guard(loadFleetEnergy());

  const stream = openStream(
    { dps: [POWER_DP, ...FAULT_DPS] },
    {
      onEvent(kind, ev) {
        if (kind === "report" && ev.dp === POWER_DP) {
          if (ev.scaled !== null && !powerCapped) {
            powerByCid.set(ev.cid, ev.scaled);
            showPower();
            flash(tiles.power.querySelector(".tile-value"));
            stampSoon();
          }
        } else if (kind === "report") {
          reloadAlarms();
        } else if (kind === "presence") {
          if (!ev.online) {
            powerByCid.delete(ev.cid);
            showPower();
          } else if (!powerCapped) {
            guard(latestPower(ev.cid).then(showPower));
          }
          reloadCounts();
          reloadSilent();
        } else if (kind === "gateway" || kind === "sync") {
          reloadCounts();
        }
      },
      onResync: (initial) => {
        if (!initial) reloadAll();
        else {
          reloadCounts();
          reloadAlarms();
        }
      },
    },
  );
  const timers = [
    setInterval(() => guard(loadAlarms()), 15000),
    setInterval(() => guard(loadCounts()).then(stamp), 30000),
    setInterval(() => guard(loadEnergy()), 60000),
    setInterval(() => guard(loadSilent()).then(stamp), 15000),
    setInterval(() => guard(Promise.all([loadFleetPower(), loadFleetEnergy()])).then(stamp), 60000),
  ];
  return () => {
    stream.close();
    timers.forEach(clearInterval);
    if (powerChart) powerChart.destroy();
    if (energyChart) energyChart.destroy();
    reloadCounts.cancel();
    reloadAlarms.cancel();
    reloadSilent.cancel();
  };
}
