'use strict';
// The snakepool dashboard. It follows GET /v1/dashboard/events (Server-Sent Events)
// with fetch(), so that it can send a bearer token, which EventSource cannot, and
// shows the workers, the queue, the sessions, calls per second, latency and the
// queue over the last minutes (on canvases), and the recent worker events.

const EVENTS_SHOWN = 50;
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 15000;
// Charts span at least this many seconds, and at most the server's window.
const MIN_SPAN_S = 60;

// Each chart: its id (canvas `chart-ID`, legend `legend-ID`), its series (a sample's
// field, a label, a colour), the least top of its scale, and how its values read.
const CHARTS = [
  {
    id: 'calls',
    series: [['calls_per_s', 'calls', '#2f7d4f'], ['errors_per_s', 'failed', '#c0392b']],
    least: 1,
    format: (v) => `${v.toFixed(v < 10 ? 1 : 0)}/s`,
  },
  {
    id: 'latency',
    series: [['p50_ms', 'p50', '#2b6cb0'], ['p99_ms', 'p99', '#d97706']],
    least: 1,
    format: formatMs,
  },
  {
    id: 'queue',
    series: [['queued', 'waiting', '#7c3aed']],
    least: 2,
    format: (v) => String(Math.round(v)),
  },
];

const $ = (id) => document.getElementById(id);

const view = {
  token: new URLSearchParams(location.hash.slice(1)).get('token') || '',
  connected: false,
  windowS: 300,
  samples: [],
  lastSeq: 0,
};

// ---- The stream ----

/** Reads the stream until it ends: 'ended', or 'unauthorized' if the token is refused. */
async function follow() {
  const headers = { Accept: 'text/event-stream' };
  if (view.token) headers.Authorization = `Bearer ${view.token}`;
  const response = await fetch('/v1/dashboard/events', { headers, cache: 'no-store' });
  if (response.status === 401) return 'unauthorized';
  if (!response.ok) throw new Error(`the server answered ${response.status}`);
  view.connected = true;
  setConnection('live', 'live');
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return 'ended';
    buffer += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      dispatch(parseEvent(buffer.slice(0, end)));
      buffer = buffer.slice(end + 2);
    }
  }
}

/** One event of the stream: its name ('message' unless given) and its data lines. */
function parseEvent(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    const colon = line.indexOf(':');
    if (colon === 0) continue;
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'event') name = value;
    if (field === 'data') data.push(value);
  }
  return { name, data: data.join('\n') };
}

function dispatch({ name, data }) {
  const handlers = { history: showHistory, snapshot: showSnapshot, worker: showWorkerEvent };
  if (data && handlers[name]) handlers[name](JSON.parse(data));
}

/** Follows the stream for good, reconnecting with back-off; stops to ask for a token. */
async function run() {
  let delay = RETRY_MIN_MS;
  for (;;) {
    view.connected = false;
    let outcome;
    try {
      outcome = await follow();
    } catch (error) {
      outcome = error.message;
    }
    if (outcome === 'unauthorized') {
      askForToken();
      return;
    }
    if (view.connected) delay = RETRY_MIN_MS;
    setConnection('retrying', `disconnected (${outcome}); retrying in ${delay / 1000} s`);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, RETRY_MAX_MS);
  }
}

function setConnection(state, text) {
  const badge = $('connection');
  badge.dataset.state = state;
  badge.textContent = text;
}

function askForToken() {
  setConnection('locked', 'token needed');
  $('login-error').textContent = view.token ? 'That token was refused.' : '';
  $('login').hidden = false;
  $('token').focus();
}

$('login').addEventListener('submit', (event) => {
  event.preventDefault();
  view.token = $('token').value.trim();
  $('login').hidden = true;
  setConnection('connecting', 'connecting…');
  run();
});

// ---- What the stream says ----

function showHistory(history) {
  view.windowS = history.window_s;
  view.samples = history.samples;
  view.lastSeq = 0;
  $('events').replaceChildren();
  $('no-events').hidden = false;
  history.events.forEach(showWorkerEvent);
  drawCharts();
}

function showSnapshot(snapshot) {
  $('node').textContent = snapshot.node || '';
  const totals = snapshot.totals;
  const failed = Object.values(totals.errors).reduce((sum, n) => sum + n, 0);
  const tiles = {
    workers: snapshot.workers.length,
    starting: snapshot.starting,
    queued: snapshot.queued,
    sessions: snapshot.sessions,
    calls: totals.calls,
    errors: failed,
    crashes: totals.worker_crashes,
    starts: totals.worker_starts,
  };
  for (const [name, value] of Object.entries(tiles)) {
    $(`tile-${name}`).textContent = value.toLocaleString('en');
  }
  showWorkers(snapshot.workers);
  const last = view.samples[view.samples.length - 1];
  if (!last || snapshot.sample.at_ms > last.at_ms) {
    view.samples.push(snapshot.sample);
    view.samples.splice(0, view.samples.length - view.windowS);
  }
  drawCharts();
}

