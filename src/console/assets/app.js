// eventgate console: the page's behaviour. Uses only the public API of the
// gateway through the client module (/console/client.js). The token lives in
// this tab's session storage and is never written into the page.

import { EventGateApi, EventGateClient, EventGateError, EVENT_TYPES, describeState } from './client.js';

const TOKEN_KEY = 'eventgate.console.token';
const INSTANCE_KEY = 'eventgate.console.instance';
const POSITION_KEY = 'eventgate.console.position.';
/** Envelopes kept in memory (for search and resume); older ones are dropped. */
const KEEP = 1000;
/** Rows shown at most; the rest are summed up in the "N more" marker. */
const SHOW = 200;
/** How often the instance list (live client counts) is refreshed. */
const LIST_EVERY_MS = 5000;

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat('en');

const state = {
  api: null,
  isAccount: false,
  instances: [],
  current: null,
  client: null,
  listTimer: null,
  tickTimer: null,
  // live view
  buffer: [],
  received: 0,
  counts: Object.fromEntries(EVENT_TYPES.map((t) => [t, 0])),
  pending: [],
  redraw: false,
  paused: false,
  pausedNew: 0,
  /** The last entry received before the pause (`seq`). */
  pausedAt: 0,
  frame: 0,
  search: '',
  replayed: 0,
  recovery: null,
  seq: 0,
  position: null,
  // webhooks
  deadLabel: undefined,
  deadNext: null,
};

// ---------------------------------------------------------------- helpers

