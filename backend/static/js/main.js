// Entry point: asks for the API key once (kept in localStorage), then shows the page the
// location hash names: `#run=<id>` a run, else the runs list (`#project=<name>` filters it).
import {apiKey, setKey, forgetKey, AuthError} from "./api.js";
import {$, el, showError} from "./dom.js";
import {RunPage} from "./run.js";
import {RunsPage} from "./runs.js";

let page = null;

function askKey(reason) {
  if (page) { page.stop(); page = null; }
  const input = el("input", {attrs: {id: "key", type: "password", size: 30,
                                     placeholder: "API key (PLUTO_API_KEY)", autocomplete: "off"}});
  const form = el("form", {cls: "key-form"},
    el("p", {text: "Enter the backend's API key. It is kept in this browser (localStorage) " +
                   "and sent with every request."}),
    reason ? el("p", {cls: "bad", text: reason}) : null,
    input, el("button", {text: "use key", attrs: {type: "submit", id: "key-save"}}));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!input.value.trim()) return;
    setKey(input.value.trim());
    route();
  });
  $("view").replaceChildren(form);
  $("crumb").textContent = "";
  input.focus();
}

async function route() {
  if (page) { page.stop(); page = null; }
  showError("");
  if (!apiKey()) { askKey(""); return; }
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const run = params.get("run");
  page = run && /^\d+$/.test(run) ? new RunPage(Number(run)) : new RunsPage(params);
  $("crumb").textContent = run ? `/ run ${run}` : "/ runs";
  $("live").textContent = "";
  $("view").replaceChildren(page.root);
  window.plutoPage = page;  // for debugging from the console
  try {
    await page.start();
  } catch (e) {
    if (e instanceof AuthError) { forgetKey(); askKey(e.message); return; }
    showError(e.message || String(e));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("pluto-auth", (ev) => { forgetKey(); askKey(ev.detail); });
$("forget").addEventListener("click", () => { forgetKey(); askKey(""); });
route();
