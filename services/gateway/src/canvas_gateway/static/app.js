// The live canvas page: sign in with a token, ask for a drawing, watch it appear.
//
// REST (same origin) for everything that changes or reads state; the notifier's
// WebSocket (another port, from /config.json) for what happens meanwhile. Frames carry
// a global position: the page remembers the last one and reconnects with ?after=, so a
// dropped connection misses nothing. Drawing: each ai_generation_progress frame draws
// one object at once (provisional, keyed by job and index); when the job completes the
// canvas's objects are read back and replace the provisional ones, so the page works
// whether or not the generator streams. Text from users and the model only ever goes
// through textContent and setAttribute, never through HTML parsing.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const TOKEN_KEY = "canvas-jobs.token";
  const CANVAS_KEY = "canvas-jobs.canvas";
  const CANVAS_ID = /^[A-Za-z0-9_\-.:]{1,128}$/;
  const COLOUR = /^#[0-9a-fA-F]{6}$/;
  const ACTIVE = new Set(["queued", "processing", "retry_scheduled"]);
  const RETRYABLE = new Set(["failed", "cancelled"]); // final, and worth a Retry button
  // Reconnect delays: 0.5 s doubling to 10 s, each shortened by up to half at random so
  // that many pages cut off by one notifier restart do not all come back at once.
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const JOBS_REFRESH_MS = 250; // frames come in bursts: one list refresh per burst
  const MIN_VIEW = { x: 0, y: 0, width: 1000, height: 700 };
  const VIEW_MARGIN = 40;

  const $ = (id) => document.getElementById(id);
  const ui = {
    connection: $("connection"),
    user: $("user"),
    signOut: $("sign-out"),
    signIn: $("sign-in"),
    signInForm: $("sign-in-form"),
    token: $("token"),
    signInError: $("sign-in-error"),
    workspace: $("workspace"),
    form: $("prompt-form"),
    query: $("query"),
    canvasId: $("canvas-id"),
    priority: $("priority"),
    submit: $("submit"),
    newCanvas: $("new-canvas"),
    formError: $("form-error"),
    usage: $("usage"),
    currentJob: $("current-job"),
    jobs: $("jobs"),
    refreshJobs: $("refresh-jobs"),
    canvasLabel: $("canvas-label"),
    canvasInfo: $("canvas-info"),
    svg: $("canvas"),
    defs: $("defs"),
    objects: $("objects"),
  };

  const state = {
    token: null,
    config: null,
    socket: null,
    reconnectTimer: null,
    attempts: 0, // failed connection attempts in a row
    lastPosition: null, // the highest frame position seen; null until the first frame
    canvasId: null, // the canvas on the board; null: a new one is made at the next submit
    jobs: new Map(), // job id → job (as the jobs API shapes it)
    currentJobId: null,
    drawn: new Map(), // key → <g>: "o:<object id>" (on the canvas) or "p:<job>:<index>" (provisional)
    partial: new Map(), // job id → {attempt, keys: Set}: provisional objects of its running attempt
    jobsTimer: null,
    canvasLoad: 0, // increases with each canvas load: a late answer for another canvas is dropped
    // A canvas this page named itself and no job has completed on yet: nothing to read
    // back (asking would only answer 404).
    freshCanvas: false,
    canvasNote: "", // why the board is empty, when it is
  };

  // -- helpers --------------------------------------------------------------------------

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs = {}) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    return node;
  }

  function num(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  function colour(value, fallback) {
    return typeof value === "string" && COLOUR.test(value) ? value : fallback;
  }

  function shortId(id) {
    return String(id).slice(0, 8);
  }

  function randomId() {
    // crypto.randomUUID exists only in secure contexts (https, localhost); a page opened
    // at http://<lan address>:8000/ still needs a canvas id.
    if (crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function tokenClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    } catch {
      return null;
    }
  }

  function setConnection(kind, text) {
    ui.connection.dataset.state = kind;
    ui.connection.textContent = text;
  }

  function describeError(status, body) {
    const detail = body && body.detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("\n");
    }
    if (typeof detail === "string") return detail;
    return `HTTP ${status}`;
  }

  class ApiError extends Error {
    constructor(status, body, retryAfter) {
      super(describeError(status, body));
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const answer = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try {
      data = await answer.json();
    } catch {
      data = null;
    }
    if (answer.status === 401 && state.token) {
      signOut("the gateway rejected the token: sign in again");
    }
    if (!answer.ok) throw new ApiError(answer.status, data, answer.headers.get("Retry-After"));
    return data;
  }

  // -- signing in -----------------------------------------------------------------------

  async function signIn(token) {
    state.token = token;
    try {
      await api("GET", "/api/ai-agent/jobs?limit=1");
    } catch (error) {
      state.token = null;
      // Only a 401 says the token is bad (api() then forgot it); anything else says the
      // gateway cannot answer now, and a saved token stays for the next load.
      ui.signInError.textContent =
        error instanceof ApiError && error.status === 401
          ? "That token was not accepted (expired, or signed with another JWT_SECRET)."
          : `Cannot check the token now: ${error.message}`;
      return false;
    }
    localStorage.setItem(TOKEN_KEY, token);
    const claims = tokenClaims(token);
    ui.user.textContent = claims && claims.sub ? `signed in as ${claims.sub}` : "";
    ui.signIn.hidden = true;
    ui.workspace.hidden = false;
    ui.signOut.hidden = false;
    ui.signInError.textContent = "";
    const saved = localStorage.getItem(CANVAS_KEY);
    openCanvas(saved && CANVAS_ID.test(saved) ? saved : null);
    connect();
    refreshUsage();
    document.dispatchEvent(new CustomEvent("canvas-jobs:signed-in", { detail: { claims } }));
    return true;
  }

  function signOut(reason) {
    state.token = null;
    localStorage.removeItem(TOKEN_KEY);
    clearTimeout(state.reconnectTimer);
    if (state.socket) {
      const socket = state.socket;
      state.socket = null;
      socket.close(1000, "signed out");
    }
    state.lastPosition = null;
    state.attempts = 0;
    state.jobs.clear();
    state.currentJobId = null;
    ui.jobs.replaceChildren();
    renderCurrentJob();
    clearBoard();
    ui.workspace.hidden = true;
    ui.signOut.hidden = true;
    ui.signIn.hidden = false;
    ui.user.textContent = "";
    ui.usage.textContent = "";
    ui.signInError.textContent = reason || "";
    setConnection("signed-out", "signed out");
    document.dispatchEvent(new CustomEvent("canvas-jobs:signed-out"));
  }

  // -- the WebSocket --------------------------------------------------------------------

  function connect() {
    clearTimeout(state.reconnectTimer);
    if (!state.token || !state.config) return;
    let url = `${state.config.notifier_url}?token=${encodeURIComponent(state.token)}`;
    const resumed = state.lastPosition !== null;
    if (resumed) url += `&after=${state.lastPosition}`;
    setConnection("connecting", state.attempts ? "reconnecting…" : "connecting…");
    const socket = new WebSocket(url);
    state.socket = socket;
    socket.addEventListener("open", () => {
      if (state.socket !== socket) return;
      state.attempts = 0;
      setConnection("live", "live");
      ui.connection.dataset.after = resumed ? String(state.lastPosition) : "";
      refreshJobs();
      // Without a position the notifier starts from now: what happened while no socket
      // was open (or before this page loaded) is read back from the REST API instead.
      if (!resumed) reloadCanvas();
    });
    socket.addEventListener("message", (message) => {
      if (state.socket !== socket) return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      handleFrame(frame);
    });
    socket.addEventListener("close", (event) => {
      if (state.socket !== socket) return; // replaced, or signed out
      state.socket = null;
      if (event.code === 4401) {
        signOut("the notifier rejected the token (expired?): sign in again");
        return;
      }
      if (event.code === 4400) state.lastPosition = null; // an `after` it refused: start over
      scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** state.attempts);
    const delay = Math.round(ceiling * (0.5 + Math.random() / 2));
    state.attempts += 1;
    setConnection("offline", `offline: reconnecting in ${(delay / 1000).toFixed(1)} s`);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  // -- frames ---------------------------------------------------------------------------

  function handleFrame(frame) {
    if (typeof frame.position !== "number" || typeof frame.job_id !== "string") {
      if (frame.type === "error") console.warn("notifier:", frame.detail);
      return; // control frames (subscribed, error) carry no position
    }
    // Positions only grow; one at or below the last seen was handled already.
    if (state.lastPosition !== null && frame.position <= state.lastPosition) return;
    state.lastPosition = frame.position;
    ui.connection.dataset.position = String(frame.position); // for people and tests to see
    const data = frame.data || {};
    const job = state.jobs.get(frame.job_id) || {
      id: frame.job_id,
      canvas_id: frame.canvas_id,
      status: "queued",
      created_at: frame.occurred_at,
      error_message: null,
      result: null,
    };
    state.jobs.set(frame.job_id, job);
    const here = frame.canvas_id === state.canvasId;
    switch (frame.type) {
      case "ai_job_queued":
        job.status = "queued";
        break;
      case "ai_generation_started":
        job.status = "processing";
        job.error_message = null;
        if (here) startRun(frame.job_id, runOf(data));
        break;
      case "ai_generation_progress":
        job.status = "processing";
        if (here) drawProvisional(frame.job_id, data);
        break;
      case "ai_generation_completed":
        job.status = "completed";
        job.result = data;
        if (here) {
          state.freshCanvas = false;
          reloadCanvas();
        }
        refreshUsage();
        break;
      case "ai_job_error":
        // This attempt's objects never reach the canvas: a retry draws again from its start.
        job.status = data.final ? "failed" : "retry_scheduled";
        job.error_message = data.error || null;
        job.next_attempt_at = data.next_attempt_at || null;
        dropProvisional(frame.job_id);
        break;
      case "ai_job_cancelled":
        job.status = "cancelled";
        dropProvisional(frame.job_id);
        break;
      default:
        return;
    }
    renderJobs();
    scheduleJobsRefresh();
  }

  // -- the board ------------------------------------------------------------------------

  function clearBoard() {
    ui.objects.replaceChildren();
    state.drawn.clear();
    state.partial.clear();
    fitView();
  }

  // fresh: a canvas id this page just made up, which nothing can have drawn on yet.
  function openCanvas(canvasId, { fresh = false } = {}) {
    state.canvasId = canvasId;
    state.freshCanvas = fresh || !canvasId;
    if (canvasId) localStorage.setItem(CANVAS_KEY, canvasId);
    else localStorage.removeItem(CANVAS_KEY);
    ui.canvasId.value = canvasId || "";
    ui.canvasLabel.textContent = canvasId || "(new)";
    state.canvasNote = "";
    // The current job is one of this canvas's: the newest, if the page knows any.
    const current = state.currentJobId && state.jobs.get(state.currentJobId);
    if (!current || current.canvas_id !== canvasId) {
      const mine = sortedJobs().find((job) => job.canvas_id === canvasId);
      state.currentJobId = mine ? mine.id : null;
    }
    clearBoard();
    renderCurrentJob();
    reloadCanvas();
  }

  // What the board head says: what is on the canvas for good, what is being drawn, and
  // why nothing is (new, empty, or not readable now).
  function renderCanvasInfo() {
    const drawn = ui.objects.querySelectorAll('g.obj[data-state="final"]').length;
    const drawing = ui.objects.querySelectorAll('g.obj[data-state="partial"]').length;
    const parts = [];
    if (drawn || !drawing) parts.push(drawn || !state.canvasNote ? `${drawn} objects` : state.canvasNote);
    if (drawing) parts.push(`drawing ${drawing}…`);
    ui.canvasInfo.textContent = parts.join(" · ");
  }

  async function reloadCanvas() {
    const canvasId = state.canvasId;
    const load = ++state.canvasLoad;
    if (state.freshCanvas) {
      state.canvasNote = "new canvas: nothing drawn yet";
      renderCanvasInfo();
      return;
    }
    if (!state.token) return;
    let body;
    try {
      body = await api("GET", `/api/canvas/${encodeURIComponent(canvasId)}/objects`);
    } catch (error) {
      if (load !== state.canvasLoad) return;
      state.canvasNote =
        error.status === 404 ? "empty: your next drawing starts it" : `cannot load: ${error.message}`;
      renderCanvasInfo();
      return;
    }
    if (load !== state.canvasLoad || canvasId !== state.canvasId) return;
    const landed = new Set();
    for (const object of body.objects) {
      landed.add(object.job_id);
      const key = `o:${object.id}`;
      if (state.drawn.has(key)) continue;
      const node = drawObject(object, { jobId: object.job_id, objectId: object.id, partial: false });
      if (node) state.drawn.set(key, node);
    }
    // The canvas now holds these jobs' objects for good: their provisional copies go.
    for (const jobId of landed) dropProvisional(jobId);
    state.canvasNote = "";
    renderCanvasInfo();
    fitView();
    renderCurrentJob();
  }

  // A run of an attempt: a new attempt, or the same attempt run again elsewhere (its
  // generator's connection dropped), draws from its first object again.
  function runOf(data) {
    return data.run_id || data.attempt_id;
  }

  function startRun(jobId, runId) {
    const partial = state.partial.get(jobId);
    if (partial && partial.run !== runId) dropProvisional(jobId);
    if (!state.partial.has(jobId)) state.partial.set(jobId, { run: runId, keys: new Set() });
  }

  function drawProvisional(jobId, data) {
    if (typeof data.index !== "number" || !data.object) return;
    startRun(jobId, runOf(data));
    const key = `p:${jobId}:${data.index}`;
    const old = state.drawn.get(key);
    if (old) old.remove();
    const node = drawObject(data.object, { jobId, index: data.index, partial: true });
    if (!node) return;
    state.drawn.set(key, node);
    state.partial.get(jobId).keys.add(key);
    fitView();
    renderCanvasInfo();
    renderCurrentJob();
  }

  function dropProvisional(jobId) {
    const partial = state.partial.get(jobId);
    if (!partial) return;
    for (const key of partial.keys) {
      const node = state.drawn.get(key);
      if (node) node.remove();
      state.drawn.delete(key);
    }
    state.partial.delete(jobId);
    fitView();
    renderCanvasInfo();
  }

  // One canvas object (docs/api.md, "Canvas route") as an SVG group, appended to the board; null
  // for a shape this page cannot draw (the generator validated it, so: a newer type).
  function drawObject(object, { jobId, objectId, index, partial }) {
    const shape = shapeOf(object);
    if (!shape) return null;
    const group = svg("g", {
      class: "obj",
      "data-type": object.type,
      "data-job-id": jobId,
      "data-state": partial ? "partial" : "final",
    });
    if (objectId !== undefined) group.setAttribute("data-object-id", objectId);
    if (index !== undefined) group.setAttribute("data-index", index);
    const rotation = num(object.rotation);
    if (rotation) group.setAttribute("transform", `rotate(${rotation} ${shape.cx} ${shape.cy})`);
    const title = svg("title");
    title.textContent = typeof object.text === "string" ? `${object.type}: ${object.text}` : object.type;
    group.append(title, ...shape.nodes);
    ui.objects.append(group);
    return group;
  }

  function strokeOf(object, fallback) {
    const width = num(object.stroke_width);
    return {
      stroke: colour(object.stroke, fallback),
      "stroke-width": width !== null && width >= 0 ? width : 2,
    };
  }

  function shapeOf(object) {
    switch (object.type) {
      case "rectangle":
      case "sticky_note":
        return box(object);
      case "circle":
        return circle(object);
      case "text":
        return label(object);
      case "line":
      case "arrow":
        return polyline(object);
      default:
        return null;
    }
  }

  function box(object) {
    const [x, y, width, height] = [num(object.x), num(object.y), num(object.width), num(object.height)];
    if (x === null || y === null || !(width > 0) || !(height > 0)) return null;
    const sticky = object.type === "sticky_note";
    const rect = svg("rect", {
      x,
      y,
      width,
      height,
      rx: sticky ? 3 : 6,
      fill: colour(object.fill, sticky ? "#fff59d" : "#ffffff"),
      ...strokeOf(object, sticky ? "#e6c84f" : "#334155"),
    });
    if (sticky) rect.setAttribute("filter", "url(#shadow)");
    const nodes = [rect];
    if (typeof object.text === "string" && object.text) {
      nodes.push(centredText(object.text, x + width / 2, y + height / 2, width - 12, 14));
    }
    return { nodes, cx: x + width / 2, cy: y + height / 2 };
  }

  function circle(object) {
    const [x, y, radius] = [num(object.x), num(object.y), num(object.radius)];
    if (x === null || y === null || !(radius > 0)) return null;
    const nodes = [
      svg("circle", { cx: x, cy: y, r: radius, fill: colour(object.fill, "#ffffff"), ...strokeOf(object, "#334155") }),
    ];
    if (typeof object.text === "string" && object.text) {
      nodes.push(centredText(object.text, x, y, radius * 1.6, 14));
    }
    return { nodes, cx: x, cy: y };
  }

  function label(object) {
    const [x, y] = [num(object.x), num(object.y)];
    if (x === null || y === null || typeof object.text !== "string") return null;
    const size = num(object.font_size) > 0 ? object.font_size : 16;
    // x, y is the text's top-left corner.
    const text = svg("text", {
      x,
      y,
      "font-size": size,
      "dominant-baseline": "hanging",
      fill: colour(object.fill, "#0f172a"),
    });
    if (COLOUR.test(object.stroke || "")) {
      text.setAttribute("stroke", object.stroke);
      text.setAttribute("stroke-width", num(object.stroke_width) ?? 0.5);
    }
    object.text.split("\n").forEach((line, i) => {
      const span = svg("tspan", { x, dy: i === 0 ? 0 : size * 1.2 });
      span.textContent = line;
      text.append(span);
    });
    return { nodes: [text], cx: x, cy: y };
  }

  function polyline(object) {
    const points = Array.isArray(object.points)
      ? object.points.filter((p) => Array.isArray(p) && num(p[0]) !== null && num(p[1]) !== null)
      : [];
    if (points.length < 2) return null;
    const stroke = strokeOf(object, "#334155");
    const line = svg("polyline", {
      points: points.map((p) => `${p[0]},${p[1]}`).join(" "),
      fill: "none",
      "stroke-linecap": "round",
      "stroke-linejoin": "round",
      ...stroke,
    });
    if (object.type === "arrow") line.setAttribute("marker-end", `url(#${arrowhead(stroke.stroke)})`);
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]);
    const cx = (Math.min(...xs) + Math.max(...xs)) / 2;
    const cy = (Math.min(...ys) + Math.max(...ys)) / 2;
    return { nodes: [line], cx, cy };
  }

  // One marker per arrow colour, so that a head has its line's colour.
  function arrowhead(stroke) {
    const id = `arrowhead-${stroke.slice(1).toLowerCase()}`;
    if (!document.getElementById(id)) {
      const marker = svg("marker", {
        id,
        viewBox: "0 0 10 10",
        refX: 9,
        refY: 5,
        markerWidth: 7,
        markerHeight: 7,
        orient: "auto-start-reverse",
      });
      marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: stroke }));
      ui.defs.append(marker);
    }
    return id;
  }

  // A label centred on (cx, cy), wrapped at word boundaries to about maxWidth pixels.
  function centredText(content, cx, cy, maxWidth, size) {
    const perLine = Math.max(4, Math.floor(maxWidth / (size * 0.56)));
    const lines = [];
    for (const paragraph of content.split("\n")) {
      let line = "";
      for (const word of paragraph.split(/\s+/)) {
        if (line && (line + " " + word).length > perLine) {
          lines.push(line);
          line = word;
        } else {
          line = line ? `${line} ${word}` : word;
        }
      }
      lines.push(line);
    }
    const text = svg("text", {
      x: cx,
      y: cy - ((lines.length - 1) * size * 1.2) / 2,
      "font-size": size,
      "text-anchor": "middle",
      "dominant-baseline": "central",
      fill: "#0f172a",
    });
    lines.forEach((line, i) => {
      const span = svg("tspan", { x: cx, dy: i === 0 ? 0 : size * 1.2 });
      span.textContent = line;
      text.append(span);
    });
    return text;
  }

  // The view shows at least MIN_VIEW and grows to whatever has been drawn.
  function fitView() {
    let { x, y, width, height } = MIN_VIEW;
    if (ui.objects.childElementCount) {
      const box = ui.objects.getBBox();
      const right = Math.max(x + width, box.x + box.width + VIEW_MARGIN);
      const bottom = Math.max(y + height, box.y + box.height + VIEW_MARGIN);
      x = Math.min(x, box.x - VIEW_MARGIN);
      y = Math.min(y, box.y - VIEW_MARGIN);
      width = right - x;
      height = bottom - y;
    }
    ui.svg.setAttribute("viewBox", `${x} ${y} ${width} ${height}`);
  }

  // -- jobs -----------------------------------------------------------------------------

  function scheduleJobsRefresh() {
    if (state.jobsTimer) return;
    state.jobsTimer = setTimeout(() => {
      state.jobsTimer = null;
      refreshJobs();
    }, JOBS_REFRESH_MS);
  }

  async function refreshJobs() {
    if (!state.token) return;
    let body;
    try {
      body = await api("GET", "/api/ai-agent/jobs?limit=20");
    } catch {
      return; // the list stays as the frames left it; the next event tries again
    }
    // The REST answer is at least as new as every frame received before it was asked
    // for: the orchestrator commits a job's row before its event is published.
    for (const job of body.jobs) {
      const known = state.jobs.get(job.id);
      state.jobs.set(job.id, { ...known, ...job });
    }
    renderJobs();
  }

  function sortedJobs() {
    return Array.from(state.jobs.values()).sort((a, b) =>
      String(b.created_at || "").localeCompare(String(a.created_at || "")),
    );
  }

  function renderJobs() {
    const items = sortedJobs()
      .slice(0, 20)
      .map((job) => {
        const li = el("li", { "data-job-id": job.id, "data-status": job.status });
        const head = el("div", { class: "head" });
        head.append(
          el("span", { class: "status", "data-status": job.status }, job.status.replace("_", " ")),
          el("span", { class: "query" }, job.query || `job ${shortId(job.id)}`),
        );
        if (ACTIVE.has(job.status)) head.append(cancelButton(job.id));
        if (RETRYABLE.has(job.status)) head.append(retryButton(job));
        const meta = el("div", { class: "meta" });
        const open = el("button", { type: "button", class: "link" }, `canvas ${shortId(job.canvas_id)}`);
        open.addEventListener("click", () => openCanvas(job.canvas_id));
        meta.append(open);
        const count = job.result ? job.result.object_count : null;
        if (count !== null && count !== undefined) meta.append(` · ${count} objects`);
        if (job.retry_count) meta.append(` · ${job.retry_count} retries`);
        if (job.waiting_for && job.status === "queued") meta.append(` · waiting for ${job.waiting_for}`);
        if (job.created_at) meta.append(` · ${new Date(job.created_at).toLocaleTimeString()}`);
        li.append(head, meta);
        if (job.error_message) li.append(el("div", { class: "job-error" }, job.error_message));
        return li;
      });
    ui.jobs.replaceChildren(...items);
    if (!items.length) ui.jobs.append(el("li", { class: "muted" }, "No jobs yet."));
    renderCurrentJob();
  }

  function cancelButton(jobId) {
    const button = el("button", { type: "button", class: "danger", "data-action": "cancel" }, "Cancel");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api("POST", `/api/ai-agent/job/${encodeURIComponent(jobId)}/cancel`);
      } catch (error) {
        // 409: it ended meanwhile; the refresh shows how.
        if (error.status !== 409) ui.formError.textContent = `Cancel failed: ${error.message}`;
      }
      refreshJobs();
    });
    return button;
  }

  function retryButton(job) {
    const button = el("button", { type: "button", class: "secondary", "data-action": "retry" }, "Retry");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const accepted = await api("POST", `/api/ai-agent/job/${encodeURIComponent(job.id)}/retry`);
        track(accepted, job.query);
        if (accepted.canvas_id !== state.canvasId) openCanvas(accepted.canvas_id);
        state.currentJobId = accepted.job_id;
        renderJobs();
      } catch (error) {
        ui.formError.textContent = `Retry failed: ${error.message}`;
        button.disabled = false;
      }
      scheduleJobsRefresh();
    });
    return button;
  }

  // A job the gateway just accepted, shown at once (the list's refresh fills in the rest).
  function track(accepted, query) {
    const known = state.jobs.get(accepted.job_id);
    if (known) {
      // Its first frame came before the answer: it knew neither prompt nor origin.
      known.query = known.query || query;
      known.retry_of = known.retry_of || accepted.retry_of || null;
      return;
    }
    state.jobs.set(accepted.job_id, {
      id: accepted.job_id,
      canvas_id: accepted.canvas_id,
      query,
      status: "queued",
      created_at: new Date().toISOString(),
      error_message: null,
      result: null,
      retry_of: accepted.retry_of || null,
    });
  }

  function renderCurrentJob() {
    const job = state.currentJobId && state.jobs.get(state.currentJobId);
    if (!job) {
      ui.currentJob.replaceChildren(el("p", { class: "muted" }, "No job yet."));
      return;
    }
    const list = el("dl", { "data-job-id": job.id, "data-status": job.status });
    const row = (name, value) => list.append(el("dt", {}, name), el("dd", {}, value));
    const status = el("dd", {});
    status.append(el("span", { class: "status", "data-status": job.status }, job.status.replace("_", " ")));
    list.append(el("dt", {}, "status"), status);
    row("prompt", job.query || "");
    row("job", job.id);
    const drawn = ui.objects.querySelectorAll(`g.obj[data-job-id="${CSS.escape(job.id)}"]`).length;
    const expected = job.result ? ` of ${job.result.object_count}` : "";
    row("drawn", `${drawn}${expected} objects`);
    if (job.error_message) row("error", job.error_message);
    if (job.next_attempt_at && job.status === "retry_scheduled") {
      row("next try", new Date(job.next_attempt_at).toLocaleTimeString());
    }
    if (job.retry_of) row("runs again", shortId(job.retry_of));
    if (job.waiting_for && job.status === "queued") row("waiting for", job.waiting_for);
    const parts = [list];
    if (ACTIVE.has(job.status)) parts.push(cancelButton(job.id));
    if (RETRYABLE.has(job.status)) parts.push(retryButton(job));
    ui.currentJob.replaceChildren(...parts);
  }

  // -- the daily token budget ------------------------------------------------------------

  // "tokens today: 1,234 of 10,000" (or "1,234, no budget"), from GET /api/ai-agent/usage:
  // read at sign-in and after each completed job; a failed read leaves the last one.
  async function refreshUsage() {
    if (!state.token) return;
    let usage;
    try {
      usage = await api("GET", "/api/ai-agent/usage");
    } catch {
      return;
    }
    const used = Number(usage.tokens_used_today).toLocaleString("en-US");
    const budget = usage.daily_budget;
    ui.usage.textContent =
      budget === null
        ? `tokens today: ${used}, no budget`
        : `tokens today: ${used} of ${Number(budget).toLocaleString("en-US")}`;
    ui.usage.dataset.over = budget !== null && usage.tokens_used_today >= budget ? "true" : "false";
    ui.usage.title = `resets at ${new Date(usage.resets_at).toLocaleString()}`;
  }

  // -- the form -------------------------------------------------------------------------

  async function submit(event) {
    event.preventDefault();
    ui.formError.textContent = "";
    const query = ui.query.value.trim();
    if (!query) {
      ui.formError.textContent = "Type what to draw.";
      return;
    }
    let canvasId = ui.canvasId.value.trim();
    if (canvasId && !CANVAS_ID.test(canvasId)) {
      ui.formError.textContent = "A canvas id is 1 to 128 letters, digits or _-.:";
      return;
    }
    // The page names a new canvas itself, so that it shows the canvas before the job's
    // first frame can arrive.
    const fresh = !canvasId;
    if (fresh) canvasId = randomId();
    if (canvasId !== state.canvasId) openCanvas(canvasId, { fresh });
    const priority = Number.parseInt(ui.priority.value, 10);
    const body = { query, canvas_id: canvasId };
    if (Number.isInteger(priority)) body.priority = priority;
    ui.submit.disabled = true;
    try {
      const accepted = await api("POST", "/api/ai-agent/create-canvas", body);
      track(accepted, query);
      state.currentJobId = accepted.job_id;
      renderJobs();
      scheduleJobsRefresh();
    } catch (error) {
      let text = error.message;
      // A wait of more than a minute (the token budget's, until 00:00 UTC) is told by the
      // detail itself, with the time it ends.
      const wait = Number(error.retryAfter);
      if ((error.status === 429 || error.status === 503) && wait > 0 && wait <= 60) {
        text += ` (try again in ${wait} s)`;
      }
      ui.formError.textContent = text;
      if (error.status === 429) refreshUsage();
    } finally {
      ui.submit.disabled = false;
    }
  }

  // -- start ----------------------------------------------------------------------------

  async function start() {
    ui.signInForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const token = ui.token.value.trim();
      if (token) signIn(token).then((ok) => ok && (ui.token.value = ""));
    });
    ui.signOut.addEventListener("click", () => signOut());
    ui.form.addEventListener("submit", submit);
    ui.newCanvas.addEventListener("click", () => openCanvas(null));
    ui.canvasId.addEventListener("change", () => {
      const value = ui.canvasId.value.trim();
      if (value && CANVAS_ID.test(value) && value !== state.canvasId) openCanvas(value);
    });
    ui.refreshJobs.addEventListener("click", () => {
      refreshJobs();
      reloadCanvas();
    });
    try {
      const answer = await fetch("/config.json");
      state.config = await answer.json();
    } catch (error) {
      setConnection("offline", `cannot read /config.json: ${error.message}`);
      return;
    }
    const saved = localStorage.getItem(TOKEN_KEY);
    if (!saved || !(await signIn(saved))) {
      ui.signIn.hidden = false;
      setConnection("signed-out", "signed out");
    }
  }

  // What the admin tab (admin.js) uses of this page.
  window.canvasJobsPage = { api, el, shortId, ApiError, ACTIVE, RETRYABLE };

  start();
})();
