// The operator dashboard: a page per view over the same /api/v1 routes fleetctl uses, with the
// operator's token (kept in this tab's sessionStorage only). Every value from the server goes
// into the page as text, never as markup.
"use strict";

const TOKEN_KEY = "fleet-operator-token";
const state = { who: null };

// ---- small DOM helpers -------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null }, h.label || h)))),
    el("tbody", {}, rows));
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined && n !== false));
}

function flash(text, isError) {
  const box = document.getElementById("flash");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.hidden = true; }, 4000);
}

function ago(ms) {
  if (!ms) return "never";
  const secs = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (secs < 90) return secs + " s ago";
  if (secs < 5400) return Math.round(secs / 60) + " min ago";
  if (secs < 172800) return Math.round(secs / 3600) + " h ago";
  return Math.round(secs / 86400) + " d ago";
}

function utc(ms) {
  return new Date(ms).toISOString().replace("T", " ").slice(0, 16);
}

function fixed(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function labels(map) {
  return Object.entries(map || {}).map(([k, v]) => k + "=" + v).join(", ");
}

// ---- API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, {
    method: (options && options.method) || "GET",
    headers: { "authorization": "Bearer " + token, "content-type": "application/json" },
    body: options && options.body ? JSON.stringify(options.body) : undefined,
  });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!response.ok) {
    const message = (body && body.error) || ("HTTP " + response.status);
    throw new ApiError(response.status, message);
  }
  return body;
}

function can(role) {
  const order = ["viewer", "operator", "admin"];
  return state.who && order.indexOf(state.who.role) >= order.indexOf(role);
}

// ---- login ---------------------------------------------------------------------------------

function loginView(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  const input = el("input", { id: "token", type: "password", autocomplete: "off", placeholder: "operator token" });
  const submit = async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    await start();
  };
  show(el("form", { class: "login", id: "login-form", onsubmit: submit },
    el("h1", {}, "Log in"),
    el("p", { class: "muted" }, "Paste an operator token (fleetctl operators add NAME --role viewer|operator|admin)."),
    message ? el("p", { class: "bad", id: "login-error" }, message) : null,
    input,
    el("button", { id: "login", type: "submit" }, "Log in")));
}

async function start() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return loginView();
  try {
    state.who = await api("/api/v1/whoami");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    return loginView(e.status === 401 ? "That token is not valid (or was revoked)." : e.message);
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent = state.who.name + " (" + state.who.role + ")";
  if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/fleet";
  else route();
}

// ---- routing -------------------------------------------------------------------------------

async function route() {
  if (!state.who) return;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("current", link.getAttribute("href") === "#/" + parts[0]);
  }
  try {
    if (parts[0] === "rollouts" && parts[1]) await rolloutView(parts[1]);
    else if (parts[0] === "rollouts") await rolloutsView();
    else if (parts[0] === "devices" && parts[1]) await deviceView(parts[1]);
    else if (parts[0] === "drift") await driftView();
    else await fleetView();
  } catch (e) {
    if (e.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      return loginView("Your token stopped working; log in again.");
    }
    show(el("p", { class: "bad", id: "load-error" }, "Could not load this page: " + e.message));
  }
}

// ---- fleet overview ------------------------------------------------------------------------

const ONLINE_MS = 5 * 60 * 1000;

function modelCell(d) {
  return d.models.map((m) => m.name + " " + (m.active_version || "–") +
    (m.desired_version && m.desired_version !== m.active_version ? " → " + m.desired_version : "")).join("; ");
}

