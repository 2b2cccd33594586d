// The members table: one row per process of the run, with its rank's last step, its speed and
// how far it trails the fastest rank (the slowest rank is highlighted: a live straggler view).
import {el, num} from "./dom.js";

const WINDOW_MS = 10000;  // steps/s is measured over the polls of the last 10 s

export class Members {
  constructor() {
    this.root = el("div", {cls: "members"});
    this.history = new Map();  // rank -> [[client ms, last step], ...]
  }

  /** Per rank the last step: the ledger's ``ranks`` rows when the backend has them, else
   * the newest step of the rank's ``rank<N>`` metrics the page holds (``derived``). */
  lastSteps(run, derived) {
    const out = new Map();
    for (const r of run.ranks || []) {
      if (r && r.rank !== null && r.rank !== undefined && r.last_step !== null &&
          r.last_step !== undefined) out.set(r.rank, r.last_step);
    }
    for (const [rank, step] of derived) if (!out.has(rank)) out.set(rank, step);
    return out;
  }

  rate(rank, step, now) {
    let h = this.history.get(rank);
    if (!h) this.history.set(rank, h = []);
    if (!h.length || h[h.length - 1][1] !== step || now - h[h.length - 1][0] > 1000) h.push([now, step]);
    while (h.length > 2 && now - h[0][0] > WINDOW_MS) h.shift();
    const [t0, s0] = h[0];
    return now - t0 >= 900 ? (step - s0) / ((now - t0) / 1000) : null;
  }

  update(run, derived) {
    const now = Date.now();
    const last = this.lastSteps(run, derived);
    const live = run.status === "RUNNING";
    const top = last.size ? Math.max(...last.values()) : null;
    const members = (run.members || []).slice().sort((a, b) => (a.rank ?? 1e9) - (b.rank ?? 1e9));
    let slowest = null;
    for (const m of members) {
      const step = last.get(m.rank);
      if (step !== undefined && top !== null && top - step > 0 &&
          (slowest === null || step < last.get(slowest))) slowest = m.rank;
    }
    const cols = ["rank", "host", "pid", "state", "last step", "steps/s", "behind",
                  "logged", "sent", "dropped", "stored", "dead", "console lost"];
    const head = el("tr", {}, ...cols.map((c) => el("th", {text: c})));
    const rows = members.map((m) => {
      const step = last.get(m.rank);
      const rate = step === undefined || !live ? null : this.rate(m.rank, step, now);
      const behind = step === undefined || top === null ? null : top - step;
      const tr = el("tr", {cls: m.rank === slowest && slowest !== null ? "slowest" : "",
                           data: {rank: m.rank ?? "", behind: behind ?? ""}});
      const cells = [m.rank ?? "?", m.host, m.pid, m.state, step === undefined ? null : step,
        rate === null ? null : Math.round(rate * 10) / 10, behind, m.logged, m.sent, m.dropped,
        m.stored, m.dead, m.drops && typeof m.drops.console === "number" ? m.drops.console : 0];
      cells.forEach((v, i) => {
        const td = el("td", {text: typeof v === "number" ? num(v) : (v ?? "–")});
        if (i === 9 && v > 0) td.className = "bad";
        if ((i === 11 || i === 12) && v > 0) td.className = "bad";
        tr.append(td);
      });
      return tr;
    });
    const table = el("table", {cls: "members-table"}, el("thead", {}, head),
                     el("tbody", {}, ...rows));
    this.root.replaceChildren(el("h3", {text: `members (${members.length})`}),
                              el("div", {cls: "members-box"}, table));
  }
}
