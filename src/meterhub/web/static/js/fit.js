// Tables that do not fit their box are shown as stacked rows (each cell under its column's name)
// instead of hiding columns behind a sideways scroll: on phones, and in the narrow columns of wide
// pages (the device page's alarms at 1280 px). Decided per table by measuring, again on resizes and
// when rows change.

const fitted = new WeakSet();

/** Give each cell of `table` its column's name (data-label), shown in front of it when stacked. */
function labelCells(table) {
  const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent.trim());
  for (const tr of table.querySelectorAll("tbody tr")) {
    let col = 0;
    for (const td of tr.children) {
      if (!td.hasAttribute("data-label")) td.setAttribute("data-label", td.colSpan > 1 ? "" : heads[col] ?? "");
      col += td.colSpan || 1;
    }
  }
}

/** Stack the rows of the table in `wrap` when its columns are wider than the box, unstack when not. */
function refit(wrap) {
  const table = wrap.querySelector("table");
  if (!table || !wrap.isConnected) return;
  wrap.classList.remove("stacked");
  const tooWide = wrap.scrollWidth > wrap.clientWidth + 1;
  if (tooWide) {
    labelCells(table);
    wrap.classList.add("stacked");
  }
}

function fit(wrap) {
  if (fitted.has(wrap)) return;
  fitted.add(wrap);
  let width = -1;
  let pending = false;
  const schedule = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      refit(wrap);
    });
  };
  // Width changes of the box (window resized, panel reflowed); row changes (live updates, paging).
  const rows = new MutationObserver(schedule);
  const box = new ResizeObserver((entries) => {
    if (!wrap.isConnected) {
      // replaced (a view reloads its tables): let both observers go with it
      box.disconnect();
      rows.disconnect();
      return;
    }
    const w = Math.round(entries[entries.length - 1].contentRect.width);
    if (w !== width) {
      width = w;
      schedule();
    }
  });
  box.observe(wrap);
  rows.observe(wrap, { childList: true, subtree: true, characterData: true });
  refit(wrap);
}

/** Fit every table box under `root` now and every one added later. */
export function fitTables(root) {
  const scan = (node) => {
    if (!(node instanceof Element)) return;
    if (node.classList.contains("table-wrap")) fit(node);
    node.querySelectorAll(".table-wrap").forEach(fit);
  };
  scan(root);
  new MutationObserver((records) => {
    for (const r of records) r.addedNodes.forEach(scan);
  }).observe(root, { childList: true, subtree: true });
}
