// Alarms: active and past, filtered by level (and device), acknowledged by admins.

import { ApiError, api, download, everyModel, isAdmin, openStream, qs } from "../api.js";
import { fill, h, table, throttle } from "../dom.js";
import { fullTime, time } from "../format.js";
import { refreshAlarmBadge } from "../shell.js";
import { LEVELS, alarmDetail, alarmName, errorBox, learnModel, levelBadge, pager } from "./common.js";

const PAGE = 50;
/** Data points whose reports raise or clear alarms (fault bitmap, level, threshold pairs). */
export const ALARM_DPS = [19, 20, 3, 5, 10, 11, 12, 13, 15, 34, 48];

/** The acknowledge cell: who and when, or a button (admin) that acknowledges. */
export function ackCell(alarm, onDone) {
  if (alarm.acknowledged_at) {
    return h("span", { title: fullTime(alarm.acknowledged_at) }, `${alarm.acknowledged_by || "—"}, ${time(alarm.acknowledged_at)}`);
  }
  if (!isAdmin()) return h("span", { class: "muted", title: "Acknowledging needs an admin token" }, "not acknowledged");
  const status = h("span", { class: "small", role: "status" });
  const button = h(
    "button",
    {
      type: "button",
      class: "btn btn-secondary btn-small",
      "aria-label": `Acknowledge ${alarmName(alarm)} on ${alarm.cid}`,
      onclick: async () => {
        button.disabled = true;
        button.textContent = "Acknowledging…";
        try {
          const updated = await api(`/api/v1/alarms/${alarm.id}/ack`, { method: "POST" });
          onDone(updated);
        } catch (err) {
          button.disabled = false;
          button.textContent = "Acknowledge";
          status.textContent = err instanceof ApiError && err.status === 403 ? "Needs an admin token." : err.message;
        }
      },
    },
    "Acknowledge",
  );
  return h("span", null, button, " ", status);
}

export function alarmRow(a, { showDevice = true, onAck }) {
  const detail = alarmDetail(a);
  const row = h(
    "tr",
    { "data-alarm": a.id, class: a.active ? "alarm-active" : "alarm-past" },
    h("td", null, levelBadge(a.level)),
    h("td", null, h("strong", null, alarmName(a)), a.count > 1 ? h("span", { class: "badge warn", title: "Times the condition came back while open" }, ` ×${a.count}`) : null, a.details?.simulated ? [" ", h("span", { class: "badge plain", title: "Written by the demo's backfill: simulated history" }, "simulated")] : null, h("span", { class: "sub" }, detail || `${a.kind} · ${a.label}`)),
    showDevice ? h("td", null, h("a", { href: `#/devices/${encodeURIComponent(a.cid)}` }, a.cid)) : null,
    h("td", null, a.active ? h("span", { class: "badge bad" }, "Active") : h("span", { class: "badge off" }, "Cleared")),
    h("td", { class: "time", title: fullTime(a.raised_at) }, time(a.raised_at)),
    h("td", { class: "time", title: fullTime(a.cleared_at) }, a.cleared_at ? time(a.cleared_at) : "—"),
    h("td", { class: "ack" }),
  );
  fill(row.querySelector("td.ack"), ackCell(a, onAck));
  return row;
}

