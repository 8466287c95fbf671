// memfree's page: the prompt's words coloured by significance (checked when typing pauses), the verdict, and
// generations with memfree's verdict and the nearest training image. Plain JS, no build step, no outside files.
"use strict";

const $ = (id) => document.getElementById(id);
const CHECK_DELAY_MS = 400;
const params = new URLSearchParams(location.search);
const state = {
  key: sessionStorage.getItem("memfree-api-key") || "",
  info: null,            // /v1/models' memfree block
  result: null,          // the last check's answer
  cache: new Map(),      // prompt -> check answer (a check is deterministic)
  timer: null,
  checking: false,
  generating: false,
};

class ApiError extends Error {
  constructor(message, status, type, retryAfter) {
    super(message);
    this.status = status;
    this.type = type;
    this.retryAfter = retryAfter;
  }
}

async function api(path, { method = "GET", body, blob = false } = {}) {
  const headers = {};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError("the service cannot be reached (" + e.message + ")", 0, "network", 2);
  }
  if (res.status === 401) $("auth").hidden = false;
  const json = (res.headers.get("Content-Type") || "").includes("application/json");
  if (!res.ok) {
    const data = json ? await res.json() : null;
    const err = data && data.error ? data.error : { message: res.status + " " + res.statusText, type: "http" };
    throw new ApiError(err.message, res.status, err.type, Number(res.headers.get("Retry-After")) || 0);
  }
  if (blob) return res.blob();
  return json ? res.json() : res.text();
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ------------------------------------------------------------------------------------------ model info

async function loadInfo() {
  try {
    const models = await api("/v1/models");
    const m = models.data[0];
    state.info = m.memfree;
    const i = state.info;
    const parts = ["model " + m.id, i.size + " images", i.default_steps + " steps by default (at most " + i.max_steps + ")",
      i.threshold == null ? "detector uncalibrated" : "threshold " + i.threshold.toFixed(3),
      i.index ? "training-set index of " + i.index.images + " images" : "no training-set index (amg unavailable)"];
    $("model-info").textContent = parts.join(" · ");
    $("n").max = i.max_n;
    $("steps").max = i.max_steps;
    if (!$("steps").value) $("steps").value = i.default_steps;
    const amg = $("mitigation").querySelector("option[value=amg]");
    amg.disabled = !i.index;
    if (!params.has("mitigation")) $("mitigation").value = i.index ? i.default_mitigation : "none";
    $("auth").hidden = true;
    showError("");
  } catch (e) {
    $("model-info").textContent = "model information unavailable: " + e.message;
    if (e.status !== 401) setTimeout(loadInfo, 3000);
  }
}

// ------------------------------------------------------------------------------------------ the prompt box

function wordAlpha(significance, result) {
  const sig = result.words.map((w) => w.significance);
  const scale = result.threshold || Math.max(1e-12, ...sig);
  return Math.min(1, Math.max(0, significance / scale));
}

// Draw the textarea's text again in the backdrop, each word on a red of its significance (words that the last
// check saw at the same place; the others stay plain until the next check).
function renderBackdrop() {
  const text = $("prompt").value;
  const backdrop = $("backdrop");
  backdrop.replaceChildren();
  const result = state.result;
  let index = 0;
  for (const piece of text.match(/\S+|\s+/g) || []) {
    if (/^\s/.test(piece)) {
      backdrop.append(document.createTextNode(piece));
      continue;
    }
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = piece;
    const known = result && result.words[index] && result.words[index].word === piece ? result.words[index] : null;
    if (known) {
      span.dataset.significance = known.significance.toFixed(4);
      span.style.backgroundColor = "rgba(220, 0, 0, " + wordAlpha(known.significance, result).toFixed(2) + ")";
    }
    backdrop.append(span);
    index += 1;
  }
  backdrop.append(document.createTextNode("\n"));   // room for a trailing newline, as the textarea has
  backdrop.scrollTop = $("prompt").scrollTop;
}

function renderVerdict(result) {
  const verdict = $("verdict");
  const words = $("words");
  words.replaceChildren();
  if (!result) {
    verdict.className = "verdict idle";
    verdict.textContent = "type a prompt to check it";
    delete verdict.dataset.flagged;
    return;
  }
  const score = result.score.toFixed(3);
  if (result.flagged === true) {
    verdict.className = "verdict mem";
    verdict.textContent = "memorized: score " + score + " > threshold " + result.threshold.toFixed(3);
  } else if (result.flagged === false) {
    verdict.className = "verdict ok";
    verdict.textContent = "ok: score " + score + " ≤ threshold " + result.threshold.toFixed(3);
  } else {
    verdict.className = "verdict uncalibrated";
    verdict.textContent = "score " + score + " (no calibrated threshold: run memfree calibrate)";
  }
  verdict.dataset.flagged = String(result.flagged);
  for (const w of result.words) {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = w.word;
    chip.style.backgroundColor = "rgba(220, 0, 0, " + (0.8 * wordAlpha(w.significance, result)).toFixed(2) + ")";
    const value = document.createElement("small");
    value.textContent = w.significance.toFixed(3);
    chip.append(value);
    words.append(chip);
  }
}

function applyCheck(result) {
  state.result = result;
  renderBackdrop();
  renderVerdict(result);
}

function scheduleCheck() {
  clearTimeout(state.timer);
  state.timer = setTimeout(runCheck, CHECK_DELAY_MS);
}

