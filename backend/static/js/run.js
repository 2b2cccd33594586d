// The run page: the run's header, config and tags, its members, then its charts in sections.
// Opening reads the overview of every chart (server-side M4, the first chart alone so it draws
// first, the rest a few requests of many series each); while the run is RUNNING the page polls
// every POLL_MS for points after each chart's last step and appends only those, and for the
// console lines after the last one shown (console.js).
import {fetchSeries, getRun, metricNames, MAX_POINTS, AuthError} from "./api.js";
import {Chart} from "./chart.js";
import {Console} from "./console.js";
import {$, el, duration, num, showError, statusBadge, FINAL} from "./dom.js";
import {groupNames, matcher} from "./groups.js";
import {Members} from "./members.js";

const POLL_MS = 500;
const NAMES_EVERY = 4;      // polls between two reads of the metric names
const BATCH_SERIES = 512;   // series per request after the first chart

export class RunPage {
  constructor(runId) {
    this.runId = runId;
    this.view = {xMode: "step", smoothing: 0, band: true, mean: true, runStart: 0};
    this.groups = new Map();      // key -> group (see groups.js)
    this.charts = new Map();      // key -> Chart
    this.sections = new Map();    // section name -> {details, box, count}
    this.members = new Members();
    this.console = new Console(runId);
    this.stopped = false;
    this.ticks = 0;
    this.finalSeen = false;
    this.root = el("section", {cls: "run-page"});
    this.header = el("div", {cls: "run-header"});
    this.meta = el("div", {cls: "run-meta"});
    this.controls = this.makeControls();
    this.chartsBox = el("div", {cls: "sections"});
    this.root.append(this.header, this.meta, this.members.root, this.console.root, this.controls,
                     this.chartsBox);
    this.onResize = () => { clearTimeout(this.resizing); this.resizing = setTimeout(() => {
      for (const c of this.charts.values()) c.resize(); }, 150); };
    window.addEventListener("resize", this.onResize);
    // Only charts on (or near) the screen are drawn and redrawn on new points.
    this.byRoot = new Map();
    this.observer = new IntersectionObserver((entries) => {
      for (const e of entries) {
        const c = this.byRoot.get(e.target);
        if (c) c.onScreen = e.isIntersecting;
      }
      this.renderVisible();
    }, {rootMargin: "800px 0px"});
  }

  makeControls() {
    this.search = el("input", {attrs: {id: "search", type: "search", size: 28,
      placeholder: "filter charts: substring or regex"}});
    this.xMode = el("select", {attrs: {id: "xmode"}},
      el("option", {text: "x: step", attrs: {value: "step"}}),
      el("option", {text: "x: relative time", attrs: {value: "rel"}}),
      el("option", {text: "x: wall time", attrs: {value: "wall"}}));
    this.smooth = el("input", {attrs: {id: "smoothing", type: "range", min: 0, max: 0.99,
      step: 0.01, value: 0}});
    this.smoothText = el("span", {cls: "muted", text: "0"});
    this.bandBox = el("input", {attrs: {id: "show-band", type: "checkbox"}});
    this.meanBox = el("input", {attrs: {id: "show-mean", type: "checkbox"}});
    this.bandBox.checked = this.meanBox.checked = true;
    const expand = el("button", {text: "expand all", attrs: {type: "button"}});
    const collapse = el("button", {text: "collapse all", attrs: {type: "button"}});
    this.search.addEventListener("input", () => this.applyFilter());
    this.xMode.addEventListener("change", () => { this.view.xMode = this.xMode.value; this.redraw(); });
    this.smooth.addEventListener("input", () => {
      this.view.smoothing = Number(this.smooth.value);
      this.smoothText.textContent = this.smooth.value;
      clearTimeout(this.smoothing);
      this.smoothing = setTimeout(() => this.redraw(), 60);
    });
    this.bandBox.addEventListener("change", () => { this.view.band = this.bandBox.checked; this.redraw(); });
    this.meanBox.addEventListener("change", () => { this.view.mean = this.meanBox.checked; this.redraw(); });
    expand.addEventListener("click", () => { for (const s of this.sections.values()) s.details.open = true; });
    collapse.addEventListener("click", () => { for (const s of this.sections.values()) s.details.open = false; });
    return el("div", {cls: "controls"}, this.search, this.xMode,
      el("label", {}, "EMA ", this.smooth, this.smoothText),
      el("label", {}, this.bandBox, " min–max band"), el("label", {}, this.meanBox, " mean"),
      expand, collapse);
  }

  async start() {
    const [run, {names}] = await Promise.all([getRun(this.runId), metricNames(this.runId)]);
    this.view.runStart = run.createdAt;
    this.showRun(run);
    this.addNames(names);
    await this.loadOverview([...this.charts.values()], true);
    this.showRun(run);
    await this.console.reload();
    this.schedule();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.console.stop();
    window.removeEventListener("resize", this.onResize);
    this.observer.disconnect();
    for (const c of this.charts.values()) c.destroy();
  }

