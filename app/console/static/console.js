// The operator console: plain JavaScript, no build step, nothing loaded from elsewhere.
// It reads GET /admin/events (Server-Sent Events) and acts through the admin API with the
// session cookie and the CSRF token the sign-in answered.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = {
  csrf: null,
  meta: { personas: [], modes: [], voices: {} },
  calls: new Map(), // sid -> {summary, transcript, tools, latencies, steers, ended}
  view: null,
  sid: null,
  events: null,
  listen: null,
  test: null,
};
// Read by the browser tests: the loudest sample each audio graph has carried.
window.consoleAudio = { listenPeak: 0, testPeak: 0, sentFrames: 0, testBytes: 0 };

// -- HTTP --------------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await resp.json(); } catch (_) { data = null; }
  if (resp.status === 401 && path !== "/console/session") showSignIn();
  return { status: resp.status, data };
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child);
  return node;
}

// -- sign-in -----------------------------------------------------------------------------

function showSignIn(message = "") {
  state.csrf = null;
  if (state.events) { state.events.close(); state.events = null; }
  $("#app").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message;
  $("#token").focus();
}

async function signedIn(csrf) {
  state.csrf = csrf;
  $("#signin").hidden = true;
  $("#app").hidden = false;
  const meta = await api("GET", "/console/meta");
  if (meta.status === 200) state.meta = meta.data;
  fillSelect($("#mode-select"), state.meta.modes);
  fillSelect($("#test-persona"), state.meta.personas);
  fillSelect($("#test-mode"), state.meta.modes);
  connectEvents();
  route();
}

function fillSelect(select, values, keepFirst = false) {
  const first = keepFirst ? select.options[0] : null;
  select.replaceChildren(...(first ? [first] : []), ...values.map((v) => el("option", { value: v, textContent: v })));
}

$("#signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const resp = await api("POST", "/console/session", { token: $("#token").value });
  $("#token").value = "";
  if (resp.status === 200) signedIn(resp.data.csrf);
  else $("#signin-error").textContent = resp.status === 401 ? "Wrong token." : `Refused (${resp.status}).`;
});

$("#signout").addEventListener("click", async () => {
  await api("DELETE", "/console/session");
  showSignIn();
});

// -- the event stream --------------------------------------------------------------------

function callState(sid) {
  if (!state.calls.has(sid)) {
    state.calls.set(sid, { summary: { call_sid: sid, barge_ins: 0 }, transcript: [], tools: [],
      latencies: [], steers: [], ended: null, detailed: false });
  }
  return state.calls.get(sid);
}

function connectEvents() {
  const source = new EventSource("/admin/events");
  state.events = source;
  source.onopen = () => { $("#stream-state").textContent = "live"; };
  source.onerror = () => { $("#stream-state").textContent = "reconnecting…"; };
  source.onmessage = (msg) => onEvent(JSON.parse(msg.data));
}

function onEvent(event) {
  const d = event.data;
  if (event.type === "snapshot") {
    const live = new Set(d.calls.map((c) => c.call_sid));
    for (const [sid, call] of state.calls) if (!live.has(sid) && !call.ended) state.calls.delete(sid);
    for (const summary of d.calls) Object.assign(callState(summary.call_sid).summary, summary);
    renderLive();
    if (state.view === "call") renderCall();
    return;
  }
  const call = callState(event.call_sid);
  const s = call.summary;
  switch (event.type) {
    case "call.started":
      Object.assign(s, { persona: d.persona, mode: d.mode, voice: d.voice, from: d.from,
        to: d.to, started_at: d.started_at, engine_state: "starting", instance: event.instance });
      break;
    case "call.ended": call.ended = d.outcome; break;
    case "call.turn":
      call.transcript.push({ role: d.role, text: d.text, interrupted: d.interrupted });
      s.engine_state = d.role === "caller" ? "responding" : "listening";
      break;
    case "call.barge_in": s.barge_ins = (s.barge_ins || 0) + 1; break;
    case "call.tool": call.tools.push(d); break;
    case "call.steer": {
      // A steer's later state replaces its pending line (events carry no steer id).
      const open = call.steers.find((x) => x.state === "pending" && x.kind === d.kind && x.detail === d.detail);
      if (open && d.state !== "pending") open.state = d.state; else call.steers.push({ ...d });
      break;
    }
    case "call.engine_switched": s.mode = d.new; break;
    case "call.latency":
      call.latencies.push(d);
      if (d.span === "first_audio_sent") s.last_turn_latency_ms = d.ms;
      break;
    default: break;
  }
  renderLive();
  if (state.view === "call" && state.sid === event.call_sid) renderCall();
}

