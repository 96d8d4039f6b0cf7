"""The page at `GET /`: samples that follow the controls as they move. Plain HTML and JavaScript in one string (no
package data, nothing fetched from elsewhere: it works offline). It reads `GET /model` to build its controls, then
posts to `/generate` on every change, debounced, aborting the request a newer one makes stale."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>jumpflow</title>
<style>
  :root { --ink: #1f2933; --muted: #65727e; --line: #d9dee3; --accent: #1f77b4; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
         background: #f6f7f9; }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { margin: 0; font-size: 20px; }
  header p { margin: 2px 0 0; color: var(--muted); font-size: 13px; }
  main { display: flex; gap: 24px; padding: 20px 24px; align-items: flex-start; flex-wrap: wrap; }
  #controls { width: 280px; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
  .row { margin-bottom: 14px; }
  .row label { display: block; font-weight: 600; margin-bottom: 4px; }
  .row .value { float: right; font-weight: 400; color: var(--muted); font-variant-numeric: tabular-nums; }
  input[type=range], select { width: 100%; }
  .inline { display: flex; gap: 8px; }
  .inline input[type=number] { width: 100%; }
  button { border: 1px solid var(--line); background: #fff; border-radius: 6px; padding: 3px 10px; cursor: pointer; }
  .hidden { display: none; }
  #output { width: 510px; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px; }
  #samples { display: block; width: 480px; height: 480px; object-fit: contain; background: #fff; }
  #samples.pixels { image-rendering: pixelated; }
  #status { margin-top: 10px; min-height: 1.5em; font-variant-numeric: tabular-nums; }
  #gen-time { font-weight: 600; color: var(--accent); }
  #round-trip { color: var(--muted); }
  #error { color: #b42318; margin-top: 6px; min-height: 1.3em; }
</style>
</head>
<body>
<header><h1 id="title">jumpflow</h1><p id="subtitle">loading the model...</p></header>
<main>
  <section id="controls">
    <div class="row"><label for="seed">Seed <span class="value" id="seed-value">0</span></label>
      <input type="range" id="seed" min="0" max="999" value="0">
      <div class="inline"><input type="number" id="seed-number" min="0" value="0" aria-label="seed">
        <button id="shuffle" type="button" title="a random seed">random</button></div></div>
    <div class="row"><label for="steps">Steps</label><select id="steps"></select></div>
    <div class="row hidden" id="class-row"><label for="class">Class</label><select id="class"></select></div>
    <div class="row hidden" id="guidance-row"><label for="guidance">Guidance
      <span class="value" id="guidance-value">1.0</span></label>
      <input type="range" id="guidance" min="1" max="8" step="0.1" value="1"></div>
    <div class="row"><label for="n">Samples</label><select id="n"></select></div>
  </section>
  <section id="output">
    <img id="samples" alt="samples">
    <div id="status"><span id="gen-time"></span> <span id="round-trip"></span></div>
    <div id="error"></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let card = null, timer = null, inflight = null, shownUrl = null, generation = 0;

function option(select, value, text) {
  const o = document.createElement("option"); o.value = String(value); o.textContent = text; select.appendChild(o);
}

function activeCard() { return $("steps").value === "teacher" ? card.teacher : card; }

function syncControls() {
  $("seed-value").textContent = $("seed").value;
  const c = activeCard();
  const hasClass = c.classes > 0 && $("class").value !== "";
  $("class").disabled = !c.classes;  // the teacher may be unconditional
  const guided = c.guidance && hasClass;
  $("guidance").disabled = !guided;
  $("guidance-value").textContent = guided ? Number($("guidance").value).toFixed(1) : "off";
}

function request() {
  const body = { n: Number($("n").value), seed: Number($("seed").value), format: "png" };
  if ($("steps").value === "teacher") { body.model = "teacher"; body.steps = card.teacher.steps; }
  else body.steps = Number($("steps").value);
  if (activeCard().classes > 0 && $("class").value !== "") {
    body["class"] = Number($("class").value);
    if (!$("guidance").disabled) body.guidance = Number($("guidance").value);
  }
  return body;
}

function schedule() { syncControls(); clearTimeout(timer); timer = setTimeout(generate, 30); }

async function generate() {
  if (inflight) inflight.abort();  // a newer request makes the running one stale
  const controller = new AbortController(); inflight = controller;
  const mine = ++generation, body = request(), started = performance.now();
  try {
    const response = await fetch("/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                                body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({ error: response.statusText }));
      $("error").textContent = problem.error || ("HTTP " + response.status); return;
    }
    const blob = await response.blob();
    if (mine !== generation) return;
    const url = URL.createObjectURL(blob), old = shownUrl;
    shownUrl = url; $("samples").src = url; $("samples").dataset.seed = response.headers.get("X-Seed");
    if (old) setTimeout(() => URL.revokeObjectURL(old), 1000);
    const ms = Number(response.headers.get("X-Generation-Ms"));
    const merged = Number(response.headers.get("X-Batch-Requests"));
    const what = body.model === "teacher" ? card.teacher.method + ", " + body.steps + " steps"
                                          : body.steps + (body.steps === 1 ? " step" : " steps");
    $("gen-time").textContent = what + ": generated in " + ms.toFixed(1) + " ms on the server" +
                                (merged > 1 ? " (batched with " + (merged - 1) + " other request" + (merged > 2 ? "s" : "") + ")" : "");
    $("round-trip").textContent = "\u00b7 " + (performance.now() - started).toFixed(0) + " ms round trip";
    $("error").textContent = "";
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = String(e);
  } finally {
    if (inflight === controller) inflight = null;
  }
}

async function start() {
  card = await (await fetch("/model")).json();
  document.title = "jumpflow \u00b7 " + card.method;
  $("title").textContent = "jumpflow \u00b7 " + card.method;
  $("subtitle").textContent = (card.paper ? card.paper + " \u00b7 " : "") + card.data.name + " (" + card.data.kind +
    ", " + card.data.shape.join("\u00d7") + ")" + (card.classes ? ", " + card.classes + " classes" : "") +
    " \u00b7 " + card.train_step + " training steps";
  for (const s of card.supported_steps) option($("steps"), s, s + (s === 1 ? " step (1 NFE)" : " steps"));
  if (card.teacher) option($("steps"), "teacher", card.teacher.steps + "-step teacher (" + card.teacher.method + ")");
  $("steps").value = String(card.supported_steps.includes(1) ? 1 : card.default_steps);
  if (card.classes > 0) {
    $("class-row").classList.remove("hidden");
    option($("class"), "", "none (unconditional)");
    for (let k = 0; k < card.classes; k++) option($("class"), k, card.class_names ? card.class_names[k] : "class " + k);
    $("class").value = "0";
  }
  if (card.guidance || (card.teacher && card.teacher.guidance)) $("guidance-row").classList.remove("hidden");
  const image = card.data.kind === "image";
  const sizes = (image ? [16, 36, 64, 144] : [250, 1000, 4000]).filter((k) => k <= card.max_n);
  if (!sizes.length) sizes.push(card.max_n);
  for (const k of sizes) option($("n"), k, k + (image ? " images" : " points"));
  $("n").value = String(image ? (sizes.includes(64) ? 64 : sizes[sizes.length - 1]) : sizes[Math.min(1, sizes.length - 1)]);
  if (image) $("samples").classList.add("pixels");
  $("seed").addEventListener("input", () => { $("seed-number").value = $("seed").value; schedule(); });
  $("seed-number").addEventListener("input", () => {
    const v = Math.max(0, Math.floor(Number($("seed-number").value) || 0));
    $("seed").max = String(Math.max(999, v)); $("seed").value = String(v); schedule();
  });
  $("shuffle").addEventListener("click", () => {
    const v = Math.floor(Math.random() * 1000); $("seed").value = String(v); $("seed-number").value = String(v);
    schedule();
  });
  for (const id of ["steps", "class", "n"]) $(id).addEventListener("change", schedule);
  $("guidance").addEventListener("input", schedule);
  schedule();
}

start().catch((e) => { $("error").textContent = "cannot read the model: " + e; });
</script>
</body>
</html>
"""
