// dogbreeds web page: upload a photo, show top-5 breeds as bars and the Grad-CAM overlay.
// Plain JS, no libraries, so the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { photoUrl: null, heatUrl: null, detector: null, dogs: [] };
// Box colours for the dogs of one photo (issue 14), the same on the canvas and in the list.
const DOG_COLORS = ["#1e9e5a", "#2f6fdf", "#d9480f", "#9c36b5", "#e8590c", "#0c8599", "#c2255c", "#5c940d"];

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

// --- every dog in the photo: when the server has a detector (GET /v1/detector answers) ---

function dogLabel(dog, index) {
  const best = dog.top[0];
  return (index + 1) + ". " + best.breed + " " + (best.prob * 100).toFixed(0) + "%";
}

function drawBoxes(result) {
  // The photo at its own resolution on a canvas, a box and a label per dog. The server's boxes are
  // in the pixels of the photo it decoded (EXIF-oriented, as the browser shows it): scale to this image.
  const img = $("photo");
  const canvas = $("photo-boxes");
  const w = img.naturalWidth, h = img.naturalHeight;
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, w, h);
  const sx = w / (result.width || w), sy = h / (result.height || h);
  const line = Math.max(2, Math.round(Math.min(w, h) / 150));
  const font = Math.max(12, Math.round(Math.min(w, h) / 22));
  ctx.font = "600 " + font + "px system-ui, sans-serif";
  ctx.textBaseline = "top";
  result.dogs.forEach((dog, i) => {
    const [x0, y0, x1, y1] = dog.box;
    const color = DOG_COLORS[i % DOG_COLORS.length];
    ctx.lineWidth = line;
    ctx.strokeStyle = color;
    ctx.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
    const text = dogLabel(dog, i);
    const tw = ctx.measureText(text).width + 2 * line;
    const ty = y0 * sy >= font + 2 * line ? y0 * sy - font - 2 * line : y0 * sy;
    const tx = Math.max(0, Math.min(x0 * sx, w - tw));  // the whole label stays on the photo
    ctx.fillStyle = color;
    ctx.fillRect(tx, ty, tw, font + 2 * line);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, tx + line, ty + line);
  });
  // Boxes the breed run calls "not a dog" (issue 11's verdict): dashed grey, so nothing is hidden.
  ctx.setLineDash([3 * line, 2 * line]);
  for (const box of result.not_dogs || []) {
    const [x0, y0, x1, y1] = box.box;
    ctx.lineWidth = line;
    ctx.strokeStyle = "#888";
    ctx.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
    ctx.fillStyle = "#888";
    ctx.fillText("not a dog?", Math.max(0, Math.min(x0 * sx + line, w - ctx.measureText("not a dog?").width)), y0 * sy + line);
  }
  ctx.setLineDash([]);
  img.hidden = true;
  canvas.hidden = false;
}

function selectDog(index) {
  const dog = state.dogs[index];
  for (const item of $("dogs").children) item.classList.toggle("selected", Number(item.dataset.index) === index);
  $("bars-title").textContent = "Top breeds of dog " + (index + 1);
  renderBars(dog);
}

function renderDogs(result) {
  state.dogs = result.dogs;
  const list = $("dogs");
  list.replaceChildren();
  result.dogs.forEach((dog, i) => {
    const li = document.createElement("li");
    li.className = "dog";
    li.dataset.index = String(i);
    li.style.setProperty("--dog-color", DOG_COLORS[i % DOG_COLORS.length]);
    li.textContent = dogLabel(dog, i);
    li.title = "dog score " + dog.score.toFixed(2) + "; box " + dog.box.map((v) => v.toFixed(0)).join(", ");
    li.addEventListener("click", () => selectDog(i));
    list.append(li);
  });
  list.hidden = result.dogs.length === 0;
  const others = (result.not_dogs || []).length;
  $("photo-caption").textContent = (result.dogs.length === 1 ? "Your photo: 1 dog"
    : "Your photo: " + result.dogs.length + " dogs")
    + (others ? " (" + others + (others === 1 ? " box" : " boxes") + " judged not a dog, dashed)" : "");
  if (result.dogs.length) {
    selectDog(0);
  } else {
    $("bars-title").textContent = "No dog found";
    $("bars").replaceChildren();
    for (const id of ["verdict", "breed-set", "trust-note", "low-confidence"]) $(id).hidden = true;
  }
}

async function detectFile(file) {
  const form = new FormData();
  form.append("image", file);
  const response = await fetch("/v1/detect?top=5", { method: "POST", body: form });
  if (!response.ok) {
    $("result").hidden = true;
    setStatus(file.name + ": " + (await errorText(response)), true);
    return;
  }
  const result = await response.json();
  await $("photo").decode().catch(() => {});
  $("result").hidden = false;
  renderDogs(result);
  drawBoxes(result);
  const n = result.dogs.length;
  setStatus(file.name + ": " + (n === 0 ? "no dog found"
    : n + (n === 1 ? " dog: " : " dogs: ") + result.dogs.map((d) => d.top[0].breed).join(", ")));
  await explain(file);
}

async function handleFile(file) {
  if (!file) return;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  $("photo").src = state.photoUrl;
  $("heatmap").removeAttribute("src");
  $("bars").replaceChildren();
  setStatus("Looking at " + file.name + " …");
  $("photo").hidden = false;
  $("photo-boxes").hidden = true;
  if (state.detector) {
    try {
      await detectFile(file);
    } catch (err) {
      setStatus("Could not reach the server: " + err, true);
    }
    return;
  }
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

async function findDetector() {
  // 404 without a detector: the page then shows one breed answer per photo, as before.
  try {
    const response = await fetch("/v1/detector");
    if (!response.ok) return;
    state.detector = await response.json();
    $("drop-zone").querySelector("span").append(" — every dog in it gets a box and a breed");
  } catch (_) { /* no detector: single-answer mode */ }
}

setUpDropZone();
showModel();
findDetector();