  // -- header, meta, members ----------------------------------------------------------------

  showRun(run) {
    this.run = run;
    const ledger = run.ledger || null;
    const lost = ledger && typeof ledger.lost === "number" ? ledger.lost : null;
    const end = FINAL.has(run.status) ? run.updatedAt : Date.now();
    this.header.replaceChildren(
      el("h2", {text: run.name || run.externalId || `run ${run.id}`}), statusBadge(run.status),
      el("span", {cls: "kv", text: `id ${run.id}`}),
      el("span", {cls: "kv", text: `external id ${run.externalId ?? "–"}`}),
      el("span", {cls: "kv", text: `project ${run.project}`}),
      el("span", {cls: "kv", text: `last step ${num(run.lastStep ?? null)}`}),
      el("span", {cls: "kv", text: `duration ${duration(end - run.createdAt)}`}),
      el("span", {cls: "kv" + (lost > 0 ? " bad" : ""), attrs: {id: "run-lost"},
                  text: lost === null ? "lost –" : `lost ${num(lost)}`}));
    const consoleLost = ledger && typeof ledger.console_dropped === "number" ? ledger.console_dropped : null;
    if (consoleLost !== null) {
      this.header.append(el("span", {cls: "kv" + (consoleLost > 0 ? " bad" : ""),
        attrs: {id: "run-console-lost"}, title: "console lines the ranks could not send",
        text: `console lost ${num(consoleLost)}`}));
    }
    if (ledger) {
      this.header.append(el("span", {cls: "kv muted", text: ["logged", "sent", "stored", "dropped",
        "dead", "missing"].map((k) => `${k} ${num(ledger[k] ?? null)}`).join(" · ")}));
    }
    const tags = (run.tags || []).map((t) => el("span", {cls: "tag", text: t}));
    const config = el("pre", {cls: "config", text: JSON.stringify(run.config ?? {}, null, 2)});
    this.meta.replaceChildren(el("div", {cls: "tags"}, el("b", {text: "tags "}), ...tags),
      el("details", {}, el("summary", {text: "config"}), config));
    this.members.update(run, this.derivedRankSteps());
    this.console.setRanks(run.members);
    $("live").textContent = FINAL.has(run.status) ? "finished: not updating"
      : `live · ${new Date().toLocaleTimeString()}`;
  }

  /** rank -> newest step over the page's ``rank<N>`` metrics (when the ledger has none). */
  derivedRankSteps() {
    const out = new Map();
    for (const c of this.charts.values()) {
      for (const line of c.group.lines) {
        if (line.rank === null) continue;
        const s = c.lastStep(line.name);
        if (s !== null && !(out.get(line.rank) >= s)) out.set(line.rank, s);
      }
    }
    return out;
  }

  // -- sections and charts ------------------------------------------------------------------

  addNames(names) {
    const before = new Map([...this.groups].map(([k, g]) => [k, g.lines.length]));
    groupNames(names, this.groups);
    const fresh = [];
    const sorted = [...this.groups.values()].sort((a, b) => a.title < b.title ? -1 : 1);
    for (const g of sorted) {
      if (!this.charts.has(g.key)) {
        const chart = new Chart(g, this.view, (c, lo, hi, a, b) => this.zoom(c, lo, hi, a, b));
        this.charts.set(g.key, chart);
        this.sectionFor(g.section).box.append(chart.root);
        this.byRoot.set(chart.root, chart);
        this.observer.observe(chart.root);
        fresh.push(chart);
      } else if (before.get(g.key) !== g.lines.length) {
        fresh.push(this.charts.get(g.key));
      }
    }
    for (const s of this.sections.values()) s.count.textContent = ` (${s.box.children.length})`;
    if (fresh.length) this.applyFilter();
    return fresh;
  }

  sectionFor(name) {
    let s = this.sections.get(name);
    if (s) return s;
    const count = el("span", {cls: "muted"});
    const box = el("div", {cls: "chart-grid"});
    const details = el("details", {cls: "section", data: {section: name}},
                       el("summary", {}, el("span", {text: name}), count), box);
    details.open = true;
    details.addEventListener("toggle", () => { if (details.open) this.renderVisible(); });
    s = {details, box, count};
    this.sections.set(name, s);
    const names = [...this.sections.keys()].sort();
    const after = names.indexOf(name) + 1 < names.length ? this.sections.get(names[names.indexOf(name) + 1]) : null;
    this.chartsBox.insertBefore(details, after ? after.details : null);
    return s;
  }

  visible(chart) {
    const s = this.sections.get(chart.group.section);
    return chart.onScreen && s.details.open && !chart.root.classList.contains("hidden");
  }

  applyFilter() {
    const match = matcher(this.search.value);
    for (const c of this.charts.values()) {
      const hit = match(c.group.title) || c.group.lines.some((l) => match(l.name));
      c.root.classList.toggle("hidden", !hit);
    }
    for (const s of this.sections.values()) {
      s.details.classList.toggle("hidden", ![...s.box.children].some((e) => !e.classList.contains("hidden")));
    }
    this.renderVisible();
  }

