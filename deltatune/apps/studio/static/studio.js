// deltatune studio: one page, four views (New run, Runs, Compare, Playground) over the JSON API in app.py.
// No framework: the form is built from /api/schema (the library's registry and config classes), charts are Chart.js.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// replaceChildren with nested lists flattened and empty slots left out
function put(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

const studio = { schema: null, charts: {}, timer: null, run: null, logCount: 0, compareRows: [], sort: null };
window.studio = studio; // the browser test reads the charts from here

// --- talking to the server ------------------------------------------------------------------------
async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: {} };
  if (init.method !== "GET") init.headers["X-Studio"] = "1"; // what a cross-site form cannot send
  if (options.json !== undefined) {
    init.body = JSON.stringify(options.json);
    init.headers["Content-Type"] = "application/json";
  } else if (options.body !== undefined) {
    init.body = options.body;
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) banner(data.detail);
  if (!response.ok) {
    let detail = data.detail || response.statusText;
    if (Array.isArray(detail)) detail = detail.map((d) => `${d.loc.slice(-1)[0]}: ${d.msg}`).join("; ");
    const err = new Error(detail);
    err.status = response.status;
    err.errors = data.errors || null;
    throw err;
  }
  return data;
}

function banner(text) {
  const node = $("#banner");
  node.textContent = text;
  node.hidden = !text;
}

// --- formatting -------------------------------------------------------------------------------------
const fmtInt = (n) => (n === null || n === undefined ? "" : Math.round(n).toLocaleString("en-US"));
function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}
function fmtNum(v) {
  if (typeof v !== "number") return v === null || v === undefined ? "" : String(v);
  return Number.isInteger(v) ? fmtInt(v) : Math.abs(v) < 1e-3 ? v.toExponential(2) : v.toFixed(4);
}
const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const basename = (p) => String(p || "").split("/").filter(Boolean).pop() || "";

// --- routing ------------------------------------------------------------------------------------------
function stopTimer() {
  if (studio.timer) clearInterval(studio.timer);
  studio.timer = null;
}

