// Devices: search and filter, with presence updated live.

import { api, openStream, qs } from "../api.js";
import { fill, flash, h, table, throttle } from "../dom.js";
import { errorBox, pager, presenceBadge, timeCell } from "./common.js";

const PAGE = 50;

export async function devicesView(main, { query, signal }) {
  document.title = "Devices · meterhub";
  const state = {
    q: query.get("q") || "",
    online: query.get("online") || "",
    gateway: query.get("gateway") || "",
    offset: 0,
  };
  const search = h("input", { id: "dev-q", type: "search", value: state.q, placeholder: "cid, name or location", autocomplete: "off" });
  const online = h(
    "select",
    { id: "dev-online" },
    h("option", { value: "" }, "All"),
    h("option", { value: "true" }, "Online"),
    h("option", { value: "false" }, "Offline"),
  );
  online.value = state.online;
  const body = h("div", null, h("p", { class: "empty" }, "Loading…"));
  const err = errorBox();
  const gatewayNote = state.gateway
    ? h("span", { class: "badge plain" }, `gateway ${state.gateway} `, h("a", { href: "#/devices", "aria-label": "Show devices of every gateway" }, "×"))
    : null;
  fill(
    main,
    h("div", { class: "page-head" }, h("h1", null, "Devices")),
    err,
    h(
      "section",
      { class: "panel", "aria-label": "Devices" },
      h(
        "form",
        { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
        h("div", { class: "field" }, h("label", { for: "dev-q" }, "Search"), search),
        h("div", { class: "field" }, h("label", { for: "dev-online" }, "State"), online),
        gatewayNote,
      ),
      body,
    ),
  );

  async function load() {
    const page = await api(
      `/api/v1/devices${qs({ q: state.q, online: state.online, gateway: state.gateway, limit: PAGE, offset: state.offset })}`,
      { signal },
    );
    err.show("");
    if (!page.items.length) {
      fill(body, h("p", { class: "empty" }, state.q || state.online || state.gateway ? "No device matches." : "No device has been synced yet."));
      return;
    }
    const rows = page.items.map((d) =>
      h(
        "tr",
        { "data-cid": d.cid },
        h("td", null, h("a", { href: `#/devices/${encodeURIComponent(d.cid)}` }, d.name || d.cid), d.name ? h("span", { class: "sub mono" }, d.cid) : null),
        h("td", { class: "hide-narrow" }, d.install_location || "—"),
        h("td", { class: "hide-narrow" }, h("a", { href: `#/gateways/${encodeURIComponent(d.gateway_id)}` }, d.gateway_id)),
        h("td", { class: "hide-narrow" }, d.model),
        h("td", { class: "presence" }, presenceBadge(d.online)),
        timeCell(d.last_seen, { relative: true }),
      ),
    );
    fill(
      body,
      table(
        ["Device", h("th", { class: "hide-narrow", scope: "col" }, "Location"), h("th", { class: "hide-narrow", scope: "col" }, "Gateway"), h("th", { class: "hide-narrow", scope: "col" }, "Model"), "State", "Last seen"],
        rows,
        { caption: "Devices" },
      ),
      pager(page, (offset) => {
        state.offset = offset;
        guard(load());
      }),
    );
  }
  const guard = (p) =>
    p.catch((e) => {
      if (e.name !== "AbortError") err.show(e.message);
    });
  const reload = throttle(() => guard(load()), 400);
  search.addEventListener("input", () => {
    state.q = search.value.trim();
    state.offset = 0;
    reload();
  });
  online.addEventListener("change", () => {
    state.online = online.value;
    state.offset = 0;
    reload();
  });
  await load();

  const stream = openStream(
    { dps: [0] },
    {
      onEvent(kind, ev) {
        if (kind === "presence") {
          const row = body.querySelector(`tr[data-cid="${CSS.escape(ev.cid)}"] td.presence`);
          if (row) {
            fill(row, presenceBadge(ev.online));
            flash(row);
          }
          if (state.online) reload();
        } else if (kind === "sync") {
          reload();
        }
      },
      onResync: reload,
    },
  );
  const timer = setInterval(reload, 30000);
  return () => {
    stream.close();
    clearInterval(timer);
    reload.cancel();
  };
}