async function fleetView() {
  const devices = await api("/api/v1/devices");
  const now = Date.now();
  const keys = [...new Set(devices.flatMap((d) => Object.keys(d.labels)))].sort();
  const versions = [...new Set(devices.flatMap((d) => d.models.map((m) => m.name + " " + (m.active_version || "–"))))].sort();
  const filter = { label: "", version: "", health: "" };

  const labelInput = el("input", { id: "filter-label", placeholder: "site=plant-a" });
  const versionSelect = el("select", { id: "filter-version" }, el("option", { value: "" }, "any model version"),
    versions.map((v) => el("option", { value: v }, v)));
  const healthSelect = el("select", { id: "filter-health" }, el("option", { value: "" }, "any"),
    el("option", { value: "online" }, "online"), el("option", { value: "offline" }, "offline"),
    el("option", { value: "revoked" }, "revoked"));
  const body = el("tbody");
  const count = el("span", { id: "device-count" });

  const online = (d) => !d.revoked_ms && d.last_seen_ms && now - d.last_seen_ms < ONLINE_MS;
  const matches = (d) => {
    if (filter.label) {
      // "site" or "site=" asks for the key, "site=plant-a" for the value too.
      const [k, v] = filter.label.split("=");
      if (v === undefined || v === "" ? !(k in d.labels) : d.labels[k] !== v) return false;
    }
    if (filter.version && !d.models.some((m) => m.name + " " + (m.active_version || "–") === filter.version)) return false;
    if (filter.health === "online" && !online(d)) return false;
    if (filter.health === "offline" && (online(d) || d.revoked_ms)) return false;
    if (filter.health === "revoked" && !d.revoked_ms) return false;
    return true;
  };
  const render = () => {
    const shown = devices.filter(matches);
    count.textContent = shown.length + " of " + devices.length + " devices";
    body.replaceChildren(...shown.slice(0, 500).map((d) => el("tr", { "data-device": d.id },
      el("td", {}, el("a", { href: "#/devices/" + encodeURIComponent(d.id) }, d.id)),
      el("td", {}, d.name),
      el("td", {}, labels(d.labels)),
      el("td", {}, modelCell(d)),
      el("td", {}, d.revoked_ms ? el("span", { class: "bad" }, "revoked") :
        online(d) ? el("span", { class: "ok" }, "online") : el("span", { class: "warn" }, "offline")),
      el("td", {}, ago(d.last_seen_ms)),
      el("td", { class: "num" }, d.health ? fixed(d.health.cpu_percent, 0) + "%" : "–"),
      el("td", { class: "num" }, d.health ? fixed(100 * d.health.memory_used_bytes / d.health.memory_total_bytes, 0) + "%" : "–"))));
  };
  labelInput.addEventListener("input", () => { filter.label = labelInput.value.trim(); render(); });
  versionSelect.addEventListener("change", () => { filter.version = versionSelect.value; render(); });
  healthSelect.addEventListener("change", () => { filter.health = healthSelect.value; render(); });

  const tally = (key) => {
    const counts = {};
    for (const d of devices) {
      const value = key(d);
      counts[value] = (counts[value] || 0) + 1;
    }
    return Object.entries(counts).sort();
  };
  const cohortKey = keys.includes("site") ? "site" : keys[0];
  render();
  show(
    el("h1", {}, "Fleet"),
    el("div", { class: "cards" },
      el("div", { class: "card", id: "card-devices" }, el("b", {}, devices.length), "devices"),
      el("div", { class: "card", id: "card-online" }, el("b", {}, devices.filter(online).length), "online (seen in 5 min)"),
      cohortKey ? el("div", { class: "card" }, el("span", { class: "muted" }, "by " + cohortKey),
        tally((d) => d.labels[cohortKey] || "(none)").map(([k, n]) => el("div", {}, k + ": " + n))) : null,
      el("div", { class: "card" }, el("span", { class: "muted" }, "by model version"),
        tally((d) => modelCell(d) || "(no model)").map(([k, n]) => el("div", {}, k + ": " + n)))),
    el("div", { class: "filters" },
      el("label", {}, "label", labelInput), el("label", {}, "model version", versionSelect),
      el("label", {}, "health", healthSelect), count),
    el("table", { id: "devices" },
      el("thead", {}, el("tr", {}, ["device", "name", "labels", "models", "health", "last seen", "cpu", "memory"]
        .map((h) => el("th", {}, h)))), body));
}

// ---- rollouts ------------------------------------------------------------------------------

function progressBar(active, failed, target) {
  const bar = el("div", { class: "bar", title: active + " active, " + failed + " failed of " + target });
  const width = (n) => (target ? Math.min(100, (100 * n) / target) : 0) + "%";
  const ok = el("span");
  ok.style.width = width(active);
  const bad = el("span", { class: "failed" });
  bad.style.left = width(active);
  bad.style.width = width(failed);
  bar.append(ok, bad);
  return bar;
}

function phaseClass(phase) {
  return { running: "ok", paused: "warn", completed: "ok", halted: "bad", rolled_back: "bad", aborted: "bad" }[phase] || "";
}

