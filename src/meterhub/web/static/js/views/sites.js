// Property management: sites (power now, energy per day, top consumers, silent meters), a unit with its
// tenant, readings, bill preview, prepaid balance and top-up form, and bills to download.

import { ApiError, api, isAdmin, qs, session } from "../api.js";
import { fill, h, table } from "../dom.js";
import { ago, fullTime, quantityText } from "../format.js";
import { errorBox, presenceBadge } from "./common.js";

const power = (w) => quantityText(w, "W", { compact: true });
const energy = (kwh) => quantityText(kwh, "kWh", { compact: true });

function thisMonth(tz) {
  const parts = new Intl.DateTimeFormat("en-CA", { timeZone: tz, year: "numeric", month: "2-digit" }).formatToParts(new Date());
  const get = (t) => parts.find((p) => p.type === t).value;
  return `${get("year")}-${get("month")}`;
}

function previousMonth(month) {
  const [y, m] = month.split("-").map(Number);
  return m === 1 ? `${y - 1}-12` : `${y}-${String(m - 1).padStart(2, "0")}`;
}

/** Download (or open) a bill with the session's token: fetch, then a blob link. */
async function download(path, filename, open = false) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${session.token}` }, cache: "no-store", credentials: "omit" });
  if (!r.ok) {
    let message = r.statusText;
    try {
      message = (await r.json()).error.message;
    } catch {
      /* not JSON */
    }
    throw new ApiError(r.status, message);
  }
  const url = URL.createObjectURL(await r.blob());
  const a = h("a", { href: url, download: open ? null : filename, target: open ? "_blank" : null, rel: "noopener" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function billLinks(base, month, label, status) {
  const go = (fmt) => async () => {
    status.show("");
    try {
      await download(`${base}${qs({ month, format: fmt })}`, `bills-${month}.${fmt}`, fmt === "html");
    } catch (err) {
      status.show(err.message);
    }
  };
  return h(
    "div",
    { class: "bill-links" },
    h("span", null, label, " "),
    h("button", { type: "button", class: "btn btn-secondary btn-small", onclick: go("csv"), "data-bill": `${month}-csv` }, "CSV"),
    " ",
    h("button", { type: "button", class: "btn btn-secondary btn-small", onclick: go("html"), "data-bill": `${month}-html` }, "Statement"),
  );
}

export async function sitesView(main, { signal }) {
  document.title = "Sites · meterhub";
  const sites = await api("/api/v1/sites", { signal });
  const rows = sites.map((s) =>
    h("tr", null, h("td", null, h("a", { href: `#/sites/${s.id}` }, s.name)), h("td", null, s.timezone), h("td", null, s.currency)),
  );
  fill(
    main,
    h("div", { class: "page-head" }, h("h1", null, "Sites")),
    h(
      "section",
      { class: "panel" },
      sites.length ? table(["Site", "Time zone", "Currency"], rows, { caption: "Sites" }) : h("p", { class: "empty" }, "No sites yet: create one with POST /api/v1/sites (see docs/operators.md)."),
    ),
  );
}

function bars(days) {
  const max = Math.max(0.0001, ...days.map((d) => d.kwh || 0));
  return h(
    "div",
    { class: "bars", role: "img", "aria-label": "Energy per day" },
    days.map((d) => {
      const fillEl = h("div", { class: "bar-fill" });
      fillEl.style.height = `${Math.round(((d.kwh || 0) / max) * 100)}%`; // CSSOM: allowed by the CSP
      return h("div", { class: "bar", title: `${d.day}: ${d.kwh == null ? "no data" : quantityText(d.kwh, "kWh")}` }, fillEl, h("div", { class: "bar-label" }, d.day.slice(8, 10)));
    }),
  );
}

