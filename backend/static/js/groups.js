// Which metric goes on which chart: names that differ only in one `rank<N>` path segment
// share a chart (one line per rank); every other name gets a chart of its own. Charts are
// sectioned by their first name segment.

const RANK = /^rank(\d+)$/;

/** {key, title, rank} for one metric name; key is shared by the names of one chart. */
export function parseName(name) {
  const parts = name.split("/");
  for (let i = parts.length - 1; i >= 0; i--) {
    const m = RANK.exec(parts[i]);
    if (m) {
      const rest = parts.slice(0, i).concat(parts.slice(i + 1));
      const key = parts.slice(0, i).concat(["rank*"], parts.slice(i + 1)).join("/");
      return {key: "group:" + key, title: rest.join("/") || name, rank: Number(m[1])};
    }
  }
  return {key: "one:" + name, title: name, rank: null};
}

export function sectionOf(title) {
  const i = title.indexOf("/");
  return i > 0 ? title.slice(0, i) : "(top)";
}

/** Map key -> {key, title, section, grouped, lines: [{name, rank}]} in a stable order. */
export function groupNames(names, into = new Map()) {
  for (const name of names) {
    const p = parseName(name);
    let g = into.get(p.key);
    if (!g) {
      g = {key: p.key, title: p.title, section: sectionOf(p.title),
           grouped: p.rank !== null, lines: []};
      into.set(p.key, g);
    }
    if (!g.lines.some((l) => l.name === name)) {
      g.lines.push({name, rank: p.rank});
      g.lines.sort((a, b) => (a.rank ?? 0) - (b.rank ?? 0) || (a.name < b.name ? -1 : 1));
    }
  }
  return into;
}

/** A predicate for the search box: a substring (any case) or, when it compiles, a regex. */
export function matcher(query) {
  const q = query.trim();
  if (!q) return () => true;
  let re = null;
  try { re = new RegExp(q, "i"); } catch (e) { re = null; }
  const lower = q.toLowerCase();
  return (text) => text.toLowerCase().includes(lower) || (re !== null && re.test(text));
}