// One check at a time: while one is out, the next waits for it, then asks for the text as it is by then.
async function runCheck() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) {
    state.result = null;
    renderBackdrop();
    renderVerdict(null);
    return;
  }
  if (state.cache.has(prompt)) {
    applyCheck(state.cache.get(prompt));
    return;
  }
  if (state.checking) return;   // the running check re-checks when it ends
  state.checking = true;
  $("checking").hidden = false;
  let retry = 0;
  try {
    const result = await api("/v1/memorization/check", { method: "POST", body: { prompt } });
    state.cache.set(prompt, result);
    if ($("prompt").value === prompt) applyCheck(result);
  } catch (e) {
    if (e.status === 503 || e.status === 0) {
      retry = Math.min(Math.max(e.retryAfter, 1), 5);
      $("verdict").className = "verdict busy";
      $("verdict").textContent = "the service is busy; checking again in " + retry + " s";
    } else {
      state.result = null;
      renderBackdrop();
      renderVerdict(null);
      $("verdict").className = "verdict idle";
      $("verdict").textContent = "cannot check: " + e.message;
    }
  } finally {
    state.checking = false;
    $("checking").hidden = true;
  }
  if (retry) setTimeout(runCheck, retry * 1000);
  else if ($("prompt").value !== prompt && !state.cache.has($("prompt").value)) scheduleCheck();
}

// ------------------------------------------------------------------------------------------ generation

function figure(src, className, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.className = className;
  img.alt = className === "generated" ? "generated image" : "nearest training image";
  img.src = src;
  const cap = document.createElement("figcaption");
  cap.append(...caption);
  fig.append(img, cap);
  return fig;
}

function span(text, className) {
  const s = document.createElement("span");
  if (className) s.className = className;
  s.textContent = text;
  return s;
}

async function nearestFigure(near) {
  const caption = [span("nearest training image #" + near.id + ", similarity " + near.similarity.toFixed(2) +
    (near.memorized ? ": a copy" : ": not a copy"), near.memorized ? "mem" : "ok")];
  if (!state.info || !state.info.training_images) {
    const div = document.createElement("div");
    div.className = "nearest-text";
    div.append(...caption);
    return div;
  }
  const blob = await api("/v1/training-images/" + encodeURIComponent(near.id), { blob: true });
  return figure(URL.createObjectURL(blob), "nearest", caption);
}

async function renderGeneration(request, answer, seconds) {
  const group = document.createElement("div");
  group.className = "generation";
  const title = document.createElement("h3");
  title.textContent = "“" + request.prompt + "”, " + request.mitigation + ", " + request.steps + " steps, " +
    seconds.toFixed(1) + " s";
  group.append(title);
  for (const item of answer.data) {
    const m = item.memfree;
    const result = document.createElement("div");
    result.className = "result";
    result.dataset.flagged = String(m.flagged);
    result.dataset.mitigated = String(m.mitigated);
    const flag = m.flagged === true ? span("flagged", "mem") : m.flagged === false ? span("not flagged", "ok")
      : span("uncalibrated");
    const acted = m.mitigated ? span(m.mitigation + " acted", "mem") : span(m.mitigation === "none"
      ? "no mitigation" : m.mitigation + " left it alone", "ok");
    const caption = [span("seed " + m.seed + " · score " + m.score.toFixed(3) + " · "), flag, span(" · "), acted];
    result.append(figure("data:image/png;base64," + item.b64_json, "generated", caption));
    group.append(result);
    if (m.nearest && (m.mitigated || m.nearest.memorized)) {
      try {
        result.append(await nearestFigure(m.nearest));
      } catch (e) {
        result.append(span("nearest training image #" + m.nearest.id + " unavailable: " + e.message));
      }
    }
  }
  $("results").prepend(group);
}

function numberField(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function generate() {
  if (state.generating) return;
  const request = { prompt: $("prompt").value, n: numberField("n") ?? 1, mitigation: $("mitigation").value };
  const steps = numberField("steps");
  const seed = numberField("seed");
  if (steps !== undefined) request.steps = steps;
  if (seed !== undefined) request.seed = seed;
  state.generating = true;
  $("generate").disabled = true;
  $("progress").hidden = false;
  showError("");
  const t0 = performance.now();
  const tick = setInterval(() => { $("elapsed").textContent = ((performance.now() - t0) / 1000).toFixed(1); }, 100);
  try {
    const answer = await api("/v1/images/generations", { method: "POST", body: request });
    request.steps = answer.data[0].memfree.steps;
    await renderGeneration(request, answer, (performance.now() - t0) / 1000);
  } catch (e) {
    showError(e.status === 503 ? e.message + (e.retryAfter ? " (retry in " + e.retryAfter + " s)" : "") : e.message);
  } finally {
    clearInterval(tick);
    state.generating = false;
    $("generate").disabled = false;
    $("progress").hidden = true;
  }
}

// ------------------------------------------------------------------------------------------ wiring

function init() {
  for (const id of ["n", "steps", "seed", "mitigation"]) {
    if (params.has(id)) $(id).value = params.get(id);
  }
  $("prompt").addEventListener("input", () => { renderBackdrop(); scheduleCheck(); });
  $("prompt").addEventListener("scroll", () => { $("backdrop").scrollTop = $("prompt").scrollTop; });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });
  $("generate").addEventListener("click", generate);
  $("save-key").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("memfree-api-key", state.key);
    loadInfo();
    scheduleCheck();
  });
  if (params.has("prompt")) {
    $("prompt").value = params.get("prompt");
    renderBackdrop();
    scheduleCheck();
  }
  loadInfo();
}

init();
