// Small DOM helpers. Text always goes in through textContent, never innerHTML, so a metric
// name or run name from the server can never become markup.

/** An element with optional class, text and attributes, and children appended. */
export function el(tag, opts = {}, ...children) {
  const e = document.createElement(tag);
  if (opts.cls) e.className = opts.cls;
  if (opts.text !== undefined && opts.text !== null) e.textContent = String(opts.text);
  if (opts.title) e.title = String(opts.title);
  for (const [k, v] of Object.entries(opts.attrs || {})) e.setAttribute(k, String(v));
  for (const [k, v] of Object.entries(opts.data || {})) e.dataset[k] = String(v);
  for (const c of children) if (c) e.append(c);
  return e;
}

export const $ = (id) => document.getElementById(id);

export function showError(message) {
  $("err").textContent = message ? String(message) : "";
}

/** "1h 02m", "3m 05s", "12s" for a duration in milliseconds. */
export function duration(ms) {
  if (ms === null || ms === undefined || !isFinite(ms) || ms < 0) return "–";
  const s = Math.floor(ms / 1000), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  if (h) return `${h}h ${pad(m)}m`;
  if (m) return `${m}m ${pad(s % 60)}s`;
  return `${s}s`;
}

export function num(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  return Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(digits - 1)
    : v.toPrecision(digits);
}

export const FINAL = new Set(["COMPLETED", "FAILED", "TERMINATED"]);

export function statusBadge(status) {
  return el("span", {cls: "st st-" + String(status).replace(/[^A-Z]/g, ""), text: status});
}
