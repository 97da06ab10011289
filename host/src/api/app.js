// The controller's web page: the runs list (at /) and one run with its live log (at
// /runs/{id}). It only reads the JSON API. Everything from the API goes into the page as
// text (textContent, text nodes), never as markup.
"use strict";

const app = document.getElementById("app");
const where = document.getElementById("where");

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  e.append(...children); // strings become text nodes
  return e;
}

async function getJSON(path) {
  const r = await fetch(path, { headers: { accept: "application/json" } });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

const runHref = (id) => "/runs/" + encodeURIComponent(id);
const isFinal = (status) => status !== "queued" && status !== "running";
const fmtTime = (ms) => new Date(ms).toLocaleString();
const badge = (status) => el("span", { class: "status s-" + status }, status);

function duration(r) {
  const s = Math.max(0, Math.round(((r.finished_ms ?? Date.now()) - r.created_ms) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor(s / 60) % 60}m`;
}

function stepOutcome(o) {
  if (!o) return "";
  switch (o.kind) {
    case "exited": return "exit " + o.code;
    case "signalled": return "signal " + o.signal;
    case "timed-out": return "timed out";
    case "could-not-start": return "could not start: " + o.reason;
    default: return o.kind;
  }
}

function runOutcome(o) {
  if (!o) return "";
  if (o.status === "failed") return `step ${o.step}: ${stepOutcome(o.outcome)}`;
  if (o.status === "timed-out") return `step ${o.step} timed out`;
  return "";
}

// ---- ANSI escapes ----------------------------------------------------------------------
// SGR (ESC [ ... m) sets colours and weight; every other escape sequence and control
// character (but tab) is dropped. Groups: CSI parameters, intermediates, final byte.
const ESCAPES = /\x1b\[([0-?]*)([ -\/]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -\/]*[0-~]?|[\x00-\x08\x0a-\x1f\x7f]/g;

function sgr(st, params) {
  const p = params === "" ? [0] : params.split(/[;:]/).map((x) => (x === "" ? 0 : Number(x)));
  for (let i = 0; i < p.length; i++) {
    const n = p[i];
    if (n === 0) for (const k of Object.keys(st)) delete st[k];
    else if (n === 1) st.b = true;
    else if (n === 2) st.d = true;
    else if (n === 3) st.i = true;
    else if (n === 4) st.u = true;
    else if (n === 22) st.b = st.d = false;
    else if (n === 23) st.i = false;
    else if (n === 24) st.u = false;
    else if (n >= 30 && n <= 37) st.fg = n - 30;
    else if (n >= 90 && n <= 97) st.fg = n - 90 + 8;
    else if (n >= 40 && n <= 47) st.bg = n - 40;
    else if (n >= 100 && n <= 107) st.bg = n - 100 + 8;
    else if (n === 39) delete st.fg;
    else if (n === 49) delete st.bg;
    else if (n === 38 || n === 48) {
      // 38;5;n (256 colours) or 38;2;r;g;b (true colour); 48 for the background
      const key = n === 38 ? "fg" : "bg";
      if (p[i + 1] === 5) {
        const c = p[i + 2];
        if (Number.isInteger(c) && c >= 0 && c < 256) st[key] = c;
        i += 2;
      } else if (p[i + 1] === 2) {
        const [r, g, b] = p.slice(i + 2, i + 5).map((v) => Math.min(255, Math.max(0, v | 0)));
        st[key] = `rgb(${r},${g},${b})`;
        i += 4;
      }
    }
  }
}

// Colours 16-255 of the xterm palette: a 6x6x6 cube, then 24 greys.
function xterm(n) {
  if (n >= 232) {
    const g = 8 + (n - 232) * 10;
    return `rgb(${g},${g},${g})`;
  }
  const c = (v) => (v ? 55 + v * 40 : 0);
  n -= 16;
  return `rgb(${c(Math.floor(n / 36))},${c(Math.floor(n / 6) % 6)},${c(n % 6)})`;
}

function styled(text, st) {
  const cls = ["b", "d", "i", "u"].filter((k) => st[k]);
  const e = document.createElement("span");
  for (const [key, prefix, prop] of [["fg", "f", "color"], ["bg", "g", "backgroundColor"]]) {
    const v = st[key];
    if (typeof v === "number" && v < 16) cls.push(prefix + v);
    else if (typeof v === "number") e.style[prop] = xterm(v);
    else if (typeof v === "string") e.style[prop] = v;
  }
  if (!cls.length && !e.style.length) return document.createTextNode(text);
  e.className = cls.join(" ");
  e.textContent = text;
  return e;
}

// One log message as a span; `st` is the SGR state, carried from line to line in a step.
function ansi(text, st) {
  const out = el("span", { class: "msg" });
  let last = 0;
  for (const m of text.matchAll(ESCAPES)) {
    if (m.index > last) out.append(styled(text.slice(last, m.index), st));
    if (m[3] === "m" && !m[2] && /^[\d;:]*$/.test(m[1])) sgr(st, m[1]);
    last = m.index + m[0].length;
  }
  if (last < text.length) out.append(styled(text.slice(last), st));
  return out;
}

// ---- the queue: what waits for an agent, and why ------------------------------------------
const waitedFor = (ms) => duration({ created_ms: 0, finished_ms: ms });

function queuePanel() {
  const heads = ["#", "run", "job", "label", "priority", "waited", "why it waits"];
  const tbody = el("tbody");
  const summary = el("p", { class: "muted", id: "queue-summary" });
  const panel = el("section", { id: "queue" },
    el("h3", {}, "Queue"),
    el("table", { id: "queue-runs" }, el("thead", {}, el("tr", {}, ...heads.map((h) => el("th", {}, h)))), tbody),
    summary);
  async function refresh() {
    try {
      const q = await getJSON("/api/queue");
      tbody.replaceChildren(
        ...q.waiting.map((w) =>
          el("tr", { "data-run": w.run },
            el("td", {}, String(w.position)),
            el("td", {}, el("a", { href: runHref(w.run) }, w.run)),
            el("td", {}, w.job),
            el("td", {}, w.label),
            el("td", {}, String(w.priority)),
            el("td", {}, waitedFor(w.waited_ms)),
            el("td", { class: "reason" }, w.reason))),
      );
      const seats = q.labels.map((l) => `${l.label}: ${l.busy}/${l.executors} executors busy, ${l.waiting} waiting`);
      summary.textContent = (q.waiting.length ? "" : "Nothing waits for an agent. ") + seats.join(" · ");
    } catch (e) {
      summary.textContent = "Could not load the queue: " + e.message;
    }
  }
  return { panel, refresh };
}

// ---- the runs list -----------------------------------------------------------------------
// The newest page, polled; "more" adds a page of older runs, and the poll then keeps that
// many rows fresh (pages fetched by cursor, so runs arriving meanwhile leave no gap).
// `?limit=N` on the page's URL sets the page size (1-500, default 50).
function showList() {
  where.textContent = "runs";
  document.title = "Trellis · runs";
  const asked = Number(new URLSearchParams(location.search).get("limit"));
  const pageSize = Number.isInteger(asked) && asked >= 1 && asked <= 500 ? asked : 50;
  let want = pageSize;
  let timer = null;
  const heads = ["run", "job", "status", "agent", "submitted", "duration"];
  const tbody = el("tbody");
  const msg = el("p", { class: "muted" });
  const queue = queuePanel();
  const more = el("button", { type: "button", id: "more", hidden: true }, "more");
  more.addEventListener("click", () => {
    want += pageSize;
    more.disabled = true;
    refresh();
  });
  app.replaceChildren(
    queue.panel,
    el("h3", {}, "Runs"),
    el("table", { id: "runs" }, el("thead", {}, el("tr", {}, ...heads.map((h) => el("th", {}, h)))), tbody),
    el("div", { class: "tools" }, more),
    msg,
  );
  // one refresh at a time: a click during one asks for another right after it
  let running = false, again = false;
  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    clearTimeout(timer);
    queue.refresh();
    try {
      const runs = [];
      let cursor = null, next = null;
      do {
        const q = new URLSearchParams({ limit: String(Math.min(500, want - runs.length)) });
        if (cursor) q.set("cursor", cursor);
        const page = await getJSON("/api/runs?" + q);
        runs.push(...page.runs);
        next = page.next;
        // a cursor that does not advance would never end
        if (next === cursor) break;
        cursor = next;
      } while (next && runs.length < want);
      tbody.replaceChildren(
        ...runs.map((r) =>
          el("tr", { "data-run": r.id },
            el("td", {}, el("a", { href: runHref(r.id) }, r.id)),
            el("td", {}, r.job),
            el("td", {}, badge(r.status)),
            el("td", {}, r.agent),
            el("td", {}, fmtTime(r.created_ms)),
            el("td", {}, duration(r)))),
      );
      more.hidden = !next;
      more.disabled = false;
      msg.textContent = runs.length ? "" : "No runs yet.";
    } catch (e) {
      msg.textContent = "Could not load the runs: " + e.message;
    }
    running = false;
    if (again) {
      again = false;
      return refresh();
    }
    timer = setTimeout(refresh, 2000);
  }
  refresh();
}

// ---- one run -------------------------------------------------------------------------------
async function showRun(id) {
  where.textContent = id;
  document.title = "Trellis · " + id;
  const base = "/api/runs/" + encodeURIComponent(id);
  let run;
  try {
    run = await getJSON(base);
  } catch (e) {
    app.replaceChildren(el("p", { class: "empty" }, `Could not load run ${id}: ${e.message}`));
    return;
  }
  const head = el("div", { class: "meta" });
  const logState = el("span", { class: "muted", id: "log-state" });
  const steps = el("div", { id: "steps" });
  const fold = (open) => steps.querySelectorAll("details").forEach((d) => (d.open = open));
  app.replaceChildren(
    head,
    el("div", { class: "tools" },
      el("button", { type: "button", onclick: () => fold(true) }, "expand all"),
      el("button", { type: "button", onclick: () => fold(false) }, "collapse all"),
      logState),
    steps,
  );
  const setLogState = (state, text) => {
    document.body.dataset.log = state;
    logState.textContent = text;
  };

  // one <details> per step, created in the job's order (or when a line names a new step)
  const sections = new Map();
  function section(name) {
    let s = sections.get(name);
    if (!s) {
      const status = el("span"), outcome = el("span", { class: "muted" }), log = el("div", { class: "log" });
      const details = el("details", { open: true, "data-step": name },
        el("summary", {}, status, el("span", { class: "name" }, name), outcome), log);
      steps.append(details);
      s = { status, outcome, log, lines: 0, sgr: {} };
      sections.set(name, s);
    }
    return s;
  }

  function render(r) {
    run = r;
    const bits = [badge(r.status), `job ${r.job}`, `agent ${r.agent}`,
      `submitted ${fmtTime(r.created_ms)}`, `duration ${duration(r)}`, runOutcome(r.outcome), r.note || ""];
    head.replaceChildren(...bits.filter((b) => b !== "").map((b) => el("span", {}, b)));
    for (const st of r.steps) {
      const s = section(st.name);
      s.status.replaceChildren(badge(st.status));
      s.outcome.textContent = stepOutcome(st.outcome);
    }
  }
  render(run);

  // the line named by the URL's hash (#<step>-L<n>) is highlighted, once it exists
  let wanted = location.hash.length > 1;
  function highlight() {
    document.querySelectorAll(".line.hl").forEach((e) => e.classList.remove("hl"));
    const t = location.hash.length > 1 && document.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (!t || !t.classList.contains("line")) return false;
    t.classList.add("hl");
    t.closest("details").open = true;
    t.scrollIntoView({ block: "center" });
    return true;
  }
  window.addEventListener("hashchange", highlight);

  let lastSeq = 0;
  function addLines(events) {
    const root = document.documentElement;
    const atBottom = !wanted && !location.hash && innerHeight + scrollY >= root.scrollHeight - 8;
    for (const ev of events) {
      if (ev.seq <= lastSeq) continue; // a reconnected follow repeats what it sent before
      lastSeq = ev.seq;
      const s = section(ev.step);
      const anchor = `${ev.step}-L${++s.lines}`;
      s.log.append(el("div", { class: ev.stream === "stderr" ? "line stderr" : "line", id: anchor },
        el("a", { class: "ln", href: "#" + anchor }, String(s.lines)),
        ansi(ev.message, s.sgr)));
    }
    if (wanted && highlight()) wanted = false;
    if (atBottom && events.length) scrollTo(0, root.scrollHeight);
  }

  // history in pages, then the rest live
  setLogState("loading", "loading the log…");
  let cursor = null, complete = false;
  try {
    for (;;) {
      const q = new URLSearchParams({ limit: "5000" });
      if (cursor) q.set("cursor", cursor);
      const page = await getJSON(`${base}/log?${q}`);
      // the same events again: the browser's cursor does not advance (reading on would never end)
      if (page.events.length && page.events[0].seq <= lastSeq) {
        throw new Error(`log browser ${page.browser}: its cursor does not advance`);
      }
      addLines(page.events);
      cursor = page.next;
      // a browser that can count says how many there are (null: it cannot)
      if (page.total != null && page.events.length) {
        setLogState("loading", `loading the log… ${lastSeq} of ${page.total} lines`);
      }
      complete = page.completeness.state === "complete";
      if (!page.events.length) break;
    }
  } catch (e) {
    setLogState("error", "could not load the log: " + e.message);
  }
  if (complete) {
    setLogState("complete", `log complete, ${lastSeq} lines`);
    return render(await getJSON(base));
  }

  setLogState("following", "following…");
  const poll = setInterval(async () => {
    try {
      const r = await getJSON(base);
      render(r);
      if (isFinal(r.status)) clearInterval(poll);
    } catch { /* shown by the log's state when it matters */ }
  }, 1500);
  const es = new EventSource(`${base}/log/follow` + (cursor ? "?cursor=" + encodeURIComponent(cursor) : ""));
  es.addEventListener("line", (m) => addLines([JSON.parse(m.data)]));
  es.addEventListener("end", (m) => {
    es.close();
    clearInterval(poll);
    render(JSON.parse(m.data));
    setLogState("complete", `log complete, ${lastSeq} lines`);
  });
  es.addEventListener("abort", (m) => {
    // the controller gave up on the log browser's answers: do not reconnect
    es.close();
    setLogState("error", "log: " + m.data);
  });
  es.addEventListener("error", (m) => {
    // an `error` event from the server carries text; a dropped connection does not
    // (EventSource reconnects by itself)
    setLogState("following", m.data ? "log: " + m.data : "connection lost, reconnecting…");
  });
}

// ---- signing in ------------------------------------------------------------------------
// The API needs a token. The page trades one for a session cookie (HttpOnly: this script
// never sees it) and forgets the token; the cookie then goes with every request, the
// live follow's EventSource included.

function showSignIn() {
  where.textContent = "sign in";
  const input = el("input", { type: "password", id: "token", autocomplete: "off", size: 50, placeholder: "trellis_…" });
  const note = el("p", { class: "muted", id: "signin-note" },
    "This controller needs an API token. An admin makes one on the controller's host with " +
    "`trellis token create NAME --role viewer --config CONTROLLER.toml`.");
  const form = el("form", { id: "signin" }, el("label", {}, "API token ", input), " ",
    el("button", { type: "submit" }, "sign in"), note);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await fetch("/api/session", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ token: input.value }),
    });
    input.value = "";
    if (r.ok) return start();
    note.textContent = (await r.json().catch(() => ({}))).error || `HTTP ${r.status}`;
  });
  app.replaceChildren(el("h2", {}, "Sign in"), form);
}

async function signOut() {
  await fetch("/api/session", { method: "DELETE", headers: { "x-trellis-request": "1" } });
  location.reload();
}

async function start() {
  const who = await (await fetch("/api/session", { headers: { accept: "application/json" } })).json();
  if (!who) return showSignIn();
  const header = document.querySelector("header");
  header.querySelector("#who")?.remove();
  const out = el("button", { type: "button" }, "sign out");
  out.addEventListener("click", signOut);
  header.append(el("span", { id: "who", class: "muted" }, `${who.name} (${who.role}) `, out));
  const m = location.pathname.match(/^\/runs\/([^/]+)\/?$/);
  if (m) showRun(decodeURIComponent(m[1]));
  else showList();
}

start();
