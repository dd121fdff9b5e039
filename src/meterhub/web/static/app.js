// meterhub operator dashboard: sign-in, hash routes, the views. Plain ES modules, no build step.

import { ApiError, session, signIn, signOut, storedToken } from "./js/api.js";
import { badge, fill, h } from "./js/dom.js";
import { fitTables } from "./js/fit.js";
import { initShell, refreshAlarmBadge, stopShell } from "./js/shell.js";
import { alarmRulesView } from "./js/views/alarm_rules.js";
import { alarmsView } from "./js/views/alarms.js";
import { deviceView } from "./js/views/device.js";
import { devicesView } from "./js/views/devices.js";
import { gatewayView, gatewaysView } from "./js/views/gateways.js";
import { overviewView } from "./js/views/overview.js";
import { siteView, sitesView, unitView } from "./js/views/sites.js";

const main = document.getElementById("main");
const topbar = document.getElementById("topbar");
const footer = document.getElementById("footer");

const ROUTES = [
  [/^\/?$/, "overview", overviewView],
  [/^\/gateways\/?$/, "gateways", gatewaysView],
  [/^\/gateways\/(.+)$/, "gateways", gatewayView],
  [/^\/devices\/?$/, "devices", devicesView],
  [/^\/devices\/(.+)$/, "devices", deviceView],
  [/^\/alarms\/?$/, "alarms", alarmsView],
  [/^\/alarm-rules\/?$/, "alarms", alarmRulesView],
  [/^\/sites\/?$/, "sites", sitesView],
  [/^\/sites\/(\d+)$/, "sites", siteView],
  [/^\/units\/(\d+)$/, "sites", unitView],
];

let current = null; // {cleanup, controller}

function parseHash() {
  const raw = window.location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = raw.split("?");
  return { path, query: new URLSearchParams(query) };
}

function teardown() {
  if (!current) return;
  current.controller.abort();
  try {
    if (typeof current.cleanup === "function") current.cleanup();
  } catch (err) {
    console.error(err);
  }
  current = null;
}

async function route() {
  if (!session.token) return;
  teardown();
  const { path, query } = parseHash();
  if (session.sites && path.replace(/\/$/, "") === "") {
    window.location.replace("#/sites"); // a site-scoped token has no fleet pages
    return;
  }
  let match = null;
  let params = [];
  for (const [re, nav, view] of ROUTES) {
    const m = path.match(re);
    if (m) {
      match = { nav, view };
      params = m.slice(1).map((p) => decodeURIComponent(p));
      break;
    }
  }
  for (const a of document.querySelectorAll(".mainnav a")) {
    if (match && a.dataset.nav === match.nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const controller = new AbortController();
  current = { controller, cleanup: null };
  const mine = current;
  fill(main);
  if (!match) {
    document.title = "Not found · meterhub";
    fill(main, h("div", { class: "panel" }, h("h1", null, "Page not found"), h("p", null, h("a", { href: "#/" }, "Back to the overview"))));
    return;
  }
  try {
    const cleanup = await match.view(main, { params, query, signal: controller.signal });
    if (current === mine) mine.cleanup = cleanup;
    else if (typeof cleanup === "function") cleanup(); // navigated away while loading
  } catch (err) {
    if (err.name === "AbortError" || current !== mine) return;
    if (err instanceof ApiError && err.status === 401) return; // the sign-in form is shown
    console.error(err);
    fill(
      main,
      h(
        "div",
        { class: "panel", role: "alert" },
        h("h1", null, err instanceof ApiError && err.status === 404 ? "Not found" : "Something went wrong"),
        h("p", null, err.message),
        h("p", null, h("a", { href: "#/" }, "Back to the overview")),
      ),
    );
  }
}

// --- sign-in ----------------------------------------------------------------------------------------

function showLogin(message, kind = "error") {
  teardown();
  stopShell();
  topbar.hidden = true;
  footer.hidden = true;
  document.title = "Sign in · meterhub";
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "token-help",
    placeholder: "mh_…",
  });
  const error = h("div", { id: "login-error", role: "alert", class: kind === "error" ? "form-error" : "form-info", hidden: !message }, message || "");
  const button = h("button", { type: "submit", class: "btn" }, "Sign in");
  const form = h(
    "form",
    { novalidate: true },
    h("label", { for: "token" }, "API token"),
    input,
    h("p", { class: "help", id: "token-help" }, "Create one on the server with ", h("code", null, "meterhub token create NAME --scope admin"), " (or ", h("code", null, "--scope read"), " to look without sending commands). It is kept in this tab only."),
    error,
    button,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) {
      error.className = "form-error";
      error.textContent = "Enter an API token.";
      error.hidden = false;
      input.focus();
      return;
    }
    button.disabled = true;
    button.textContent = "Checking…";
    try {
      await signIn(token);
      startApp();
    } catch (err) {
      error.className = "form-error";
      error.textContent =
        err instanceof ApiError && err.status === 401
          ? `This token was not accepted: ${err.message}.`
          : err.message || "Sign-in failed.";
      error.hidden = false;
      input.setAttribute("aria-invalid", "true");
      input.focus();
      input.select();
    } finally {
      button.disabled = false;
      button.textContent = "Sign in";
    }
  });
  fill(
    main,
    h(
      "div",
      { class: "login" },
      h(
        "div",
        { class: "panel" },
        h("h1", null, svgMark(), "meterhub"),
        h("p", { class: "muted" }, "Operator dashboard for meters and gateways."),
        form,
      ),
    ),
  );
  input.focus();
}

function svgMark() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "brand-mark");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", "M13 2 4 14h7l-1 8 9-12h-7z");
  svg.append(path);
  return svg;
}

function startApp() {
  topbar.hidden = false;
  footer.hidden = false;
  fill(
    document.getElementById("who"),
    session.name,
    badge(session.scope, `plain scope scope-${session.scope}`, session.scope === "admin" ? "May send commands and acknowledge alarms" : "Read only: no commands, no acknowledgements"),
  );
  for (const a of document.querySelectorAll(".mainnav a")) a.hidden = Boolean(session.sites) && a.dataset.nav !== "sites";
  if (!session.sites) refreshAlarmBadge();
  route();
}

window.addEventListener("meterhub:auth-lost", (e) => {
  showLogin(`You were signed out: ${e.detail?.message || "the token is no longer valid"}. Sign in again with a valid token.`);
});
window.addEventListener("hashchange", route);
document.getElementById("signout").addEventListener("click", () => {
  signOut();
  showLogin("You signed out.", "info");
});

async function boot() {
  initShell();
  fitTables(main);
  const token = storedToken();
  if (!token) {
    showLogin(null);
    return;
  }
  try {
    await signIn(token);
    startApp();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      signOut();
      showLogin(`The saved token was not accepted: ${err.message}. Sign in again.`);
    } else {
      showLogin(err.message || "Cannot reach the server.");
    }
  }
}

boot();