async function rolloutsView() {
  const rollouts = await api("/api/v1/rollouts");
  show(el("h1", {}, "Rollouts"),
    rollouts.length === 0 ? el("p", { class: "muted" }, "No rollouts yet: fleetctl rollout start --plan PLAN.toml") :
      table(["rollout", "model", "version", "phase", "wave", "progress", "active", "failed", "holdout"],
        rollouts.map((r) => el("tr", { "data-rollout": r.id },
          el("td", {}, el("a", { href: "#/rollouts/" + encodeURIComponent(r.id) }, r.id)),
          el("td", {}, r.plan.model), el("td", {}, r.plan.version),
          el("td", { class: phaseClass(r.phase) }, r.phase),
          el("td", {}, (r.wave + 1) + " / " + r.plan.waves.length),
          el("td", {}, progressBar(r.summary.active, r.summary.failed, r.summary.eligible)),
          el("td", { class: "num" }, r.summary.active), el("td", { class: "num" }, r.summary.failed),
          el("td", { class: "num" }, r.summary.holdout))), { id: "rollouts" }));
}

const GATE_NAMES = {
  confidence: "mean confidence (ratio to control)",
  prediction_psi: "prediction shift (PSI vs control)",
  error_rate: "error rate (increase over control)",
  latency_p95: "latency p95 (ratio to control)",
  input_drift: "input drift (increase over control)",
  drift_share: "features drifted by their tests (increase over control)",
};

function gateValue(gate, value) {
  if (value === null || value === undefined) return "–";
  if (gate === "error_rate") return (100 * value).toFixed(2) + "%";
  if (gate === "latency_p95") return value.toFixed(0) + " µs";
  if (gate === "drift_share") return (100 * value).toFixed(0) + "%";
  return value.toFixed(3);
}

function gatesTable(r) {
  if (!r.live) {
    if (r.evidence && r.evidence.breaches.length) return el("p", { class: "bad", id: "breaches" }, "Stopped on: " + r.reason);
    return el("p", { class: "muted" }, "The gates are read while a rollout runs.");
  }
  const live = r.live;
  const rows = live.readings.map((g) => el("tr", { "data-gate": g.gate },
    el("td", {}, GATE_NAMES[g.gate] || g.gate),
    el("td", { class: "num" }, gateValue(g.gate, g.candidate)),
    el("td", { class: "num" }, gateValue(g.gate, g.control)),
    el("td", { class: "num" }, fixed(g.value, 3)),
    el("td", { class: "num" }, (g.at_least ? "≥ " : "≤ ") + fixed(g.limit, 3)),
    el("td", { class: g.breach ? "bad" : g.value === null ? "muted" : "ok" },
      g.breach ? (live.judged ? "BREACH" : "over (not judged yet)") : g.value === null ? "no data" : "pass")));
  return el("div", {},
    el("p", { class: "muted" }, "candidate: " + live.candidate.devices + " devices, " + live.candidate.samples +
      " samples; control (holdout, or the same devices' previous version): " + live.control.devices + " devices, " +
      live.control.samples + " samples; " + (live.judged ? "judged" : "needs " + r.plan.gates.min_samples + " samples on each side")),
    table(["gate", "candidate", "control", { label: "value", num: true }, { label: "limit", num: true }, "status"], rows,
      { id: "gates" }));
}

function wavesTable(r) {
  const eligible = r.summary.eligible;
  const members = Object.values(r.members);
  return table(["wave", "target", "share", "state", "progress"], r.plan.waves.map((w, i) => {
    const target = w.percent !== null && w.percent !== undefined ?
      Math.min(eligible, Math.max(eligible ? 1 : 0, Math.ceil((w.percent / 100) * eligible))) : Math.min(eligible, w.count);
    const inWave = members.filter((m) => m.wave === i);
    const active = inWave.filter((m) => m.status.state === "active").length;
    const failed = inWave.filter((m) => m.status.state === "failed" || m.status.state === "timed_out").length;
    const stateText = i < r.wave ? "passed" : i === r.wave ? (r.soak_until_ms ? "soaking" : "current") : "waiting";
    return el("tr", { "data-wave": i + 1 },
      el("td", {}, "wave " + (i + 1) + (w.shadow ? " (shadow first)" : "")),
      el("td", { class: "num" }, target),
      el("td", {}, w.percent !== null && w.percent !== undefined ? w.percent + "%" : w.count + " devices"),
      el("td", {}, stateText),
      el("td", {}, progressBar(active, failed, Math.max(1, target - (i > 0 ? 0 : 0)))));
  }), { id: "waves" });
}

const ACTIONS = {
  pause: ["running"],
  resume: ["paused"],
  promote: ["running", "paused"],
  retry: ["running", "paused", "halted"],
  abort: ["running", "paused", "halted"],
};