function showWorkers(workers) {
  const rows = workers.map((worker) => {
    const row = document.createElement('tr');
    row.dataset.worker = worker.id;
    row.dataset.pid = worker.pid;
    const state = document.createElement('span');
    state.className = 'state';
    state.dataset.state = worker.state;
    state.textContent = worker.state;
    const cells = [
      worker.id,
      state,
      worker.pid,
      worker.calls_served.toLocaleString('en'),
      worker.in_flight,
      worker.sessions,
      formatBytes(worker.rss_bytes),
      formatAge(worker.age_s),
    ];
    cells.forEach((content, i) => {
      const cell = row.insertCell();
      if (i >= 2) cell.className = 'num';
      cell.append(content);
    });
    return row;
  });
  $('workers').tBodies[0].replaceChildren(...rows);
}

function showWorkerEvent(event) {
  if (event.seq <= view.lastSeq) return;
  view.lastSeq = event.seq;
  const item = document.createElement('li');
  item.dataset.kind = event.kind;
  if (event.worker) item.dataset.worker = event.worker;
  if (event.pid != null) item.dataset.pid = event.pid;
  const time = document.createElement('time');
  time.dateTime = new Date(event.at_ms).toISOString();
  time.textContent = new Date(event.at_ms).toLocaleTimeString('en-GB');
  const what = document.createElement('span');
  what.className = 'what';
  what.textContent = describe(event);
  item.append(time, what);
  if (event.detail) {
    const detail = document.createElement('pre');
    detail.textContent = event.detail;
    item.append(detail);
  }
  const list = $('events');
  list.prepend(item);
  while (list.children.length > EVENTS_SHOWN) list.lastElementChild.remove();
  $('no-events').hidden = true;
}

function describe({ kind, worker, pid, detail }) {
  switch (kind) {
    case 'ready': return `worker ${worker} ready (pid ${pid})`;
    case 'lost': return `worker ${worker} (pid ${pid}) lost${detail ? '; its stderr:' : ''}`;
    case 'recycled': return `worker ${worker} recycled`;
    case 'start_failed': return 'a worker failed to start';
    case 'zygote_ready': return `zygote ready (pid ${pid})`;
    case 'zygote_unavailable': return 'zygote unavailable; workers start fresh';
    default: return kind;
  }
}

// ---- Charts ----

function drawCharts() {
  for (const chart of CHARTS) {
    drawChart($(`chart-${chart.id}`), chart);
    showLegend($(`legend-${chart.id}`), chart);
  }
}

function showLegend(legend, { series, format }) {
  const last = view.samples[view.samples.length - 1] || {};
  legend.replaceChildren(...series.map(([key, label, color]) => {
    const entry = document.createElement('span');
    entry.className = 'key';
    entry.style.setProperty('--color', color);
    entry.textContent = `${label} ${last[key] == null ? '–' : format(last[key])}`;
    return entry;
  }));
}

/** Draws the samples' series, the newest at the right edge, one point a second. */
function drawChart(canvas, { series, least, format }) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);

  const samples = view.samples;
  const left = 52;
  const top = 6;
  const plotWidth = width - left - 8;
  const plotHeight = height - top - 20;
  const span = Math.min(view.windowS, Math.max(MIN_SPAN_S, samples.length));
  const step = plotWidth / Math.max(1, span - 1);
  const values = samples.flatMap((s) => series.map(([key]) => s[key])).filter((v) => v != null);
  const max = Math.max(least, niceCeiling(Math.max(0, ...values)));
  const x = (i) => left + plotWidth - (samples.length - 1 - i) * step;
  const y = (v) => top + plotHeight * (1 - v / max);

  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = '#6b7280';
  ctx.strokeStyle = '#e5e7eb';
  ctx.lineWidth = 1;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (const share of [0, 0.5, 1]) {
    const at = Math.round(y(max * share)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, at);
    ctx.lineTo(left + plotWidth, at);
    ctx.stroke();
    ctx.fillText(format(max * share), left - 6, at);
  }
  ctx.textBaseline = 'alphabetic';
  ctx.fillText('now', left + plotWidth, height - 4);
  ctx.textAlign = 'left';
  ctx.fillText(`−${formatAge(span)}`, left, height - 4);

  ctx.lineWidth = 1.5;
  for (const [key, , color] of series) {
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.beginPath();
    samples.forEach((sample, i) => {
      const value = sample[key];
      if (value == null) return;
      const previous = samples[i - 1];
      if (previous && previous[key] != null) {
        ctx.lineTo(x(i), y(value));
      } else {
        ctx.moveTo(x(i), y(value));
        ctx.fillRect(x(i) - 1, y(value) - 1, 2, 2);
      }
    });
    ctx.stroke();
  }
  canvas.dataset.points = samples.length;
}

/** The smallest 1, 2 or 5 times a power of ten at or above `value` (0 for 0). */
function niceCeiling(value) {
  if (!(value > 0)) return 0;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * power).find((bound) => bound >= value);
}

// ---- Formats ----

function formatMs(ms) {
  if (ms === 0) return '0 ms';
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 100) return `${ms.toFixed(1)} ms`;
  if (ms < 10000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(1)} s`;
}

function formatBytes(bytes) {
  if (bytes == null) return '–';
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}

function formatAge(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

window.addEventListener('resize', drawCharts);
run();