// -- views -------------------------------------------------------------------------------

function route() {
  const [, view = "live", sid = null] = location.hash.split("/");
  if (state.listen && (view !== "call" || sid !== state.sid)) stopListening();
  state.view = view; state.sid = sid;
  for (const section of document.querySelectorAll(".view")) section.hidden = true;
  if (view === "call" && sid) { $("#view-call").hidden = false; openCall(sid); }
  else if (view === "past" && sid) { $("#view-past-call").hidden = false; openPastCall(sid); }
  else if (view === "past") { $("#view-past").hidden = false; loadPast(); }
  else if (view === "test") { $("#view-test").hidden = false; }
  else { state.view = "live"; $("#view-live").hidden = false; renderLive(); }
}
window.addEventListener("hashchange", () => { if (state.csrf) route(); });

function since(iso) {
  if (!iso) return "";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function renderLive() {
  const live = [...state.calls.values()].filter((c) => !c.ended);
  $("#live-empty").hidden = live.length > 0;
  $("#live-calls tbody").replaceChildren(...live.map((c) => {
    const s = c.summary;
    const row = el("tr", { "data-sid": s.call_sid },
      el("td", {}, el("a", { href: `#/call/${s.call_sid}`, textContent: s.call_sid })),
      el("td", { textContent: s.from || "" }),
      el("td", { textContent: s.persona || "" }),
      el("td", { textContent: s.mode || "" }),
      el("td", { textContent: s.engine_state || "" }),
      el("td", { class: "duration", textContent: since(s.started_at) }),
      el("td", { textContent: s.last_turn_latency_ms == null ? "–" : `${Math.round(s.last_turn_latency_ms)} ms` }),
      el("td", { textContent: String(s.barge_ins || 0) }));
    row.addEventListener("click", () => { location.hash = `#/call/${s.call_sid}`; });
    return row;
  }));
}
setInterval(() => { if (state.view === "live") renderLive(); }, 1000);
// What an engine is doing (listening, responding, speaking...) changes too often for
// events: the live list asks the registry every few seconds.
setInterval(async () => {
  if (!state.csrf || state.view !== "live") return;
  const resp = await api("GET", "/admin/calls");
  if (resp.status !== 200) return;
  for (const summary of resp.data.calls) {
    const call = state.calls.get(summary.call_sid);
    if (call && !call.ended) Object.assign(call.summary, summary);
  }
  renderLive();
}, 3000);

async function openCall(sid) {
  $("#call-sid").textContent = sid;
  for (const out of document.querySelectorAll("#view-call output")) out.textContent = "";
  const call = callState(sid);
  if (!call.detailed && !call.ended) {
    const resp = await api("GET", `/admin/calls/${sid}`);
    if (resp.status === 200) {
      const { transcript = [], steering = [], tools = [], ...summary } = resp.data;
      Object.assign(call.summary, summary);
      // Events that came before the detail are in it too: the detail wins.
      call.transcript = transcript.map((t) => ({ ...t }));
      call.steers = steering.map((s) => ({ kind: s.voice ? "voice" : "instructions",
        detail: s.instructions || s.voice, state: s.state }));
      call.tools = tools.map((t) => ({ name: t.name, arguments: t.arguments, outcome: t.outcome || t.status, latency_ms: t.latency_ms }));
      call.detailed = true;
    }
  }
  fillSelect($("#steer-voice"), state.meta.voices[call.summary.mode] || [], true);
  renderCall();
}

function turnItem(role, text, interrupted) {
  return el("li", { class: `turn ${role}${interrupted ? " interrupted" : ""}` },
    el("span", { class: "who", textContent: role }), el("span", { class: "text", textContent: text }));
}

function renderCall() {
  const call = callState(state.sid);
  const s = call.summary;
  $("#call-status").textContent = call.ended ? `ended: ${call.ended}` : (s.engine_state || "live");
  $("#call-status").className = call.ended ? "badge ended" : "badge";
  $("#call-facts").textContent = [s.persona && `persona ${s.persona}`, s.mode && `engine ${s.mode}`,
    s.voice && `voice ${s.voice}`, s.from && `from ${s.from}`, `barge-ins ${s.barge_ins || 0}`,
    s.instance && `on ${s.instance}`].filter(Boolean).join(" · ");
  const list = $("#transcript");
  const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 20;
  list.replaceChildren(...call.transcript.map((t) => turnItem(t.role, t.text, t.interrupted)));
  if (stick) list.scrollTop = list.scrollHeight;
  $("#tools").replaceChildren(...call.tools.map((t) => el("li", {
    textContent: `${t.name}(${JSON.stringify(t.arguments)}) → ${t.outcome}, ${Math.round(t.latency_ms)} ms` })));
  $("#steers").replaceChildren(...call.steers.map((t) => el("li", {
    textContent: `${t.kind}: ${t.detail} — ${t.state}` })));
  $("#latencies").replaceChildren(...call.latencies.map((l) => el("li", {
    textContent: `${l.span}: ${Math.round(l.ms)}` })));
}

function showResult(output, resp) {
  const ok = resp.status >= 200 && resp.status < 300;
  output.className = ok ? "" : "failed";
  const d = resp.data || {};
  output.textContent = ok ? `${resp.status} ${d.state || d.status || d.mode || "ok"}`
    : `${resp.status} ${d.error || "failed"}`;
}

$("#steer-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = {};
  const instructions = $("#steer-instructions").value.trim();
  if (instructions) body.instructions = instructions;
  if ($("#steer-voice").value) body.voice = $("#steer-voice").value;
  const resp = await api("POST", `/admin/calls/${state.sid}/steer`, body);
  showResult($("#steer-result"), resp);
});
$("#mode-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showResult($("#mode-result"), await api("POST", `/admin/calls/${state.sid}/mode`, { mode: $("#mode-select").value }));
});
$("#transfer-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showResult($("#transfer-result"), await api("POST", `/admin/calls/${state.sid}/transfer`, { to: $("#transfer-to").value }));
});
$("#hangup").addEventListener("click", async () => {
  showResult($("#hangup-result"), await api("POST", `/admin/calls/${state.sid}/hangup`));
});

