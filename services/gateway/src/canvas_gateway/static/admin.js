// The operators' tab, shown to a token with the admin role: every user's jobs, filtered
// by status, user, time and prompt text; a job's timeline drawn from its events
// (attempts, errors, back-off, the model's latency and usage); Cancel and Retry.
//
// The notifier streams a user only their own jobs, so while the tab is open the list
// and the open timeline are read again every REFRESH_MS (and at once after an action).
// As in app.js, text from users and the model only goes through textContent.
"use strict";

(() => {
  const page = window.canvasJobsPage;
  const { api, el, shortId } = page;
  const REFRESH_MS = 2000;
  const PAGE_SIZE = 50;

  const $ = (id) => document.getElementById(id);
  const ui = {
    tabs: $("tabs"),
    workspace: $("workspace"),
    admin: $("admin"),
    filters: $("admin-filters"),
    status: $("admin-status"),
    user: $("admin-user"),
    since: $("admin-since"),
    text: $("admin-q"),
    rows: $("admin-jobs"),
    more: $("admin-more"),
    error: $("admin-error"),
    job: $("admin-job"),
    timeline: $("admin-timeline"),
  };

  const state = {
    isAdmin: false,
    open: false,
    timer: null,
    jobs: [], // the rows shown, newest first
    cursor: null, // next_cursor of the last page shown
    selected: null, // the job whose timeline is open
    load: 0, // increases with each list load: a late answer for older filters is dropped
  };

  // -- tabs -----------------------------------------------------------------------------

  function showTab(name) {
    const admin = name === "admin" && state.isAdmin;
    for (const button of ui.tabs.querySelectorAll("button[data-tab]")) {
      button.setAttribute("aria-selected", String(button.dataset.tab === (admin ? "admin" : "canvas")));
    }
    ui.workspace.hidden = admin;
    ui.admin.hidden = !admin;
    state.open = admin;
    clearInterval(state.timer);
    state.timer = null;
    if (admin) {
      refresh();
      state.timer = setInterval(refresh, REFRESH_MS);
    }
  }

  document.addEventListener("canvas-jobs:signed-in", (event) => {
    const claims = event.detail.claims || {};
    state.isAdmin = Array.isArray(claims.roles) && claims.roles.includes("admin");
    ui.tabs.hidden = !state.isAdmin;
    showTab("canvas");
  });

  document.addEventListener("canvas-jobs:signed-out", () => {
    state.isAdmin = false;
    ui.tabs.hidden = true;
    showTab("canvas");
    ui.workspace.hidden = true;
    state.jobs = [];
    state.selected = null;
    ui.rows.replaceChildren();
    ui.job.replaceChildren();
    ui.timeline.replaceChildren();
  });

  // -- the list -------------------------------------------------------------------------

  function filterParams() {
    const params = new URLSearchParams();
    if (ui.status.value) params.set("status", ui.status.value);
    if (ui.user.value.trim()) params.set("user_id", ui.user.value.trim());
    if (ui.text.value.trim()) params.set("q", ui.text.value.trim());
    if (ui.since.value) {
      const since = new Date(ui.since.value); // local time, as the input shows it
      if (!Number.isNaN(since.getTime())) params.set("since", since.toISOString());
    }
    return params;
  }

  // Reads the first page again (as many rows as are shown), or the next page (more).
  async function refresh({ more = false } = {}) {
    if (!state.open) return;
    const params = filterParams();
    const load = ++state.load;
    if (more && state.cursor) {
      params.set("cursor", state.cursor);
      params.set("limit", String(PAGE_SIZE));
    } else {
      params.set("limit", String(Math.min(100, Math.max(PAGE_SIZE, state.jobs.length))));
    }
    let body;
    try {
      body = await api("GET", `/api/admin/jobs?${params}`);
    } catch (error) {
      if (load === state.load) ui.error.textContent = `Cannot list jobs: ${error.message}`;
      return;
    }
    if (load !== state.load) return;
    ui.error.textContent = "";
    state.jobs = more ? state.jobs.concat(body.jobs) : body.jobs;
    state.cursor = body.next_cursor;
    render();
    if (state.selected) loadTimeline(state.selected);
  }

  function render() {
    const rows = state.jobs.map((job) => {
      const row = el("tr", { "data-job-id": job.id, "data-status": job.status });
      if (job.id === state.selected) row.classList.add("selected");
      const status = el("td", {});
      status.append(el("span", { class: "status", "data-status": job.status }, job.status.replace("_", " ")));
      const actions = el("td", { class: "actions" });
      if (page.ACTIVE.has(job.status)) actions.append(action(job, "cancel", "Cancel", "danger"));
      if (page.RETRYABLE.has(job.status) || job.status === "completed") {
        actions.append(action(job, "retry", "Retry", "secondary"));
      }
      row.append(
        el("td", { class: "time" }, new Date(job.created_at).toLocaleString()),
        el("td", { class: "user" }, job.user_id),
        status,
        el("td", { class: "query" }, job.query),
        el("td", { class: "num" }, String(job.retry_count)),
        el("td", { class: "job-error" }, job.error_message || ""),
        actions,
      );
      row.addEventListener("click", (event) => {
        if (event.target.closest("button")) return;
        select(job.id);
      });
      return row;
    });
    ui.rows.replaceChildren(...rows);
    if (!rows.length) {
      const empty = el("tr", { class: "muted" });
      empty.append(el("td", { colspan: "7" }, "No job matches."));
      ui.rows.append(empty);
    }
    ui.more.hidden = !state.cursor;
  }

  function action(job, name, label, kind) {
    const button = el("button", { type: "button", class: kind, "data-action": name }, label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const answer = await api("POST", `/api/ai-agent/job/${encodeURIComponent(job.id)}/${name}`);
        if (name === "retry") {
          ui.error.textContent = "";
          state.selected = answer.job_id;
        }
      } catch (error) {
        ui.error.textContent = `${label} failed: ${error.message}`;
      }
      refresh();
    });
    return button;
  }

  // -- one job's timeline ---------------------------------------------------------------

  function select(jobId) {
    state.selected = jobId;
    for (const row of ui.rows.querySelectorAll("tr[data-job-id]")) {
      row.classList.toggle("selected", row.dataset.jobId === jobId);
    }
    loadTimeline(jobId);
  }

  async function loadTimeline(jobId) {
    let body;
    try {
      body = await api("GET", `/api/admin/jobs/${encodeURIComponent(jobId)}/events`);
    } catch (error) {
      if (state.selected === jobId) ui.timeline.replaceChildren(el("li", { class: "error" }, error.message));
      return;
    }
    if (state.selected !== jobId) return;
    renderJob(state.jobs.find((job) => job.id === jobId), jobId);
    const start = body.events.length ? Date.parse(body.events[0].occurred_at) : 0;
    ui.timeline.dataset.jobId = jobId;
    ui.timeline.replaceChildren(...steps(body.events).map((step) => stepItem(step, start)));
    if (!body.events.length) ui.timeline.append(el("li", { class: "muted" }, "Accepted; not recorded yet."));
  }

  function renderJob(job, jobId) {
    const list = el("dl", { "data-job-id": jobId });
    const row = (name, value) => list.append(el("dt", {}, name), el("dd", {}, value));
    row("job", jobId);
    if (job) {
      row("user", job.user_id);
      row("status", job.status.replace("_", " "));
      row("prompt", job.query);
      row("canvas", job.canvas_id);
      if (job.retry_of) row("runs again", job.retry_of);
    }
    ui.job.replaceChildren(list);
  }

  // The events as steps: a run of progress events of one attempt becomes one step.
  function steps(events) {
    const out = [];
    for (const event of events) {
      const last = out[out.length - 1];
      if (event.type === "GenerationProgressed" && last && last.type === "GenerationProgressed") {
        last.count += 1;
        last.until = event.occurred_at;
        continue;
      }
      out.push({ ...event, count: 1, until: event.occurred_at });
    }
    return out;
  }

  function stepItem(step, start) {
    const offset = (Date.parse(step.occurred_at) - start) / 1000;
    const item = el("li", { "data-type": step.type });
    item.append(
      el("span", { class: "offset" }, `+${offset.toFixed(3)} s`),
      el("span", { class: "type" }, step.type),
      el("span", { class: "detail" }, describe(step)),
    );
    return item;
  }

  function tokens(usage) {
    if (!usage) return "";
    const prompt = usage.prompt_tokens ?? "?";
    const completion = usage.completion_tokens ?? "?";
    return `, tokens ${prompt} in / ${completion} out`;
  }

  function describe(step) {
    const data = step.data || {};
    switch (step.type) {
      case "JobRequested":
        return `priority ${data.priority}${data.retry_of ? `, runs job ${shortId(data.retry_of)} again` : ""}`;
      case "JobQueued":
        return data.retry_count ? `queued again (retry ${data.retry_count})` : "queued";
      case "GenerationRequested":
        return `attempt ${data.attempt} handed to the generators`;
      case "GenerationStarted":
        return `started on ${data.generator_id} with ${data.model}`;
      case "GenerationProgressed":
        return `${step.count} object${step.count === 1 ? "" : "s"} streamed`;
      case "GenerationSucceeded":
        return `${(data.objects || []).length} objects (${data.dropped_objects} dropped) in ${data.latency_ms} ms${tokens(data.usage)}`;
      case "GenerationFailed":
        return `${data.retryable ? "retryable" : "permanent"} ${data.kind}: ${data.error}`;
      case "JobRetryScheduled": {
        const wait = (Date.parse(data.next_attempt_at) - Date.parse(step.occurred_at)) / 1000;
        return `retry ${data.retry_count} in ${Math.max(0, wait).toFixed(0)} s: ${data.error}`;
      }
      case "JobCompleted":
        return `${data.object_count} objects by ${data.model} in ${data.latency_ms} ms${tokens(data.usage)}`;
      case "JobFailed":
        return `failed after ${data.retry_count} retries: ${data.error}`;
      case "JobCancelRequested":
      case "JobCancelled":
        return data.reason || "";
      default:
        return "";
    }
  }

  // -- start ----------------------------------------------------------------------------

  for (const button of ui.tabs.querySelectorAll("button[data-tab]")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  ui.filters.addEventListener("submit", (event) => {
    event.preventDefault();
    state.jobs = [];
    refresh();
  });
  ui.status.addEventListener("change", () => {
    state.jobs = [];
    refresh();
  });
  ui.more.addEventListener("click", () => refresh({ more: true }));
})();