async function route() {
  const [page, arg] = location.hash.replace(/^#\/?/, "").split("/");
  const view = page === "runs" && arg ? "run" : page || "new";
  stopTimer();
  for (const section of $$(".page")) section.hidden = section.id !== `page-${view}`;
  for (const link of $$("nav a")) link.classList.toggle("active", link.dataset.page === (view === "run" ? "runs" : view));
  try {
    if (view === "new") await showNew();
    else if (view === "runs") await showRuns();
    else if (view === "run") await showRun(decodeURIComponent(arg));
    else if (view === "compare") await showCompare();
    else if (view === "play") await showPlay();
  } catch (err) {
    banner(err.message);
  }
}

// ======================================================================================================
// New run
// ======================================================================================================
let formReady = false;
let previewSeq = 0;
let previewTimer = null;

const method = () => studio.schema.methods.find((m) => m.name === $("#f-method").value);
const task = () => studio.schema.tasks.find((t) => t.name === $("#f-task").value);

function inputValue(input) {
  return input.type === "checkbox" ? (input.checked ? "true" : "false") : input.value.trim();
}

function markChanged(input) {
  input.classList.toggle("changed", inputValue(input) !== input.dataset.default);
}

function buildField(spec, key) {
  const id = `f-${key.replace(".", "-")}`;
  const field = el("div", { class: "field", "data-key": key });
  let input;
  if (spec.widget === "bool") {
    input = el("input", { type: "checkbox", id });
    input.checked = spec.default === "true";
    field.append(el("label", { for: id }, input, spec.key));
  } else {
    if (spec.widget === "choice") {
      input = el("select", { id }, spec.default === "" ? el("option", { value: "" }, "(none)") : null,
        spec.choices.map((c) => el("option", { value: c }, c)));
    } else {
      input = el("input", { id, placeholder: spec.default === "" ? "(none)" : null, autocomplete: "off" });
    }
    input.value = spec.default;
    field.append(el("label", { for: id }, spec.key), input);
  }
  input.dataset.default = spec.default;
  input.dataset.key = key;
  if (spec.fixed) {
    input.disabled = true;
    field.append(el("div", { class: "hint" }, `set by the method name ${$("#f-method").value}`));
  } else {
    field.append(el("div", { class: "hint", title: spec.type }, spec.help || spec.type));
  }
  field.append(el("div", { class: "error" }));
  const changed = () => {
    input.dataset.touched = "1";
    markChanged(input);
    clearError(key);
  };
  input.addEventListener("input", changed);
  input.addEventListener("change", changed);
  return field;
}

function renderMethodOptions() {
  const m = method();
  const box = $("#method-options");
  put(box, ...m.options.map((spec) => buildField(spec, `${m.section}.${spec.key}`)));
  const notes = [m.title, m.mergeable ? "can be merged into the base" : "cannot be merged",
    m.mixed_batches ? "shares batches in the playground and the server" : null];
  $("#method-hint").textContent = notes.filter(Boolean).join(" · ");
  const lr = $("#f-lr");
  if (lr && !lr.dataset.touched) { // a learning rate that suits the method, unless the user typed one
    lr.value = String(m.typical_lr);
    markChanged(lr);
  }
}

function fillFileSelect(select, files, optional) {
  const current = select.value;
  put(select, 
    el("option", { value: "" }, optional ? "(none)" : "(choose a file)"),
    files.map((f) => el("option", { value: f.path, title: fmtBytes(f.bytes) }, f.path)),
  );
  if (current && !files.some((f) => f.path === current)) select.append(el("option", { value: current }, current));
  select.value = current;
}

async function refreshFiles() {
  const files = await api("/api/files");
  fillFileSelect($("#f-train_file"), files.data, false);
  fillFileSelect($("#f-eval_file"), files.data, true);
  fillFileSelect($("#f-test_file"), files.data, true);
  const models = [...studio.schema.packaged_models, ...files.models];
  put($("#model-list"), ...models.map((m) => el("option", { value: m })));
}

function fillColumns(columns) {
  const t = task();
  const defaults = { text_column: t.text_column, text_pair_column: null, label_column: t.label_column };
  for (const [key, fallback] of Object.entries(defaults)) {
    const select = $(`#f-${key}`);
    const current = select.value;
    const first = fallback ? `(default: ${fallback})` : "(none)";
    put(select, el("option", { value: "" }, first), columns.map((c) => el("option", { value: c }, c)));
    if (current && !columns.includes(current)) select.append(el("option", { value: current }, current));
    select.value = current || (fallback && columns.includes(fallback) ? fallback : "");
  }
}

async function showNew() {
  if (formReady) return refreshFiles();
  const schema = (studio.schema = await api("/api/schema"));
  $("#workspace").textContent = `workspace: ${schema.workspace}`;
  put($("#f-task"), schema.tasks.map((t) => el("option", { value: t.name }, t.name)));
  const groups = {};
  for (const m of schema.methods) (groups[m.title] ||= []).push(m);
  put($("#f-method"), ...Object.entries(groups).map(([title, ms]) =>
    el("optgroup", { label: title }, ms.map((m) => el("option", { value: m.name }, m.name)))));
  $("#f-method").value = "lora";
  for (const spec of schema.settings) {
    $(spec.group === "main" ? "#main-settings" : "#more-settings").append(buildField(spec, spec.key));
  }
  put($("#cleaning"), el("span", { class: "hint" }, "Cleaning:"), ...schema.cleaning.map((c) => {
    const box = el("input", { type: "checkbox", "data-clean": c.key, "data-default": c.default });
    box.checked = c.default === "true";
    box.addEventListener("change", schedulePreview);
    return el("label", {}, box, c.key.replaceAll("_", " "));
  }));
  renderMethodOptions();
  await refreshFiles();
  const onTask = () => {
    $("#task-hint").textContent = task().title;
    const chat = task().name === "causal-lm";
    $("#columns").hidden = chat;
    if (chat) $("#upload-hint").textContent = "Chat data: a messages column, or instruction / input / output columns.";
    schedulePreview();
  };
  $("#f-task").addEventListener("change", onTask);
  onTask();
  $("#f-method").addEventListener("change", () => { clearError("method"); renderMethodOptions(); });
  for (const select of $$(".data-file, .column")) select.addEventListener("change", () => {
    clearError(select.id.slice(2));
    schedulePreview();
  });
  $("#f-model").addEventListener("input", () => clearError("model"));
  $("#f-name").addEventListener("input", () => clearError("name"));
  $("#upload-button").addEventListener("click", () => $("#upload-input").click());
  $("#upload-input").addEventListener("change", upload);
  $("#check").addEventListener("click", checkForm);
  $("#start").addEventListener("click", startRun);
  $("#save-recipe").addEventListener("click", saveRecipe);
  $("#load-recipe").addEventListener("click", () => $("#recipe-input").click());
  $("#recipe-input").addEventListener("change", loadRecipe);
  formReady = true;
}

function collectForm() {
  const form = {
    name: $("#f-name").value.trim(),
    model: $("#f-model").value.trim(),
    task: $("#f-task").value,
    method: $("#f-method").value,
    clean: {},
  };
  for (const key of ["train_file", "eval_file", "test_file"]) if ($(`#f-${key}`).value) form[key] = $(`#f-${key}`).value;
  if (form.task !== "causal-lm") {
    for (const key of ["text_column", "text_pair_column", "label_column"]) {
      if ($(`#f-${key}`).value) form[key] = $(`#f-${key}`).value;
    }
  }
  for (const box of $$("[data-clean]")) {
    if (String(box.checked) !== box.dataset.default) form.clean[box.dataset.clean] = box.checked;
  }
  const section = method().section;
  const options = {};
  for (const input of $$("#method-options input, #method-options select")) {
    if (input.disabled || inputValue(input) === input.dataset.default) continue;
    options[input.dataset.key.split(".")[1]] = input.type === "checkbox" ? input.checked : input.value.trim();
  }
  if (Object.keys(options).length) form[section] = options;
  for (const spec of studio.schema.settings) {
    const input = $(`#f-${spec.key}`);
    if (spec.always || inputValue(input) !== input.dataset.default) {
      form[spec.key] = input.type === "checkbox" ? input.checked : input.value.trim();
    }
  }
  return form;
}

function clearError(key) {
  const field = $(`.field[data-key="${CSS.escape(key)}"]`);
  if (field) { field.classList.remove("bad"); $(".error", field).textContent = ""; }
}

function showErrors(errors) {
  for (const field of $$("#page-new .field.bad")) field.classList.remove("bad");
  for (const node of $$("#page-new .error")) node.textContent = "";
  let first = null;
  for (const [key, message] of Object.entries(errors || {})) {
    const field = $(`#page-new .field[data-key="${CSS.escape(key)}"]`);
    const target = field ? $(".error", field) : $(`[data-error="${CSS.escape(key)}"]`) || $('[data-error="_form"]');
    if (field) {
      field.classList.add("bad");
      const details = field.closest("details");
      if (details) details.open = true;
    }
    target.textContent = target.textContent ? `${target.textContent} ${message}` : message;
    first ||= field || target;
  }
  if (first) first.scrollIntoView({ block: "center", behavior: "instant" });
}

function status(text, ok = false) {
  const node = $("#form-status");
  put(node, ...(Array.isArray(text) ? text : [text]));
  node.className = ok ? "status ok" : "status";
}

function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(preview, 250);
}

