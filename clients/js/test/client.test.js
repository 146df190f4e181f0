// The client against a real gateway binary (see gateway.js): events,
// per-client narrowing, close codes (4004, 4008, 1001), refusals,
// recovery when the gateway keeps a history, and the REST helper.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { createServer, connect as tcpConnect } from 'node:net';

import { EventGateClient, EventGateApi, EventGateError, EVENT_TYPES, ORIGIN_SUSPECTED, UPGRADE_REFUSED, describeState } from '../index.js';
import { Gateway, ACCOUNT, waitFor, hasHistory } from './gateway.js';

let gw;

before(async () => {
  gw = await Gateway.start({ EVENTGATE_WS_HISTORY_SIZE: '1000' });
});

after(async () => {
  await gw?.close();
});

/** A ws constructor that remembers every socket it made. */
function recordingWebSocket() {
  const made = [];
  class Recording extends WebSocket {
    constructor(url) {
      super(url);
      made.push(this);
    }
  }
  return { Recording, made };
}

function collect(client) {
  const got = [];
  const states = [];
  client.on('event', (env, meta) => got.push({ env, meta }));
  client.on('state', (s) => states.push(s));
  return { got, states };
}

test('receives published events with the instance token, narrowed by ?events=', async () => {
  const token = await gw.instance('narrow-1');
  const client = new EventGateClient({
    baseUrl: gw.base,
    instance: 'narrow-1',
    token,
    events: ['call.update'],
    WebSocket,
  });
  const { got, states } = collect(client);
  client.connect();
  await waitFor(() => client.state.state === 'live', { what: 'live' });
  await waitFor(async () => (await gw.clients('narrow-1')) === 1, { what: 'joined' });
  await gw.publish('narrow-1', [
    { event: 'message.exchange', data: { n: 1 } },
    { event: 'call.update', data: { n: 2 } },
  ]);
  await waitFor(() => got.length >= 1, { what: 'an event' });
  assert.equal(got[0].env.event, 'call.update');
  assert.deepEqual(got[0].env.data, { n: 2 });
  assert.equal(got[0].env.instanceData.instance, 'narrow-1');
  assert.equal(got[0].env.instanceData.token, token);
  assert.equal(got[0].meta.replayed, false);
  assert.equal(states[0].state, 'connecting');
  assert.equal(describeState(states[0]), 'connecting…');
  assert.equal(describeState(client.state), 'live');

  // Widening the narrowing reconnects with the new list.
  client.setEvents([]);
  await waitFor(() => client.state.state === 'live' && client._socket?.readyState === 1, { what: 'reopened' });
  await waitFor(async () => (await gw.clients('narrow-1')) === 1, { what: 'rejoined' });
  await gw.publish('narrow-1', { event: 'message.exchange', data: { n: 3 } });
  await waitFor(() => got.some((g) => g.env.data.n === 3), { what: 'the widened event' });
  assert.ok(!got.some((g) => g.env.data.n === 1), 'the narrowed-out event never arrives');
  client.close();
  assert.equal(client.state.state, 'closed');
  await waitFor(async () => (await gw.clients('narrow-1')) === 0, { what: 'left' });
});

test('the URL carries the token, narrowing and recovery position', () => {
  const client = new EventGateClient({
    baseUrl: 'https://gw.example.test/',
    instance: 'a b',
    token: 't&k',
    events: ['label.update', 'call.update', 'label.update'],
    position: { epoch: 'e1', offset: 41 },
    WebSocket,
  });
  const url = new URL(client.url());
  assert.equal(url.protocol, 'wss:');
  assert.equal(url.pathname, '/ws/a%20b');
  assert.equal(url.searchParams.get('token'), 't&k');
  assert.equal(url.searchParams.get('events'), 'label.update,call.update');
  assert.equal(url.searchParams.get('recover'), 'true');
  assert.equal(url.searchParams.get('epoch'), 'e1');
  assert.equal(url.searchParams.get('since'), '41');
  const plain = new EventGateClient({ baseUrl: 'http://h:1', instance: 'x', token: 't', recover: false, WebSocket });
  assert.equal(plain.url(), 'ws://h:1/ws/x?token=t');
  assert.throws(() => new EventGateClient({ baseUrl: 'http://h', instance: 'x', token: 't', events: ['nope'], WebSocket }));
  assert.throws(() => new EventGateClient({ baseUrl: 'http://h', instance: 'x', token: 't', WebSocket: undefined, }), /WebSocket/);
});