// -- past calls --------------------------------------------------------------------------

async function loadPast() {
  const resp = await api("GET", "/console/archive");
  if (resp.status !== 200) return;
  $("#past-calls tbody").replaceChildren(...resp.data.calls.map((c) => {
    const row = el("tr", { "data-id": c.id },
      el("td", { textContent: (c.started_at || "").replace("T", " ").slice(0, 19) }),
      el("td", {}, el("a", { href: `#/past/${c.id}`, textContent: c.call_sid || c.id })),
      el("td", { textContent: c.from || "" }),
      el("td", { textContent: c.persona || "" }),
      el("td", { textContent: c.duration_s == null ? "" : `${c.duration_s} s` }),
      el("td", { textContent: c.outcome || "in progress" }));
    row.addEventListener("click", () => { location.hash = `#/past/${c.id}`; });
    return row;
  }));
}

async function openPastCall(id) {
  $("#past-sid").textContent = id;
  $("#recording").src = `/console/archive/${id}/recording.wav`;
  const resp = await api("GET", `/console/archive/${id}`);
  if (resp.status !== 200) return;
  const turns = (resp.data.transcript && resp.data.transcript.turns) || [];
  $("#past-transcript").replaceChildren(...turns.map((t) => turnItem(t.speaker,
    t.speaker === "tool" ? `${t.name}(${JSON.stringify(t.arguments)}) → ${t.outcome}` : t.text, t.interrupted)));
  const r = resp.data.record || {};
  const latency = (r.latency || []).map((l) => Object.entries(l.spans || {})
    .map(([k, v]) => `${k} ${Math.round(v)}`).join(", ")).join(" | ");
  const facts = [
    ["From", r.from], ["To", r.to], ["Persona", r.persona], ["Voice", r.voice],
    ["Started", r.started_at], ["Duration", r.duration_s == null ? "" : `${r.duration_s} s`],
    ["Outcome", r.outcome], ["Engine", r.mode ? `${r.mode.initial} → ${r.mode.final}` : ""],
    ["Engine switches", (r.engine_switches || []).map((s) => `${s.old || s.from} → ${s.new || s.to} (${s.reason})`).join("; ") || "none"],
    ["Barge-ins", String((r.barge_ins || []).length)],
    ["Tool calls", (r.tool_calls || r.tools || []).map((t) => `${t.name}: ${t.outcome}`).join("; ") || "none"],
    ["Steering", (r.steering || []).map((s) => `${s.kind || ""} ${s.detail || ""} ${s.state || ""}`).join("; ") || "none"],
    ["Latency (ms)", latency || "none"],
  ];
  $("#past-record").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v || "" })]));
}

