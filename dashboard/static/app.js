// renderfarm dashboard: small live updates. Each page polls the JSON API (never faster than
// every 2 s, and only after the previous answer came back) and updates its own part of the DOM;
// live previews come pushed on the batch's event stream (the batch and job pages).
// Text goes in with textContent only, never innerHTML.
"use strict";

const body = document.body;
const POLL_MS = Math.max(2000, parseInt(body.dataset.pollMs || "2000", 10));
const STATES = ["queued", "started", "rendering", "uploading", "succeeded", "failed", "cancelled"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function secs(v) {
  if (v === null || v === undefined) return "–";
  return v < 60 ? `${v.toFixed(2)} s` : ago(v);
}

function pills(counts) {
  const span = el("span", { class: "counts" });
  for (const s of STATES) if (counts[s]) span.append(el("span", { class: `pill s-${s}` }, `${s} ${counts[s]}`));
  return span;
}

// The batch's bar from the API's "bar" parts (see dashboard/api.py progress_bar).
function statebar(b, bar) {
  bar = bar || el("div", { class: "statebar", role: "img" });
  bar.replaceChildren(...b.bar.map((p) => {
    const part = el("span", { class: `part p-${p.part}`, "data-part": p.part, title: `${p.part} ${p.jobs}` });
    part.style.width = `${p.width}%`;
    return part;
  }));
  bar.setAttribute("aria-label", doneText(b));
  return bar;
}

function doneText(b) {
  let text = `${b.counts.succeeded}/${b.total} succeeded`;
  if (b.counts.failed) text += `, ${b.counts.failed} failed`;
  if (b.counts.cancelled) text += `, ${b.counts.cancelled} cancelled`;
  return text;
}

// poll(url, onData): call onData(json) now and every POLL_MS; onData returns false to stop.
function poll(url, onData) {
  let stopped = false;
  async function tick() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok && onData(await response.json()) === false) stopped = true;
    } catch (err) {
      console.warn("poll failed", err);
    }
    if (!stopped) setTimeout(tick, POLL_MS);
  }
  setTimeout(tick, POLL_MS);
}

// A batch's speed while it runs, its total time once done (as _macros.html speed_text).
function speedText(b) {
  if (b.finished) return b.took !== null ? `took ${ago(b.took)}` : "–";
  if (b.images_per_minute === null) return "waiting for a worker";
  return b.images ? `${b.images_per_minute} images/min` : "rendering, no image yet";
}

function batchesPage() {
  const tbody = document.getElementById("batch-rows");
  const { offset, limit } = body.dataset;
  poll(`/api/v1/batches?offset=${offset}&limit=${limit}`, (data) => {
    if (!data.batches.length) return;
    tbody.replaceChildren(...data.batches.map((b) => {
      const href = `/batches/${encodeURIComponent(b.id)}`;
      const thumb = el("a", { class: "thumb", href });
      if (b.thumbnail) thumb.append(el("img", { src: b.thumbnail, alt: "first image", loading: "lazy" }));
      const who = el("div", { class: "who" }, el("a", { href }, el("code", {}, b.id)));
      if (b.label) who.append(" ", el("strong", { class: "label" }, b.label));
      who.append(el("div", { class: "prompt", title: b.prompt }, b.prompt));
      return el("tr", { "data-id": b.id },
        el("td", { class: "batch" }, el("div", { class: "cell" }, thumb, who)),
        el("td", {}, statebar(b), " ", el("span", { class: "done" }, doneText(b))),
        el("td", { class: "states" }, pills(b.counts)),
        el("td", { class: "age" }, ago(b.age)),
        el("td", { class: "tput" }, speedText(b)));
    }));
  });
}

// "step 3/20", or "worker lost, re-queue in N s" when the job's worker stopped beating.
function stepText(job) {
  if (job.worker_lost) return job.worker_lost;
  return job.state === "rendering" ? `step ${job.step}/${job.steps_total}` : "";
}

// A job's live preview (a small JPEG from its latents) in `box`, replacing the striped
// placeholder once it loads. Loaded off-DOM first, so a missing one never shows a broken image.
function setPreview(box, src, alt) {
  const img = new Image();
  img.className = "preview";
  img.alt = alt;
  img.onload = () => {
    const old = box.querySelector("img.preview");
    if (old) old.replaceWith(img); else box.prepend(img);
    box.classList.add("has-preview");
  };
  img.onerror = () => dropPreview(box);
  img.src = src;
}

function dropPreview(box) {
  const old = box.querySelector("img.preview");
  if (old) old.remove();
  box.classList.remove("has-preview");
}

// Previews by polling (GET /api/v1/jobs/<id>/preview), where there is no event stream: one
// per poll while the job renders, removed when it is not rendering.
function showPreview(box, job) {
  if (job.state !== "rendering") dropPreview(box);
  else setPreview(box, `/api/v1/jobs/${encodeURIComponent(job.id)}/preview?step=${job.step}`, `preview, step ${job.step}`);
}