test('back-off grows exponentially, is capped, and is jittered', () => {
  let r = 0;
  const client = new EventGateClient({
    baseUrl: 'http://h',
    instance: 'x',
    token: 't',
    WebSocket,
    backoff: { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5 },
    random: () => r,
  });
  r = 0;
  assert.deepEqual([1, 2, 3, 4, 5, 6].map((n) => client.nextDelay(n)), [50, 100, 200, 400, 500, 500]);
  r = 1;
  assert.deepEqual([1, 2, 3, 4, 5].map((n) => client.nextDelay(n)), [100, 200, 400, 800, 1000]);
  const spread = new Set(Array.from({ length: 50 }, () => ((r = Math.random()), client.nextDelay(3))));
  assert.ok(spread.size > 10, 'jitter spreads the delays');
  for (const d of spread) assert.ok(d >= 200 && d <= 400);
});

test('4004 (instance deleted) ends the client without a retry', async () => {
  await gw.instance('doomed-1');
  const client = new EventGateClient({ baseUrl: gw.base, instance: 'doomed-1', token: ACCOUNT, WebSocket });
  const { states } = collect(client);
  const closes = [];
  client.on('close', (c) => closes.push(c));
  client.connect();
  await waitFor(() => client.state.state === 'live', { what: 'live' });
  await waitFor(async () => (await gw.clients('doomed-1')) === 1, { what: 'joined' });
  assert.equal((await gw.call('DELETE', '/api/instance/delete/doomed-1')).status, 200);
  await waitFor(() => client.state.state === 'closed', { what: 'closed' });
  assert.equal(closes[0].code, 4004);
  assert.equal(client.state.reason, 'instance deleted');
  assert.equal(client.state.final, true);
  assert.equal(client._timer, null, 'no retry is scheduled');
  assert.ok(!states.some((s) => s.state === 'waiting' || s.state === 'reconnecting'));
  assert.equal(describeState(client.state), 'closed: instance deleted');
});

test('refusals no retry can fix end the client with the contract message', async () => {
  await gw.instance('refuse-1');
  const bad = new EventGateClient({ baseUrl: gw.base, instance: 'refuse-1', token: 'not-a-token', WebSocket });
  const errors = [];
  bad.on('error', (e) => errors.push(e));
  bad.connect();
  await waitFor(() => bad.state.state === 'closed', { what: 'refused' });
  assert.equal(bad.state.reason, 'Invalid token');
  assert.equal(bad.state.status, 401);
  assert.ok(errors[0] instanceof EventGateError);

  const missing = new EventGateClient({ baseUrl: gw.base, instance: 'no-such', token: ACCOUNT, WebSocket });
  missing.connect();
  await waitFor(() => missing.state.state === 'closed', { what: 'refused' });
  assert.equal(missing.state.reason, 'Instance not found');
  assert.equal(missing._timer, null);
});

test('an upgrade refused for its Origin is retried with a reason that says so', async () => {
  const strict = await Gateway.start({ EVENTGATE_WS_ALLOWED_ORIGINS: 'http://console.example.test' });
  try {
    await strict.instance('origin-1');
    class FromElsewhere extends WebSocket {
      constructor(url) {
        super(url, { origin: 'http://elsewhere.example.test' });
      }
    }
    const client = new EventGateClient({
      baseUrl: strict.base,
      instance: 'origin-1',
      token: ACCOUNT,
      WebSocket: FromElsewhere,
      backoff: { initialMs: 50, maxMs: 100 },
    });
    client.connect();
    await waitFor(() => client.state.state === 'waiting', { what: 'a retry' });
    assert.equal(client.state.reason, ORIGIN_SUSPECTED);
    client.close();
    class FromTheConsole extends WebSocket {
      constructor(url) {
        super(url, { origin: 'http://console.example.test' });
      }
    }
    const allowed = new EventGateClient({ baseUrl: strict.base, instance: 'origin-1', token: ACCOUNT, WebSocket: FromTheConsole });
    allowed.connect();
    await waitFor(() => allowed.state.state === 'live', { what: 'live from an allowed origin' });
    allowed.close();
  } finally {
    await strict.close();
  }
});