async function preview() {
  const seq = ++previewSeq;
  const box = $("#preview");
  const form = collectForm();
  if (!form.train_file) {
    put(box, el("p", { class: "hint" }, "Choose or upload a training file to see its first rows and the data report."));
    return;
  }
  put(box, el("p", { class: "hint" }, "Reading the data…"));
  let data;
  try {
    data = await api("/api/preview", { method: "POST", json: form });
  } catch (err) {
    if (seq !== previewSeq) return;
    put(box, );
    return showErrors(err.errors || { train_file: err.message });
  }
  if (seq !== previewSeq) return; // a newer preview is on its way
  fillColumns(data.columns);
  for (const key of ["train_file", "eval_file", "test_file", "text_column", "text_pair_column", "label_column", "_data"]) {
    clearError(key);
    const node = $(`[data-error="${key}"]`);
    if (node) node.textContent = "";
  }
  if (data.errors) showErrors(data.errors);
  const table = el("table", { class: "table" },
    el("tr", {}, data.columns.map((c) => el("th", {}, c))),
    data.rows.map((row) => el("tr", {}, data.columns.map((c) => el("td", { title: row[c] }, row[c])))));
  const parts = [el("h3", {}, `First rows of ${form.train_file} (${fmtInt(data.total_rows)} rows)`),
    el("div", { class: "preview-table" }, table)];
  if (data.report) parts.push(renderReport(data.report));
  put(box, ...parts);
}

const DROPPED = { empty: "empty", duplicate: "duplicates", conflicting_label: "with conflicting labels",
  overlap_with_eval_test: "also in the validation/test files" };

function renderReport(report) {
  const title = el("h3", {}, "Data report (what the run will train and score on)");
  if (report.summary) return el("div", { class: "report", id: "data-report" }, title, el("p", {}, report.summary)); // a task's own
  const said = DROPPED;
  const read = Object.entries(report.rows_read).map(([s, n]) => `${s} ${fmtInt(n)} (${report.files[s]})`).join(", ");
  const dropped = Object.entries(report.dropped).filter(([, n]) => n).map(([r, n]) => `${fmtInt(n)} ${said[r] || r}`);
  const split = report.split
    ? `split ${report.split.ratios.map((r) => r * 100).join("/")} from the training file${report.split.stratified_by_label ? ", stratified by label" : ""}`
    : "as given";
  const rows = Object.entries(report.rows).map(([s, n]) => `${s} ${fmtInt(n)}`).join(" · ");
  const items = [
    el("li", {}, `Rows read: ${read}`),
    el("li", {}, `Dropped: ${dropped.length ? dropped.join(", ") : "none"}`),
    el("li", {}, `Splits: ${rows} (${split}, seed ${report.seed})`),
  ];
  const parts = [title, el("ul", {}, items)];
  const splits = Object.keys(report.labels || {});
  if (splits.length) {
    const labels = [...new Set(splits.flatMap((s) => Object.keys(report.labels[s])))];
    parts.push(el("table", { class: "table", id: "label-counts" },
      el("tr", {}, el("th", {}, "label"), splits.map((s) => el("th", { class: "n" }, s))),
      labels.map((l) => el("tr", {}, el("td", {}, l), splits.map((s) => el("td", { class: "n" }, fmtInt(report.labels[s][l] || 0)))))));
  }
  return el("div", { class: "report", id: "data-report" }, parts);
}

