// Gateways: the table (connection state, address, last seen, devices, conformance verdict) and one
// gateway's page with its devices and its conformance report card.

import { ApiError, api, openStream, pool } from "../api.js";
import { badge, fill, h, table, throttle } from "../dom.js";
import { fullTime, time } from "../format.js";
import { connectionBadge, errorBox, presenceBadge, timeCell } from "./common.js";

const NO_REPORTS = [0]; // fleet stream without reports: presence and gateway events only

function conformancePath(id) {
  return `/api/v1/gateways/${encodeURIComponent(id)}/conformance`;
}

/** The gateway's report card, or null when the endpoint does not answer 200. */
async function fetchConformance(id, signal) {
  try {
    return await api(conformancePath(id), { signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    if (err instanceof ApiError && err.status === 401) throw err;
    return null;
  }
}

function verdictBadge(verdict) {
  const v = String(verdict || "unknown").toLowerCase();
  return badge(v, v === "pass" || v === "warn" || v === "fail" ? v : "unknown");
}

export async function gatewaysView(main, { signal }) {
  document.title = "Gateways · meterhub";
  const body = h("div", null, h("p", { class: "empty" }, "Loading…"));
  const err = errorBox();
  fill(
    main,
    h("div", { class: "page-head" }, h("div", null, h("h1", null, "Gateways"), h("div", { class: "sub" }, "Connection state is live; the conformance verdict is what meterhub observed since it started."))),
    err,
    h("section", { class: "panel", "aria-label": "Gateways" }, body),
  );
  const verdicts = new Map();

  async function load() {
    const page = await api("/api/v1/gateways?limit=1000", { signal });
    err.show("");
    if (!page.items.length) {
      fill(body, h("p", { class: "empty" }, "No gateway has connected yet."));
      return;
    }
    const rows = page.items.map((g) => {
      const link = `#/gateways/${encodeURIComponent(g.gateway_id)}`;
      const cell = h("td", { "data-conformance": g.gateway_id }, verdicts.has(g.gateway_id) ? verdictCell(verdicts.get(g.gateway_id), link) : h("span", { class: "muted" }, "…"));
      return h(
        "tr",
        { "data-gateway": g.gateway_id },
        h("td", null, h("a", { href: link }, g.gateway_id), g.enabled ? null : h("span", { class: "sub" }, "disabled")),
        h("td", null, g.vendor || "—"),
        h("td", null, connectionBadge(g.connected)),
        h("td", { class: "mono" }, g.client_address || "—"),
        timeCell(g.last_seen, { relative: true }),
        h("td", { class: "num" }, h("a", { href: `#/devices?gateway=${encodeURIComponent(g.gateway_id)}`, title: "Devices online / all devices" }, `${g.devices_online} / ${g.device_count}`)),
        cell,
      );
    });
    fill(
      body,
      table(
        ["Gateway", "Vendor", "State", "Client address", "Last seen", h("th", { class: "num", scope: "col" }, "Devices online"), "Conformance"],
        rows,
        { caption: "Gateways" },
      ),
      page.total > page.items.length ? h("p", { class: "small muted" }, `Showing ${page.items.length} of ${page.total}.`) : null,
    );
    await pool(page.items, 4, async (g) => {
      const card = await fetchConformance(g.gateway_id, signal);
      verdicts.set(g.gateway_id, card);
      const cell = body.querySelector(`td[data-conformance="${CSS.escape(g.gateway_id)}"]`);
      if (cell) fill(cell, verdictCell(card, `#/gateways/${encodeURIComponent(g.gateway_id)}`));
    });
  }

  function verdictCell(card, link) {
    if (!card) return h("span", { class: "muted" }, "not available");
    return h("a", { href: link, title: "Open the report card" }, verdictBadge(card.verdict));
  }

  const guard = (p) =>
    p.catch((e) => {
      if (e.name !== "AbortError") err.show(e.message);
    });
  await load();
  const reload = throttle(() => guard(load()), 1000);
  const stream = openStream({ dps: NO_REPORTS }, { onEvent: reload, onResync: reload });
  const timer = setInterval(reload, 20000);
  return () => {
    stream.close();
    clearInterval(timer);
    reload.cancel();
  };
}

function renderCard(card) {
  if (!card) {
    return h("p", { class: "empty", id: "conformance-missing" }, "Conformance report: not available yet (nothing is recorded for this gateway: it has never connected).");
  }
  if (!Array.isArray(card.findings)) {
    return h("pre", { class: "small" }, JSON.stringify(card, null, 2));
  }
  const summary = card.summary || {};
  const rows = card.findings.map((f) =>
    h(
      "tr",
      null,
      h("td", null, h("strong", null, f.title || f.rule), h("span", { class: "sub mono" }, f.rule)),
      h("td", null, verdictBadge(f.verdict)),
      h("td", { class: "small" }, f.expected || ""),
      h("td", { class: "small finding-observed" }, f.observed || ""),
    ),
  );
  return h(
    "div",
    { id: "conformance-card" },
    h(
      "div",
      { class: "verdict-line" },
      h("span", null, "Overall: ", verdictBadge(card.verdict)),
      h("span", { class: "small muted tnum" }, Object.entries(summary).map(([k, v]) => `${v} ${k}`).join(" · ")),
      h("span", { class: "small muted", title: fullTime(card.generated_at) }, `generated ${time(card.generated_at)}`),
    ),
    table(["Rule", "Verdict", "Expected", "Observed"], rows, { caption: "Conformance findings" }),
  );
}

export async function gatewayView(main, { params, signal }) {
  const id = params[0];
  document.title = `${id} · Gateways · meterhub`;
  const [gw, card] = await Promise.all([api(`/api/v1/gateways/${encodeURIComponent(id)}`, { signal }), fetchConformance(id, signal)]);
  const state = h("span", null, connectionBadge(gw.connected));
  const info = h("dl", { class: "kv" });
  const devicesBox = h("div");
  const cardBox = h("div", null, renderCard(card));

  function renderInfo(g) {
    fill(state, connectionBadge(g.connected));
    fill(
      info,
      h("dt", null, "Vendor"), h("dd", null, g.vendor || "—"),
      h("dt", null, "Client address"), h("dd", { class: "mono" }, g.client_address || "—"),
      h("dt", null, "Last seen"), h("dd", { title: fullTime(g.last_seen) }, time(g.last_seen)),
      h("dt", null, "Connected at"), h("dd", { title: fullTime(g.last_connected_at) }, time(g.last_connected_at)),
      h("dt", null, "Disconnected at"), h("dd", { title: fullTime(g.last_disconnected_at) }, time(g.last_disconnected_at)),
      h("dt", null, "First seen"), h("dd", { title: fullTime(g.first_seen) }, time(g.first_seen)),
      h("dt", null, "Enabled"), h("dd", null, g.enabled ? "yes" : "no (refused at connect)"),
      h("dt", null, "Devices"), h("dd", { class: "tnum" }, `${g.devices_online} online of ${g.device_count}`),
    );
    const rows = g.devices.map((d) =>
      h(
        "tr",
        { "data-cid": d.cid },
        h("td", null, h("a", { href: `#/devices/${encodeURIComponent(d.cid)}` }, d.name || d.cid), d.name ? h("span", { class: "sub mono" }, d.cid) : null),
        h("td", null, d.install_location || "—"),
        h("td", null, presenceBadge(d.online)),
        timeCell(d.last_seen, { relative: true }),
      ),
    );
    fill(devicesBox, rows.length ? table(["Device", "Location", "State", "Last seen"], rows, { caption: "Devices" }) : h("p", { class: "empty" }, "No devices synced through this gateway."));
  }
  renderInfo(gw);
  fill(
    main,
    h(
      "div",
      { class: "page-head" },
      h("div", null, h("div", { class: "crumbs" }, h("a", { href: "#/gateways" }, "Gateways"), " / "), h("h1", { class: "device-title" }, id, state)),
      h("button", { type: "button", class: "btn btn-secondary", onclick: () => refreshCard() }, "Refresh report card"),
    ),
    h(
      "div",
      { class: "grid grid-main" },
      h(
        "section",
        { class: "panel", "aria-labelledby": "conf-h" },
        h("div", { class: "panel-head" }, h("h2", { id: "conf-h" }, "Conformance report card"), h("span", { class: "hint mono" }, `GET ${conformancePath(id)}`)),
        cardBox,
      ),
      h(
        "div",
        { class: "stack" },
        h("section", { class: "panel", "aria-labelledby": "gw-info" }, h("h2", { id: "gw-info", class: "section" }, "Gateway"), info),
        h("section", { class: "panel", "aria-labelledby": "gw-devs" }, h("h2", { id: "gw-devs", class: "section" }, "Devices"), devicesBox),
      ),
    ),
  );

  async function refreshCard() {
    fill(cardBox, renderCard(await fetchConformance(id, signal)));
  }
  const reload = throttle(async () => {
    try {
      renderInfo(await api(`/api/v1/gateways/${encodeURIComponent(id)}`, { signal }));
    } catch {
      /* keep what is shown */
    }
  }, 1000);
  const stream = openStream(
    { dps: NO_REPORTS },
    {
      onEvent(kind, ev) {
        if (kind === "gateway" ? ev.gateway_id === id : true) reload();
      },
      onResync: reload,
    },
  );
  const timer = setInterval(reload, 20000);
  return () => {
    stream.close();
    clearInterval(timer);
    reload.cancel();
  };
}