test('a disabled WebSocket is retried with back-off, and connects once enabled', async () => {
  await gw.call('POST', '/api/instance/new', { name: 'later-1' });
  const client = new EventGateClient({
    baseUrl: gw.base,
    instance: 'later-1',
    token: ACCOUNT,
    WebSocket,
    backoff: { initialMs: 50, maxMs: 200 },
  });
  const { states } = collect(client);
  client.connect();
  await waitFor(() => client.state.state === 'waiting', { what: 'a retry' });
  // The first wait, as it was announced (later ones may have come by now).
  const first = states.find((s) => s.state === 'waiting');
  assert.match(first.reason, /^WebSocket is not enabled for this instance/);
  assert.match(describeState(first, first.retryAt - 1), /^reconnecting in \d+ s \(attempt 1\)/);
  await gw.call('POST', '/api/events/websocket/later-1', { enabled: true });
  await waitFor(() => client.state.state === 'live', { what: 'live after enabling' });
  assert.ok(states.filter((s) => s.state === 'waiting').length >= 1);
  client.close();
});

test('4008 (slow consumer) backs off for at least slowConsumerMs', async () => {
  const slow = await Gateway.start({
    EVENTGATE_WS_CLIENT_BUFFER: '4',
    EVENTGATE_WS_CLIENT_BUFFER_BYTES: '65536',
  });
  try {
    await slow.instance('slow-1');
    const { Recording, made } = recordingWebSocket();
    const client = new EventGateClient({
      baseUrl: slow.base,
      instance: 'slow-1',
      token: ACCOUNT,
      WebSocket: Recording,
      backoff: { initialMs: 10, maxMs: 50, slowConsumerMs: 60000 },
    });
    const closes = [];
    client.on('close', (c) => closes.push(c));
    client.connect();
    await waitFor(() => client.state.state === 'live', { what: 'live' });
    await waitFor(async () => (await slow.clients('slow-1')) === 1, { what: 'joined' });
    made[0].pause();
    const big = 'x'.repeat(512 * 1024);
    await waitFor(
      async () => {
        await slow.publish('slow-1', { event: 'message.exchange', data: { big } });
        return (await slow.metric('eventgate_clients_evicted_total{reason="slow_consumer"}')) >= 1;
      },
      { ms: 30000, every: 1, what: 'the eviction' },
    );
    made[0].resume();
    await waitFor(() => closes.length === 1, { ms: 20000, what: 'the close' });
    assert.equal(closes[0].code, 4008);
    await waitFor(() => client.state.state === 'waiting', { what: 'waiting' });
    assert.ok(client.state.delayMs >= 60000, `delay ${client.state.delayMs} ms after 4008`);
    assert.equal(client.state.code, 4008);
    client.close();
  } finally {
    await slow.close();
  }
});