async function upload(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  if (file.size > studio.schema.max_upload_bytes) {
    return showErrors({ train_file: `${file.name} is ${fmtBytes(file.size)}; the upload limit is ${fmtBytes(studio.schema.max_upload_bytes)}.` });
  }
  try {
    const { path } = await api(`/api/uploads?name=${encodeURIComponent(file.name)}`, { method: "POST", body: file });
    await refreshFiles();
    const train = $("#f-train_file");
    train.value = train.value || path;
    if (train.value !== path && !$("#f-eval_file").value) $("#f-eval_file").value = path;
    status(`Uploaded ${path}.`, true);
    schedulePreview();
  } catch (err) {
    showErrors({ train_file: err.message });
  }
}

async function checked() {
  try {
    const result = await api("/api/check", { method: "POST", json: collectForm() });
    showErrors({});
    return result;
  } catch (err) {
    showErrors(err.errors || { _form: err.message });
    status("Fix the fields marked in red.");
    return null;
  }
}

async function checkForm() {
  const result = await checked();
  if (result) {
    status([el("span", {}, "Everything checks out; this is the recipe the run will use:"), el("pre", {}, result.yaml)], true);
  }
}

async function saveRecipe() {
  const result = await checked();
  if (!result) return;
  const link = el("a", { href: URL.createObjectURL(new Blob([result.yaml], { type: "text/yaml" })),
    download: `${$("#f-name").value.trim() || "recipe"}.yaml` });
  document.body.append(link);
  link.click();
  link.remove();
  status("Recipe saved: run it with `deltatune train <file>` or load it here again.", true);
}

async function loadRecipe(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  try {
    const result = await api("/api/recipe/parse", { method: "POST", json: { text: await file.text() } });
    applyForm(result.form);
    showErrors(result.errors);
    status(result.notes.length ? result.notes.join(" ") : `Loaded ${file.name}.`, !result.notes.length);
  } catch (err) {
    showErrors(err.errors || { _form: err.message });
  }
}

function setSelect(select, value) {
  if (value && ![...select.options].some((o) => o.value === value)) select.append(el("option", { value }, value));
  select.value = value || "";
}

function applyForm(form) {
  if (form.task) { $("#f-task").value = form.task; $("#f-task").dispatchEvent(new Event("change")); }
  if (form.method) { $("#f-method").value = form.method; renderMethodOptions(); }
  $("#f-model").value = form.model || "";
  $("#f-name").value = form.name || "";
  for (const key of ["train_file", "eval_file", "test_file", "text_column", "text_pair_column", "label_column"]) {
    setSelect($(`#f-${key}`), form[key]);
  }
  for (const box of $$("[data-clean]")) {
    const value = (form.clean || {})[box.dataset.clean];
    box.checked = value === undefined ? box.dataset.default === "true" : Boolean(value);
  }
  const section = method().section;
  for (const input of $$("#method-options input, #method-options select")) {
    const value = (form[section] || {})[input.dataset.key.split(".")[1]];
    if (value === undefined || input.disabled) continue;
    if (input.type === "checkbox") input.checked = value === "true"; else input.value = value;
    markChanged(input);
  }
  for (const spec of studio.schema.settings) {
    const input = $(`#f-${spec.key}`);
    if (form[spec.key] === undefined) continue;
    if (input.type === "checkbox") input.checked = form[spec.key] === "true"; else input.value = form[spec.key];
    input.dataset.touched = "1";
    markChanged(input);
  }
  schedulePreview();
}

async function startRun() {
  const form = collectForm();
  if (!form.name) return showErrors({ name: "Give the run a name: it becomes its folder in the workspace." });
  $("#start").disabled = true;
  try {
    await api("/api/runs", { method: "POST", json: form });
    showErrors({});
    status("");
    location.hash = `#/runs/${encodeURIComponent(form.name)}`;
  } catch (err) {
    showErrors(err.errors || { [err.status === 409 || err.message.includes("run name") ? "name" : "_form"]: err.message });
  } finally {
    $("#start").disabled = false;
  }
}

// ======================================================================================================
// Runs
// ======================================================================================================
const badge = (state) => el("span", { class: `badge ${state.replace(" ", "-")}` }, state);

function mainScore(metrics) {
  const keys = Object.keys(metrics || {});
  const key = ["eval_accuracy", "eval_exact_match", "eval_f1", "eval_loss"].find((k) => keys.includes(k)) || keys[0];
  return key ? `${key} ${fmtNum(metrics[key])}` : "";
}