async function rolloutView(id) {
  const [r, audit] = await Promise.all([
    api("/api/v1/rollouts/" + encodeURIComponent(id)),
    api("/api/v1/audit?rollout=" + encodeURIComponent(id) + "&limit=100"),
  ]);
  const act = async (action) => {
    if (action === "abort" && !confirm("Abort rollout " + id + " and put every touched device back?")) return;
    try {
      const after = await api("/api/v1/rollouts/" + encodeURIComponent(id) + "/" + action, { method: "POST" });
      flash("rollout " + id + " is now " + after.phase);
    } catch (e) {
      flash(e.message, true);
    }
    await route();
  };
  const buttons = Object.entries(ACTIONS).map(([action, phases]) =>
    el("button", {
      id: "action-" + action,
      class: action === "abort" ? "secondary" : null,
      disabled: !can("operator") || !phases.includes(r.phase),
      title: can("operator") ? null : "needs the operator role",
      onclick: () => act(action),
    }, action));
  const s = r.summary;
  show(
    el("h1", {}, "Rollout " + r.id + ": " + r.plan.model + " " + r.plan.version),
    el("p", {},
      el("span", { id: "phase", class: phaseClass(r.phase) }, r.phase), " · wave " + (r.wave + 1) + " of " + r.plan.waves.length +
      " · " + s.active + " active, " + s.assigned + " installing, " +
      (s.staged ? s.staged + " staged for the " + r.plan.activation_window.start + "-" + r.plan.activation_window.end + " window, " : "") + s.failed + " failed, " + s.reverted + " reverted of " +
      s.eligible + " eligible; " + s.holdout + " in the holdout"),
    r.waiting_for ? el("p", { class: "warn", id: "waiting" }, "Waiting for " + r.waiting_for) : null,
    r.reason ? el("p", { class: "bad" }, r.reason) : null,
    el("div", { class: "actions" }, buttons),
    el("h2", {}, "Waves"), wavesTable(r),
    el("h2", {}, "Health gates"), gatesTable(r),
    el("h2", {}, "Audit"),
    table(["when", "who", "action", "detail"], audit.slice().reverse().map((a) => el("tr", {},
      el("td", {}, utc(a.at_ms)), el("td", {}, a.actor), el("td", {}, a.action), el("td", {}, a.detail))), { id: "audit" }));
}

// ---- drift ---------------------------------------------------------------------------------