test('1001 (gateway shutting down) reconnects at once, then with back-off until it is back', async () => {
  const node = await Gateway.start();
  try {
    await node.instance('restart-1');
    const client = new EventGateClient({
      baseUrl: node.base,
      instance: 'restart-1',
      token: ACCOUNT,
      WebSocket,
      backoff: { initialMs: 100, maxMs: 400 },
    });
    const { got, states } = collect(client);
    const closes = [];
    client.on('close', (c) => closes.push(c));
    client.connect();
    await waitFor(() => client.state.state === 'live', { what: 'live' });
    await node.stop();
    await waitFor(() => closes.length >= 1, { what: 'the close' });
    assert.equal(closes[0].code, 1001);
    const firstWait = states.find((s) => s.state === 'waiting');
    assert.equal(firstWait.delayMs, 0, 'the first retry after 1001 is immediate');
    await node.spawn();
    await waitFor(() => client.state.state === 'live', { ms: 20000, what: 'live again' });
    await waitFor(async () => (await node.clients('restart-1')) === 1, { what: 'rejoined' });
    await node.publish('restart-1', { event: 'group.flow', data: { after: 'restart' } });
    await waitFor(() => got.some((g) => g.env.data.after === 'restart'), { what: 'event after restart' });
    client.close();
  } finally {
    await node.close();
  }
});

test('recovery: a dropped client gets what it missed', async () => {
  assert.ok(await hasHistory(gw, WebSocket), 'the gateway keeps a history (§12; the test sets EVENTGATE_WS_HISTORY_SIZE)');
  await gw.instance('recover-1');
  const { Recording, made } = recordingWebSocket();
  const client = new EventGateClient({
    baseUrl: gw.base,
    instance: 'recover-1',
    token: ACCOUNT,
    WebSocket: Recording,
    // Long enough that the publish below lands while the client is away.
    backoff: { initialMs: 3000, maxMs: 3000, jitter: 0 },
  });
  const { got } = collect(client);
  const outcomes = [];
  client.on('recovery', (o) => outcomes.push(o));
  client.connect();
  await waitFor(() => outcomes.length === 1, { what: 'the first recovery frame' });
  assert.equal(outcomes[0].requested, false, 'a first connection is a starting position, not a recovery');
  await waitFor(async () => (await gw.clients('recover-1')) === 1, { what: 'joined' });
  await gw.publish('recover-1', { event: 'message.status', data: { n: 1 } });
  await waitFor(() => got.length === 1, { what: 'first event' });
  assert.equal(typeof got[0].env.offset, 'number');
  made[0].terminate();
  await waitFor(() => client.state.state === 'waiting', { what: 'the drop' });
  await gw.publish('recover-1', [
    { event: 'message.status', data: { n: 2 } },
    { event: 'message.status', data: { n: 3 } },
  ]);
  await waitFor(() => outcomes.length === 2, { ms: 15000, what: 'the recovery' });
  assert.equal(outcomes[1].requested, true);
  assert.equal(outcomes[1].recovered, true);
  assert.equal(outcomes[1].afterDrop, true);
  await waitFor(() => got.length === 3, { what: 'the missed events' });
  assert.deepEqual(got.map((g) => g.env.data.n), [1, 2, 3]);
  assert.deepEqual(got.map((g) => g.meta.replayed), [false, true, true]);
  client.close();
});

test('recover=true on a gateway without history: events as usual, never "recovered"', async () => {
  const plain = await Gateway.start();
  try {
    await plain.instance('nohist-1');
    const client = new EventGateClient({ baseUrl: plain.base, instance: 'nohist-1', token: ACCOUNT, WebSocket });
    const { got } = collect(client);
    const outcomes = [];
    client.on('recovery', (o) => outcomes.push(o));
    client.connect();
    await waitFor(async () => (await plain.clients('nohist-1')) === 1, { what: 'joined' });
    await plain.publish('nohist-1', { event: 'instance.state', data: { s: 'open' } });
    await waitFor(() => got.length === 1, { what: 'the event' });
    assert.equal(got[0].env.offset, undefined);
    assert.equal(client.position, null, 'no position without offsets');
    assert.ok(outcomes.every((o) => o.requested === false));
    client.close();
  } finally {
    await plain.close();
  }
});