function progressText(run) {
  const p = run.progress;
  if (!p.total_steps) return p.step ? `step ${p.step}` : "";
  return `${p.step} / ${p.total_steps}`;
}

async function showRuns() {
  const render = async () => {
    const { runs } = await api("/api/runs");
    $("#runs-empty").hidden = runs.length > 0;
    put($("#runs-table"), 
      el("tr", {}, ["Run", "State", "Method", "Model", "Task", "Steps", "Score", "Created"].map((h) => el("th", {}, h))),
      runs.map((r) => el("tr", {},
        el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(r.name)}` }, r.name)),
        el("td", {}, badge(r.state)), el("td", {}, r.method), el("td", {}, basename(r.model)), el("td", {}, r.task),
        el("td", {}, progressText(r)), el("td", {}, mainScore(r.metrics)), el("td", {}, fmtTime(r.created_at)))));
    if (!runs.some((r) => r.state === "running")) stopTimer();
  };
  await render();
  studio.timer = setInterval(() => render().catch((err) => banner(err.message)), 2000);
}

function lineChart(canvas, yTitle, logY = false) {
  return new Chart(canvas, {
    type: "line",
    data: { datasets: [] },
    options: {
      animation: false,
      parsing: false,
      normalized: true,
      maintainAspectRatio: false,
      elements: { point: { radius: 0 }, line: { borderWidth: 2 } },
      scales: {
        x: { type: "linear", title: { display: true, text: "step" } },
        y: { type: logY ? "logarithmic" : "linear", title: { display: true, text: yTitle } },
      },
      plugins: { legend: { display: true, labels: { boxWidth: 12 } } },
    },
  });
}

const PALETTE = ["#3b5bdb", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0c8599", "#e67700", "#5c940d", "#862e9c",
  "#1864ab", "#d9480f", "#087f5b", "#a61e4d", "#5f3dc4", "#0b7285", "#f08c00", "#364fc7", "#c92a2a", "#495057"];

function series(chart, label, index, dots = false) {
  let dataset = chart.data.datasets.find((d) => d.label === label);
  if (!dataset) {
    const color = PALETTE[index % PALETTE.length];
    dataset = { label, data: [], borderColor: color, backgroundColor: color, pointRadius: dots ? 3 : 0 };
    chart.data.datasets.push(dataset);
  }
  return dataset;
}

function addRecords(records) {
  const { loss, lr, evals } = studio.charts;
  for (const r of records) {
    if ("loss" in r) {
      series(loss, "training loss", 0).data.push({ x: r.step, y: r.loss });
      series(lr, "learning rate", 0).data.push({ x: r.step, y: r.lr });
    }
    for (const [key, value] of Object.entries(r)) {
      if (!key.startsWith("eval_") || typeof value !== "number") continue;
      if (key === "eval_loss") series(loss, "validation loss", 1, true).data.push({ x: r.step, y: value });
      else series(evals, key.replace("eval_", ""), evals.data.datasets.length, true).data.push({ x: r.step, y: value });
    }
  }
  for (const chart of [loss, lr, evals]) chart.update("none");
}

async function showRun(name) {
  stopTimer();
  for (const chart of Object.values(studio.charts)) chart.destroy();
  studio.charts = {
    loss: lineChart($("#chart-loss"), "loss"),
    lr: lineChart($("#chart-lr"), "learning rate"),
    evals: lineChart($("#chart-eval"), "score"),
  };
  studio.run = name;
  studio.logCount = 0;
  $("#run-title").textContent = name;
  $("#run-stop").onclick = () => runAction(name, "stop");
  $("#run-resume").onclick = () => runAction(name, "resume");
  await refreshRun(name);
  studio.timer = setInterval(() => refreshRun(name).catch((err) => banner(err.message)), 500);
}

async function runAction(name, action) {
  $("#run-stop").disabled = $("#run-resume").disabled = true;
  try {
    await api(`/api/runs/${encodeURIComponent(name)}/${action}`, { method: "POST" });
  } catch (err) {
    banner(err.message);
  }
  stopTimer();
  await showRun(name);
}

let refreshing = false;

async function refreshRun(name) {
  if (refreshing) return; // the previous refresh is still on its way: never add the same records twice
  refreshing = true;
  try {
    const path = `/api/runs/${encodeURIComponent(name)}`;
    const [run, log] = await Promise.all([api(path), api(`${path}/log?since=${studio.logCount}`)]);
    if (studio.run !== name) return;
    if (log.count < studio.logCount) { // a resume rewrote the log shorter: draw it again from the start
      for (const chart of [studio.charts.loss, studio.charts.lr, studio.charts.evals]) chart.data.datasets = [];
      studio.logCount = 0;
      return;
    }
    studio.logCount = log.count;
    addRecords(log.records);
    renderRun(run);
    if (run.state !== "running") stopTimer();
  } finally {
    refreshing = false;
  }
}

function renderRun(run) {
  const state = $("#run-state");
  state.textContent = run.state;
  state.className = `badge ${run.state.replace(" ", "-")}`;
  $("#run-what").textContent = `${run.method} on ${basename(run.model) || run.model} · task ${run.task}` +
    (run.started_at ? ` · started ${fmtTime(run.started_at)}` : "") + (run.starts > 1 ? ` · ${run.starts} starts` : "");
  $("#run-stop").disabled = run.state !== "running";
  $("#run-resume").disabled = !["stopped", "failed"].includes(run.state);
  $("#run-resume").title = run.has_checkpoint ? "Continue from the last checkpoint" : "No checkpoint yet: starts over";
  const p = run.progress;
  const done = run.state === "finished";
  const fraction = done ? 1 : p.total_steps ? Math.min(1, p.step / p.total_steps) : 0;
  $("#run-bar").style.width = `${(100 * fraction).toFixed(1)}%`;
  let text;
  if (run.state === "running" && !p.step) text = "Starting: reading the data and loading the model…";
  else if (run.state === "running") {
    text = `Step ${p.step} of ${p.total_steps ?? "?"} (${Math.round(100 * fraction)}%) · ${fmtDuration(p.elapsed_s)} of training` +
      (p.eta_s !== null ? ` · about ${fmtDuration(p.eta_s)} left` : "");
  } else if (done) text = `Finished: ${p.step} steps in ${fmtDuration(run.wall_time_s ?? p.elapsed_s)}.`;
  else if (run.state === "stopped") {
    text = `Stopped at step ${p.step} of ${p.total_steps ?? "?"}. ` +
      (run.has_checkpoint ? "Resume continues from the last checkpoint." : "No checkpoint yet: Resume starts over.");
  } else if (run.state === "failed") text = `Failed at step ${p.step}. Fix the cause and press Resume, or start a new run.`;
  else text = run.state;
  $("#run-progress").textContent = text;
  const error = $("#run-error");
  error.hidden = !run.error;
  error.textContent = run.error || "";
  const evalKeys = Object.keys(run.metrics || {});
  $("#eval-hint").textContent = studio.charts.evals.data.datasets.length ? "" : "Scores appear at each evaluation (eval_every).";
  const rows = evalKeys.map((k) => [k, fmtNum(run.metrics[k])]);
  if (run.trainable_params) {
    rows.push(["trainable parameters", `${fmtInt(run.trainable_params)} of ${fmtInt(run.total_params)} (${(100 * run.trainable_params / run.total_params).toFixed(3)}%)`]);
  }
  if (run.stored_bytes) rows.push(["adapter on disk", fmtBytes(run.stored_bytes)]);
  if (run.wall_time_s) rows.push(["training time", fmtDuration(run.wall_time_s)]);
  if (run.peak_memory_mb) rows.push(["peak memory", `${fmtInt(run.peak_memory_mb)} MiB`]);
  put($("#run-metrics"), ...rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", { class: "n" }, v))));
  $("#metrics-hint").textContent = rows.length ? "eval_* are scored on the validation split, test_* on the test split."
    : "The table fills in when the run finishes.";
  $("#run-folder").textContent = run.folder;
  put($("#run-files"), ...(run.files || []).map((f) => el("li", {},
    el("a", { href: `/api/runs/${encodeURIComponent(run.name)}/files/${encodeURIComponent(f.name)}`, target: "_blank" }, f.name),
    el("span", { class: "size" }, fmtBytes(f.bytes)))));
  $("#run-data").textContent = run.data_report ? reportText(run.data_report) : "Written when the run has read its data.";
  $("#run-console").textContent = (run.console || []).join("\n");
}

function reportText(report) {
  if (report.summary) return report.summary; // a task that reads its data itself (rec) writes its own lines
  const lines = [`rows read: ${Object.entries(report.rows_read).map(([s, n]) => `${s} ${n}`).join(", ")}`,
    `dropped: ${Object.entries(report.dropped).filter(([, n]) => n).map(([r, n]) => `${n} ${DROPPED[r] || r}`).join(", ") || "none"}`,
    `splits: ${Object.entries(report.rows).map(([s, n]) => `${s} ${n}`).join(", ")}`];
  for (const [split, counts] of Object.entries(report.labels || {})) {
    lines.push(`${split} labels: ${Object.entries(counts).map(([l, n]) => `${l}=${n}`).join(", ")}`);
  }
  return lines.join("\n");
}

// ======================================================================================================
// Compare
// ======================================================================================================
const COLUMNS = [
  ["name", "Run", (r) => r.name],
  ["method", "Method", (r) => r.method],
  ["state", "State", (r) => r.state],
  ["trainable_params", "Trainable params", (r) => fmtInt(r.trainable_params), true],
  ["stored_bytes", "Stored", (r) => fmtBytes(r.stored_bytes), true],
  ["wall_time_s", "Time", (r) => fmtDuration(r.wall_time_s), true],
  ["peak_memory_mb", "Peak memory", (r) => (r.peak_memory_mb ? `${fmtInt(r.peak_memory_mb)} MiB` : ""), true],
];

async function showCompare() {
  const { files } = await api("/api/bench");
  const source = $("#compare-source");
  const current = source.value;
  put(source, el("option", { value: "" }, "runs in this workspace"),
    files.map((f) => el("option", { value: f }, `bench results: ${f}`)));
  source.value = files.includes(current) ? current : "";
  source.onchange = loadCompare;
  $("#compare-metric").onchange = drawCompare;
  await loadCompare();
}

async function loadCompare() {
  const path = $("#compare-source").value;
  const data = path ? await api(`/api/bench/table?path=${encodeURIComponent(path)}`) : await api("/api/runs");
  studio.compareRows = data.runs.filter((r) => r.trainable_params || Object.keys(r.metrics || {}).length);
  const metrics = [...new Set(studio.compareRows.flatMap((r) => Object.keys(r.metrics || {})))].sort();
  const select = $("#compare-metric");
  const previous = select.value;
  put(select, ...metrics.map((m) => el("option", { value: m }, m)));
  select.value = metrics.includes(previous) ? previous
    : metrics.find((m) => /accuracy|exact_match|f1/.test(m) && !m.startsWith("test")) || metrics[0] || "";
  drawCompare();
}

function sortValue(row, key) {
  return key in row ? row[key] : (row.metrics || {})[key];
}

function drawCompare() {
  const rows = [...studio.compareRows];
  const metrics = [...new Set(rows.flatMap((r) => Object.keys(r.metrics || {})))].sort();
  if (studio.sort) {
    const { key, dir } = studio.sort;
    rows.sort((a, b) => {
      const x = sortValue(a, key), y = sortValue(b, key);
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * dir;
    });
  }
  const header = (key, label, numeric) => {
    const arrow = studio.sort && studio.sort.key === key ? (studio.sort.dir > 0 ? " ▲" : " ▼") : "";
    return el("th", { class: `sortable${numeric ? " n" : ""}`, onclick: () => {
      studio.sort = { key, dir: studio.sort && studio.sort.key === key ? -studio.sort.dir : numeric ? -1 : 1 };
      drawCompare();
    } }, label + arrow);
  };
  put($("#compare-table"), 
    el("tr", {}, COLUMNS.map(([key, label, , numeric]) => header(key, label, numeric)), metrics.map((m) => header(m, m, true))),
    rows.map((r) => el("tr", {},
      COLUMNS.map(([key, , show, numeric]) => el("td", { class: numeric ? "n" : null },
        key === "name" && r.state !== "bench" ? el("a", { href: `#/runs/${encodeURIComponent(r.name)}` }, r.name) : show(r))),
      metrics.map((m) => el("td", { class: "n" }, fmtNum((r.metrics || {})[m]))))));
  const metric = $("#compare-metric").value;
  $("#compare-plot-title").textContent = `${metric || "score"} vs trainable parameters`;
  if (studio.charts.compare) studio.charts.compare.destroy();
  const points = rows.filter((r) => r.trainable_params && typeof (r.metrics || {})[metric] === "number");
  studio.charts.compare = new Chart($("#chart-compare"), {
    type: "scatter",
    data: { datasets: points.map((r, i) => ({ label: r.name, data: [{ x: r.trainable_params, y: r.metrics[metric] }],
      backgroundColor: PALETTE[i % PALETTE.length], pointRadius: 6 })) },
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: { x: { type: "logarithmic", title: { display: true, text: "trainable parameters (log scale)" } },
        y: { title: { display: true, text: metric } } },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 10, font: { size: 11 } } } },
    },
  });
}

