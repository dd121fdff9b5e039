// The page frame around the views: the live indicator and the active-alarm count in the nav.

import { api, onLiveState } from "./api.js";
import { setText } from "./dom.js";

const LIVE_TEXT = {
  on: "Live",
  connecting: "Connecting…",
  error: "Disconnected",
  off: "Not live",
};

export function initShell() {
  const live = document.getElementById("live");
  const text = live.querySelector(".live-text");
  onLiveState((state) => {
    live.dataset.state = state;
    setText(text, LIVE_TEXT[state] || state);
    live.title = state === "on" ? "Values update as the meters report them" : "";
  });
}

let alarmTimer = null;

/** Refresh the active-alarm count in the nav (now, then every 20 s). */
export async function refreshAlarmBadge() {
  clearTimeout(alarmTimer);
  alarmTimer = setTimeout(refreshAlarmBadge, 20000);
  const el = document.getElementById("nav-alarm-count");
  try {
    const page = await api("/api/v1/alarms?active=true&limit=1");
    el.hidden = page.total === 0;
    setText(el, page.total > 99 ? "99+" : page.total);
    el.title = `${page.total} active alarm${page.total === 1 ? "" : "s"}`;
  } catch {
    el.hidden = true;
  }
}

export function stopShell() {
  clearTimeout(alarmTimer);
  alarmTimer = null;
}