function show(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function errorText(e) {
  if (e instanceof EventGateError) {
    const details = e.details ? ` (${e.details})` : '';
    if (e.status === 429) return `Rate limit exceeded. Try again in ${e.retryAfter ?? 60} s.`;
    return `${e.message}${details}`;
  }
  return String(e?.message ?? e);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function mask(secret) {
  if (!secret) return '';
  return '•'.repeat(8);
}

function time(ms) {
  const d = new Date(ms);
  return `${d.toLocaleTimeString('en-GB', { hour12: false })}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString('en-GB', { hour12: false }) : 'never';
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = el('textarea', { class: 'sr-only' });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand('copy');
    area.remove();
  }
  const before = button.textContent;
  button.textContent = 'Copied';
  setTimeout(() => (button.textContent = before), 1200);
}

function typeChecks(container, name, onChange) {
  container.replaceChildren(
    ...EVENT_TYPES.map((t) =>
      el('label', {}, el('input', { type: 'checkbox', name, value: t, onchange: onChange }), t),
    ),
  );
}

function ticked(container) {
  return [...container.querySelectorAll('input[type=checkbox]:checked')].map((i) => i.value);
}

function tick(container, list) {
  for (const box of container.querySelectorAll('input[type=checkbox]')) box.checked = list.includes(box.value);
}

function describeTypes(list) {
  return list.length === 0 ? 'all six types' : list.join(', ');
}

// ---------------------------------------------------------------- sign in

async function signIn(token, { remember }) {
  const api = new EventGateApi({ token });
  const instances = await api.listInstances();
  state.api = api;
  state.instances = instances;
  // The list carries `token` only for a TokenAccount; an instance token always sees its own instance.
  state.isAccount = instances.length === 0 || instances.some((i) => typeof i.token === 'string');
  if (remember) sessionStorage.setItem(TOKEN_KEY, token);
  $('login').hidden = true;
  $('app').hidden = false;
  $('who').hidden = false;
  $('who-kind').textContent = state.isAccount ? 'Signed in with a TokenAccount' : 'Signed in with a TokenInstance';
  $('create-form').hidden = !state.isAccount;
  renderInstances();
  clearInterval(state.listTimer);
  state.listTimer = setInterval(refreshInstances, LIST_EVERY_MS);
  const saved = sessionStorage.getItem(INSTANCE_KEY);
  const fromHash = linkedInstance();
  const wanted = [fromHash, saved].find((n) => n && instances.some((i) => i.name === n));
  if (wanted) selectInstance(wanted);
  else if (instances.length === 1) selectInstance(instances[0].name);
}

/**
 * The instance a link names (`#instance=<name>`), or '' when it names none
 * or one this token does not have (said under the list; the link is dropped).
 */
function linkedInstance() {
  let name = '';
  try {
    name = decodeURIComponent(location.hash.replace(/^#instance=/, ''));
  } catch {
    // A malformed link (`#instance=%`) names no instance.
  }
  if (name && !state.instances.some((i) => i.name === name)) {
    show($('link-error'), `The link names an instance this token does not have: “${name}”.`);
    history.replaceState(null, '', state.current ? `#instance=${encodeURIComponent(state.current)}` : location.pathname);
    return '';
  }
  return name;
}

// A link followed while the console is open.
window.addEventListener('hashchange', async () => {
  if (!state.api) return;
  // The list may be a few seconds old: an instance made since is in it after this.
  await refreshInstances();
  const name = linkedInstance();
  if (name) {
    show($('link-error'), '');
    selectInstance(name);
  }
});

function signOut() {
  show($('link-error'), '');
  stopLive();
  clearInterval(state.listTimer);
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(INSTANCE_KEY);
  for (const key of Object.keys(sessionStorage)) if (key.startsWith(POSITION_KEY)) sessionStorage.removeItem(key);
  state.api = null;
  state.current = null;
  $('app').hidden = true;
  $('who').hidden = true;
  $('conn').hidden = true;
  $('detail').hidden = true;
  $('login').hidden = false;
  $('token').value = '';
  $('token').focus();
  history.replaceState(null, '', location.pathname);
}

$('login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const input = $('token');
  const token = input.value.trim();
  show($('login-error'), '');
  if (!token) return;
  try {
    await signIn(token, { remember: true });
    input.value = '';
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    const why =
      e instanceof EventGateError && e.status === 401
        ? 'That token is not valid on this gateway (Invalid token). Check it and try again.'
        : `Could not sign in: ${errorText(e)}`;
    show($('login-error'), why);
    input.focus();
    input.select();
  }
});

$('forget').addEventListener('click', signOut);

// ---------------------------------------------------------------- instances

async function refreshInstances() {
  if (!state.api) return;
  try {
    state.instances = await state.api.listInstances();
    show($('instances-error'), '');
    renderInstances();
  } catch (e) {
    show($('instances-error'), `Could not list instances: ${errorText(e)}`);
  }
}

function renderInstances() {
  const list = $('instances');
  const items = state.instances.map((inst) => {
    const clients = `${inst.connectedClients} ${inst.connectedClients === 1 ? 'client' : 'clients'}`;
    const off = !inst.websocket || !inst.websocket.enabled;
    return el(
      'li',
      {},
      el(
        'button',
        {
          type: 'button',
          'data-instance': inst.name,
          'aria-current': inst.name === state.current ? 'true' : 'false',
          onclick: () => {
            show($('link-error'), '');
            selectInstance(inst.name);
          },
        },
        el('span', { class: 'name', text: inst.name }),
        off ? el('span', { class: 'off', text: 'WebSocket off' }) : el('span', { class: 'clients', text: clients }),
      ),
    );
  });
  // The list is rebuilt every few seconds: keyboard focus stays on the
  // instance it was on.
  const focused = list.contains(document.activeElement) ? document.activeElement.dataset.instance : undefined;
  list.replaceChildren(...items);
  if (focused !== undefined) {
    list.querySelector(`button[data-instance="${CSS.escape(focused)}"]`)?.focus({ preventScroll: true });
  }
  if (state.instances.length === 0 && state.isAccount) $('create-form').open = true;
  $('instances-hint').textContent =
    state.instances.length === 0
      ? state.isAccount
        ? 'No instances yet: create one below (New instance), or with POST /api/instance/new.'
        : 'No instances for this token.'
      : state.current
        ? 'Counts are this node’s connected clients, the console included.'
        : 'Pick an instance to watch its events live.';
}

$('refresh').addEventListener('click', refreshInstances);

$('create-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = $('create-name').value.trim();
  show($('create-error'), '');
  try {
    await state.api.createInstance({ name, websocketEnabled: true });
    $('create-name').value = '';
    await refreshInstances();
    selectInstance(name);
  } catch (e) {
    show($('create-error'), errorText(e));
  }
});

function selectInstance(name) {
  if (state.current === name && state.client) return;
  stopLive();
  state.current = name;
  sessionStorage.setItem(INSTANCE_KEY, name);
  history.replaceState(null, '', `#instance=${encodeURIComponent(name)}`);
  $('detail').hidden = false;
  $('detail-title').textContent = name;
  renderInstances();
  resetLive();
  startLive();
  selectTab(currentTab());
}

// ---------------------------------------------------------------- tabs

const TABS = ['live', 'settings', 'webhooks', 'publish'];

function currentTab() {
  return TABS.find((t) => $(`tab-${t}`).getAttribute('aria-selected') === 'true') ?? 'live';
}

function selectTab(name) {
  for (const t of TABS) {
    $(`tab-${t}`).setAttribute('aria-selected', String(t === name));
    $(`panel-${t}`).hidden = t !== name;
  }
  if (name === 'settings') loadSettings();
  if (name === 'webhooks') loadWebhooks();
  if (name === 'publish') preparePublish();
}

for (const t of TABS) $(`tab-${t}`).addEventListener('click', () => selectTab(t));

// ---------------------------------------------------------------- live view

function resetLive() {
  state.buffer = [];
  state.received = 0;
  state.pending = [];
  state.pausedNew = 0;
  state.replayed = 0;
  state.recovery = null;
  for (const t of EVENT_TYPES) state.counts[t] = 0;
  $('events').replaceChildren();
  renderCounts();
  renderMore();
  setPaused(false);
}

function savedPosition(name) {
  try {
    const raw = sessionStorage.getItem(POSITION_KEY + name);
    const pos = raw ? JSON.parse(raw) : null;
    return pos && typeof pos.epoch === 'string' && pos.epoch !== '' && Number.isInteger(pos.offset) ? pos : null;
  } catch {
    return null;
  }
}

/** Where a reload resumes from (written once per frame, not per event). */
function savePosition() {
  if (!state.position || !state.current) return;
  sessionStorage.setItem(POSITION_KEY + state.current, JSON.stringify(state.position));
  state.position = null;
}

function startLive() {
  const name = state.current;
  const client = new EventGateClient({
    instance: name,
    token: state.api.token,
    events: ticked($('live-types')),
    position: savedPosition(name),
  });
  state.client = client;
  client.on('event', (envelope, meta) => onEvent(envelope, meta));
  client.on('state', () => {
    renderConn();
    if (client.state.state === 'live') setTimeout(refreshInstances, 300);
  });
  client.on('recovery', (outcome) => {
    if (outcome.requested) {
      state.recovery = outcome;
      state.replayed = 0;
    }
    renderConn();
  });
  client.on('error', (e) => {
    if (e instanceof EventGateError) show($('live-error'), errorText(e));
  });
  client.on('open', () => show($('live-error'), ''));
  client.connect();
  clearInterval(state.tickTimer);
  state.tickTimer = setInterval(renderConn, 500);
  renderConn();
}

function stopLive() {
  savePosition();
  if (state.client) {
    state.client.close();
    state.client = null;
  }
  clearInterval(state.tickTimer);
  cancelAnimationFrame(state.frame);
  state.frame = 0;
}

function renderConn() {
  const conn = $('conn');
  const client = state.client;
  if (!client) {
    conn.hidden = true;
    return;
  }
  const s = client.state;
  let phrase = describeState(s);
  let kind = s.state;
  const r = state.recovery;
  if (s.state === 'live' && r && r.requested) {
    if (!r.recovered) {
      phrase = 'live · could not recover: reload from your backend';
    } else if (state.replayed > 0) {
      phrase = `live · recovered ${fmt.format(state.replayed)} missed ${state.replayed === 1 ? 'event' : 'events'}`;
    } else if (r.afterDrop) {
      // After a drop, say that nothing was lost; after a filter change or a
      // resume from a saved position with nothing missed, plain "live".
      phrase = 'live · recovered, nothing missed';
    }
  }
  if (s.state === 'waiting' && /^WebSocket is not enabled/.test(s.reason ?? '')) {
    phrase = `${describeState({ ...s, reason: '' })} — its WebSocket is off: enable it under “WebSocket settings”`;
  }
  if (s.state === 'reconnecting') kind = 'connecting';
  conn.hidden = false;
  conn.className = `conn ${kind}`;
  // What this connection asks for (?events=), for people and tests alike.
  conn.dataset.events = s.state === 'live' ? client.events.join(',') || 'all' : '';
  conn.textContent = `${state.current}: ${phrase}`;
}

function onEvent(envelope, meta) {
  state.received += 1;
  if (meta.replayed) state.replayed += 1;
  if (envelope.event in state.counts) state.counts[envelope.event] += 1;
  const entry = { seq: ++state.seq, at: Date.now(), envelope, replayed: meta.replayed, text: null };
  state.buffer.push(entry);
  if (state.buffer.length > KEEP * 1.2) state.buffer.splice(0, state.buffer.length - KEEP);
  if (envelope.offset !== undefined && envelope.epoch) state.position = { epoch: envelope.epoch, offset: envelope.offset };
  if (state.paused) {
    state.pausedNew += 1;
  } else if (!state.redraw) {
    state.pending.push(entry);
    // No frame for a while (a hidden tab gets none): rather than a backlog
    // beyond the kept events, the next frame redraws from those.
    if (state.pending.length > KEEP) {
      state.pending = [];
      state.redraw = true;
    }
  }
  if (!state.frame) state.frame = requestAnimationFrame(flush);
}

/** Once per animation frame: counts, the paused note, and new rows (at most SHOW). */
function flush() {
  state.frame = 0;
  savePosition();
  renderCounts();
  if (state.paused) {
    $('paused-note').textContent = `${fmt.format(state.pausedNew)} new while paused`;
    $('paused-note').hidden = false;
    renderMore();
    return;
  }
  if (state.redraw) {
    rerender();
    if (state.recovery) renderConn();
    return;
  }
  const fresh = state.pending.filter(matches).slice(-SHOW);
  state.pending = [];
  if (fresh.length) {
    const list = $('events');
    const frag = document.createDocumentFragment();
    for (let i = fresh.length - 1; i >= 0; i -= 1) frag.append(row(fresh[i]));
    list.prepend(frag);
    while (list.childElementCount > SHOW) list.lastElementChild.remove();
  }
  if (state.recovery) renderConn();
  renderMore();
}

/** The text a search looks in: the envelope as shown, its token masked (a search must not find what the page hides). */
function envelopeText(entry) {
  if (entry.text === null) entry.text = JSON.stringify(shownEnvelope(entry.envelope)).toLowerCase();
  return entry.text;
}

/** Whether the list may show the entry: the search's, and while paused only what came before the pause. */
function matches(entry) {
  if (state.paused && entry.seq > state.pausedAt) return false;
  return !state.search || envelopeText(entry).includes(state.search);
}

function summary(envelope) {
  const d = envelope.data ?? {};
  const pick =
    d.text ?? d.message?.text ?? d.message?.conversation ?? d.status ?? d.state ?? d.action ?? d.name ?? null;
  const text = typeof pick === 'string' ? pick : JSON.stringify(d);
  return text.length > 160 ? `${text.slice(0, 157)}…` : text;
}

/** The envelope as the page shows it: `instanceData.token` masked. */
function shownEnvelope(envelope) {
  const token = envelope.instanceData?.token;
  if (typeof token !== 'string') return envelope;
  return { ...envelope, instanceData: { ...envelope.instanceData, token: mask(token) } };
}

function maskedEnvelope(envelope) {
  return JSON.stringify(shownEnvelope(envelope), null, 2);
}

function row(entry) {
  const { envelope } = entry;
  const details = el(
    'details',
    {},
    el(
      'summary',
      {},
      el('span', { class: 'time', text: time(entry.at) }),
      el('span', { class: 'type', text: envelope.event }),
      el('span', { class: 'summary', text: summary(envelope) }, entry.replayed ? el('span', { class: 'replayed', text: ' (recovered)' }) : null),
    ),
  );
  details.addEventListener(
    'toggle',
    () => {
      if (!details.open || details.querySelector('.body')) return;
      let revealed = false;
      const pre = el('pre', { class: 'json', text: maskedEnvelope(envelope) });
      const copy = el('button', { type: 'button', class: 'small secondary', text: 'Copy JSON' });
      copy.addEventListener('click', () => copyText(pre.textContent, copy));
      const reveal = el('button', { type: 'button', class: 'small secondary', text: 'Show token' });
      reveal.addEventListener('click', () => {
        revealed = !revealed;
        pre.textContent = revealed ? JSON.stringify(envelope, null, 2) : maskedEnvelope(envelope);
        reveal.textContent = revealed ? 'Hide token' : 'Show token';
      });
      details.append(el('div', { class: 'body' }, pre, el('div', { class: 'row' }, copy, reveal)));
    },
  );
  return el('li', { 'data-type': envelope.event, 'data-seq': entry.seq }, details);
}

function rerender() {
  const rows = state.buffer.filter(matches).slice(-SHOW);
  const frag = document.createDocumentFragment();
  for (let i = rows.length - 1; i >= 0; i -= 1) frag.append(row(rows[i]));
  $('events').replaceChildren(frag);
  state.pending = [];
  state.redraw = false;
  renderMore();
}

function renderCounts() {
  $('counts').replaceChildren(
    el('span', {}, 'total ', el('b', { text: fmt.format(state.received) })),
    ...EVENT_TYPES.map((t) => el('span', { 'data-type': t }, `${t} `, el('b', { text: fmt.format(state.counts[t]) }))),
  );
}

function renderMore() {
  const listed = $('events').childElementCount;
  const matching = state.search ? state.buffer.filter(matches).length : state.received - state.pausedNew;
  const hidden = Math.max(0, matching - listed);
  const more = $('events-more');
  if (hidden > 0) {
    more.textContent = state.search
      ? `${fmt.format(hidden)} more matching events not shown (the newest ${SHOW} are listed; search covers the last ${fmt.format(KEEP)})`
      : `${fmt.format(hidden)} more events not shown (the newest ${SHOW} are listed)`;
    more.hidden = false;
  } else {
    more.hidden = true;
  }
  $('events-empty').hidden = state.received > 0;
}

function setPaused(paused) {
  state.paused = paused;
  const button = $('pause');
  button.textContent = paused ? 'Resume' : 'Pause';
  button.setAttribute('aria-pressed', String(paused));
  if (!paused) {
    $('paused-note').hidden = true;
    if (state.pausedNew > 0) {
      state.pausedNew = 0;
      rerender();
    }
  } else {
    state.pausedNew = 0;
    state.pausedAt = state.seq;
    $('paused-note').textContent = '0 new while paused';
    $('paused-note').hidden = false;
  }
}

$('pause').addEventListener('click', () => setPaused(!state.paused));
$('clear').addEventListener('click', () => {
  const paused = state.paused;
  resetLive();
  setPaused(paused);
});

let searchTimer = 0;
$('search').addEventListener('input', () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    state.search = $('search').value.trim().toLowerCase();
    rerender();
  }, 150);
});