// ======================================================================================================
// Playground
// ======================================================================================================
const GENERATION = [
  ["max_new_tokens", "32", "tokens to write"],
  ["do_sample", "false", "sample instead of the most likely token"],
  ["temperature", "1.0", "sampling only"],
  ["top_p", "1.0", "sampling only"],
  ["top_k", "50", "sampling only"],
  ["seed", "", "sampling only: the same seed gives the same text"],
];

async function showPlay() {
  const { groups } = await api("/api/playground");
  studio.groups = groups;
  const select = $("#play-group");
  const current = select.value;
  put(select, ...groups.map((g, i) => el("option", { value: String(i) },
    `${basename(g.model) || g.model} · ${g.task}${g.labels ? ` · labels ${g.labels.join(", ")}` : ""}`)));
  if (!groups.length) {
    put($("#play-adapters"), el("p", { class: "empty" },
      "No trained adapters yet. Start a run; when it finishes, its adapter appears here."));
    return;
  }
  select.value = current && Number(current) < groups.length ? current : "0";
  select.onchange = renderGroup;
  $("#play-run").onclick = play;
  renderGroup();
}

function renderGroup() {
  const group = studio.groups[Number($("#play-group").value)];
  const base = el("input", { type: "checkbox", value: "", "data-base": "1" });
  base.checked = true;
  put($("#play-adapters"), 
    el("label", {}, base, "base model (no adapter)",
      group.task === "seq-cls" ? el("span", { class: "tag" }, "its classifier head is untrained") : null),
    group.adapters.map((a) => {
      const box = el("input", { type: "checkbox", value: a.name, "data-adapter": "1" });
      box.checked = true;
      return el("label", {}, box, a.name, el("span", { class: "tag" }, a.method),
        el("span", { class: "tag" }, a.shared_batch ? "shares the batch" : "own model"));
    }));
  $("#play-pair-field").hidden = !group.text_pair;
  const generation = $("#play-generation");
  generation.hidden = group.task !== "causal-lm";
  put(generation, ...GENERATION.map(([key, value, help]) => {
    const input = key === "do_sample" ? el("input", { type: "checkbox", id: `g-${key}` }) : el("input", { id: `g-${key}`, value });
    return el("div", { class: "field" }, el("label", { for: `g-${key}` }, key === "do_sample" ? input : null, key),
      key === "do_sample" ? null : input, el("div", { class: "hint" }, help));
  }));
  put($("#play-export"), el("h3", {}, "Export a merged model"),
    el("p", { class: "hint" }, "Folds the adapter into the base weights and saves a full model folder under exports/ (it loads with transformers alone)."),
    group.adapters.map((a) => {
      const result = el("div", { class: "hint" });
      const button = el("button", { type: "button", disabled: !a.mergeable, onclick: async () => {
        button.disabled = true;
        result.textContent = "Merging…";
        try {
          const out = await api(`/api/runs/${encodeURIComponent(a.name)}/export`, { method: "POST" });
          result.textContent = `Saved to ${out.relative} (${out.tensors_checked} tensors checked after reloading).`;
        } catch (err) {
          result.textContent = err.message;
          button.disabled = false;
        }
      } }, a.mergeable ? `Export ${a.name}` : `${a.name}: ${a.method} cannot be merged`);
      return el("div", {}, el("div", { class: "row" }, button), result);
    }));
  put($("#play-outputs"), );
}