test('REST helper: instances, WebSocket settings, publish, errors', async () => {
  const api = new EventGateApi({ baseUrl: gw.base, token: ACCOUNT });
  const created = await api.createInstance({ name: 'rest-1' });
  assert.equal(created.name, 'rest-1');
  assert.equal(await api.getWebsocket('rest-1'), null);
  const set = await api.setWebsocket('rest-1', {
    enabled: true,
    events: ['call.update', 'call.update', 'label.update'],
    mediaBase64: true,
  });
  assert.deepEqual(set, { enabled: true, events: ['call.update', 'label.update'], mediaBase64: true });
  assert.deepEqual(await api.getWebsocket('rest-1'), set);
  assert.ok(api.rateLimit && api.rateLimit.limit === 100000 && api.rateLimit.remaining >= 0);
  const list = await api.listInstances();
  const mine = list.find((i) => i.name === 'rest-1');
  assert.equal(mine.connectedClients, 0);
  assert.equal(typeof mine.token, 'string');
  assert.equal(await api.publish('rest-1', [{ event: 'call.update', data: {} }, { event: 'label.update', data: {} }]), 2);
  assert.equal(await api.publishEvent('rest-1', 'call.update', { a: 1 }), 1);

  await assert.rejects(api.setWebsocket('rest-1', { enabled: 'yes' }), (e) => {
    assert.ok(e instanceof EventGateError);
    assert.equal(e.status, 400);
    assert.equal(e.message, 'Invalid request body');
    return true;
  });
  await assert.rejects(api.publish('rest-1', { event: 'nope', data: {} }), { status: 400, message: 'Invalid request body' });
  await assert.rejects(api.getWebsocket('no-such'), { status: 404, message: 'Instance not found' });
  const wrong = new EventGateApi({ baseUrl: gw.base, token: 'wrong' });
  await assert.rejects(wrong.listInstances(), { status: 401, message: 'Invalid token' });
  const instanceApi = new EventGateApi({ baseUrl: gw.base, token: mine.token });
  await assert.rejects(instanceApi.publish('rest-1', { event: 'call.update', data: {} }), {
    status: 401,
    message: 'Invalid token',
  });
  const unreachable = new EventGateApi({ baseUrl: 'http://127.0.0.1:1', token: 't' });
  await assert.rejects(unreachable.listInstances(), { status: 0, message: 'Gateway unreachable' });
  assert.deepEqual([...EVENT_TYPES].length, 6);
  await api.deleteInstance('rest-1');
  await assert.rejects(api.getWebsocket('rest-1'), { status: 404, message: 'Instance not found' });
});

test('REST helper: webhooks and dead letters', async () => {
  const api = new EventGateApi({ baseUrl: gw.base, token: ACCOUNT });
  await api.createInstance({ name: 'hooks-1' });
  const hooks = await api.listWebhooks('hooks-1');
  assert.deepEqual(hooks, []);
  await assert.rejects(api.getWebhook('hooks-1', 'default'), { status: 404, message: 'Webhook not found' });
  const stored = await api.setWebhook('hooks-1', { label: 'a', enabled: false });
  assert.equal(stored.label, 'a');
  assert.equal(stored.enabled, false);
  assert.match(stored.secret, /^whsec_/);
  const one = await api.getWebhook('hooks-1', 'a');
  assert.equal(one.stats.pending, 0);
  const page = await api.failedDeliveries('hooks-1', { label: 'a', limit: 10 });
  assert.deepEqual(page, { deliveries: [], next: null });
  assert.equal(await api.retryDeliveries('hooks-1', { label: 'a' }), 0);
  await assert.rejects(api.failedDeliveries('hooks-1', { limit: 0 }), { status: 400, message: 'Invalid request body' });
  assert.deepEqual(await api.deleteWebhook('hooks-1', 'a'), { label: 'a', status: 'deleted' });
});

/**
 * A TCP relay to `port` whose open connections can be frozen: nothing passes
 * either way and neither side is told, as when a network drops a connection
 * silently. New connections pass.
 */