// Previews pushed on the batch's event stream (GET /api/v1/batches/<id>/events, "preview"
// events carry the picture; with `job`, that job's events only): no request per picture.
// onPreview(data) gets each picture, onJob(data) each state change. Null where the browser
// has no EventSource: the page then polls for previews. The stream closes when the batch ends.
function previewStream(batch, job, onPreview, onJob) {
  if (!window.EventSource) return null;
  let url = `/api/v1/batches/${encodeURIComponent(batch)}/events`;
  if (job) url += `?job=${encodeURIComponent(job)}`;
  const source = new EventSource(url);
  source.addEventListener("preview", (e) => {
    const data = JSON.parse(e.data);
    if (data.image) onPreview(data);  // null: expired since (a replayed event)
  });
  source.addEventListener("job", (e) => onJob(JSON.parse(e.data)));
  source.addEventListener("end", () => source.close());
  return source;
}

// With a stream, a preview stays until the job's images replace it, or it goes back to the
// queue (a lost worker); a poll answer older than the stream's news never removes it.
const KEEPS_PREVIEW = new Set(["started", "rendering", "uploading"]);

function showResults(thumb, results) {
  thumb.replaceChildren(...results.map((r) => el("img", { src: r.url, alt: `seed ${r.seed}` })));
  // several images (num_images > 1): a mosaic in the one tile, as batch.html draws it
  const n = results.length;
  for (const c of [...thumb.classList]) if (c === "mosaic" || c.startsWith("cols-")) thumb.classList.remove(c);
  if (n > 1) thumb.classList.add("mosaic", `cols-${n <= 4 ? 2 : n <= 9 ? 3 : 4}`);
}

function updateTile(tile, job, streamed) {
  tile.dataset.state = job.state;
  tile.className = `tile s-${job.state}`;
  tile.querySelector(".state").textContent = job.state;
  tile.querySelector(".step").textContent = stepText(job);
  const thumb = tile.querySelector(".thumb");
  if (!streamed) showPreview(thumb, job);
  else if (!KEEPS_PREVIEW.has(job.state)) dropPreview(thumb);
  if (job.results.length && thumb.querySelectorAll("img:not(.preview)").length !== job.results.length) {
    showResults(thumb, job.results);
  }
}

// The batch's buttons, enabled by its state (as the page renders them).
function batchButtons(b) {
  document.getElementById("cancel-batch").disabled = b.finished;
  document.getElementById("pause-batch").disabled = b.paused || b.finished;
  document.getElementById("resume-batch").disabled = !b.paused;
  document.getElementById("batch-paused").hidden = !b.paused;
  document.getElementById("retry-batch").disabled = !(b.counts.failed || b.counts.cancelled);
  const zip = document.getElementById("download-zip");
  if (b.counts.succeeded) {
    zip.classList.remove("disabled");
    zip.removeAttribute("aria-disabled");
    zip.setAttribute("href", body.dataset.zip);
  }
}

// Destructive actions ask first: a form with data-confirm submits only when confirmed.
document.addEventListener("submit", (event) => {
  const message = event.target.dataset && event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});

const GRID_WAITING = {
  waiting: "The grid is drawn when every cell has ended.",
  redrawing: "A cell was retried: the grid is drawn again when every cell has ended.",
};

// A plot's grid images (GET /api/v1/batches/<id>: "grids"), once a worker has drawn them;
// after a retry of a cell, none (grid_state "redrawing") until the new grid is stored.
function showGrids(grids, state) {
  const box = document.getElementById("plot-grids");
  if (!box) return;
  if (!grids.length) {
    const hint = document.getElementById("grid-waiting");
    if (hint && hint.dataset.gridState === state) return;
    box.replaceChildren(el("p", { class: "hint", id: "grid-waiting", "data-grid-state": state },
      GRID_WAITING[state] || GRID_WAITING.waiting));
    return;
  }
  const shown = [...box.querySelectorAll("img")].map((i) => i.getAttribute("src"));
  if (shown.join() === grids.map((g) => g.url).join()) return;
  box.replaceChildren(...grids.map((g) => el("a", { href: g.url },
    el("img", { class: "plot-grid", src: g.url, alt: `grid ${g.key}` }))));
}

function batchPage() {
  const { batch, offset, limit } = body.dataset;
  const tiles = new Map([...document.querySelectorAll(".tile")].map((t) => [t.dataset.id, t]));
  let lastRound = false;
  // Previews come on the batch's event stream; the poll keeps the rest of the page current.
  const stream = body.dataset.finished === "true" ? null : previewStream(batch, null, (p) => {
    const tile = tiles.get(p.job_id);
    if (tile && !TERMINAL.has(tile.dataset.state)) {
      setPreview(tile.querySelector(".thumb"), p.image, "preview");
    }
  }, (change) => {
    const tile = tiles.get(change.job_id);
    if (!tile || !TERMINAL.has(change.state)) return;
    tile.dataset.state = change.state;
    tile.className = `tile s-${change.state}`;
    tile.querySelector(".state").textContent = change.state;
    tile.querySelector(".step").textContent = "";
    const thumb = tile.querySelector(".thumb");
    dropPreview(thumb);
    if (change.results && change.results.length) showResults(thumb, change.results);
  });
  poll(`/api/v1/batches/${encodeURIComponent(batch)}?offset=${offset}&limit=${limit}`, (data) => {
    const b = data.batch;
    statebar(b, document.getElementById("batch-progress"));
    document.getElementById("batch-done").textContent = doneText(b);
    batchButtons(b);
    document.getElementById("batch-counts").replaceChildren(pills(b.counts));
    for (const job of data.jobs) {
      const tile = tiles.get(job.id);
      if (tile) updateTile(tile, job, stream !== null);
    }
    if (b.plot) showGrids(b.grids, b.grid_state);
    if (b.finished && !(b.plot && !b.grids.length)) {  // a plot: until its grid is drawn
      if (lastRound) return false;  // one more round picks up the last results' URLs
      lastRound = true;
    }
    return true;
  });
}