async function play() {
  const group = studio.groups[Number($("#play-group").value)];
  const request = {
    adapters: $$("[data-adapter]").filter((b) => b.checked).map((b) => b.value),
    base: $("[data-base]").checked,
    text: $("#play-text").value,
  };
  if (group.text_pair) request.text_pair = $("#play-pair").value;
  if (group.task === "causal-lm") {
    request.max_new_tokens = Number($("#g-max_new_tokens").value);
    request.do_sample = $("#g-do_sample").checked;
    if (request.do_sample) {
      for (const key of ["temperature", "top_p"]) request[key] = Number($(`#g-${key}`).value);
      request.top_k = Number($("#g-top_k").value);
      if ($("#g-seed").value) request.seed = Number($("#g-seed").value);
    }
  }
  $("#play-error").textContent = "";
  $("#play-run").disabled = true;
  put($("#play-outputs"), el("p", { class: "hint" }, "Running… (the first run loads the models)"));
  try {
    const result = await api("/api/playground", { method: "POST", json: request });
    put($("#play-outputs"), ...result.outputs.map(renderOutput));
  } catch (err) {
    put($("#play-outputs"), );
    $("#play-error").textContent = err.message;
  } finally {
    $("#play-run").disabled = false;
  }
}

function renderOutput(out) {
  const head = [el("h3", {}, out.name), out.method ? el("span", { class: "tag" }, out.method) : null,
    el("span", { class: "tag" }, out.pass)];
  if ("generation" in out) {
    return el("div", { class: "card output" }, head, el("div", { class: "generation" }, out.generation || "(nothing)"));
  }
  const scores = Object.entries(out.scores || {}).sort((a, b) => b[1] - a[1]);
  return el("div", { class: "card output" }, head, el("div", { class: "label" }, out.label),
    scores.map(([label, p]) => el("div", { class: "score-row" }, el("span", {}, label),
      el("div", { class: "score-bar" }, el("div", { style: `width:${(100 * p).toFixed(1)}%` })),
      el("span", {}, p.toFixed(3)))));
}

// --- start ------------------------------------------------------------------------------------------
window.addEventListener("hashchange", route);
api("/api/schema").then((schema) => {
  studio.schema = studio.schema || schema;
  $("#workspace").textContent = `workspace: ${schema.workspace}`;
}).catch(() => {});
route();