export async function siteView(main, { params, query, signal }) {
  const id = params[0];
  const silent = Number(query.get("silent")) || 15;
  const [o, units, accounts] = await Promise.all([
    api(`/api/v1/sites/${id}/overview${qs({ silent_minutes: silent })}`, { signal }),
    api(`/api/v1/sites/${id}/units`, { signal }),
    api(`/api/v1/sites/${id}/prepaid`, { signal }),
  ]);
  const unitOf = Object.fromEntries(o.meters.map((m) => [m.cid, m]));
  const prepaidRows = accounts.map((a) =>
    h(
      "tr",
      { "data-prepaid": a.cid },
      h("td", null, unitOf[a.cid] ? h("a", { href: `#/units/${unitOf[a.cid].unit_id}` }, unitOf[a.cid].unit) : "—"),
      h("td", null, a.cid),
      h("td", { class: "num" }, `${a.balance} ${a.unit}`),
      h("td", null, a.low_credit ? h("span", { class: "badge bad" }, "Low credit") : h("span", { class: "badge ok" }, "OK")),
      h("td", null, a.switch_state === false ? "off" : a.switch_state === true ? "on" : "—", a.last_command_status && a.last_command_status !== "ok" ? ` (${a.last_command_status})` : ""),
    ),
  );
  document.title = `${o.site.name} · meterhub`;
  const month = thisMonth(o.site.timezone);
  const status = errorBox();
  const meterRows = o.meters.map((m) =>
    h(
      "tr",
      { class: m.silent ? "silent" : null },
      h("td", null, h("a", { href: `#/units/${m.unit_id}` }, m.unit)),
      h("td", null, h("a", { href: `#/devices/${encodeURIComponent(m.cid)}` }, m.name || m.cid)),
      h("td", null, presenceBadge(m.online)),
      h("td", { class: "num" }, m.power_w == null ? "—" : power(m.power_w)),
      h("td", { title: fullTime(m.last_seen) }, m.last_seen ? ago(m.last_seen) : "never", m.silent ? [" ", h("span", { class: "badge warn" }, "silent")] : null),
    ),
  );
  const topRows = o.top_consumers.map((t) => h("tr", null, h("td", null, t.unit), h("td", null, t.cid), h("td", { class: "num" }, t.kwh == null ? "—" : energy(t.kwh))));
  const silentForm = h(
    "form",
    {
      class: "inline-form",
      onsubmit: (e) => {
        e.preventDefault();
        window.location.hash = `#/sites/${id}?silent=${encodeURIComponent(e.target.elements.silent.value)}`;
      },
    },
    h("label", { for: "silent" }, "Silent for more than "),
    h("input", { id: "silent", name: "silent", type: "number", min: "1", step: "1", value: String(silent), class: "control-input small-input" }),
    h("span", null, " minutes "),
    h("button", { type: "submit", class: "btn btn-secondary btn-small" }, "Apply"),
  );
  fill(
    main,
    h("nav", { class: "crumbs" }, h("a", { href: "#/sites" }, "Sites"), " / ", o.site.name),
    h("div", { class: "page-head" }, h("h1", null, o.site.name), h("div", { class: "sub" }, `${o.site.timezone} · ${o.site.currency}`)),
    h(
      "div",
      { class: "tiles" },
      h("section", { class: "tile", id: "site-power" }, h("div", { class: "tile-label" }, "Power now"), h("div", { class: "tile-value" }, power(o.power_w))),
      h("section", { class: "tile" }, h("div", { class: "tile-label" }, "Meters"), h("div", { class: "tile-value" }, String(o.meters.length))),
      h("section", { class: `tile ${o.silent.length ? "warn" : ""}`, id: "site-silent" }, h("div", { class: "tile-label" }, `Silent > ${silent} min`), h("div", { class: "tile-value" }, String(o.silent.length))),
      h("section", { class: `tile ${o.alarms.length ? "bad" : ""}` }, h("div", { class: "tile-label" }, "Active alarms"), h("div", { class: "tile-value" }, String(o.alarms.length))),
    ),
    h("section", { class: "panel" }, h("h2", null, "Energy per day"), bars(o.energy_per_day)),
    h("section", { class: "panel" }, h("h2", null, "Meters"), silentForm, table(["Unit", "Meter", "State", "Power", "Last seen"], meterRows, { caption: "Meters of the site" })),
    accounts.length ? h("section", { class: "panel", id: "site-prepaid" }, h("h2", null, "Prepaid meters"), table(["Unit", "Meter", "Balance", "Credit", "Switch"], prepaidRows, { caption: "Prepaid meters" })) : null,
    h("section", { class: "panel" }, h("h2", null, "Top consumers this month"), table(["Unit", "Meter", "Energy"], topRows, { caption: "Top consumers" })),
    h(
      "section",
      { class: "panel", id: "site-bills" },
      h("h2", null, "Bills"),
      billLinks(`/api/v1/sites/${id}/bills`, month, `This month (${month}, preview):`, status),
      billLinks(`/api/v1/sites/${id}/bills`, previousMonth(month), `${previousMonth(month)}:`, status),
      status,
    ),
    h("section", { class: "panel" }, h("h2", null, "Units"), h("ul", { class: "unit-list" }, units.map((u) => h("li", null, h("a", { href: `#/units/${u.id}` }, u.name), u.label ? ` (${u.label})` : "")))),
  );
}