let filterTimer = 0;
typeChecks($('live-types'), 'live-type', () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => state.client?.setEvents(ticked($('live-types'))), 200);
});

// ---------------------------------------------------------------- WebSocket settings

typeChecks($('ws-types'), 'ws-type', () => {});

async function loadSettings() {
  const name = state.current;
  show($('settings-result'), '');
  show($('settings-error'), '');
  try {
    const ws = await state.api.getWebsocket(name);
    if (name !== state.current) return;
    $('ws-enabled').checked = Boolean(ws?.enabled);
    tick($('ws-types'), ws?.events ?? []);
    $('ws-media').checked = Boolean(ws?.mediaBase64);
    $('settings-state').textContent = ws
      ? `Now: ${ws.enabled ? 'enabled' : 'disabled'}, ${describeTypes(ws.events)}${ws.mediaBase64 ? ', media base64 kept' : ''}.`
      : 'Not configured yet: clients are refused until it is enabled.';
  } catch (e) {
    show($('settings-error'), errorText(e));
  }
}

$('settings-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  show($('settings-result'), '');
  show($('settings-error'), '');
  try {
    const saved = await state.api.setWebsocket(state.current, {
      enabled: $('ws-enabled').checked,
      events: ticked($('ws-types')),
      mediaBase64: $('ws-media').checked,
    });
    show($('settings-result'), `Saved: ${saved.enabled ? 'enabled' : 'disabled'}, ${describeTypes(saved.events)}.`);
    await loadSettings();
    show($('settings-result'), `Saved: ${saved.enabled ? 'enabled' : 'disabled'}, ${describeTypes(saved.events)}.`);
    refreshInstances();
  } catch (e) {
    show($('settings-error'), errorText(e));
  }
});

