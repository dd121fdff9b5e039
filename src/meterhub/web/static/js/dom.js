// Tiny DOM helpers. Text from the server (device names, labels) is only ever set as text, never as
// HTML, so a gateway cannot inject markup into the page.

/**
 * h("a", {href: "#/", class: "x", onclick: fn}, "text", child, [more])
 * Attributes: class, dataset (object), on<event> (function), value / checked / disabled (properties),
 * anything else with setAttribute (true -> "", false / null / undefined -> left out).
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props) {
    for (const [key, value] of Object.entries(props)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
      else if (key === "value" || key === "checked" || key === "selected") el[key] = value;
      else el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** Set text only when it changed (no needless repaint, no lost selection). Returns true on change. */
export function setText(el, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (el.textContent !== value) {
    el.textContent = value;
    return true;
  }
  return false;
}

/** Restart the highlight animation on an element. */
export function flash(el) {
  el.classList.remove("flash");
  void el.offsetWidth; // restart the CSS animation
  el.classList.add("flash");
}

/** Call fn at most once per `ms` (trailing call kept), never sooner than `minDelay` after a call. */
export function throttle(fn, ms, minDelay = 0) {
  let timer = null;
  let last = 0;
  const run = () => {
    timer = null;
    last = Date.now();
    fn();
  };
  const wrapped = () => {
    if (timer) return;
    const wait = Math.max(minDelay, last + ms - Date.now());
    timer = setTimeout(run, wait);
  };
  wrapped.cancel = () => {
    if (timer) clearTimeout(timer);
    timer = null;
  };
  return wrapped;
}

/** A badge: h("span", {class: "badge " + kind}, text). */
export function badge(text, kind = "", title) {
  return h("span", { class: `badge ${kind}`.trim(), title }, text);
}

/** A table with a head row; rows are arrays of cells (Node, text, or {el, class}). */
export function table(headers, rows, { caption, className } = {}) {
  const head = h("tr", null, headers.map((hd) => (typeof hd === "string" ? h("th", { scope: "col" }, hd) : hd)));
  const body = h("tbody", null, rows);
  return h(
    "div",
    { class: "table-wrap" },
    h("table", { class: className }, caption ? h("caption", { class: "visually-hidden" }, caption) : null, h("thead", null, head), body),
  );
}