async function driftView() {
  const models = await api("/api/v1/models");
  const names = [...new Set(models.map((m) => m.name))].sort();
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const model = params.get("model") || names[0];
  const cohort = params.get("cohort") || "";
  const hours = Number(params.get("hours") || 24);
  const modelSelect = el("select", { id: "drift-model" }, names.map((n) => el("option", { value: n, selected: n === model }, n)));
  const cohortInput = el("input", { id: "drift-cohort", value: cohort, placeholder: "site=plant-a" });
  const hoursSelect = el("select", { id: "drift-hours" }, [1, 6, 24, 168].map((h) =>
    el("option", { value: h, selected: h === hours }, h < 24 ? h + " h" : h / 24 + " d")));
  const apply = () => {
    location.hash = "#/drift?" + new URLSearchParams({ model: modelSelect.value, cohort: cohortInput.value.trim(), hours: hoursSelect.value });
  };
  const controls = el("div", { class: "filters" },
    el("label", {}, "model", modelSelect), el("label", {}, "cohort", cohortInput), el("label", {}, "since", hoursSelect),
    el("button", { id: "drift-apply", onclick: apply }, "Show"));
  if (!model) return show(el("h1", {}, "Drift"), el("p", { class: "muted" }, "No model is published yet."));
  const bucketSecs = hours > 24 ? 86400 : hours > 6 ? 3600 : 300;
  const query = new URLSearchParams({ model, since_ms: String(Date.now() - hours * 3600 * 1000), bucket_secs: String(bucketSecs) });
  if (cohort) query.set("cohort", cohort);
  const report = await api("/api/v1/drift?" + query);
  const charts = el("div", { id: "drift-charts" });
  const versions = [...new Set(report.buckets.map((b) => b.version))];
  const latest = report.buckets[report.buckets.length - 1];
  show(el("h1", {}, "Drift of " + model + (cohort ? " for " + cohort : " for the whole fleet")), controls, charts,
    latest ? el("div", {},
      el("h2", {}, "Latest bucket: " + utc(latest.start_ms) + " UTC, version " + latest.version + ", " + latest.verdict.rows + " rows, " +
        (latest.verdict.dataset_drift ? "dataset drift" : "no dataset drift")),
      table(["feature", "test", { label: "score", num: true }, { label: "threshold", num: true }, "drifted", { label: "missing", num: true }],
        latest.verdict.features.map((f) => el("tr", { "data-feature": f.name },
          el("td", {}, f.name), el("td", {}, f.test), el("td", { class: "num" }, fixed(f.score, 4)),
          el("td", { class: "num" }, fixed(f.threshold, 3)),
          el("td", { class: f.drifted ? "bad" : "ok" }, f.drifted ? "yes" : "no"),
          el("td", { class: "num" }, fixed(100 * f.missing_rate, 1) + "%"))), { id: "drift-latest" })) :
      el("p", { class: "muted", id: "drift-empty" }, "No drift windows in that time for that cohort."));
  for (const version of versions) {
    const buckets = report.buckets.filter((b) => b.version === version);
    const features = buckets[0].verdict.features.map((f) => f.name);
    const xs = buckets.map((b) => b.start_ms / 1000);
    const series = features.map((name) => buckets.map((b) => {
      const f = b.verdict.features.find((x) => x.name === name);
      return f ? f.score : null;
    }));
    const palette = ["#2457c5", "#b3261e", "#1b7f3b", "#8a5a00", "#6b3fa0", "#00798c", "#c05780", "#4d4d4d"];
    const holder = el("div", { class: "chart", "data-version": version }, el("strong", {}, "version " + version + ": test score per feature"));
    charts.append(holder);
    new uPlot({
      width: Math.min(1200, document.getElementById("main").clientWidth - 30),
      height: 260,
      // One bucket alone would make uPlot's automatic range span years.
      scales: { x: { time: true, auto: false, range: [xs[0] - bucketSecs, xs[xs.length - 1] + bucketSecs] } },
      series: [{}, ...features.map((name, i) => ({ label: name, stroke: palette[i % palette.length], width: 1.5 }))],
    }, [xs, ...series], holder);
  }
}

// ---- device page ---------------------------------------------------------------------------

async function deviceView(id) {
  const detail = await api("/api/v1/devices/" + encodeURIComponent(id));
  const d = detail.device;
  show(
    el("h1", {}, "Device " + d.id + (d.name !== d.id ? " (" + d.name + ")" : "")),
    el("p", {}, "labels: " + (labels(d.labels) || "none") + " · enrolled " + utc(d.enrolled_ms) + " UTC · last seen " +
      ago(d.last_seen_ms) + (d.revoked_ms ? " · REVOKED " + utc(d.revoked_ms) : "")),
    el("h2", {}, "Models"),
    table(["model", "active", "previous", "installed by", "bundle", "training data", "code"], detail.models.map((m) =>
      el("tr", { "data-model": m.name },
        el("td", {}, m.name), el("td", {}, m.active_version || "–"), el("td", {}, m.previous_version || "–"),
        el("td", {}, m.installed_by ? (m.installed_by.startsWith("ro-") ?
          el("a", { href: "#/rollouts/" + encodeURIComponent(m.installed_by) }, m.installed_by) : m.installed_by) : "–"),
        el("td", {}, el("code", {}, (m.bundle_sha256 || "–").slice(0, 16))),
        el("td", {}, el("code", {}, m.lineage && m.lineage.training_data ? m.lineage.training_data.slice(0, 16) : "–")),
        el("td", {}, el("code", {}, m.lineage && m.lineage.code_commit ? m.lineage.code_commit : "–")))), { id: "device-models" }),
    el("h2", {}, "Status history"),
    table(["model", "when", "version", "step", "detail"], detail.models.flatMap((m) => (m.history || []).map((h) =>
      el("tr", {}, el("td", {}, m.name), el("td", {}, utc(h.at_ms)), el("td", {}, h.version), el("td", {}, h.step),
        el("td", {}, h.detail)))), { id: "device-history" }),
    el("h2", {}, "Audit"),
    table(["when", "who", "action", "detail"], detail.audit.map((a) => el("tr", {},
      el("td", {}, utc(a.at_ms)), el("td", {}, a.actor), el("td", {}, a.action), el("td", {}, a.detail))), { id: "device-audit" }));
}

// ---- start ---------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  state.who = null;
  loginView();
});
start();