// -- audio -------------------------------------------------------------------------------

const ULAW = new Float32Array(256);
for (let i = 0; i < 256; i++) {
  const u = ~i & 0xff;
  const magnitude = ((((u & 0x0f) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84;
  ULAW[i] = (u & 0x80 ? -magnitude : magnitude) / 32768;
}

function ulawDecode(bytes) {
  const out = new Float32Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = ULAW[bytes[i]];
  return out;
}

function ulawEncode(sample) { // a float in [-1, 1]
  let s = Math.max(-32635, Math.min(32635, Math.round(sample * 32767)));
  const sign = s < 0 ? 0x80 : 0;
  if (sign) s = -s;
  s += 0x84;
  let exponent = 7;
  for (let mask = 0x4000; (s & mask) === 0 && exponent > 0; exponent--, mask >>= 1);
  return ~(sign | (exponent << 4) | ((s >> (exponent + 3)) & 0x0f)) & 0xff;
}

// Plays 8 kHz chunks back to back; listen-in never falls more than MAX_BEHIND_S behind
// (a test call's audio is paced by the service, like a phone line's: none is dropped).
const MAX_BEHIND_S = 0.5;
class Player {
  constructor(ctx, destination, maxBehind = MAX_BEHIND_S) {
    this.ctx = ctx; this.destination = destination; this.maxBehind = maxBehind; this.at = 0; this.sources = new Set();
  }
  play(samples) {
    const now = this.ctx.currentTime;
    if (this.at < now + 0.04) this.at = now + 0.04;
    if (this.at > now + this.maxBehind) return this.at; // too far behind: drop, catch up
    const buffer = this.ctx.createBuffer(1, samples.length, 8000);
    buffer.copyToChannel(samples, 0);
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.destination);
    source.start(this.at);
    source.onended = () => this.sources.delete(source);
    this.sources.add(source);
    this.at += buffer.duration;
    return this.at;
  }
  clear() { for (const s of this.sources) s.stop(); this.sources.clear(); this.at = 0; }
}

function meter(ctx, node, key) {
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 2048;
  node.connect(analyser);
  const data = new Float32Array(analyser.fftSize);
  const timer = setInterval(() => {
    analyser.getFloatTimeDomainData(data);
    let peak = 0;
    for (const v of data) peak = Math.max(peak, Math.abs(v));
    window.consoleAudio[key] = Math.max(window.consoleAudio[key], peak);
  }, 50);
  return () => clearInterval(timer);
}

function socketUrl(path, params) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  return url.toString();
}

// -- listen-in ---------------------------------------------------------------------------

function stopListening() {
  const l = state.listen;
  if (!l) return;
  state.listen = null;
  l.ws.close(); l.stopMeter(); l.ctx.close();
  $("#listen").textContent = "Listen in";
  $("#listen-state").textContent = "";
}

$("#listen").addEventListener("click", () => {
  if (state.listen) { stopListening(); return; }
  const ctx = new AudioContext();
  const mix = ctx.createGain();
  mix.connect(ctx.destination);
  const gains = [ctx.createGain(), ctx.createGain()];
  gains.forEach((g) => g.connect(mix));
  const players = gains.map((g) => new Player(ctx, g));
  const ws = new WebSocket(socketUrl(`/admin/calls/${state.sid}/listen`, { csrf: state.csrf }));
  ws.binaryType = "arraybuffer";
  const l = { ctx, ws, gains, stopMeter: meter(ctx, mix, "listenPeak") };
  state.listen = l;
  applyMutes();
  ws.onopen = () => { $("#listen-state").textContent = "listening"; };
  ws.onclose = () => { if (state.listen === l) { $("#listen-state").textContent = "stopped"; } };
  ws.onmessage = (msg) => {
    if (typeof msg.data === "string") {
      const control = JSON.parse(msg.data);
      if (control.event === "clear") players[1].clear();
      return;
    }
    const bytes = new Uint8Array(msg.data);
    players[bytes[0] === 1 ? 1 : 0].play(ulawDecode(bytes.subarray(1)));
  };
  $("#listen").textContent = "Stop listening";
});

function applyMutes() {
  if (!state.listen) return;
  state.listen.gains[0].gain.value = $("#mute-caller").checked ? 0 : 1;
  state.listen.gains[1].gain.value = $("#mute-agent").checked ? 0 : 1;
}
$("#mute-caller").addEventListener("change", applyMutes);
$("#mute-agent").addEventListener("change", applyMutes);

// -- a test call from this browser -------------------------------------------------------

function b64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

async function startTestCall() {
  const media = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
  const ctx = new AudioContext();
  const out = ctx.createGain();
  out.connect(ctx.destination);
  const player = new Player(ctx, out, Infinity);
  const ws = new WebSocket(socketUrl("/console/call", {
    csrf: state.csrf, persona: $("#test-persona").value, mode: $("#test-mode").value }));
  const t = { ctx, ws, media, player, stopMeter: meter(ctx, out, "testPeak"), streamSid: null, seq: 0, chunk: 0, marks: [] };
  state.test = t;
  const send = (msg) => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ ...msg, sequenceNumber: String(++t.seq), streamSid: t.streamSid })); };
  // Echo each mark once the audio before it has played, as Twilio does.
  const echoMark = (name) => send({ event: "mark", mark: { name } });
  ws.onmessage = (msg) => {
    const m = JSON.parse(msg.data);
    if (m.event === "console.started") {
      t.streamSid = m.streamSid;
      $("#test-state").textContent = `on call ${m.callSid}`;
      $("#test-call-link").href = `#/call/${m.callSid}`;
      $("#test-call-link").hidden = false;
    } else if (m.event === "media") {
      const bytes = Uint8Array.from(atob(m.media.payload), (c) => c.charCodeAt(0));
      player.play(ulawDecode(bytes));
      window.consoleAudio.testBytes += bytes.length;
    } else if (m.event === "mark") {
      const delay = Math.max(0, (player.at - ctx.currentTime) * 1000);
      const timer = setTimeout(() => { t.marks = t.marks.filter((x) => x.timer !== timer); echoMark(m.mark.name); }, delay);
      t.marks.push({ timer, name: m.mark.name });
    } else if (m.event === "clear") {
      player.clear();
      for (const x of t.marks) { clearTimeout(x.timer); echoMark(x.name); }
      t.marks = [];
    }
  };
  ws.onclose = () => endTestCall("ended");
  // The microphone, low-passed and decimated to 8 kHz, as 20 ms mu-law frames.
  const source = ctx.createMediaStreamSource(media);
  const processor = ctx.createScriptProcessor(2048, 1, 1);
  const step = ctx.sampleRate / 8000;
  let position = 0, sum = 0, count = 0;
  let frame = [];
  const started = performance.now();
  processor.onaudioprocess = (e) => {
    const input = e.inputBuffer.getChannelData(0);
    for (let i = 0; i < input.length; i++) {
      sum += input[i]; count++;
      position += 1;
      if (position >= step) {
        position -= step;
        frame.push(ulawEncode(sum / count));
        sum = 0; count = 0;
        if (frame.length === 160) {
          if (t.streamSid) {
            t.chunk++;
            send({ event: "media", media: { track: "inbound", chunk: String(t.chunk),
              timestamp: String(Math.round(performance.now() - started)), payload: b64(frame) } });
            window.consoleAudio.sentFrames++;
          }
          frame = [];
        }
      }
    }
  };
  const sink = ctx.createGain();
  sink.gain.value = 0;
  source.connect(processor);
  processor.connect(sink);
  sink.connect(ctx.destination);
  t.processor = processor;
  $("#test-start").disabled = true;
  $("#test-stop").disabled = false;
  $("#test-state").textContent = "connecting…";
}

function endTestCall(why) {
  const t = state.test;
  if (!t) return;
  state.test = null;
  if (t.ws.readyState === WebSocket.OPEN) {
    t.ws.send(JSON.stringify({ event: "stop", streamSid: t.streamSid, sequenceNumber: String(++t.seq) }));
    t.ws.close();
  }
  t.processor && t.processor.disconnect();
  t.media.getTracks().forEach((track) => track.stop());
  t.stopMeter();
  setTimeout(() => t.ctx.close(), 1000);
  $("#test-start").disabled = false;
  $("#test-stop").disabled = true;
  $("#test-state").textContent = why;
}

$("#test-form").addEventListener("submit", (e) => {
  e.preventDefault();
  startTestCall().catch((err) => { $("#test-state").textContent = `microphone: ${err.message}`; endTestCall(`failed: ${err.message}`); });
});
$("#test-stop").addEventListener("click", () => endTestCall("hung up"));

// -- start -------------------------------------------------------------------------------

(async () => {
  const resp = await api("GET", "/console/session");
  if (resp.status === 200) signedIn(resp.data.csrf);
  else showSignIn();
})();