export async function alarmsView(main, { query, signal }) {
  document.title = "Alarms · meterhub";
  const state = {
    active: query.get("state") || "true",
    level: query.get("level") || "",
    cid: query.get("cid") || "",
    offset: 0,
  };
  const stateGroup = h(
    "div",
    { class: "segmented", role: "radiogroup", "aria-label": "Alarm state" },
    [
      ["true", "Active"],
      ["false", "Past"],
      ["", "All"],
    ].map(([value, label]) => [
      h("input", { type: "radio", name: "alarm-state", id: `alarm-state-${label.toLowerCase()}`, value, checked: state.active === value }),
      h("label", { for: `alarm-state-${label.toLowerCase()}` }, label),
    ]),
  );
  const level = h("select", { id: "alarm-level" }, h("option", { value: "" }, "All levels"), LEVELS.map((l) => h("option", { value: l }, l)));
  level.value = state.level;
  const cidInput = h("input", { id: "alarm-cid", type: "search", value: state.cid, placeholder: "device cid", autocomplete: "off" });
  const body = h("div", null, h("p", { class: "empty" }, "Loading…"));
  const err = errorBox();
  const csv = h("button", { type: "button", class: "btn btn-secondary btn-small", id: "alarms-csv", title: "The alarms of this list (state, level, device filters), newest first" }, "Download CSV");
  csv.addEventListener("click", async () => {
    csv.disabled = true;
    try {
      await download(`/api/v1/alarms.csv${qs({ active: state.active, level: state.level, cid: state.cid })}`, "alarms.csv");
      err.show("");
    } catch (e) {
      err.show(`CSV download failed: ${e.message || e}`);
    } finally {
      csv.disabled = false;
    }
  });
  fill(
    main,
    h(
      "div",
      { class: "page-head" },
      h("div", null, h("h1", null, "Alarms"), h("div", { class: "sub" }, isAdmin() ? "Acknowledge an alarm to record that someone is on it." : "Read-only token: acknowledging needs an admin token.")),
      h("a", { href: "#/alarm-rules", id: "alarm-rules-link" }, "Rules and notifications"),
    ),
    err,
    h(
      "section",
      { class: "panel", "aria-label": "Alarms" },
      h(
        "form",
        { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
        stateGroup,
        h("div", { class: "field" }, h("label", { for: "alarm-level" }, "Level"), level),
        h("div", { class: "field" }, h("label", { for: "alarm-cid" }, "Device"), cidInput),
        csv,
      ),
      body,
    ),
  );
  try {
    (await everyModel()).forEach(learnModel);
  } catch {
    /* labels fall back to their codes */
  }

  async function load() {
    const page = await api(
      `/api/v1/alarms${qs({ active: state.active, level: state.level, cid: state.cid, limit: PAGE, offset: state.offset })}`,
      { signal },
    );
    err.show("");
    if (!page.items.length) {
      const what = state.active === "true" ? "No active alarms" : state.active === "false" ? "No past alarms" : "No alarms";
      fill(body, h("p", { class: "empty", id: "alarms-empty" }, `${what}${state.level ? ` of level ${state.level}` : ""}${state.cid ? ` for ${state.cid}` : ""}.`));
      return;
    }
    const rows = page.items.map((a) => alarmRow(a, { onAck }));
    fill(
      body,
      table(["Level", "Alarm", "Device", "State", "Raised", "Cleared", "Acknowledged"], rows, { caption: "Alarms", className: "alarm-table" }),
      pager(page, (offset) => {
        state.offset = offset;
        guard(load());
      }),
    );
  }
  function onAck(updated) {
    const row = body.querySelector(`tr[data-alarm="${updated.id}"]`);
    if (row) row.replaceWith(alarmRow(updated, { onAck }));
  }
  const guard = (p) =>
    p.catch((e) => {
      if (e.name !== "AbortError") err.show(e.message);
    });
  const reload = throttle(() => guard(load().then(refreshAlarmBadge)), 1000, 300);
  for (const input of stateGroup.querySelectorAll("input")) {
    input.addEventListener("change", () => {
      state.active = input.value;
      state.offset = 0;
      reload();
    });
  }
  level.addEventListener("change", () => {
    state.level = level.value;
    state.offset = 0;
    reload();
  });
  cidInput.addEventListener("input", () => {
    state.cid = cidInput.value.trim();
    state.offset = 0;
    reload();
  });
  await load();
  const stream = openStream({ dps: ALARM_DPS }, { onEvent: (kind) => kind === "report" && reload(), onResync: reload });
  const timer = setInterval(reload, 10000);
  return () => {
    stream.close();
    clearInterval(timer);
    reload.cancel();
  };
}
