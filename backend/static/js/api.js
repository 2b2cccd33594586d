// Talking to the backend: the API key (asked once, kept in localStorage) and the JSON reads,
// including /series, which answers many metrics in one request.

const KEY = "pluto_key";
const URL_BUDGET = 6000;   // characters of query per /series request, well within server limits
export const MAX_POINTS = 1000;

export class AuthError extends Error {}

export function apiKey() { return localStorage.getItem(KEY) || ""; }
export function setKey(key) { localStorage.setItem(KEY, key); }
export function forgetKey() { localStorage.removeItem(KEY); }

/** GET a JSON path with the bearer key; throws AuthError on 401 and Error naming the reason. */
export async function getJSON(path, params = []) {
  const qs = new URLSearchParams(params).toString();
  const resp = await fetch(path + (qs ? "?" + qs : ""), {
    headers: {Authorization: "Bearer " + apiKey()}, cache: "no-store"});
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) throw new AuthError((body && body.error) || "API key refused");
  if (!resp.ok) throw new Error((body && body.error) || `${path}: HTTP ${resp.status}`);
  return body;
}

export const listRuns = (project) => getJSON("/api/runs", project ? {project} : {});
export const getRun = (id) => getJSON(`/api/runs/${id}`);
export const metricNames = (id) => getJSON(`/api/runs/${id}/metrics`);

/** Split ``names`` into groups whose query fits URL_BUDGET and holds at most ``most`` names. */
export function batches(names, most = 256) {
  const out = [];
  let cur = [], size = 0;
  for (const n of names) {
    const cost = encodeURIComponent(n).length + 6;
    if (cur.length && (size + cost > URL_BUDGET || cur.length >= most)) {
      out.push(cur); cur = []; size = 0;
    }
    cur.push(n); size += cost;
  }
  if (cur.length) out.push(cur);
  return out;
}

/** Points of every name in ``names`` and of every metric starting with one of ``prefixes``
 * (a chart of 64 ranks is one short prefix): Map name -> [[step, v, t]], a request per batch. */
export async function fetchSeries(runId, names, bounds = {}, prefixes = []) {
  const out = new Map();
  const groups = batches(names);
  if (!groups.length) groups.push([]);
  for (const [i, group] of groups.entries()) {
    const params = group.map((n) => ["name", n]);
    if (i === 0) for (const p of prefixes) params.push(["prefix", p]);
    if (!params.length) continue;
    for (const [k, v] of Object.entries(bounds)) {
      if (v !== null && v !== undefined) params.push([k, String(v)]);
    }
    const body = await getJSON(`/api/runs/${runId}/series`, params);
    for (const s of body.series) out.set(s.name, s.points);
  }
  return out;
}