function jobPage() {
  const id = body.dataset.job;
  if (TERMINAL.has(body.dataset.state)) return;
  const images = document.getElementById("job-images");
  // Its previews come on its batch's event stream, this job's events only.
  const stream = images ? previewStream(body.dataset.batch, id, (p) => {
    setPreview(images, p.image, "preview");
  }, (change) => {
    if (TERMINAL.has(change.state)) window.location.replace(window.location.href);
  }) : null;
  poll(`/api/v1/jobs/${encodeURIComponent(id)}`, (job) => {
    const state = document.getElementById("job-state");
    state.textContent = job.state;
    state.className = `pill s-${job.state}`;
    document.getElementById("job-step").textContent = stepText(job);
    document.getElementById("job-worker").textContent = job.worker || "–";
    if (images && !stream) showPreview(images, job);
    else if (images && !KEEPS_PREVIEW.has(job.state)) dropPreview(images);
    document.getElementById("job-attempts").textContent = job.attempts;
    for (const k of ["waited", "loaded", "rendered", "uploaded"]) {
      document.getElementById(`t-${k}`).textContent = secs(job.timings[k]);
    }
    if (TERMINAL.has(job.state)) {
      // The image, the embedded parameters text and the buttons come with the finished page.
      if (stream) stream.close();
      window.location.replace(window.location.href);
      return false;
    }
    return true;
  });
}

function workersPage() {
  const tbody = document.getElementById("worker-rows");
  poll("/api/v1/workers", (data) => {
    document.getElementById("worker-summary").textContent = `${data.live} live, ${data.lost} lost`;
    if (!data.workers.length) return;
    tbody.replaceChildren(...data.workers.map((w) => el("tr", { class: `w-${w.state}` },
      el("td", {}, el("code", {}, w.id)),
      el("td", {}, el("span", { class: `pill w-${w.state}` }, w.state)),
      el("td", {}, w.host || "–"),
      el("td", {}, w.profile || "–"),
      el("td", {}, w.device_name || w.device || "–"),
      el("td", {}, w.memory_total ? `${((w.memory_free || 0) / 2 ** 30).toFixed(1)} / ${(w.memory_total / 2 ** 30).toFixed(1)} GiB` : "–"),
      el("td", {}, w.loaded.join(", ") || "–"),
      el("td", {}, w.current_job ? el("a", { href: `/jobs/${encodeURIComponent(w.current_job)}` }, el("code", {}, w.current_job)) : w.status === "starting" ? "starting (loading, warming up)" : "idle"),
      el("td", {}, w.steps_total ? `${w.step}/${w.steps_total}` : "–"),
      el("td", {}, w.its_per_second ?? "–"),
      el("td", {}, w.jobs_done),
      el("td", {}, `${ago(w.seconds_since_beat)} ago`))));
  });
}

function queuesPage() {
  const tbody = document.getElementById("queue-rows");
  poll("/api/v1/queues", (data) => {
    tbody.replaceChildren(...data.queues.map((q) => {
      const prio = Object.entries(q.by_priority).map(([p, n]) => el("span", { class: "pill" }, `p${p}: ${n}`));
      return el("tr", {}, el("td", {}, el("code", {}, q.name)),
        el("td", { class: "jobs" }, el("strong", {}, q.jobs)),
        el("td", {}, ...(prio.length ? prio : ["–"])), el("td", { class: "depth" }, q.depth));
    }));
    document.getElementById("queued-jobs").textContent = data.queued_jobs;
    const o = data.oldest_waiting;
    document.getElementById("oldest-job").replaceChildren(o
      ? el("span", {}, el("a", { href: `/jobs/${encodeURIComponent(o.id)}` }, el("code", {}, o.id)), `, waiting ${ago(o.waiting)}`)
      : "none");
  });
}

function submitPage() {
  const size = document.getElementById("size");
  const custom = document.getElementById("custom-size");
  const sync = () => { custom.hidden = size.value !== "custom"; };
  size.addEventListener("change", sync);
  sync();
}

const pages = { batches: batchesPage, batch: batchPage, job: jobPage, workers: workersPage,
  queues: queuesPage, submit: submitPage };
// The server renders the bars' parts with data-width (the CSP allows no inline style).
for (const part of document.querySelectorAll(".statebar .part[data-width]")) {
  part.style.width = `${part.dataset.width}%`;
}
(pages[body.dataset.page] || (() => {}))();
