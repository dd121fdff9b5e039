// Alarm rules (thresholds, rate, no data, tuning) with a form to add one, and the dead-letter list of
// notifications that could not be delivered (with a button to send again).

import { ApiError, api, isAdmin } from "../api.js";
import { fill, h, table } from "../dom.js";
import { fullTime, time } from "../format.js";
import { LEVELS, errorBox, levelBadge } from "./common.js";

const KINDS = [
  ["above", "Above a value"],
  ["below", "Below a value"],
  ["rate", "Changes faster than (per minute)"],
  ["no_data", "No data for (minutes)"],
  ["tune", "Tune an alarm (hysteresis, durations)"],
];

function field(id, label, input) {
  return h("div", { class: "field" }, h("label", { for: id }, label), input);
}

function num(id, value = "") {
  return h("input", { id, name: id, type: "number", step: "any", value, class: "control-input small-input" });
}

export async function alarmRulesView(main, { signal }) {
  document.title = "Alarm rules · meterhub";
  const err = errorBox();
  const rulesBox = h("div", null, h("p", { class: "empty" }, "Loading…"));
  const deadBox = h("div", null, h("p", { class: "empty" }, "Loading…"));
  const formStatus = h("p", { class: "small", role: "status", id: "rule-status" });
  const kind = h("select", { id: "rule-kind", name: "kind" }, KINDS.map(([v, l]) => h("option", { value: v }, l)));
  const level = h("select", { id: "rule-level", name: "level" }, LEVELS.map((l) => h("option", { value: l }, l)));
  const label = h("input", { id: "rule-label", name: "label", required: true, maxlength: 64, placeholder: "e.g. hot_meter or *", class: "control-input" });
  const code = h("input", { id: "rule-code", name: "code", placeholder: "e.g. temp_current", class: "control-input" });
  const value = num("rule-value");
  const product = h("input", { id: "rule-model", name: "product_id", placeholder: "any model", class: "control-input" });
  const site = num("rule-site");
  const hyst = num("rule-hysteresis", "0");
  const raiseAfter = num("rule-raise-after", "0");
  const clearAfter = num("rule-clear-after", "0");
  const form = h(
    "form",
    {
      class: "filters",
      id: "rule-form",
      "aria-label": "Add an alarm rule",
      onsubmit: async (e) => {
        e.preventDefault();
        const body = {
          kind: kind.value,
          label: label.value.trim(),
          level: level.value,
          hysteresis: Number(hyst.value || 0),
          raise_after: Number(raiseAfter.value || 0),
          clear_after: Number(clearAfter.value || 0),
        };
        if (code.value.trim()) body.code = code.value.trim();
        if (value.value !== "") body.value = Number(value.value);
        if (product.value.trim()) body.product_id = product.value.trim();
        if (site.value !== "") body.site_id = Number(site.value);
        try {
          const made = await api("/api/v1/alarm-rules", { method: "POST", body });
          formStatus.textContent = `Rule ${made.id} added.`;
          form.reset();
          await loadRules();
        } catch (ex) {
          formStatus.textContent = ex instanceof ApiError && ex.status === 403 ? "Needs an admin token." : ex.message;
        }
      },
    },
    field("rule-kind", "Kind", kind),
    field("rule-label", "Label", label),
    field("rule-code", "Data point", code),
    field("rule-value", "Value", value),
    field("rule-level", "Level", level),
    field("rule-model", "Model", product),
    field("rule-site", "Site id", site),
    field("rule-hysteresis", "Hysteresis", hyst),
    field("rule-raise-after", "Raise after (s)", raiseAfter),
    field("rule-clear-after", "Clear after (s)", clearAfter),
    h("button", { type: "submit", class: "btn btn-primary btn-small", disabled: !isAdmin() }, "Add rule"),
  );
  fill(
    main,
    h("nav", { class: "crumbs" }, h("a", { href: "#/alarms" }, "Alarms"), " / Rules and notifications"),
    h("div", { class: "page-head" }, h("h1", null, "Alarm rules"), h("div", { class: "sub" }, "Without a rule of their own, alarms wait 10 s before raising and 30 s before clearing.")),
    err,
    h("section", { class: "panel", "aria-label": "Alarm rules" }, h("h2", null, "Rules"), rulesBox),
    h("section", { class: "panel", "aria-label": "Add a rule" }, h("h2", null, "Add a rule"), form, formStatus),
    h("section", { class: "panel", id: "dead-letters", "aria-label": "Dead letters" }, h("h2", null, "Undelivered notifications"), deadBox),
  );

  async function loadRules() {
    const { items } = await api("/api/v1/alarm-rules", { signal });
    if (!items.length) {
      fill(rulesBox, h("p", { class: "empty", id: "rules-empty" }, "No rules: the built-in alarms with their defaults."));
      return;
    }
    const rows = items.map((r) =>
      h(
        "tr",
        { "data-rule": r.id },
        h("td", null, h("strong", null, r.label), h("span", { class: "sub" }, r.kind)),
        h("td", null, r.code || "—", r.value == null ? "" : ` ${r.kind === "below" ? "<" : ">"} ${r.value}`),
        h("td", null, levelBadge(r.level)),
        h("td", null, [r.product_id ? `model ${r.product_id}` : null, r.site_id ? `site ${r.site_id}` : null].filter(Boolean).join(", ") || "all meters"),
        h("td", { class: "num" }, `±${r.hysteresis}`),
        h("td", { class: "num" }, `${r.raise_after} s / ${r.clear_after} s`),
        h(
          "td",
          null,
          isAdmin()
            ? h(
                "button",
                {
                  type: "button",
                  class: "btn btn-secondary btn-small",
                  "aria-label": `Delete rule ${r.label}`,
                  onclick: async () => {
                    try {
                      await api(`/api/v1/alarm-rules/${r.id}`, { method: "DELETE" });
                      await loadRules();
                    } catch (ex) {
                      err.show(ex.message);
                    }
                  },
                },
                "Delete",
              )
            : null,
        ),
      ),
    );
    fill(rulesBox, table(["Rule", "Condition", "Level", "Scope", "Hysteresis", "Raise / clear after", ""], rows, { caption: "Alarm rules", className: "rule-table" }));
  }

  async function loadDead() {
    const { items } = await api("/api/v1/notify/dead", { signal });
    if (!items.length) {
      fill(deadBox, h("p", { class: "empty", id: "dead-empty" }, "Every notification was delivered."));
      return;
    }
    const rows = items.map((n) =>
      h(
        "tr",
        { "data-dead": n.id },
        h("td", null, n.event),
        h("td", null, `${n.payload.alarm.label} on ${n.payload.alarm.cid}`),
        h("td", null, `target ${n.target_id}`),
        h("td", { class: "num" }, String(n.attempts)),
        h("td", null, n.last_error || "—"),
        h("td", { class: "time", title: fullTime(n.done_at) }, time(n.done_at)),
        h(
          "td",
          null,
          isAdmin()
            ? h(
                "button",
                {
                  type: "button",
                  class: "btn btn-secondary btn-small",
                  "aria-label": `Send notification ${n.id} again`,
                  onclick: async () => {
                    try {
                      await api(`/api/v1/notify/dead/${n.id}/retry`, { method: "POST" });
                      await loadDead();
                    } catch (ex) {
                      err.show(ex.message);
                    }
                  },
                },
                "Send again",
              )
            : null,
        ),
      ),
    );
    fill(deadBox, table(["Event", "Alarm", "Target", "Attempts", "Last error", "Given up", ""], rows, { caption: "Dead letters", className: "dead-table" }));
  }

  try {
    await Promise.all([loadRules(), loadDead()]);
  } catch (ex) {
    if (ex.name !== "AbortError") err.show(ex.message);
  }
  const timer = setInterval(() => loadDead().catch(() => {}), 5000);
  return () => clearInterval(timer);
}