  renderVisible(force = false) {
    for (const c of this.charts.values()) {
      if (this.visible(c) && (c.overview.size || c.zoom)) {
        if (c.render(force) && !document.body.dataset.firstChart) {
          document.body.dataset.firstChart = String(Math.round(performance.now()));
        }
      }
    }
  }

  redraw() {
    for (const c of this.charts.values()) c.dirty = true;
    this.renderVisible(true);
  }

  // -- reading points -----------------------------------------------------------------------

  /** What to ask for the lines of ``charts``: a prefix per `.../rank<N>` chart, else names. */
  static wanted(charts) {
    const names = [], prefixes = [];
    for (const c of charts) {
      const key = c.group.key;
      const prefix = key.startsWith("group:") && key.endsWith("/rank*") ? key.slice(6, -1) : null;
      if (prefix && c.group.lines.every((l) => l.name.startsWith(prefix))) prefixes.push(prefix);
      else names.push(...c.group.lines.map((l) => l.name));
    }
    return [names, prefixes];
  }

  /** Downsampled overview of ``charts``: the first chart alone, then batches of charts. */
  async loadOverview(charts, firstAlone = false) {
    const batches = [];
    let cur = [], size = 0;
    charts.forEach((c, i) => {
      cur.push(c); size += c.group.lines.length;
      if ((firstAlone && i === 0) || size >= BATCH_SERIES) { batches.push(cur); cur = []; size = 0; }
    });
    if (cur.length) batches.push(cur);
    for (const batch of batches) {
      if (this.stopped) return;
      const [names, prefixes] = RunPage.wanted(batch);
      const got = await fetchSeries(this.runId, names, {max_points: MAX_POINTS}, prefixes);
      for (const c of batch) {
        for (const l of c.group.lines) c.setPoints(l.name, got.get(l.name) || []);
        c.root.dataset.fetches = String(Number(c.root.dataset.fetches) + 1);
      }
      this.renderVisible();
    }
  }

  async zoom(chart, stepLo, stepHi, xMin, xMax) {
    try {
      const [names, prefixes] = RunPage.wanted([chart]);
      const got = await fetchSeries(this.runId, names,
        {step_min: stepLo, step_max: stepHi, max_points: MAX_POINTS}, prefixes);
      chart.root.dataset.fetches = String(Number(chart.root.dataset.fetches) + 1);
      chart.setZoom(stepLo, stepHi, xMin, xMax, got);
    } catch (e) {
      this.fail(e);
    }
  }

  /** Points after each chart's last step, for every chart; only what is new is appended. */
  async poll() {
    const charts = [...this.charts.values()];
    const batches = [];
    let cur = [], size = 0;
    for (const c of charts) {
      cur.push(c); size += c.group.lines.length;
      if (size >= BATCH_SERIES) { batches.push(cur); cur = []; size = 0; }
    }
    if (cur.length) batches.push(cur);
    const regrown = [];
    for (const batch of batches) {
      const [names, prefixes] = RunPage.wanted(batch);
      const lasts = batch.flatMap((c) => c.group.lines.map((l) => c.lastStep(l.name)));
      const since = lasts.some((s) => s === null) ? null : Math.min(...lasts) + 1;
      const got = await fetchSeries(this.runId, names, {since_step: since, max_points: MAX_POINTS},
                                    prefixes);
      for (const c of batch) {
        for (const l of c.group.lines) c.append(l.name, got.get(l.name) || []);
        if (!c.zoom && c.longest() > 4 * MAX_POINTS) regrown.push(c);
      }
    }
    if (regrown.length) await this.loadOverview(regrown);
    for (const c of charts) if (c.zoom) c.dirty = false;  // the zoom view stays as fetched
    this.renderVisible();
  }

  schedule() {
    if (this.stopped) return;
    if (FINAL.has(this.run.status)) {
      if (this.finalSeen) { document.body.dataset.live = "stopped"; return; }  // read once more, then stop
      this.finalSeen = true;
    }
    document.body.dataset.live = "polling";
    this.timer = setTimeout(() => this.tick(), POLL_MS);
  }

  async tick() {
    try {
      const run = await getRun(this.runId);
      if (++this.ticks % NAMES_EVERY === 0 || FINAL.has(run.status)) {
        const fresh = this.addNames((await metricNames(this.runId)).names);
        if (fresh.length) await this.loadOverview(fresh);
      }
      await this.poll();
      await this.console.poll();
      this.showRun(run);
      showError("");
    } catch (e) {
      this.fail(e);
    }
    this.schedule();
  }

  fail(e) {
    if (e instanceof AuthError) { this.stop(); window.dispatchEvent(new CustomEvent("pluto-auth", {detail: e.message})); return; }
    showError(e.message || String(e));
  }
}
