// The runs list: project filter (asked of the server), name and status filters (applied here),
// newest first, with members, last step, duration and the run's loss total (red when > 0):
// entries lost, plus the console lines its ranks lost.
import {listRuns} from "./api.js";
import {el, duration, num, statusBadge, FINAL} from "./dom.js";
import {matcher} from "./groups.js";

const REFRESH_MS = 3000;

export class RunsPage {
  constructor(params) {
    this.project = params.get("project") || "";
    this.root = el("section", {cls: "runs-page"});
    this.projectBox = el("input", {attrs: {id: "f-project", placeholder: "project (all)", size: 16}});
    this.projectBox.value = this.project;
    this.nameBox = el("input", {attrs: {id: "f-name", placeholder: "name or id filter", size: 18}});
    this.statusBox = el("select", {attrs: {id: "f-status"}},
      ...["", "RUNNING", "COMPLETED", "FAILED", "TERMINATED"].map(
        (s) => el("option", {text: s || "any status", attrs: {value: s}})));
    this.table = el("tbody");
    this.count = el("span", {cls: "muted"});
    this.root.append(
      el("div", {cls: "filters"}, this.projectBox, this.nameBox, this.statusBox, this.count),
      el("table", {cls: "runs-table"},
        el("thead", {}, el("tr", {}, ...["id", "project", "name", "status", "members",
          "last step", "duration", "lost"].map((c) => el("th", {text: c})))),
        this.table));
    this.projectBox.addEventListener("change", () => {
      this.project = this.projectBox.value.trim();
      location.hash = this.project ? "project=" + encodeURIComponent(this.project) : "";
      this.load();
    });
    this.nameBox.addEventListener("input", () => this.draw());
    this.statusBox.addEventListener("change", () => this.draw());
    this.runs = [];
    this.timer = null;
  }

  async start() {
    await this.load();
    this.timer = setInterval(() => this.load().catch(() => {}), REFRESH_MS);
  }

  stop() { clearInterval(this.timer); }

  async load() {
    const body = await listRuns(this.project);
    this.runs = body.runs;
    this.draw();
  }

  draw() {
    const match = matcher(this.nameBox.value);
    const status = this.statusBox.value;
    const shown = this.runs.filter((r) => r.error ? !status :
      (!status || r.status === status) &&
      match(`${r.name} ${r.externalId ?? ""} ${r.id}`));
    this.count.textContent = `${shown.length} of ${this.runs.length} runs`;
    const now = Date.now();
    this.table.replaceChildren(...shown.map((r) => {
      if (r.error) {  // a stored row the backend cannot read: say so, in place of the run
        return el("tr", {cls: "run-row", data: {run: r.id}}, el("td", {text: r.id}),
                  el("td", {cls: "bad", text: r.error, attrs: {colspan: 7}}));
      }
      const link = el("a", {text: r.name || r.externalId || `run ${r.id}`,
                            attrs: {href: `#run=${r.id}`}});
      const ext = r.externalId && r.name ? el("span", {cls: "muted", text: ` ${r.externalId}`}) : null;
      const members = typeof r.members === "number" ? r.members
        : Array.isArray(r.members) ? r.members.length : null;
      const end = FINAL.has(r.status) ? r.updatedAt : now;
      const lost = typeof r.lost === "number" ? r.lost : null;
      const consoleLost = typeof r.console_dropped === "number" ? r.console_dropped : 0;
      const lostText = (lost === null ? "–" : num(lost)) +
        (consoleLost > 0 ? ` + ${num(consoleLost)} console` : "");
      return el("tr", {cls: "run-row", data: {run: r.id, status: r.status}},
        el("td", {text: r.id}), el("td", {text: r.project}),
        el("td", {}, link, ext), el("td", {}, statusBadge(r.status)),
        el("td", {text: members === null ? "–" : members}),
        el("td", {text: num(r.lastStep ?? null)}),
        el("td", {text: duration(end - r.createdAt)}),
        el("td", {cls: lost > 0 || consoleLost > 0 ? "bad lost" : "lost", text: lostText,
                  data: {consoleLost}, title: "entries lost, + console lines the ranks lost"}));
    }));
  }
}