// ---------------------------------------------------------------- webhooks

typeChecks($('wh-types'), 'wh-type', () => {});

function secretField(value) {
  if (!value) return el('span', { text: 'none' });
  const span = el('span', { class: 'secret', text: mask(value) });
  let shown = false;
  const button = el('button', { type: 'button', class: 'link', text: 'show' });
  button.addEventListener('click', () => {
    shown = !shown;
    span.textContent = shown ? value : mask(value);
    button.textContent = shown ? 'hide' : 'show';
  });
  return el('span', {}, span, ' ', button);
}

async function loadWebhooks() {
  const name = state.current;
  show($('webhooks-error'), '');
  let hooks;
  try {
    hooks = await state.api.listWebhooks(name);
  } catch (e) {
    if (e instanceof EventGateError && e.notAvailable) {
      $('webhooks-unavailable').hidden = false;
      $('webhooks-area').hidden = true;
      return;
    }
    show($('webhooks-error'), errorText(e));
    return;
  }
  if (name !== state.current) return;
  $('webhooks-unavailable').hidden = true;
  $('webhooks-area').hidden = false;
  $('webhooks-empty').hidden = hooks.length > 0;
  $('webhooks').replaceChildren(...hooks.map(webhookCard));
}

function webhookCard(hook) {
  const s = hook.stats ?? {};
  const dead = el('button', { type: 'button', class: 'small', text: `Dead letters (${fmt.format(s.failed ?? 0)})` });
  dead.addEventListener('click', () => openDead(hook.label));
  const edit = el('button', { type: 'button', class: 'small secondary', text: 'Edit' });
  edit.addEventListener('click', () => editWebhook(hook));
  const remove = el('button', { type: 'button', class: 'small secondary', text: 'Delete' });
  remove.addEventListener('click', async () => {
    if (!confirm(`Delete webhook “${hook.label}” with its pending deliveries and dead letters?`)) return;
    try {
      await state.api.deleteWebhook(state.current, hook.label);
      loadWebhooks();
    } catch (e) {
      show($('webhooks-error'), errorText(e));
    }
  });
  return el(
    'li',
    { class: 'card', 'data-label': hook.label },
    el(
      'div',
      { class: 'wh-head' },
      el('span', { class: 'label', text: hook.label }),
      el('span', { class: `badge ${hook.enabled ? 'on' : 'off'}`, text: hook.enabled ? 'enabled' : 'disabled' }),
      hook.ordered ? el('span', { class: 'badge', text: 'ordered' }) : null,
    ),
    el(
      'dl',
      { class: 'facts' },
      el('dt', { text: 'URL' }), el('dd', { text: hook.url ?? '—' }),
      el('dt', { text: 'Events' }), el('dd', { text: describeTypes(hook.events ?? []) }),
      el('dt', { text: 'Authorization' }), el('dd', {}, secretField(hook.authorization)),
      el('dt', { text: 'Secret' }), el('dd', {}, secretField(hook.secret)),
    ),
    el(
      'div',
      { class: 'stats', 'aria-label': 'Delivery stats' },
      el('span', { 'data-stat': 'pending', text: `pending ${fmt.format(s.pending ?? 0)}` }),
      el('span', { 'data-stat': 'failed', text: `dead letters ${fmt.format(s.failed ?? 0)}` }),
      el('span', { 'data-stat': 'delivered', text: `delivered ${fmt.format(s.delivered ?? 0)}` }),
      el('span', { text: `last success ${when(s.lastSuccessAt)}` }),
      el('span', { text: `last failure ${when(s.lastFailureAt)}` }),
    ),
    s.lastError ? el('p', { class: 'error', text: `Last error: ${s.lastError}` }) : null,
    el('div', { class: 'row' }, dead, edit, remove),
  );
}