function readingText(p) {
  if (!p) return "no reading";
  const mark = p.source === "interpolated" ? " (interpolated)" : p.source === "reading" ? "" : " (held)";
  return `${quantityText(p.kwh, "kWh")}${mark}`;
}

async function prepaidPanel(cid, signal) {
  let acct;
  try {
    acct = await api(`/api/v1/meters/${encodeURIComponent(cid)}/prepaid`, { signal });
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  }
  const balance = h("div", { class: "tile-value", id: `balance-${cid}` }, `${acct.balance} ${acct.unit}`);
  const state = h("p", { class: "small", id: `prepaid-state-${cid}` });
  const show = (a) => {
    fill(balance, `${a.balance} ${a.unit}`);
    fill(
      state,
      a.low_credit ? h("span", { class: "badge bad" }, "Low credit") : h("span", { class: "badge ok" }, "Credit OK"),
      ` · switch ${a.switch_state === false ? "off" : a.switch_state === true ? "on" : "untouched"}`,
      a.last_command_status ? ` · last command: ${a.last_command_status}` : "",
    );
  };
  show(acct);
  const status = errorBox();
  const done = h("p", { class: "form-info", role: "status", hidden: true });
  const amount = h("input", { id: `amount-${cid}`, name: "amount", inputmode: "decimal", required: true, placeholder: "20.00", class: "control-input", autocomplete: "off" });
  const reference = h("input", { id: `reference-${cid}`, name: "reference", maxlength: "255", placeholder: "receipt, transfer id", class: "control-input", autocomplete: "off" });
  const canTopUp = session.scope === "admin" || session.scope === "operate";
  const button = h("button", { type: "submit", class: "btn", disabled: !canTopUp }, "Top up");
  const form = h(
    "form",
    {
      class: "topup-form",
      novalidate: true,
      onsubmit: async (e) => {
        e.preventDefault();
        status.show("");
        done.hidden = true;
        const value = amount.value.trim().replace(",", ".");
        if (!/^\d+(\.\d+)?$/.test(value) || Number(value) <= 0) {
          status.show("Enter an amount greater than 0, e.g. 20.00.");
          amount.focus();
          return;
        }
        button.disabled = true;
        try {
          const a = await api(`/api/v1/meters/${encodeURIComponent(cid)}/topups`, { method: "POST", body: { amount: value, reference: reference.value.trim() || null } });
          show(a);
          done.textContent = `Topped up ${value} ${a.unit}: balance ${a.balance} ${a.unit}.`;
          done.hidden = false;
          amount.value = "";
          reference.value = "";
        } catch (err) {
          status.show(err.message);
        } finally {
          button.disabled = !canTopUp;
        }
      },
    },
    h("div", { class: "control-row" }, h("label", { for: `amount-${cid}`, class: "control-label" }, `Amount (${acct.unit})`), amount),
    h("div", { class: "control-row" }, h("label", { for: `reference-${cid}`, class: "control-label" }, "Reference"), reference),
    button,
    canTopUp ? null : h("p", { class: "small muted" }, "Topping up needs an operate or admin token."),
    status,
    done,
  );
  return h(
    "section",
    { class: "panel", id: `prepaid-${cid}` },
    h("h2", null, `Prepaid balance · ${cid}`),
    h("div", { class: "tile" }, h("div", { class: "tile-label" }, "Balance"), balance),
    state,
    form,
  );
}

