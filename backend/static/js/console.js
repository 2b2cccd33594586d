// The run page's console section: the run's stdout/stderr lines, newest last, with rank, stream
// and time. The rank filter (ranks from the members table) and the text filter are asked of the
// server (GET /api/runs/{id}/logs), so they search the whole run, not only the lines on screen.
// A run opens on its newest PAGE lines ("load older" fetches the page before them); while the
// run is RUNNING, poll() reads what came after the last line's id and appends only that. Every
// line's text goes in with textContent: a printed `<script>` is shown, never run.
import {getJSON, AuthError} from "./api.js";
import {el} from "./dom.js";

const PAGE = 500;          // lines per request
const KEEP = 5000;         // lines held on the page; beyond, the oldest leave ("load older" again)
const CATCH_UP = 4;        // requests per poll while the server says more lines wait
const TYPES = {INFO: "stdout", ERROR: "stderr"};

/** "HH:MM:SS.mmm" in local time for epoch ms (the full date is the element's title). */
function clock(ms) {
  const d = new Date(ms);
  if (isNaN(d.getTime())) return String(ms);
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

export class Console {
  constructor(runId) {
    this.runId = runId;
    this.first = null;     // id of the oldest line shown (the "load older" cursor)
    this.last = null;      // id of the newest line shown (the polling cursor)
    this.older = false;    // the server has lines before this.first
    this.generation = 0;   // bumped when a filter changes: answers to older requests are ignored
    this.ranks = [];
    this.rankBox = el("select", {attrs: {id: "console-rank"}},
      el("option", {text: "all ranks", attrs: {value: ""}}));
    this.textBox = el("input", {attrs: {id: "console-q", type: "search", size: 24,
      placeholder: "filter lines: text"}});
    this.olderButton = el("button", {text: "load older", attrs: {id: "console-older", type: "button"}});
    this.count = el("span", {cls: "muted"});
    this.state = el("span", {cls: "muted", attrs: {id: "console-state"}});
    this.lines = el("div", {cls: "console-lines", attrs: {id: "console-lines"}});
    this.details = el("details", {cls: "section console", data: {section: "console"}},
      el("summary", {}, el("span", {text: "Console"}), this.count),
      el("div", {cls: "controls"}, this.rankBox, this.textBox, this.olderButton, this.state),
      this.lines);
    this.details.open = true;
    this.root = this.details;
    this.rankBox.addEventListener("change", () => this.reload());
    this.textBox.addEventListener("input", () => {
      clearTimeout(this.typing);
      this.typing = setTimeout(() => this.reload(), 250);
    });
    this.olderButton.addEventListener("click", () => this.loadOlder());
    this.draw();
  }

  /** The rank filter's choices: every rank of the run's members (the selection is kept). */
  setRanks(members) {
    const ranks = [...new Set((members || []).map((m) => m.rank)
      .filter((r) => typeof r === "number"))].sort((a, b) => a - b);
    if (ranks.join(",") === this.ranks.join(",")) return;
    this.ranks = ranks;
    const chosen = this.rankBox.value;
    this.rankBox.replaceChildren(el("option", {text: "all ranks", attrs: {value: ""}}),
      ...ranks.map((r) => el("option", {text: `rank ${r}`, attrs: {value: String(r)}})));
    this.rankBox.value = chosen !== "" && ranks.includes(Number(chosen)) ? chosen : "";
  }

  params(extra) {
    const out = {limit: String(PAGE), ...extra};
    if (this.rankBox.value !== "") out.rank = this.rankBox.value;
    const q = this.textBox.value.trim();
    if (q) out.q = q;
    return out;
  }

  /** GET a page and ``apply`` it, unless a filter changed meanwhile (the answer is stale then);
   * false when not applied (stale, or failed: the reason is shown in the section). */
  async page(extra, gen, apply) {
    try {
      const body = await getJSON(`/api/runs/${this.runId}/logs`, this.params(extra));
      if (gen !== this.generation) return false;
      apply(body);
      this.state.textContent = "";
      return true;
    } catch (e) {
      this.failed(e);
      return false;
    }
  }

  /** The newest page under the current filters, replacing what is shown. */
  async reload() {
    await this.page({}, ++this.generation, (body) => {
      this.lines.replaceChildren();
      this.first = this.last = null;
      this.older = body.more;
      this.add(body.lines, false);
      this.lines.scrollTop = this.lines.scrollHeight;
    });
  }

  async loadOlder() {
    if (this.first === null) return this.reload();
    await this.page({before: String(this.first)}, this.generation, (body) => {
      const height = this.lines.scrollHeight;
      this.older = body.more;
      this.add(body.lines, true);
      this.lines.scrollTop += this.lines.scrollHeight - height;  // the view stays where it was
    });
  }

  /** Lines after the newest shown; a few requests at most when many are waiting. */
  async poll() {
    if (this.last === null) return this.reload();
    const gen = this.generation;
    let more = true;
    for (let i = 0; i < CATCH_UP && more; i++) {
      const applied = await this.page({after: String(this.last)}, gen, (body) => {
        this.add(body.lines, false);
        more = body.more;
      });
      if (!applied) return;
    }
  }

  failed(e) {
    if (e instanceof AuthError) {  // the page asks for the key again (main.js)
      window.dispatchEvent(new CustomEvent("pluto-auth", {detail: e.message}));
      return;
    }
    this.state.textContent = `console: ${e.message || e}`;
  }

  row(line) {
    const kind = TYPES[line.logType] || String(line.logType).toLowerCase();
    const div = el("div", {cls: "line" + (line.logType === "ERROR" ? " stderr" : ""),
                           data: {id: line.id, rank: line.rank ?? "", stream: kind}},
      el("span", {cls: "at", text: clock(line.time), title: new Date(line.time).toString()}),
      el("span", {cls: "rank", text: line.rank === null ? "?" : `rank ${line.rank}`}),
      el("span", {cls: "stream", text: kind}),
      el("span", {cls: "msg", text: line.message}));
    return div;
  }

  stop() { clearTimeout(this.typing); ++this.generation; }

  /** Lines in id order: prepended (older) or appended (newer, following the bottom). */
  add(lines, older) {
    if (lines.length) {
      const box = this.lines;
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
      const rows = lines.map((l) => this.row(l));
      if (older) {
        box.prepend(...rows);
        this.first = lines[0].id;
        if (this.last === null) this.last = lines[lines.length - 1].id;
      } else {
        box.append(...rows);
        this.last = lines[lines.length - 1].id;
        if (this.first === null) this.first = lines[0].id;
        while (box.children.length > KEEP) {  // the oldest leave the page, still on the server
          box.firstElementChild.remove();
          this.older = true;
        }
        this.first = Number(box.firstElementChild.dataset.id);
        if (atBottom) box.scrollTop = box.scrollHeight;
      }
    }
    this.draw();
  }

  draw() {
    const n = this.lines.children.length;
    this.count.textContent = ` (${n} line${n === 1 ? "" : "s"}${this.older ? ", older ones on the server" : ""})`;
    this.olderButton.disabled = !this.older;
    this.details.dataset.lines = String(n);
    this.details.dataset.older = String(this.older);
  }
}
