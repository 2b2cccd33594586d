// One chart: a uPlot plot of one metric, or of one metric over ranks (a line per rank, plus a
// mean line and a min-max band across ranks). It keeps the overview points (M4-downsampled by
// the server, then appended to live) and, while zoomed, the zoom range at full resolution.
/* global uPlot */
import {el, num} from "./dom.js";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];

function color(i, rank) {
  const k = rank ?? i;
  return k < PALETTE.length ? PALETTE[k] : `hsl(${(k * 137.508) % 360}, 60%, 45%)`;
}

/** A point's value as a number, or null with its kind for NaN / +-Infinity (a gap + marker). */
function value(v) {
  if (typeof v === "number") return isFinite(v) ? [v, null] : [null, v > 0 ? "+Inf" : "-Inf"];
  if (v === "NaN") return [null, "NaN"];
  if (v === "Infinity") return [null, "+Inf"];
  if (v === "-Infinity") return [null, "-Inf"];
  const n = Number(v);  // an int beyond 64 bits arrives as a number already; be lenient
  return isFinite(n) ? [n, null] : [null, "NaN"];
}

function lowerBound(arr, x) {
  let lo = 0, hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (arr[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

export class Chart {
  /**
   * @param group {key, title, grouped, lines: [{name, rank}]}
   * @param view  {xMode, smoothing, band, mean, runStart} shared by every chart of the page
   * @param onZoom (chart, stepLo, stepHi) => void, asks the page to fetch that range
   */
  constructor(group, view, onZoom) {
    this.group = group;
    this.view = view;
    this.onZoom = onZoom;
    this.overview = new Map();   // name -> [[step, v, t], ...] by step
    this.zoom = null;            // {xMin, xMax, stepLo, stepHi, points: Map} while zoomed
    this.u = null;
    this.shape = "";
    this.markers = [];
    this.dirty = true;
    this.onScreen = false;       // set by the page's IntersectionObserver
    this.root = el("div", {cls: "chart", data: {key: group.key, title: group.title,
                                                 fetches: 0, zoomed: 0, points: 0}});
    this.head = el("div", {cls: "chart-head"}, el("span", {cls: "chart-title", text: group.title}));
    this.info = el("span", {cls: "muted chart-info"});
    this.head.append(this.info);
    this.plot = el("div", {cls: "plot"});
    this.notes = el("div", {cls: "notes"});
    this.root.append(this.head, this.plot, this.notes);
  }

  lastStep(name) {
    const pts = this.overview.get(name);
    return pts && pts.length ? pts[pts.length - 1][0] : null;
  }

  /** Replace the overview of ``name`` (a fresh, downsampled read). */
  setPoints(name, points) {
    this.overview.set(name, points.slice());
    this.dirty = true;
  }

  /** Append the points newer than what the chart has; returns how many were new. */
  append(name, points) {
    const have = this.overview.get(name) || [];
    const last = have.length ? have[have.length - 1][0] : -Infinity;
    let added = 0;
    for (const p of points) if (p[0] > last) { have.push(p); added++; }
    if (added) { this.overview.set(name, have); this.dirty = true; }
    return added;
  }

  /** The most points any one line holds (the page re-reads a line grown well past MAX_POINTS). */
  longest() {
    let n = 0;
    for (const pts of this.overview.values()) n = Math.max(n, pts.length);
    return n;
  }

  setZoom(stepLo, stepHi, xMin, xMax, points) {
    this.zoom = {stepLo, stepHi, xMin, xMax, points};
    this.dirty = true;
    this.render(true);
  }

  resetZoom() {
    if (!this.zoom) return;
    this.zoom = null;
    this.dirty = true;
    this.render(true);
  }

  xOf(step, time) {
    if (this.view.xMode === "wall") return time / 1000;
    if (this.view.xMode === "rel") return (time - this.view.runStart) / 1000;
    return step;
  }

  /** uPlot's aligned data plus what the options depend on. */
  build() {
    const source = this.zoom ? this.zoom.points : this.overview;
    const lines = this.group.lines;
    const w = Math.min(Math.max(this.view.smoothing, 0), 0.999);
    const perLine = [];
    const markers = [];
    let total = 0, longest = 0;
    for (const line of lines) {
      const pts = source.get(line.name) || [];
      const xs = new Float64Array(pts.length), ys = new Array(pts.length);
      let ema = null;
      for (let i = 0; i < pts.length; i++) {
        const [step, raw, time] = pts[i];
        const x = this.xOf(step, time);
        const [y, kind] = value(raw);
        xs[i] = x;
        if (kind) { markers.push({x, kind, name: line.name, step}); ys[i] = null; continue; }
        ema = ema === null || w === 0 ? y : ema * w + y * (1 - w);
        ys[i] = ema;
      }
      total += pts.length;
      longest = Math.max(longest, pts.length);
      perLine.push({xs, ys});
    }
    let all = new Float64Array(total), k = 0;
    for (const {xs} of perLine) { all.set(xs, k); k += xs.length; }
    all.sort();
    let u = 0;
    for (let i = 0; i < all.length; i++) if (i === 0 || all[i] !== all[i - 1]) all[u++] = all[i];
    const xs = Array.from(all.subarray(0, u));
    const data = [xs];
    for (const line of perLine) {
      const ys = new Array(xs.length);
      for (let i = 0; i < line.xs.length; i++) ys[lowerBound(xs, line.xs[i])] = line.ys[i];
      data.push(ys);
    }
    const across = this.group.grouped && lines.length >= 2;
    if (across) data.push(...this.acrossRanks(data));
    return {data, markers, total, across};
  }

  /** [mean, max, min] across the rank lines. A sweep over x gathers points into a bin until
   * every line that spans that x has a point in it, then closes the bin at its last x: with
   * lines that share their steps each step is a bin (exact); with M4 overviews, whose picks
   * differ per line, a bin is about one bucket. The band holds every point (no spike is
   * lost); the mean is the mean over lines of each line's mean in the bin. */
  acrossRanks(data) {
    const xs = data[0], n = xs.length, lines = data.length - 1;
    const mean = new Array(n), hi = new Array(n), lo = new Array(n);
    const first = new Int32Array(lines).fill(-1), last = new Int32Array(lines).fill(-1);
    for (let s = 0; s < lines; s++) {
      const ys = data[s + 1];
      for (let i = 0; i < n; i++) if (ys[i] !== undefined) { if (first[s] < 0) first[s] = i; last[s] = i; }
    }
    const sum = new Float64Array(lines), cnt = new Uint32Array(lines), seen = new Uint8Array(lines);
    let bmin = Infinity, bmax = -Infinity;
    for (let i = 0; i < n; i++) {
      for (let s = 0; s < lines; s++) {
        const y = data[s + 1][i];
        if (y === undefined) continue;
        seen[s] = 1;
        if (y === null) continue;  // NaN: the line is there, without a value
        sum[s] += y; cnt[s]++;
        if (y < bmin) bmin = y;
        if (y > bmax) bmax = y;
      }
      let complete = true;
      for (let s = 0; s < lines && complete; s++) {
        if (!seen[s] && first[s] <= i && i <= last[s]) complete = false;
      }
      if (!complete) continue;
      let m = 0, c = 0;
      for (let s = 0; s < lines; s++) if (cnt[s]) { m += sum[s] / cnt[s]; c++; }
      if (c) { mean[i] = m / c; hi[i] = bmax; lo[i] = bmin; }
      sum.fill(0); cnt.fill(0); seen.fill(0);
      bmin = Infinity; bmax = -Infinity;
    }
    return [mean, hi, lo];
  }

  options(width, across) {
    const view = this.view;
    const series = [{label: view.xMode === "step" ? "step" : view.xMode === "rel" ? "s" : "time",
                     value: view.xMode === "wall" ? undefined : (u, v) => num(v, 6)}];
    this.group.lines.forEach((line, i) => {
      series.push({label: line.rank !== null ? `rank ${line.rank}` : line.name,
                   stroke: color(i, line.rank), width: 1, spanGaps: false,
                   value: (u, v) => num(v), points: {show: false}});
    });
    const bands = [];
    if (across) {
      const base = this.group.lines.length + 1;
      series.push({label: "mean", stroke: "#111", width: 2, show: view.mean,
                   value: (u, v) => num(v), points: {show: false}});
      series.push({label: "max", stroke: "rgba(60,60,160,0.35)", width: 1, show: view.band,
                   value: (u, v) => num(v), points: {show: false}});
      series.push({label: "min", stroke: "rgba(60,60,160,0.35)", width: 1, show: view.band,
                   value: (u, v) => num(v), points: {show: false}});
      if (view.band) bands.push({series: [base + 1, base + 2], fill: "rgba(80,80,200,0.14)"});
    }
    const chart = this;
    return {
      width, height: 240, series, bands,
      scales: {x: {time: view.xMode === "wall"}},
      legend: {live: true},
      cursor: {drag: {x: true, y: false, setScale: false}},
      hooks: {
        setSelect: [(u) => {
          if (u.select.width < 4) return;
          const a = u.posToVal(u.select.left, "x"), b = u.posToVal(u.select.left + u.select.width, "x");
          u.setSelect({left: 0, top: 0, width: 0, height: 0}, false);
          chart.zoomTo(a, b);
        }],
        draw: [(u) => chart.drawMarkers(u, chart.markers)],
      },
    };
  }

  /** A red tick where a value was NaN (bottom and top) or +-Inf (top or bottom edge). */
  drawMarkers(u, markers) {
    if (!markers.length) return;
    const ctx = u.ctx, {top, height} = u.bbox, size = 5 * devicePixelRatio;
    ctx.save();
    ctx.fillStyle = "#d00";
    for (const m of markers) {
      const x = u.valToPos(m.x, "x", true);
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
      const ys = m.kind === "+Inf" ? [top] : m.kind === "-Inf" ? [top + height] : [top, top + height];
      for (const y of ys) {
        const dir = y === top ? 1 : -1;
        ctx.beginPath();
        ctx.moveTo(x - size, y); ctx.lineTo(x + size, y); ctx.lineTo(x, y + dir * size * 1.6);
        ctx.fill();
      }
    }
    ctx.restore();
  }

  /** The steps shown between x values a and b, then ask the page for them. */
  zoomTo(a, b) {
    const xMin = Math.min(a, b), xMax = Math.max(a, b);
    let stepLo = Infinity, stepHi = -Infinity;
    const source = this.zoom ? this.zoom.points : this.overview;
    for (const pts of source.values()) {
      for (const [step, , time] of pts) {
        const x = this.xOf(step, time);
        if (x >= xMin && x <= xMax) {
          if (step < stepLo) stepLo = step;
          if (step > stepHi) stepHi = step;
        }
      }
    }
    if (this.view.xMode === "step") { stepLo = Math.ceil(xMin); stepHi = Math.floor(xMax); }
    if (!(stepLo <= stepHi)) return;
    this.u.setScale("x", {min: xMin, max: xMax});
    this.onZoom(this, stepLo, stepHi, xMin, xMax);
  }

  width() {
    return Math.max(280, (this.root.clientWidth || 520) - 16);
  }

  /** Draw (or redraw) if anything changed; ``force`` rebuilds the uPlot instance. */
  render(force = false) {
    if (!this.dirty && !force) return false;
    this.dirty = false;
    const {data, markers, total, across} = this.build();
    this.markers = markers;
    const shape = [this.view.xMode, this.view.band, this.view.mean, this.group.lines.length,
                   across].join("|");
    this.root.dataset.lines = String(this.group.lines.length);
    this.root.dataset.band = across ? (this.view.band ? "on" : "off") : "none";
    this.root.dataset.points = String(total);
    this.root.dataset.zoomed = this.zoom ? "1" : "0";
    this.root.dataset.nonfinite = String(markers.length);
    this.info.textContent = (this.group.grouped ? `${this.group.lines.length} ranks · ` : "") +
      `${total.toLocaleString("en-US")} points` + (this.zoom ? " · zoomed (double-click resets)" : "");
    this.notes.replaceChildren();
    if (markers.length) {
      const shown = markers.slice(0, 4).map((m) => `${m.kind} at step ${m.step}` +
        (this.group.grouped ? ` (${m.name})` : ""));
      this.notes.append(el("span", {cls: "nonfinite",
        text: `${markers.length} non-finite: ${shown.join(", ")}${markers.length > 4 ? ", …" : ""}`}));
    }
    if (this.u && this.shape === shape && !force) {
      this.u.setData(data);
      if (this.zoom) this.u.setScale("x", {min: this.zoom.xMin, max: this.zoom.xMax});
      return true;
    }
    if (this.u) this.u.destroy();
    this.shape = shape;
    this.u = new uPlot(this.options(this.width(), across), data, this.plot);
    if (this.zoom) this.u.setScale("x", {min: this.zoom.xMin, max: this.zoom.xMax});
    this.u.over.addEventListener("dblclick", () => this.resetZoom());
    this.root.dataset.drawn = "1";
    return true;
  }

  resize() {
    if (this.u) this.u.setSize({width: this.width(), height: 240});
  }

  destroy() {
    if (this.u) this.u.destroy();
    this.u = null;
  }
}