function editWebhook(hook) {
  const form = $('webhook-form');
  form.hidden = false;
  $('webhook-form-title').textContent = hook ? `Edit webhook “${hook.label}”` : 'Add a webhook';
  $('wh-label').value = hook?.label ?? '';
  $('wh-label').readOnly = Boolean(hook);
  $('wh-enabled').checked = hook ? hook.enabled : true;
  $('wh-url').value = hook?.url ?? '';
  $('wh-auth').value = hook?.authorization ?? '';
  tick($('wh-types'), hook?.events ?? []);
  $('wh-byevents').checked = Boolean(hook?.byEvents);
  $('wh-media').checked = Boolean(hook?.mediaBase64);
  $('wh-ordered').checked = Boolean(hook?.ordered);
  $('wh-rotate').checked = false;
  show($('webhook-form-error'), '');
  (hook ? $('wh-url') : $('wh-label')).focus();
}

$('webhook-new').addEventListener('click', () => editWebhook(null));
$('webhooks-refresh').addEventListener('click', loadWebhooks);
$('wh-cancel').addEventListener('click', () => ($('webhook-form').hidden = true));
$('webhook-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  show($('webhook-form-error'), '');
  const config = {
    label: $('wh-label').value.trim() || 'default',
    enabled: $('wh-enabled').checked,
    byEvents: $('wh-byevents').checked,
    events: ticked($('wh-types')),
    mediaBase64: $('wh-media').checked,
    ordered: $('wh-ordered').checked,
    rotateSecret: $('wh-rotate').checked,
    authorization: $('wh-auth').value || null,
  };
  const url = $('wh-url').value.trim();
  if (url) config.url = url;
  try {
    await state.api.setWebhook(state.current, config);
    $('webhook-form').hidden = true;
    loadWebhooks();
  } catch (e) {
    show($('webhook-form-error'), errorText(e));
  }
});