async function freezableRelay(port) {
  const pairs = [];
  const server = createServer((inbound) => {
    const outbound = tcpConnect(port, '127.0.0.1');
    const pair = { inbound, outbound, frozen: false };
    pairs.push(pair);
    inbound.on('data', (d) => pair.frozen || outbound.write(d));
    outbound.on('data', (d) => pair.frozen || inbound.write(d));
    for (const [a, b] of [[inbound, outbound], [outbound, inbound]]) {
      a.on('error', () => b.destroy());
      a.on('close', () => pair.frozen || b.destroy());
    }
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    freeze() {
      for (const p of pairs) p.frozen = true;
    },
    close() {
      for (const p of pairs) {
        p.inbound.destroy();
        p.outbound.destroy();
      }
      server.close();
    },
  };
}

test('a connection gone silent (no ping, no event) is dropped, reconnected and recovered', async () => {
  const beating = await Gateway.start({
    EVENTGATE_WS_HISTORY_SIZE: '100',
    EVENTGATE_WS_PING_INTERVAL_SECS: '1',
    EVENTGATE_WS_IDLE_TIMEOUT_SECS: '3',
  });
  const relay = await freezableRelay(beating.port);
  let client;
  try {
    await beating.instance('silent-1');
    client = new EventGateClient({
      baseUrl: relay.base,
      instance: 'silent-1',
      token: ACCOUNT,
      WebSocket,
      heartbeatTimeoutMs: 2500,
      backoff: { initialMs: 50, maxMs: 100 },
    });
    const { got, states } = collect(client);
    const closes = [];
    client.on('close', (c) => closes.push(c));
    client.connect();
    await waitFor(async () => (await beating.clients('silent-1')) === 1, { what: 'joined' });
    // Pings keep a quiet connection alive: no drop over twice the timeout.
    await new Promise((r) => setTimeout(r, 5000));
    assert.equal(closes.length, 0, 'pings count as heard');
    await beating.publish('silent-1', { event: 'call.update', data: { n: 1 } });
    await waitFor(() => got.length === 1, { what: 'first event' });
    relay.freeze();
    await beating.publish('silent-1', [
      { event: 'call.update', data: { n: 2 } },
      { event: 'call.update', data: { n: 3 } },
    ]);
    await waitFor(() => closes.length === 1, { ms: 10000, what: 'the silence noticed' });
    assert.equal(closes[0].reason, 'no heartbeat from the gateway');
    assert.ok(states.some((s) => s.state === 'waiting'));
    await waitFor(() => got.length === 3, { ms: 10000, what: 'the missed events, recovered' });
    assert.deepEqual(got.map((g) => g.env.data.n), [1, 2, 3]);
    assert.equal(client.state.state, 'live');
  } finally {
    client?.close();
    relay.close();
    await beating.close();
  }
});

test('an upgrade refused by a connection limit is not blamed on an Origin; reconnect:false still says why', async () => {
  const capped = await Gateway.start({ EVENTGATE_LIMITS__MAX_CONNECTIONS_PER_INSTANCE: '1' });
  try {
    await capped.instance('cap-1');
    const first = new EventGateClient({ baseUrl: capped.base, instance: 'cap-1', token: ACCOUNT, WebSocket });
    first.connect();
    await waitFor(() => first.state.state === 'live', { what: 'the first client' });
    const second = new EventGateClient({
      baseUrl: capped.base,
      instance: 'cap-1',
      token: ACCOUNT,
      WebSocket,
      backoff: { initialMs: 50, maxMs: 100 },
    });
    second.connect();
    await waitFor(() => second.state.state === 'waiting', { what: 'a retry' });
    assert.equal(second.state.reason, UPGRADE_REFUSED);
    second.close();

    const once = new EventGateClient({ baseUrl: capped.base, instance: 'cap-1', token: ACCOUNT, WebSocket, reconnect: false });
    const errors = [];
    once.on('error', (e) => errors.push(e));
    once.connect();
    await waitFor(() => once.state.state === 'closed', { what: 'stopped' });
    assert.equal(once.state.final, true);
    assert.equal(once.state.reason, UPGRADE_REFUSED);
    assert.equal(errors[0]?.message, UPGRADE_REFUSED);

    const wrong = new EventGateClient({ baseUrl: capped.base, instance: 'cap-1', token: 'not-a-token', WebSocket, reconnect: false });
    wrong.connect();
    await waitFor(() => wrong.state.state === 'closed', { what: 'stopped' });
    assert.equal(wrong.state.reason, 'Invalid token');
    assert.equal(wrong.state.status, 401);
    first.close();
  } finally {
    await capped.close();
  }
});

/**
 * A client of a new instance whose WebSocket is not enabled yet (so its
 * upgrades are refused), looking into each refusal with a GET that takes
 * 600 ms while `slow.on`; `made` holds every socket it opened.
 */
async function slowlyDiagnosedClient(name) {
  await gw.call('POST', '/api/instance/new', { name });
  const slow = { on: true };
  const slowFetch = async (...args) => {
    if (slow.on) await new Promise((r) => setTimeout(r, 600));
    return fetch(...args);
  };
  const { Recording, made } = recordingWebSocket();
  const client = new EventGateClient({
    baseUrl: gw.base,
    instance: name,
    token: ACCOUNT,
    WebSocket: Recording,
    fetch: slowFetch,
    backoff: { initialMs: 50, maxMs: 100 },
  });
  return { client, made, slow };
}

/** Exactly one socket is open and counted by the gateway; after close(), none. */
async function assertOneSocketThenNone(client, made, name) {
  assert.equal(made.filter((s) => s.readyState !== WebSocket.CLOSED).length, 1, 'one socket open');
  assert.equal(await gw.clients(name), 1);
  client.close();
  await waitFor(async () => (await gw.clients(name)) === 0, { what: 'no client left' });
}

test('connecting anew while a refusal is being looked into leaves one socket, and close() ends it', async () => {
  const { client, made, slow } = await slowlyDiagnosedClient('race-1');
  client.connect();
  // The upgrade is refused (not enabled yet) and the slow diagnosis begins.
  await waitFor(() => made.length === 1 && made[0].readyState === WebSocket.CLOSED, { what: 'the refusal' });
  await gw.call('POST', '/api/events/websocket/race-1', { enabled: true });
  client.setEvents(['call.update']);
  await waitFor(() => client.state.state === 'live', { what: 'live' });
  slow.on = false;
  // Past the diagnosis: nothing else was opened.
  await new Promise((r) => setTimeout(r, 1200));
  await assertOneSocketThenNone(client, made, 'race-1');
});

test('a handshake that never ends is dropped by the watchdog without ending the process', async () => {
  // Accepts connections and never answers.
  const held = [];
  const silent = createServer((c) => held.push(c));
  await new Promise((ok) => silent.listen(0, '127.0.0.1', ok));
  const client = new EventGateClient({
    baseUrl: `http://127.0.0.1:${silent.address().port}`,
    instance: 'nobody',
    token: ACCOUNT,
    WebSocket,
    heartbeatTimeoutMs: 300,
    fetch: async () => {
      throw new Error('unreachable');
    },
    backoff: { initialMs: 50, maxMs: 100 },
  });
  const closes = [];
  client.on('close', (c) => closes.push(c));
  client.connect();
  await waitFor(() => closes.length >= 2, { what: 'two handshakes given up' });
  assert.equal(closes[0].reason, 'no heartbeat from the gateway');
  assert.equal(closes[0].opened, false);
  // The terminated sockets' late errors reach no one: the process lives on.
  await new Promise((r) => setTimeout(r, 300));
  client.close();
  for (const c of held) c.destroy();
  silent.close();
});

test('two refusals looked into at once leave one socket', async () => {
  const { client, made } = await slowlyDiagnosedClient('race-2');
  client.connect();
  await waitFor(() => made.length === 1 && made[0].readyState === WebSocket.CLOSED, { what: 'the first refusal' });
  client.setEvents(['call.update']);
  await waitFor(() => made.length === 2 && made[1].readyState === WebSocket.CLOSED, { what: 'the second refusal' });
  await gw.call('POST', '/api/events/websocket/race-2', { enabled: true });
  await waitFor(() => client.state.state === 'live', { what: 'live' });
  await new Promise((r) => setTimeout(r, 1500));
  await assertOneSocketThenNone(client, made, 'race-2');
});
