// dogbreeds web page: upload a photo, show top-5 breeds as bars and the Grad-CAM overlay.
// Plain JS, no libraries, so the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { photoUrl: null, heatUrl: null };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    return response.statusText;
  }
}

function renderBars(result) {
  const list = $("bars");
  list.replaceChildren();
  for (const item of result.top) {
    const li = document.createElement("li");
    li.className = "bar";
    li.dataset.breedId = item.breed_id;
    const label = document.createElement("div");
    label.className = "bar-label";
    const name = document.createElement("span");
    name.className = "breed-name";
    name.textContent = item.breed;
    const prob = document.createElement("span");
    prob.className = "breed-prob";
    prob.textContent = (item.prob * 100).toFixed(1) + "%";
    label.append(name, prob);
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = Math.max(0.5, item.prob * 100).toFixed(1) + "%";
    track.append(fill);
    li.append(label, track);
    list.append(li);
  }
  // The verdict in words (issue 11): "breed", "unknown_breed" or "not_a_dog", and the breed set.
  const verdict = $("verdict");
  verdict.textContent = result.verdict_text || "";
  verdict.dataset.verdict = result.verdict || "";
  verdict.hidden = !result.verdict_text;
  const set = result.breed_set || [];
  $("breed-set").textContent = result.verdict === "breed" && set.length > 1
    ? "Could also be: " + set.slice(1).map((s) => s.breed).join(", ")
    : (result.verdict === "unknown_breed" && set.length ? "Look-alikes it knows: " + set.map((s) => s.breed).join(", ") : "");
  $("breed-set").hidden = !$("breed-set").textContent;
  $("trust-note").textContent = result.note || "";
  $("trust-note").hidden = !result.note;
  // Kept for compatibility; the verdict says more (low_confidence is derived from top-1).
  $("low-confidence").hidden = !result.low_confidence || Boolean(result.verdict_text);
}

async function explain(file) {
  const caption = $("heatmap-caption");
  const form = new FormData();
  form.append("image", file);
  const response = await fetch("/v1/explain", { method: "POST", body: form });
  if (!response.ok) {
    caption.textContent = "No heat map: " + (await errorText(response));
    $("heatmap").removeAttribute("src");
    return;
  }
  if (state.heatUrl) URL.revokeObjectURL(state.heatUrl);
  state.heatUrl = URL.createObjectURL(await response.blob());
  $("heatmap").src = state.heatUrl;
  caption.textContent = "Where the model looked for \u201c" + (response.headers.get("X-Breed") || "the top breed") + "\u201d (Grad-CAM)";
}

async function handleFile(file) {
  if (!file) return;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  $("photo").src = state.photoUrl;
  $("heatmap").removeAttribute("src");
  $("bars").replaceChildren();
  setStatus("Looking at " + file.name + " …");
  const form = new FormData();
  form.append("image", file);
  try {
    const response = await fetch("/v1/predict?top=5", { method: "POST", body: form });
    if (!response.ok) {
      $("result").hidden = true;
      setStatus(file.name + ": " + (await errorText(response)), true);
      return;
    }
    const result = await response.json();
    $("result").hidden = false;
    renderBars(result);
    setStatus(file.name + ": " + result.top[0].breed + " (" + (result.top[0].prob * 100).toFixed(1) + "%)");
    await explain(file);
  } catch (err) {
    setStatus("Could not reach the server: " + err, true);
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (e) => handleFile(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("dragging"); });
  }
  zone.addEventListener("drop", (e) => handleFile(e.dataTransfer.files[0]));
}

async function showModel() {
  try {
    const health = await (await fetch("/healthz")).json();
    $("model-name").textContent = "Model: " + health.model + " (" + health.num_classes + " breeds)";
  } catch (_) { /* the page still works; the name is decoration */ }
}

setUpDropZone();
showModel();