async function openDead(label, more = false) {
  state.deadLabel = label;
  const section = $('dead');
  section.hidden = false;
  $('dead-title').textContent = `Dead letters of “${label}”`;
  if (!more) {
    $('dead-list').replaceChildren();
    state.deadNext = null;
    show($('dead-result'), '');
  }
  show($('dead-error'), '');
  try {
    const page = await state.api.failedDeliveries(state.current, { label, limit: 50, after: more ? state.deadNext : undefined });
    state.deadNext = page.next;
    $('dead-list').append(...page.deliveries.map(deadRow));
    $('dead-empty').hidden = $('dead-list').childElementCount > 0;
    $('dead-more').hidden = !page.next;
    $('dead-retry-all').disabled = $('dead-list').childElementCount === 0;
  } catch (e) {
    show($('dead-error'), errorText(e));
  }
  section.scrollIntoView({ block: 'nearest' });
}

function deadRow(d) {
  const retry = el('button', { type: 'button', class: 'small', text: 'Retry' });
  retry.addEventListener('click', () => retryDead([d.id], retry));
  const status = d.lastStatus === null ? 'no HTTP status' : `HTTP ${d.lastStatus}`;
  const why = d.lastError === status ? status : `${d.lastError} · ${status}`;
  const details = el(
    'details',
    {},
    el(
      'summary',
      {},
      el('span', { class: 'time', text: when(d.createdAt) }),
      el('span', { class: 'type', text: d.event }),
      el('span', { class: 'summary', text: `${why} · ${d.attempts} ${d.attempts === 1 ? 'attempt' : 'attempts'}` }),
    ),
  );
  details.addEventListener('toggle', () => {
    if (!details.open || details.querySelector('.body')) return;
    const pre = el('pre', { class: 'json', text: maskedEnvelope(d.envelope) });
    const copy = el('button', { type: 'button', class: 'small secondary', text: 'Copy JSON' });
    copy.addEventListener('click', () => copyText(pre.textContent, copy));
    details.append(
      el(
        'div',
        { class: 'body' },
        el('p', { class: 'help', text: `${d.id} · last attempt ${when(d.lastAttemptAt)}` }),
        pre,
        el('div', { class: 'row' }, retry, copy),
      ),
    );
  });
  return el('li', { 'data-id': d.id }, details);
}

