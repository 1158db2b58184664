'use strict';
// mistral-gateway browser console. Plain DOM, no framework, no build step: the page must work offline under a strict
// CSP (no inline code, no eval). Everything from the server is written with textContent, never parsed as HTML.
// Rule of the page: no console output and no unhandled rejection; every failure ends up in #notice.

(() => {
  const KEY_STORE = 'mg-admin-key';
  const STATUS_EVERY = 2000;
  const REQUESTS_EVERY = 1000;
  const MODELS_EVERY = 15000;
  const RECONNECT_MS = 2000;
  const MAX_LOG_LINES = 2000;
  const MAX_RECENT = 300;
  const CHAT_KINDS = new Set(['plain', 'gguf', 'vision-plain']);

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------------------------------- errors and notice

  class AuthError extends Error {}
  class NetError extends Error {}
  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  const isAbort = (e) => !!e && e.name === 'AbortError';

  // The notice shows one message; a tag says who wrote it, so that e.g. a working /status poll clears only the
  // "cannot reach the gateway" it wrote itself and not the answer to a button press.
  let noticeTag = '';
  function notice(text, kind = 'error', tag = '') {
    const el = $('notice');
    el.textContent = text;
    el.title = text;
    el.className = text ? kind : '';
    noticeTag = tag;
  }
  function clearNotice(...tags) { if (tags.includes(noticeTag)) notice(''); }

  function messageOf(e) {
    if (e instanceof HttpError) return e.status ? `${e.status}: ${e.message}` : e.message;
    return String((e && e.message) || e);
  }

  function report(e, tag = '') {
    if (isAbort(e) || e instanceof AuthError) return; // aborts are wanted; a 401 already shows the key form
    if (e instanceof NetError) notice('cannot reach the gateway', 'error', 'net');
    else notice(messageOf(e), 'error', tag);
  }

  // Fire and forget, but never leave a rejection unhandled (the browser would log it).
  function go(promise, tag = '') { promise.catch((e) => report(e, tag)); }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ------------------------------------------------------------------------------------------- admin key

  // sessionStorage only: the key lives as long as the tab, never in localStorage or a cookie.
  function getKey() {
    try { return sessionStorage.getItem(KEY_STORE) || ''; } catch (e) { return ''; }
  }
  function setKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY_STORE, value);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) { /* storage disabled: nothing to keep the key in */ }
  }

  // While locked (a 401 and no working key yet) nothing polls or streams: one 401, not one per second.
  let locked = false;

  function authFailed(sentKey) {
    // A 401 to a request sent with an older key (or none) while a newer one was entered is stale: ignore it.
    if (locked || sentKey !== getKey()) return;
    locked = true;
    if (sentKey) {
      setKey('');
      notice('wrong key', 'error', 'auth');
    } else {
      notice('admin key required', 'info', 'auth');
    }
    stopStreams();
    $('key-form').hidden = false;
    $('admin-key').focus();
  }

  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = $('admin-key').value.trim();
    if (!value) return;
    setKey(value);
    $('admin-key').value = '';
    $('key-form').hidden = true;
    locked = false;
    clearNotice('auth');
    go(reloadAll());
  });

  // ------------------------------------------------------------------------------------------- HTTP

  async function request(path, opts = {}) {
    const key = getKey();
    const headers = Object.assign({}, opts.headers);
    if (key) headers.Authorization = 'Bearer ' + key;
    let res;
    try {
      res = await fetch(path, Object.assign({}, opts, { headers, cache: 'no-store' }));
    } catch (e) {
      if (isAbort(e)) throw e;
      throw new NetError('cannot reach the gateway');
    }
    if (res.status === 401) {
      authFailed(key);
      throw new AuthError('unauthorized');
    }
    return res;
  }

  // The gateway answers {"error": {"message": ...}}; anything else is shown as text, shortened.
  async function errorMessage(res) {
    let text = '';
    try {
      text = await res.text();
      const body = JSON.parse(text);
      const err = body && (body.error !== undefined ? body.error : body.detail);
      const msg = err && typeof err === 'object' ? err.message : err;
      if (msg) return String(msg);
    } catch (e) { /* not JSON */ }
    return text.trim().slice(0, 200) || `HTTP ${res.status}`;
  }

  async function call(path, opts) {
    const res = await request(path, opts);
    if (!res.ok) throw new HttpError(res.status, await errorMessage(res));
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  }

  // Model ids may contain a slash (Qwen/Qwen3-1.7B): the route takes it as is, so encode each segment only.
  const modelPath = (id) => id.split('/').map(encodeURIComponent).join('/');

  // ------------------------------------------------------------------------------------------- Server-Sent Events

  // EventSource cannot send an Authorization header, hence fetch + a stream reader. Calls h.event(type, data) per
  // event and h.comment(text) per comment line (the gateway sends ": loading" while an engine starts).
  async function readSSE(body, h) {
    if (!body) return;
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    let type = '';
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      const lines = buf.split('\n');
      buf = lines.pop(); // an unfinished line waits for the next chunk
      for (let line of lines) {
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (data.length) {
            try { h.event(type || 'message', data.join('\n')); } catch (e) { /* one bad event must not end it */ }
          }
          type = '';
          data = [];
        } else if (line[0] === ':') {
          if (h.comment) h.comment(line.slice(1).trim());
        } else {
          const i = line.indexOf(':');
          const field = i < 0 ? line : line.slice(0, i);
          let val = i < 0 ? '' : line.slice(i + 1);
          if (val[0] === ' ') val = val.slice(1);
          if (field === 'event') type = val;
          else if (field === 'data') data.push(val);
        }
      }
    }
  }

  // Follows an SSE endpoint until stopped, reconnecting after a pause when it ends or fails. h.open() runs on each
  // (re)connection: the gateway replays its recent history then, so it is the place to reset what was shown.
  function follow(path, h) {
    const st = { stopped: false, ac: null };
    const run = async () => {
      while (!st.stopped && !locked) {
        st.ac = new AbortController();
        try {
          const res = await request(path, { signal: st.ac.signal, headers: { Accept: 'text/event-stream' } });
          if (!res.ok) throw new HttpError(res.status, await errorMessage(res));
          clearNotice('stream');
          if (h.open) h.open();
          await readSSE(res.body, h);
        } catch (e) {
          if (st.stopped || e instanceof AuthError) return;
          // An unreachable gateway is reported by the /status poll already; say it once.
          if (!(e instanceof NetError) && !isAbort(e)) notice(`${path}: ${messageOf(e)}`, 'error', 'stream');
        }
        if (!st.stopped) await sleep(RECONNECT_MS);
      }
    };
    run().catch(() => {});
    return { stop() { st.stopped = true; if (st.ac) st.ac.abort(); } };
  }

  let eventsStream = null;
  let logsStream = null;

  function stopStreams() {
    if (eventsStream) eventsStream.stop();
    if (logsStream) logsStream.stop();
    eventsStream = logsStream = null;
  }

  function startEvents() {
    if (eventsStream) eventsStream.stop();
    eventsStream = follow('/events', {
      event(type, data) {
        if (type === 'message') type = JSON.parse(data).type || '';
        if (type.startsWith('engine.') || type.startsWith('download.') || type === 'events.dropped') {
          scheduleStatus();
        }
      },
    });
  }

  // ------------------------------------------------------------------------------------------- formatting

  const dash = '—';

  function fmtBytes(n) {
    if (n === null || n === undefined || isNaN(n)) return dash;
    const units = ['B', 'KB', 'MB', 'GB', 'TB'];
    let v = Number(n);
    let i = 0;
    for (; Math.abs(v) >= 1024 && i < units.length - 1; i++) v /= 1024;
    const digits = i === 0 ? 0 : v < 10 ? 2 : v < 100 ? 1 : 0;
    return `${v.toFixed(digits)} ${units[i]}`;
  }

  const fmtMB = (mb) => (mb === null || mb === undefined ? dash : `${Math.round(mb)} MB`);

  function fmtDuration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = s % 60;
    if (h) return `${h}h ${String(m).padStart(2, '0')}m`;
    if (m) return `${m}m ${String(sec).padStart(2, '0')}s`;
    return `${sec}s`;
  }

  const fmtElapsed = (ms) => (ms < 10000 ? `${(Math.max(0, ms) / 1000).toFixed(1)} s` : fmtDuration(ms / 1000));

  // Times come as ISO 8601 strings or epoch seconds: accept both.
  function toDate(t) {
    if (t === null || t === undefined || t === '') return null;
    if (typeof t === 'number') return new Date(t < 1e11 ? t * 1000 : t);
    if (/^\d+(\.\d+)?$/.test(t)) return toDate(Number(t));
    const d = new Date(t);
    return isNaN(d.getTime()) ? null : d;
  }

  function fmtClock(t) {
    const d = toDate(t);
    if (!d) return String(t === null || t === undefined ? '' : t);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map((x) => String(x).padStart(2, '0')).join(':');
  }

  const shorten = (text, n) => (text.length > n ? text.slice(0, n - 1) + '…' : text);
  const orDash = (v) => (v === null || v === undefined || v === '' ? dash : String(v));

  // ------------------------------------------------------------------------------------------- DOM helpers

  function setText(el, value) {
    const s = String(value);
    if (el.textContent !== s) el.textContent = s;
  }

  function setTitle(el, value) { if (el.title !== value) el.title = value; }

  function setState(el, state) {
    setText(el, state || dash);
    const cls = 'st st-' + String(state || 'unknown').replace(/[^\w-]/g, '_');
    if (el.className !== cls) el.className = cls;
  }

  function button(action, label, cls) {
    const b = document.createElement('button');
    b.type = 'button';
    b.dataset.action = action;
    b.textContent = label;
    if (cls) b.className = cls;
    return b;
  }

  // A table row keyed by an attribute, with one data-field cell per field; tr.cells_ maps field -> cell.
  function makeRow(attr, key, fields, numeric = []) {
    const tr = document.createElement('tr');
    tr.setAttribute(attr, key);
    tr.cells_ = {};
    for (const f of fields) {
      const td = document.createElement('td');
      td.dataset.field = f;
      if (numeric.includes(f)) td.className = 'num';
      tr.appendChild(td);
      tr.cells_[f] = td;
    }
    return tr;
  }

  // Updates a container's children in place by key (rows keep their identity across refreshes), creates the
  // missing ones, removes the gone ones and puts them in the order of items.
  function syncChildren(container, attr, items, keyOf, build, update) {
    const existing = new Map();
    for (const el of Array.from(container.children)) existing.set(el.getAttribute(attr), el);
    let prev = null;
    for (const item of items) {
      const key = String(keyOf(item));
      let el = existing.get(key);
      if (el) existing.delete(key);
      else el = build(key);
      update(el, item);
      const want = prev ? prev.nextSibling : container.firstChild;
      if (want !== el) container.insertBefore(el, want);
      prev = el;
    }
    for (const el of existing.values()) el.remove();
  }

  // ------------------------------------------------------------------------------------------- /status

  let lastStatus = null;
  let statusBusy = false;
  let statusAgain = false;
  let statusTimer = 0;

  async function refreshStatus() {
    if (locked) return;
    if (statusBusy) return void (statusAgain = true); // one more right after this one: no event is missed
    statusBusy = true;
    try {
      const s = await call('/status');
      clearNotice('net', 'status');
      lastStatus = s;
      renderStatus(s);
    } catch (e) {
      report(e, 'status');
    } finally {
      statusBusy = false;
      if (statusAgain) scheduleStatus(0);
      statusAgain = false;
    }
  }

  // Events come in bursts (download.progress, a start's several steps): one refresh per burst.
  function scheduleStatus(delay = 150) {
    clearTimeout(statusTimer);
    statusTimer = setTimeout(() => go(refreshStatus(), 'status'), delay);
  }

  function renderStatus(s) {
    const engines = s.engines || [];
    renderEngines(engines, s.budget);
    renderModels(s.models || []);
    renderDownloads(s.downloads || {});
    renderCache(s.embedding_cache);
    syncLogEngines(engines.map((e) => e.name));
    pickDefaultModel();
    const defaults = [];
    if (s.default_model) defaults.push(`default model: ${s.default_model}`);
    if (s.default_embedding_model) defaults.push(`embeddings: ${s.default_embedding_model}`);
    setText($('defaults'), defaults.join(' · '));
    setText($('models-file'), s.models_file ? String(s.models_file) : '');
  }

  // ------------------------------------------------------------------------------------------- engines

  const ENGINE_FIELDS = ['name', 'models', 'state', 'pid', 'memory', 'in-flight', 'idle', 'starts', 'crashes',
    'error', 'actions'];

  function buildEngineRow(key) {
    const tr = makeRow('data-engine', key, ENGINE_FIELDS, ['pid', 'memory', 'in-flight', 'idle', 'starts', 'crashes']);
    tr.cells_.actions.append(button('load', 'Load'), button('unload', 'Unload'));
    return tr;
  }

  function updateEngineRow(tr, e) {
    const c = tr.cells_;
    const models = e.models || [];
    setText(c.name, e.name);
    setText(c.models, models.join(', '));
    setState(c.state, e.state);
    setText(c.pid, orDash(e.pid));
    setTitle(c.pid, e.port ? `port ${e.port}` : '');
    setText(c.memory, fmtMB(e.memory_mb));
    setTitle(c.memory, e.memory_source || '');
    setText(c['in-flight'], `${e.in_flight || 0}/${e.waiting || 0}`);
    // The countdown ticks locally (tick()) from a deadline taken at each refresh.
    const until = e.seconds_until_idle_stop;
    tr.idleAt_ = until === null || until === undefined ? null : Date.now() + until * 1000;
    tr.state_ = e.state;
    const why = [];
    if (e.keep_alive === -1) why.push('kept alive until further notice');
    else if (e.keep_alive) why.push(`kept alive ${fmtDuration(e.keep_alive)}`);
    if (e.persistent) why.push('persistent');
    if (e.ttl) why.push(`ttl ${e.ttl} s`);
    if (e.in_flight) why.push('no idle stop while requests run');
    setTitle(c.idle, why.join(', '));
    renderIdle(tr);
    setText(c.starts, orDash(e.starts));
    setText(c.crashes, orDash(e.crashes));
    const err = e.last_error ? String(e.last_error) : '';
    setText(c.error, err ? shorten(err, 60) : '');
    setTitle(c.error, err + (e.retry_in ? ` (retry in ${fmtDuration(e.retry_in)})` : ''));
    // Load/unload act on the engine's first model (an engine serves one model, or a group started together).
    for (const b of c.actions.querySelectorAll('button')) {
      if (models.length) b.dataset.model = models[0];
      else delete b.dataset.model;
      b.hidden = !models.length;
    }
  }

  function renderIdle(tr) {
    let text = dash;
    if (typeof tr.idleAt_ === 'number') text = fmtDuration(Math.ceil((tr.idleAt_ - Date.now()) / 1000));
    else if (tr.state_ === 'ready') text = 'never'; // nothing will stop it (ttl 0, kept alive, persistent, busy)
    setText(tr.cells_.idle, text);
  }

  function renderEngines(engines, budget) {
    syncChildren($('engine-rows'), 'data-engine', engines, (e) => e.name, buildEngineRow, updateEngineRow);
    $('engines-empty').hidden = engines.length > 0;
    const hasBudget = !!(budget && budget.budget_mb);
    $('budget').hidden = !hasBudget;
    $('budget-bar').hidden = !hasBudget;
    if (hasBudget) {
      setText($('budget'), `memory ${fmtMB(budget.used_mb)} of ${fmtMB(budget.budget_mb)}`);
      $('budget-bar').max = budget.budget_mb;
      $('budget-bar').value = Math.min(budget.used_mb || 0, budget.budget_mb);
    }
  }

  // Load, unload, stop all. The POST answers only once the engine is up (or down): meanwhile the page refreshes
  // /status on its own, so the intermediate state (starting, stopping) shows at once.
  async function adminAction(path, btn, pending, done) {
    btn.disabled = true;
    notice(pending, 'info', 'action');
    setTimeout(() => scheduleStatus(0), 250);
    try {
      notice(done(await call(path, { method: 'POST' })), 'info', 'action');
    } catch (e) {
      report(e, 'action');
    } finally {
      btn.disabled = false;
      scheduleStatus();
    }
  }

  function modelAction(action, id, btn) {
    return adminAction(`/admin/models/${modelPath(id)}/${action}`, btn,
      `${action === 'load' ? 'loading' : 'unloading'} ${id}…`, (r) => `${id}: ${(r && r.state) || 'done'}`);
  }

  // ------------------------------------------------------------------------------------------- models

  const MODEL_FIELDS = ['id', 'kind', 'state', 'engine', 'memory', 'aliases'];

  function renderModels(models) {
    syncChildren($('model-rows'), 'data-model', models, (m) => m.id,
      (key) => {
        const tr = makeRow('data-model', key, MODEL_FIELDS, ['memory']);
        tr.cells_.id.className = 'mono';
        return tr;
      },
      (tr, m) => {
        const c = tr.cells_;
        setText(c.id, m.id);
        setTitle(c.id, m.source ? `source: ${m.source}` : '');
        setText(c.kind, orDash(m.kind));
        setState(c.state, m.state);
        setText(c.engine, orDash(m.engine || m.engine_id));
        setText(c.memory, fmtMB(m.memory_mb));
        setText(c.aliases, (m.aliases || []).join(', '));
      });
    $('models-empty').hidden = models.length > 0;
  }

  // ------------------------------------------------------------------------------------------- downloads

  function buildDownload(key) {
    const div = document.createElement('div');
    div.setAttribute('data-file', key);
    const name = document.createElement('span');
    name.className = 'file';
    name.textContent = key;
    name.title = key;
    const info = document.createElement('div');
    info.className = 'info';
    div.parts_ = { progress: document.createElement('progress') };
    for (const f of ['state', 'bytes', 'rate', 'eta']) {
      const span = document.createElement('span');
      span.dataset.field = f;
      if (info.childNodes.length) info.append(' · ');
      info.append(span);
      div.parts_[f] = span;
    }
    div.parts_.error = document.createElement('div');
    div.parts_.error.className = 'error';
    div.append(name, div.parts_.progress, info, div.parts_.error);
    return div;
  }

  function updateDownload(div, [, d]) {
    const p = div.parts_;
    const bytes = Number(d.bytes) || 0;
    const total = Number(d.total) || 0;
    const finished = d.state === 'done' || d.state === 'present';
    if (total > 0) {
      p.progress.max = total;
      p.progress.value = Math.min(bytes, total);
    } else if (['downloading', 'retrying', 'waiting'].includes(d.state)) {
      p.progress.removeAttribute('value'); // under way, size unknown: an indeterminate bar
    } else {
      p.progress.max = 1;
      p.progress.value = finished ? 1 : 0;
    }
    setState(p.state, d.state);
    setText(p.bytes, total > 0 ? `${fmtBytes(bytes)} of ${fmtBytes(total)}` : bytes ? fmtBytes(bytes) : dash);
    setText(p.rate, !finished && d.rate ? `${fmtBytes(d.rate)}/s` : dash);
    setText(p.eta, !finished && d.eta !== null && d.eta !== undefined ? `ETA ${fmtDuration(d.eta)}` : 'ETA ' + dash);
    setText(p.error, d.error ? String(d.error) : '');
    p.error.hidden = !d.error;
  }

  function renderDownloads(downloads) {
    const items = Object.entries(downloads);
    syncChildren($('download-list'), 'data-file', items, ([file]) => file, buildDownload, updateDownload);
    $('downloads-empty').hidden = items.length > 0;
  }

  // ------------------------------------------------------------------------------------------- embedding cache

  function renderCache(c) {
    if (!c) return;
    const field = (name) => document.querySelector(`#cache [data-field="${name}"]`);
    const hits = Number(c.hits) || 0;
    const misses = Number(c.misses) || 0;
    const lookups = hits + misses;
    setText(field('entries'), orDash(c.entries));
    setText(field('size'), fmtBytes(c.bytes));
    setText(field('hit-rate'), lookups ? `${((100 * hits) / lookups).toFixed(1)} %` : dash);
    setText(field('hits'), hits);
    setText(field('misses'), misses);
    setText(field('engine-requests'), orDash(c.engine_requests));
    setText(field('rejected'), orDash(c.rejected));
    const redis = c.redis;
    const el = field('redis');
    if (!redis) setText(el, 'not configured');
    else if (redis.available) setText(el, 'available');
    else setText(el, `unavailable (${redis.errors || 0} errors)`);
    setTitle(el, redis ? `errors ${redis.errors || 0}, rejected ${redis.rejected || 0}` : '');
    el.className = !redis ? '' : redis.available ? 'st-ready' : 'st-failed';
  }

  // ------------------------------------------------------------------------------------------- requests

  let requestsBusy = false;

  async function refreshRequests() {
    if (locked || requestsBusy) return;
    requestsBusy = true;
    try {
      const r = await call('/admin/requests');
      clearNotice('net', 'requests');
      renderInFlight((r && r.in_flight) || []);
      renderRecent(((r && r.recent) || []).slice(0, MAX_RECENT));
    } catch (e) {
      report(e, 'requests');
    } finally {
      requestsBusy = false;
    }
  }

  const IN_FLIGHT_FIELDS = ['time', 'method', 'path', 'model', 'elapsed', 'actions'];

  function renderInFlight(records) {
    syncChildren($('in-flight').tBodies[0], 'data-request', records, (r) => r.id,
      (key) => {
        const tr = makeRow('data-request', key, IN_FLIGHT_FIELDS, ['elapsed']);
        const b = button('cancel', 'Cancel', 'danger');
        b.dataset.request = key;
        tr.cells_.actions.append(b);
        return tr;
      },
      (tr, r) => {
        const c = tr.cells_;
        setText(c.time, fmtClock(r.time));
        setText(c.method, orDash(r.method));
        setText(c.path, orDash(r.path));
        setText(c.model, orDash(r.model));
        setTitle(c.path, r.stream ? 'streaming' : '');
        // Prefer the server's own count (no clock skew), moved on locally between polls.
        const started = toDate(r.time);
        tr.duration_ = r.duration_ms;
        tr.polledAt_ = Date.now();
        tr.startedAt_ = started ? started.getTime() : Date.now();
        renderElapsed(tr);
      });
    $('in-flight-empty').hidden = records.length > 0;
  }

  function renderElapsed(tr) {
    const ms = typeof tr.duration_ === 'number'
      ? tr.duration_ + (Date.now() - tr.polledAt_)
      : Date.now() - tr.startedAt_;
    setText(tr.cells_.elapsed, fmtElapsed(ms));
  }

  const RECENT_FIELDS = ['time', 'route', 'model', 'status', 'duration', 'ttft', 'tokens', 'cache', 'id'];

  function renderRecent(records) {
    syncChildren($('recent').tBodies[0], 'data-request', records, (r) => r.id,
      (key) => makeRow('data-request', key, RECENT_FIELDS, ['duration', 'ttft', 'tokens']),
      (tr, r) => {
        const c = tr.cells_;
        const cancelled = r.state === 'cancelled';
        tr.classList.toggle('cancelled', cancelled);
        setText(c.time, fmtClock(r.time));
        setTitle(c.time, String(r.time || ''));
        setText(c.route, `${r.method || ''} ${r.path || ''}`.trim());
        setTitle(c.route, r.stream ? 'streaming' : '');
        setText(c.model, orDash(r.model));
        let status = r.status === null || r.status === undefined ? '' : String(r.status);
        if (cancelled) status = status ? `${status} cancelled` : 'cancelled';
        else if (!status) status = r.state === 'in_flight' ? '…' : dash;
        setText(c.status, status);
        const cls = cancelled ? 'st st-cancelled' : r.status >= 400 ? 'st st-error' : r.status ? 'st st-ok' : 'st';
        if (c.status.className !== cls) c.status.className = cls;
        setText(c.duration, orDash(typeof r.duration_ms === 'number' ? Math.round(r.duration_ms) : null));
        setText(c.ttft, orDash(typeof r.ttft_ms === 'number' ? Math.round(r.ttft_ms) : null));
        setText(c.tokens, `${orDash(r.tokens_in)}/${orDash(r.tokens_out)}`);
        setText(c.cache, orDash(r.cache));
        setText(c.id, r.id);
      });
    $('recent-empty').hidden = records.length > 0;
  }

  async function cancelRequest(id, btn) {
    btn.disabled = true;
    try {
      const res = await request(`/admin/requests/${encodeURIComponent(id)}/cancel`, { method: 'POST' });
      if (res.status === 404) notice(`request ${id} is no longer in flight`, 'info', 'action');
      else if (!res.ok) throw new HttpError(res.status, await errorMessage(res));
      else notice(`cancelled request ${id}`, 'info', 'action');
    } catch (e) {
      btn.disabled = false;
      report(e, 'action');
    }
    go(refreshRequests(), 'requests');
  }

  // ------------------------------------------------------------------------------------------- logs

  let logQueue = [];
  let logTimer = 0;

  function syncLogEngines(names) {
    const sel = $('log-engine');
    const current = sel.value;
    const want = names.slice();
    if (current && !want.includes(current)) want.push(current); // keep following an engine that went away
    const have = Array.from(sel.options).slice(1).map((o) => o.value);
    if (have.length === want.length && have.every((v, i) => v === want[i])) return;
    while (sel.options.length > 1) sel.remove(1);
    for (const n of want) sel.add(new Option(n, n));
    sel.value = current;
  }

  function clearLogs() {
    logQueue = [];
    $('log-lines').textContent = '';
  }

  function startLogs() {
    if (logsStream) logsStream.stop();
    const engine = $('log-engine').value;
    const path = '/logs/stream' + (engine ? '?engine=' + encodeURIComponent(engine) : '');
    logsStream = follow(path, {
      open: clearLogs, // each connection replays the recent history: start from a clean pane, no duplicates
      event(type, data) {
        const d = JSON.parse(data);
        if (type === 'dropped') logQueue.push(`--- ${d.dropped} lines lost (the page fell behind) ---`);
        else if (type === 'log' || type === 'message') {
          logQueue.push(`${fmtClock(d.time)} [${d.engine || '?'}] ${d.line === undefined ? '' : d.line}`);
        } else return;
        if (!logTimer) logTimer = setTimeout(flushLogs, 50); // a history replay is hundreds of lines at once
      },
    });
  }

  function flushLogs() {
    logTimer = 0;
    const pre = $('log-lines');
    // Follow the tail only when the reader is at the bottom; someone scrolled up to read keeps their place.
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    const lines = logQueue.slice(-MAX_LOG_LINES);
    logQueue = [];
    const frag = document.createDocumentFragment();
    for (const line of lines) frag.appendChild(document.createTextNode(line + '\n'));
    pre.appendChild(frag);
    for (let extra = pre.childNodes.length - MAX_LOG_LINES; extra > 0; extra--) pre.removeChild(pre.firstChild);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  // ------------------------------------------------------------------------------------------- playground

  let modelsBusy = false;
  let userPickedModel = false;
  let chat = null;

  async function refreshModels() {
    if (locked || modelsBusy) return;
    modelsBusy = true;
    try {
      const r = await call('/v1/models');
      const ids = ((r && r.data) || [])
        .filter((m) => m.kind === undefined || m.kind === null || CHAT_KINDS.has(m.kind))
        .map((m) => String(m.id));
      const sel = $('pg-model');
      const current = sel.value;
      const have = Array.from(sel.options).map((o) => o.value);
      if (have.length !== ids.length || !have.every((v, i) => v === ids[i])) {
        sel.textContent = '';
        for (const id of ids) sel.add(new Option(id, id));
        if (ids.includes(current)) sel.value = current;
      }
      pickDefaultModel();
      $('pg-send').disabled = !!chat || !ids.length;
    } catch (e) {
      report(e, 'models');
    } finally {
      modelsBusy = false;
    }
  }

  // Until the user picks one, preselect the gateway's default model when it is a chat model.
  function pickDefaultModel() {
    const sel = $('pg-model');
    const def = lastStatus && lastStatus.default_model;
    if (!userPickedModel && def && Array.from(sel.options).some((o) => o.value === def)) sel.value = def;
  }

  function modelReady(id) {
    const m = lastStatus && (lastStatus.models || []).find((x) => x.id === id);
    return !!m && m.state === 'ready';
  }

  function pgStats(text, error = false) {
    const el = $('pg-stats');
    el.textContent = text;
    el.classList.toggle('error', error);
  }

  function statsText(run) {
    const usage = run.usage && typeof run.usage.completion_tokens === 'number' ? run.usage.completion_tokens : null;
    const tokens = usage !== null ? usage : run.chunks;
    const seconds = (run.last - run.first) / 1000;
    const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : dash;
    const ttft = run.first ? Math.round(run.first - run.t0) : dash;
    return `${tokens} tokens · ${rate} tok/s · TTFT ${ttft} ms`;
  }

  function setChatBusy(busy) {
    $('pg-send').disabled = busy || !$('pg-model').value;
    $('pg-stop').disabled = !busy;
  }

  async function send() {
    if (chat) return;
    const model = $('pg-model').value;
    const text = $('pg-input').value;
    if (!model) return pgStats('no chat model available', true);
    if (!text.trim()) return pgStats('type a message first', true);
    const out = $('pg-output');
    out.textContent = '';
    const sink = document.createTextNode(''); // one text node, grown with appendData: text only, never HTML
    out.appendChild(sink);
    const run = { ac: new AbortController(), t0: performance.now(), first: 0, last: 0, chunks: 0, usage: null };
    chat = run;
    setChatBusy(true);
    pgStats(modelReady(model) ? 'waiting…' : 'loading…');
    let failure = null;
    try {
      const res = await request('/v1/chat/completions', {
        method: 'POST',
        signal: run.ac.signal,
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
        body: JSON.stringify({
          model,
          messages: [{ role: 'user', content: text }],
          stream: true,
          stream_options: { include_usage: true },
        }),
      });
      if (!res.ok) throw new HttpError(res.status, await errorMessage(res));
      await readSSE(res.body, {
        comment() {
          if (!run.first) pgStats('loading…'); // the gateway keeps the stream alive while the engine starts
        },
        event(type, data) {
          if (data === '[DONE]') return;
          const chunk = JSON.parse(data);
          if (chunk.error) return void (failure = chunk.error.message || JSON.stringify(chunk.error));
          if (chunk.usage) run.usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          const piece = choice && choice.delta && choice.delta.content;
          if (!piece) return;
          const now = performance.now();
          if (!run.first) run.first = now;
          run.last = now;
          run.chunks++;
          const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
          sink.appendData(piece);
          if (atBottom) out.scrollTop = out.scrollHeight;
          pgStats(statsText(run));
        },
      });
      if (failure) throw new HttpError(0, failure);
      pgStats(run.first ? statsText(run) : 'no content in the answer · ' + statsText(run));
    } catch (e) {
      if (isAbort(e)) pgStats('stopped · ' + statsText(run));
      else if (e instanceof AuthError) pgStats('a key is needed', true);
      else if (e instanceof NetError) {
        pgStats('error: cannot reach the gateway', true);
        notice('cannot reach the gateway', 'error', 'net');
      } else {
        pgStats('error: ' + messageOf(e), true);
        notice(`playground: ${messageOf(e)}`, 'error', 'chat');
      }
    } finally {
      chat = null;
      setChatBusy(false);
      scheduleStatus(); // the engine may have started for this request
    }
  }

  // ------------------------------------------------------------------------------------------- wiring

  function tick() {
    for (const tr of $('engine-rows').children) renderIdle(tr);
    for (const tr of $('in-flight').tBodies[0].children) renderElapsed(tr);
  }

  // /status first, alone: without a key, one 401 (and one key prompt) rather than one per endpoint.
  async function reloadAll() {
    await refreshStatus();
    if (locked) return;
    go(refreshRequests(), 'requests');
    go(refreshModels(), 'models');
    startEvents();
    startLogs();
  }

  document.addEventListener('click', (ev) => {
    const btn = ev.target instanceof Element ? ev.target.closest('button[data-action]') : null;
    if (!btn || btn.disabled) return;
    const action = btn.dataset.action;
    if ((action === 'load' || action === 'unload') && btn.dataset.model) go(modelAction(action, btn.dataset.model, btn));
    else if (action === 'cancel' && btn.dataset.request) go(cancelRequest(btn.dataset.request, btn));
  });
  $('stop-all').addEventListener('click', () =>
    go(adminAction('/admin/engine/stop', $('stop-all'), 'stopping every engine…', () => 'every engine stopped')));
  $('log-engine').addEventListener('change', startLogs);
  $('log-clear').addEventListener('click', clearLogs);
  $('pg-model').addEventListener('change', () => { userPickedModel = true; });
  $('pg-send').addEventListener('click', () => go(send(), 'chat'));
  $('pg-stop').addEventListener('click', () => { if (chat) chat.ac.abort(); });
  $('pg-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      go(send(), 'chat');
    }
  });

  setChatBusy(false);
  setInterval(() => go(refreshStatus(), 'status'), STATUS_EVERY);
  setInterval(() => go(refreshRequests(), 'requests'), REQUESTS_EVERY);
  setInterval(() => go(refreshModels(), 'models'), MODELS_EVERY);
  setInterval(tick, 1000);
  go(reloadAll());
})();