/** A meter's operator name and location, editable with an admin token. */
function renameForm(m) {
  const key = m.cid.replace(/[^A-Za-z0-9_-]/g, "_");
  const name = h("input", { id: `name-${key}`, value: m.name || "", maxlength: "255", class: "control-input", autocomplete: "off" });
  const location = h("input", { id: `location-${key}`, value: m.location || "", maxlength: "255", class: "control-input", autocomplete: "off" });
  const status = h("p", { class: "small", role: "status" });
  const button = h("button", { type: "submit", class: "btn btn-secondary btn-small", disabled: !isAdmin() }, "Save");
  return h(
    "form",
    {
      class: "topup-form",
      id: `meter-${key}`,
      onsubmit: async (e) => {
        e.preventDefault();
        button.disabled = true;
        try {
          const out = await api(`/api/v1/meters/${encodeURIComponent(m.cid)}`, { method: "PATCH", body: { name: name.value.trim() || null, location: location.value.trim() || null } });
          status.textContent = `Saved: ${out.name || m.cid}${out.location ? `, ${out.location}` : ""}.`;
        } catch (err) {
          status.textContent = err.message;
        } finally {
          button.disabled = !isAdmin();
        }
      },
    },
    h("h3", null, h("a", { href: `#/devices/${encodeURIComponent(m.cid)}` }, m.cid), " ", presenceBadge(m.online)),
    h("div", { class: "control-row" }, h("label", { for: `name-${key}`, class: "control-label" }, "Name"), name),
    h("div", { class: "control-row" }, h("label", { for: `location-${key}`, class: "control-label" }, "Location"), location),
    button,
    isAdmin() ? null : h("p", { class: "small muted" }, "Renaming needs an admin token."),
    status,
  );
}

export async function unitView(main, { params, signal }) {
  const id = params[0];
  const unit = await api(`/api/v1/units/${id}`, { signal });
  const site = await api(`/api/v1/sites/${unit.site_id}`, { signal });
  const tenants = await api(`/api/v1/sites/${unit.site_id}/tenants`, { signal });
  document.title = `${unit.name} · ${site.name} · meterhub`;
  const month = thisMonth(site.timezone);
  const now = Date.now() / 1000;
  const occupants = tenants.filter((t) => t.occupancies.some((o) => o.unit_id === unit.id && o.from <= now && (o.to == null || o.to > now)));
  let bill = null;
  let billError = null;
  try {
    bill = await api(`/api/v1/units/${id}/bill${qs({ month })}`, { signal });
  } catch (err) {
    if (!(err instanceof ApiError) || err.status === 401) throw err;
    billError = err.message;
  }
  const status = errorBox();
  const billPanel = h(
    "section",
    { class: "panel", id: "bill-preview" },
    h("h2", null, `Bill preview · ${month}`),
    bill
      ? [
          table(
            ["Meter", "Opening", "Closing", "kWh"],
            bill.meters.map((m) => h("tr", null, h("td", null, m.cid), h("td", null, readingText(m.opening)), h("td", null, readingText(m.closing)), h("td", { class: "num" }, m.kwh))),
            { caption: "Meter readings" },
          ),
          table(
            ["Item", "Quantity", "Price", "Amount"],
            bill.lines.map((l) => h("tr", null, h("td", null, l.description), h("td", { class: "num" }, `${l.quantity} ${l.unit}`), h("td", { class: "num" }, l.unit_price), h("td", { class: "num" }, l.amount))),
            { caption: "Charges" },
          ),
          h("p", { class: "bill-total" }, "Total ", h("strong", { id: "bill-total" }, `${bill.total} ${bill.currency}`)),
        ]
      : h("p", { class: "empty" }, billError),
    billLinks(`/api/v1/units/${id}/bill`, month, "Download:", status),
    status,
  );
  const meterForms = [];
  for (const cid of unit.meters) meterForms.push(renameForm(await api(`/api/v1/meters/${encodeURIComponent(cid)}`, { signal })));
  const panels = [];
  for (const cid of unit.meters) {
    const p = await prepaidPanel(cid, signal);
    if (p) panels.push(p);
  }
  fill(
    main,
    h("nav", { class: "crumbs" }, h("a", { href: "#/sites" }, "Sites"), " / ", h("a", { href: `#/sites/${site.id}` }, site.name), " / ", unit.name),
    h(
      "div",
      { class: "page-head" },
      h("h1", null, unit.name),
      h("div", { class: "sub" }, [unit.label, occupants.length ? `Tenant: ${occupants.map((t) => t.name).join(", ")}` : "Vacant"].filter(Boolean).join(" · ")),
    ),
    h("section", { class: "panel" }, h("h2", null, "Meters"), meterForms),
    panels,
    billPanel,
  );
  return () => {};
}