async function retryDead(ids, button) {
  show($('dead-error'), '');
  if (button) button.disabled = true;
  try {
    const n = await state.api.retryDeliveries(state.current, { label: state.deadLabel, ids });
    show($('dead-result'), `${fmt.format(n)} ${n === 1 ? 'delivery' : 'deliveries'} requeued.`);
    const label = state.deadLabel;
    await loadWebhooks();
    const result = $('dead-result').textContent;
    await openDead(label);
    show($('dead-result'), result);
  } catch (e) {
    show($('dead-error'), errorText(e));
    if (button) button.disabled = false;
  }
}

$('dead-retry-all').addEventListener('click', () => retryDead(undefined, $('dead-retry-all')));
$('dead-more').addEventListener('click', () => openDead(state.deadLabel, true));
$('dead-close').addEventListener('click', () => ($('dead').hidden = true));

// ---------------------------------------------------------------- publish

$('pub-type').replaceChildren(...EVENT_TYPES.map((t) => el('option', { value: t, text: t })));

function preparePublish() {
  const allowed = state.isAccount;
  $('pub-send').disabled = !allowed;
  $('publish-note').textContent = allowed
    ? `Sends POST /api/events/publish/${state.current} with this TokenAccount.`
    : 'Publishing needs a TokenAccount; this console was opened with a TokenInstance.';
}

$('publish-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  show($('publish-result'), '');
  show($('publish-error'), '');
  let data;
  try {
    data = JSON.parse($('pub-data').value);
  } catch (e) {
    show($('publish-error'), `data is not valid JSON: ${e.message}`);
    return;
  }
  if (data === null || typeof data !== 'object' || Array.isArray(data)) {
    show($('publish-error'), 'data must be a JSON object.');
    return;
  }
  try {
    const n = await state.api.publishEvent(state.current, $('pub-type').value, data);
    show($('publish-result'), `Accepted ${n} ${n === 1 ? 'event' : 'events'} (${$('pub-type').value}).`);
  } catch (e) {
    show($('publish-error'), errorText(e));
  }
});

// ---------------------------------------------------------------- start

(async function start() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    $('token').focus();
    return;
  }
  try {
    await signIn(token, { remember: false });
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    $('login').hidden = false;
    $('app').hidden = true;
    show($('login-error'), `The saved token no longer works: ${errorText(e)}`);
    $('token').focus();
  }
})();

// A reload resumes from the last event shown.
addEventListener('pagehide', savePosition);
