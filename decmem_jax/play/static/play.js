// The play page: sends the held keys, plays the streamed frames back at the clip's frame rate, shows the stats and
// the SGM retrieval strip. All state lives on the server; this page only draws what it is sent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  keymap: {}, held: new Set(), queue: [], fps: 10, shown: 0, chunks: 0, frames: 0, seconds: 0, timer: null,
};
const ws = new WebSocket(`ws://${location.host}/ws`);

function setState(name, message) {
  document.body.dataset.state = name;
  if (message !== undefined) $("status").textContent = message;
}

function draw(canvas, url) {
  const img = new Image();
  img.onload = () => {
    const ctx = canvas.getContext("2d");
    if (canvas.width !== img.width) { canvas.width = img.width; canvas.height = img.height; }
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0);
  };
  img.src = url;
}

// Playback at the video's frame rate; when generation runs ahead (or the tab was hidden), skip to stay near live.
function tick() {
  if (state.queue.length === 0) return;
  const skip = Math.max(0, state.queue.length - 2 * 16);
  state.queue.splice(0, skip);
  const [model, truth] = state.queue.shift();
  draw($("model"), model);
  draw($("truth"), truth);
  state.shown += 1 + skip;
  $("frames-shown").textContent = state.shown;
}

function sendKeys(pressed) {
  if (ws.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify({ type: "keys", held: [...state.held], pressed: pressed || null }));
  for (const el of document.querySelectorAll("#keys span")) el.classList.toggle("on", state.held.has(el.dataset.code));
}

document.addEventListener("keydown", (e) => {
  if (!(e.code in state.keymap)) return;  // unknown keys are ignored (the server ignores them too)
  e.preventDefault();  // arrows and space would scroll the page
  if (e.repeat || state.held.has(e.code)) return;
  state.held.add(e.code);
  sendKeys(e.code);
});
document.addEventListener("keyup", (e) => {
  if (!state.held.delete(e.code)) return;
  e.preventDefault();
  sendKeys(null);
});
window.addEventListener("blur", () => { state.held.clear(); sendKeys(null); });  // no key stays stuck down
$("restart").addEventListener("click", () => {
  ws.send(JSON.stringify({ type: "restart" }));
  state.queue = [];
  $("restart").blur();
});

function drawStrip(shares, contextLatents) {
  const strip = $("strip");
  const n = Math.max(shares.length, 1);
  strip.width = n;
  const ctx = strip.getContext("2d");
  const max = Math.max(...shares, 1e-6);
  shares.forEach((s, i) => {
    const v = Math.round(255 * s / max);
    // context latents in blue-ish, generated ones in orange-ish, brightness = share of the chunk's SGM picks
    ctx.fillStyle = i < contextLatents ? `rgb(${v >> 2},${v >> 1},${v})` : `rgb(${v},${v >> 1},${v >> 3})`;
    ctx.fillRect(i, 0, 1, 1);
  });
}

function showTop(top) {
  const box = $("top");
  box.replaceChildren();
  for (const t of top) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = t.frame;
    const cap = document.createElement("figcaption");
    cap.textContent = `latent ${t.latent} (frame ${4 * t.latent}): ${(100 * t.share).toFixed(0)}%`;
    fig.append(img, cap);
    box.append(fig);
  }
}

ws.onmessage = (event) => {
  const msg = JSON.parse(event.data);
  switch (msg.type) {
    case "hello": {
      state.keymap = msg.keymap;
      state.fps = msg.settings.fps || 10;
      const s = msg.settings;
      $("settings").textContent = `${s.size[0]}x${s.size[1]}, ${s.steps} ${s.solver} steps, ` +
        (s.cfg ? `action CFG ${s.guidance}` : "no CFG") + ` (${s.weights})`;
      clearInterval(state.timer);
      state.timer = setInterval(tick, 1000 / state.fps);
      break;
    }
    case "status": setState(document.body.dataset.state === "connecting" ? "loading" : document.body.dataset.state,
                            msg.message); break;
    case "context":
      draw($("model"), msg.frame); draw($("truth"), msg.truth);
      state.chunks = 0; state.frames = 0; state.seconds = 0; state.queue = [];
      $("chunks").textContent = "0"; $("chunks-left").textContent = msg.chunks_left;
      drawStrip([], 0); showTop([]);
      setState("ready");
      break;
    case "frames":
      setState("generating", `generating chunk ${msg.chunk}...`);
      msg.frames.forEach((f, i) => state.queue.push([f, msg.truth[i]]));
      break;
    case "chunk":
      state.chunks += 1; state.frames += msg.frames; state.seconds += msg.seconds;
      $("fps").textContent = msg.fps.toFixed(1);
      $("chunk-time").textContent = `${msg.seconds.toFixed(2)} s / ${msg.frames} frames`;
      $("avg-fps").textContent = `${(state.frames / state.seconds).toFixed(1)} frames/s`;
      $("chunks").textContent = state.chunks;
      $("chunks-left").textContent = msg.chunks_left;
      $("controls").textContent = msg.controls.join(", ");
      if (msg.retrieval) { drawStrip(msg.retrieval, msg.context_latents); showTop(msg.top); }
      setState("ready", `chunk ${msg.chunk} done in ${msg.seconds.toFixed(2)} s`);
      break;
    case "full": setState("ready", msg.message); break;
    case "busy": $("overlay-text").textContent = msg.message; setState("busy", msg.message); break;
    case "error": $("overlay-text").textContent = msg.message; setState("error", msg.message); break;
  }
};
ws.onclose = () => {
  if (document.body.dataset.state !== "busy" && document.body.dataset.state !== "error") {
    $("overlay-text").textContent = "The play server closed the connection (stopped?). Restart it and reload.";
    setState("error", "disconnected");
  }
};
