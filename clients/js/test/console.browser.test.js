// The console (/console) in a real browser: Debian's chromium driven by
// playwright-core, against a real gateway binary (see gateway.js). Saves
// screenshots under clients/js/test-output/. The gateway runs with a
// history (§12) and serves webhooks (§11); a build without either fails.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';

import { Gateway, ACCOUNT, REPO, waitFor, hasHistory } from './gateway.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const OUT = resolve(HERE, '../test-output');
const CHROMIUM = process.env.EVENTGATE_CHROMIUM ?? '/usr/bin/chromium';
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

let gw;
let browser;
let profile;
let context;
let page;
/** Replies of 400 or more the page received (a missing favicon would show here). */
const failures = [];
const pageErrors = [];

before(async () => {
  mkdirSync(OUT, { recursive: true });
  gw = await Gateway.start({
    EVENTGATE_WS_HISTORY_SIZE: '1000',
    EVENTGATE_WEBHOOK_ALLOWED_NETWORKS: '127.0.0.0/8',
    EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS: '',
  });
  profile = mkdtempSync(join(tmpdir(), 'eventgate-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    args: ARGS,
    headless: true,
    viewport: { width: 1280, height: 800 },
  });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: gw.base });
  browser = context;
  page = context.pages()[0] ?? (await context.newPage());
  watch(page);
});

after(async () => {
  await browser?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  await gw?.close();
});

function watch(p) {
  p.on('response', (r) => {
    if (r.status() >= 400) failures.push(`${r.status()} ${r.url().replace(/token=[^&]+/, 'token=…')}`);
  });
  p.on('pageerror', (e) => pageErrors.push(e.message));
}

/** The connection phrase in the header. */
async function phrase() {
  return (await page.locator('#conn').textContent())?.trim();
}

async function until(fn, arg, what, ms = 15000) {
  try {
    await page.waitForFunction(fn, arg, { timeout: ms, polling: 50 });
  } catch (e) {
    const conn = await phrase().catch(() => '?');
    throw new Error(`timed out waiting for ${what} (state: ${conn}): ${e.message.split('\n')[0]}`);
  }
}

function rowsOf(type) {
  return page.locator(`#events li[data-type="${type}"]`);
}

async function openConsole() {
  await page.goto(`${gw.base}/console`);
}

test("the README's path: its token, its instance, its curl publish line, seen in the console", async () => {
  // Follows README.md literally: the account token of its first command and
  // the bodies of its two curl lines.
  const readme = readFileSync(join(REPO, 'README.md'), 'utf8');
  const token = readme.match(/EVENTGATE_ACCOUNT_TOKEN=(\S+) cargo run/)[1];
  const bodies = [...readme.matchAll(/curl -s -X POST localhost:8080(\S+) -H 'token: [^']+' \\\n\s+-H 'content-type: application\/json' -d '([^']+)'/g)];
  assert.equal(bodies.length, 2, 'the README has its create and publish lines');
  const node = await Gateway.start({ EVENTGATE_ACCOUNT_TOKEN: token });
  const tab = await context.newPage();
  try {
    const [create, publish] = bodies.map(([, path, body]) => ({ path, body: JSON.parse(body) }));
    assert.equal((await node.call('POST', create.path, create.body, token)).status, 201);
    await tab.goto(`${node.base}/console`);
    await tab.getByLabel('Paste a TokenAccount or TokenInstance').fill(token);
    await tab.keyboard.press('Enter');
    const name = create.body.name;
    // The only instance opens at once.
    await tab.waitForFunction((n) => document.querySelector('#conn')?.textContent === `${n}: live`, name, { timeout: 15000 });
    await waitFor(async () => (await node.clients(name)) === 1, { what: 'the console joined' });
    assert.equal((await node.call('POST', publish.path, publish.body, token)).status, 202);
    const row = tab.locator(`#events li[data-type="${publish.body.event}"]`).first();
    await row.waitFor();
    assert.match(await row.textContent(), new RegExp(publish.body.data.text));
  } finally {
    await tab.close();
    await node.close();
  }
});

test('first minute: the empty page, a wrong token, then the instance list', async () => {
  await gw.instance('shop-1');
  await openConsole();
  const field = page.getByLabel('Paste a TokenAccount or TokenInstance');
  assert.equal(await field.count(), 1, 'a labelled token field');
  await field.fill('this-is-not-a-token');
  await field.press('Enter');
  await page.locator('#login-error').waitFor({ state: 'visible' });
  assert.match(await page.locator('#login-error').textContent(), /not valid on this gateway \(Invalid token\)/);
  assert.equal(await field.inputValue(), 'this-is-not-a-token', 'the field keeps the bad token');
  const selection = await field.evaluate((i) => [i.selectionStart, i.selectionEnd, i.value.length]);
  assert.deepEqual(selection, [0, selection[2], selection[2]], 'the bad token is selected for correction');
  assert.equal(await page.evaluate(() => Object.keys(sessionStorage).length), 0, 'nothing is stored');

  await field.fill(ACCOUNT);
  await field.press('Enter');
  await page.locator('#instances button[data-instance="shop-1"]').waitFor();
  // Its count (the list refreshes once the instance, opened at once, is live).
  assert.match(await page.locator('#instances button[data-instance="shop-1"]').textContent(), /\d+ clients?/);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('eventgate.console.token')), ACCOUNT);
  const text = await page.evaluate(() => document.documentElement.outerHTML);
  assert.ok(!text.includes(ACCOUNT), 'the token is not written into the page');
});

test('live view: pick an instance, see a published event, pretty JSON with the token masked, copy', async () => {
  const instanceToken = (await gw.call('GET', '/api/instance/list')).body.instances.find((i) => i.name === 'shop-1').token;
  await page.locator('#instances button[data-instance="shop-1"]').click();
  await until(() => document.querySelector('#conn')?.textContent?.startsWith('shop-1: live'), null, 'live');
  // The list's client count moves while the console is connected.
  await until(
    () => /1 client\b/.test(document.querySelector('#instances button[data-instance="shop-1"]')?.textContent ?? ''),
    null,
    'the console counted as a client',
  );
  assert.ok(!page.url().includes(ACCOUNT), 'no token in the address');
  await gw.publish('shop-1', { event: 'message.exchange', data: { text: 'hello from the test' } });
  await rowsOf('message.exchange').first().waitFor();
  const row = rowsOf('message.exchange').first();
  assert.match(await row.locator('summary').textContent(), /message\.exchange.*hello from the test/);
  await row.locator('summary').click();
  const pre = row.locator('pre');
  await pre.waitFor();
  const shown = await pre.textContent();
  assert.deepEqual(JSON.parse(shown).data, { text: 'hello from the test' });
  assert.ok(shown.includes('\n  "data": {'), 'pretty printed');
  assert.ok(!shown.includes(instanceToken), 'instanceData.token is masked');
  await row.getByRole('button', { name: 'Show token' }).click();
  assert.ok((await pre.textContent()).includes(instanceToken), 'revealed on request');
  await row.getByRole('button', { name: 'Hide token' }).click();
  await row.getByRole('button', { name: 'Copy JSON' }).click();
  // The click returns before the clipboard is written.
  const copied = await waitFor(
    async () => {
      const text = await page.evaluate(() => navigator.clipboard.readText());
      return JSON.parse(text).event === 'message.exchange' && text;
    },
    { what: 'the copied envelope' },
  );
  assert.ok(!copied.includes(instanceToken), 'the copy is masked like the view');
  assert.equal(await page.locator('#counts [data-type="message.exchange"] b').textContent(), '1');
  await page.screenshot({ path: join(OUT, 'console-live-1280x800.png') });
});

test('filter: ticking a type narrows the next events (none ticked = all six)', async () => {
  assert.match(await page.locator('.types legend').textContent(), /none ticked = all six/);
  const liveWith = (events) =>
    until(
      (want) => {
        const c = document.querySelector('#conn');
        return c?.textContent?.startsWith('shop-1: live') && c.dataset.events === want;
      },
      events,
      `live with events=${events}`,
    );
  await page.locator('#live-types input[value="call.update"]').check();
  // The console reconnects with ?events=call.update.
  await liveWith('call.update');
  const before = await rowsOf('message.exchange').count();
  // In one request: if message.exchange were delivered, it would arrive before
  // call.update. Repeated until the new connection has joined its instance.
  await waitFor(
    async () => {
      await gw.publish('shop-1', [
        { event: 'message.exchange', data: { text: 'filtered out' } },
        { event: 'call.update', data: { status: 'ringing' } },
      ]);
      return (await rowsOf('call.update').count()) > 0;
    },
    { every: 200, what: 'a call.update row' },
  );
  assert.equal(await rowsOf('message.exchange').count(), before, 'the unticked type did not arrive');
  await page.locator('#live-types input[value="call.update"]').uncheck();
  await liveWith('all');
  await waitFor(
    async () => {
      await gw.publish('shop-1', { event: 'message.exchange', data: { text: 'all six again' } });
      return page.evaluate(() =>
        [...document.querySelectorAll('#events li')].some((li) => li.textContent.includes('all six again')),
      );
    },
    { every: 200, what: 'the widened event' },
  );
  // A last event, waited for: every earlier one has been shown by then, so
  // none is still on its way when the next test counts rows.
  await gw.publish('shop-1', { event: 'message.exchange', data: { text: 'last before pause' } });
  await until(
    () => [...document.querySelectorAll('#events li')].some((li) => li.textContent.includes('last before pause')),
    null,
    'the last event before the pause test',
  );
});

test('pause keeps counting ("N new while paused"), resume shows them; search narrows the list', async () => {
  await page.getByRole('button', { name: 'Pause' }).click();
  const rows = await page.locator('#events li').count();
  await gw.publish('shop-1', [
    { event: 'label.update', data: { name: 'vip' } },
    { event: 'label.update', data: { name: 'needle-label' } },
    { event: 'group.flow', data: { action: 'join' } },
  ]);
  await until(() => document.querySelector('#paused-note')?.textContent === '3 new while paused', null, 'paused count');
  assert.equal(await page.locator('#events li').count(), rows, 'nothing added while paused');
  assert.equal(await page.locator('#counts [data-type="label.update"] b').textContent(), '2', 'counts go on');
  await page.getByRole('button', { name: 'Resume' }).click();
  await until((n) => document.querySelectorAll('#events li').length === n + 3, rows, 'the paused events');
  assert.ok(await page.locator('#paused-note').isHidden());

  await page.locator('#search').fill('needle');
  await until(() => document.querySelectorAll('#events li').length === 1, null, 'one match');
  assert.match(await page.locator('#events li').first().textContent(), /needle-label/);
  await page.locator('#search').fill('');
  await until((n) => document.querySelectorAll('#events li').length === n + 3, rows, 'all rows again');

  // A search while paused looks only at what came before the pause.
  await page.getByRole('button', { name: 'Pause' }).click();
  await gw.publish('shop-1', [{ event: 'label.update', data: { name: 'haystack-late' } }]);
  await until(() => document.querySelector('#paused-note')?.textContent === '1 new while paused', null, 'paused count');
  await page.locator('#search').fill('haystack');
  await until(() => document.querySelector('#events-empty') && document.querySelectorAll('#events li').length === 0, null, 'no match before the pause');
  assert.equal(await page.locator('#paused-note').textContent(), '1 new while paused');
  await page.getByRole('button', { name: 'Resume' }).click();
  await until(() => document.querySelectorAll('#events li').length === 1, null, 'the late match after resuming');
  assert.match(await page.locator('#events li').first().textContent(), /haystack-late/);
  await page.locator('#search').fill('');
  await until((n) => document.querySelectorAll('#events li').length === n + 4, rows, 'all rows again');

  // The instance's token is masked on the page, so a search does not find it.
  const instanceToken = (await gw.call('GET', '/api/instance/list')).body.instances.find((i) => i.name === 'shop-1').token;
  await page.locator('#search').fill(instanceToken.slice(-12));
  await until(() => document.querySelector('#events-empty') && document.querySelectorAll('#events li').length === 0, null, 'no match inside the masked token');
  await page.locator('#search').fill('');
  await until((n) => document.querySelectorAll('#events li').length === n + 4, rows, 'all rows again');
});

test('keyboard focus stays on an instance across the list\'s refresh', async () => {
  const button = page.locator('#instances button[data-instance="shop-1"]');
  await button.focus();
  await button.evaluate((b) => {
    b.dataset.old = 'yes';
  });
  // The refresh rebuilds the list (the button clicked by script: focus stays put).
  await page.evaluate(() => document.querySelector('#refresh').click());
  await until(() => {
    const b = document.querySelector('#instances button[data-instance="shop-1"]');
    return b && !b.dataset.old;
  }, null, 'a new list');
  assert.equal(await page.evaluate(() => document.activeElement?.dataset?.instance), 'shop-1');
});

test('test-publish form and WebSocket settings editor', async () => {
  await page.getByRole('tab', { name: 'Publish test event' }).click();
  await page.locator('#pub-type').selectOption('instance.state');
  await page.locator('#pub-data').fill('{"state": "open", "from": "the form"}');
  await page.getByRole('button', { name: 'Publish', exact: true }).click();
  await until(() => document.querySelector('#publish-result')?.textContent?.startsWith('Accepted 1 event'), null, 'accepted');
  await page.locator('#pub-data').fill('[1, 2]');
  await page.getByRole('button', { name: 'Publish', exact: true }).click();
  await until(() => document.querySelector('#publish-error')?.textContent === 'data must be a JSON object.', null, 'refused');

  await page.getByRole('tab', { name: 'Live events' }).click();
  await rowsOf('instance.state').first().waitFor();
  assert.match(await rowsOf('instance.state').first().textContent(), /open/);

  await page.getByRole('tab', { name: 'WebSocket settings' }).click();
  await until(() => /enabled, all six types/.test(document.querySelector('#settings-state')?.textContent ?? ''), null, 'settings loaded');
  await page.locator('#ws-types input[value="message.status"]').check();
  await page.locator('#ws-media').check();
  await page.getByRole('button', { name: 'Save settings' }).click();
  await until(() => document.querySelector('#settings-result')?.textContent === 'Saved: enabled, message.status.', null, 'saved');
  const stored = (await gw.call('GET', '/api/events/getWebsocket/shop-1')).body.websocket;
  assert.deepEqual(stored, { enabled: true, events: ['message.status'], mediaBase64: true });
  await page.locator('#ws-types input[value="message.status"]').uncheck();
  await page.locator('#ws-media').uncheck();
  await page.getByRole('button', { name: 'Save settings' }).click();
  await until(() => document.querySelector('#settings-result')?.textContent === 'Saved: enabled, all six types.', null, 'saved back');
  await page.getByRole('tab', { name: 'Live events' }).click();
});

test('an instance whose WebSocket is off says so, and goes live once enabled in the editor', async () => {
  assert.equal((await gw.call('POST', '/api/instance/new', { name: 'quiet-1' })).status, 201);
  await page.getByRole('button', { name: 'Refresh' }).first().click();
  await page.locator('#instances button[data-instance="quiet-1"]').click();
  await until(
    () => /^quiet-1: reconnecting in \d+ s \(attempt \d+\) — its WebSocket is off: enable it under “WebSocket settings”$/.test(document.querySelector('#conn')?.textContent ?? ''),
    null,
    'the WebSocket-off phrase',
  );
  await page.getByRole('tab', { name: 'WebSocket settings' }).click();
  await until(() => /^Not configured yet/.test(document.querySelector('#settings-state')?.textContent ?? ''), null, 'not configured');
  await page.locator('#ws-enabled').check();
  await page.getByRole('button', { name: 'Save settings' }).click();
  await until(() => document.querySelector('#conn')?.textContent === 'quiet-1: live', null, 'live once enabled', 40000);
  await page.getByRole('tab', { name: 'Live events' }).click();
  await page.locator('#instances button[data-instance="shop-1"]').click();
  await until(() => document.querySelector('#conn')?.textContent?.startsWith('shop-1: live'), null, 'back on shop-1');
  // Nothing was published to shop-1 meanwhile: no recovery to speak of.
  assert.equal(await phrase(), 'shop-1: live');
});

test('keeps up with a burst of 5,000 events: bounded list with an "N more" marker', async () => {
  const total = Number((await page.locator('#counts span').first().locator('b').textContent()).replace(/,/g, ''));
  for (let i = 0; i < 5; i += 1) {
    await gw.publish(
      'shop-1',
      Array.from({ length: 1000 }, (_, n) => ({ event: 'message.status', data: { status: 'read', n: i * 1000 + n } })),
    );
  }
  await until(
    (want) => document.querySelector('#counts span b')?.textContent === want,
    (total + 5000).toLocaleString('en'),
    'every event counted',
    30000,
  );
  const shown = await page.locator('#events li').count();
  assert.ok(shown <= 200, `${shown} rows at most 200`);
  assert.match(await page.locator('#events-more').textContent(), /^[\d,]+ more events not shown/);
  assert.match(await rowsOf('message.status').first().textContent(), /read/);
  // The page still answers.
  assert.equal(await page.evaluate(() => 1 + 1), 2);
});

test('phone width: nothing wider than the screen, headings on one line', async () => {
  // The README's two pictures: a few events of several types, one expanded.
  await page.locator('#clear').click();
  await gw.publish('shop-1', [
    { event: 'instance.state', data: { state: 'open' } },
    { event: 'message.status', data: { id: 'wamid.41', status: 'delivered' } },
    { event: 'label.update', data: { name: 'vip', action: 'add' } },
    { event: 'group.flow', data: { group: 'team-sales', action: 'join' } },
    { event: 'call.update', data: { status: 'ringing', from: '+15550002' } },
    { event: 'message.exchange', data: { from: '+15550001', text: 'Hi! Is my order on its way?' } },
  ]);
  await rowsOf('message.exchange').first().waitFor();
  await rowsOf('message.exchange').first().locator('summary').click();
  await rowsOf('message.exchange').first().locator('pre').waitFor();
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(OUT, 'console-1280x800.png') });
  await page.setViewportSize({ width: 390, height: 844 });
  const widths = await page.evaluate(() => ({
    doc: document.documentElement.scrollWidth,
    body: document.body.scrollWidth,
    h1: document.querySelector('h1').getBoundingClientRect().height,
    title: document.querySelector('#instances-title').getBoundingClientRect().height,
  }));
  assert.ok(widths.doc <= 390 && widths.body <= 390, `no sideways scrolling: ${JSON.stringify(widths)}`);
  assert.ok(widths.h1 < 40 && widths.title < 40, `headings on one line: ${JSON.stringify(widths)}`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(OUT, 'console-390x844.png') });
  await page.setViewportSize({ width: 1280, height: 800 });
});

test('webhooks: dead letters are listed and retried against a test receiver', async () => {
  await page.getByRole('tab', { name: 'Webhooks' }).click();
  assert.ok(await gw.has('/api/events/getWebhook/shop-1'), 'the gateway serves the webhook routes (§11)');
  const seen = [];
  let answer = 500;
  const receiver = createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      seen.push({ headers: req.headers, body, status: answer });
      res.writeHead(answer).end();
    });
  });
  await new Promise((r) => receiver.listen(0, '127.0.0.1', r));
  try {
    const url = `http://127.0.0.1:${receiver.address().port}/hook`;
    const set = await gw.call('POST', '/api/events/webhook/shop-1', { label: 'crm', enabled: true, url, authorization: 'Bearer receiver-secret' });
    assert.equal(set.status, 200, set.text);
    await gw.publish('shop-1', { event: 'message.exchange', data: { text: 'for the receiver' } });
    await waitFor(async () => {
      const r = await gw.call('GET', '/api/events/getWebhook/shop-1?label=crm');
      return r.body?.webhook?.stats?.failed === 1;
    }, { ms: 30000, what: 'the dead letter' });
    const firstId = seen[0].headers['webhook-id'];
    await page.getByRole('button', { name: 'Refresh' }).last().click();
    const card = page.locator('#webhooks li[data-label="crm"]');
    // The card may already be on the page from before the delivery failed:
    // the refresh replaces it once its request is answered.
    await until(
      () => /dead letters 1/.test(document.querySelector('#webhooks li[data-label="crm"]')?.textContent ?? ''),
      null,
      'the refreshed card with its dead letter',
    );
    const cardText = await card.textContent();
    assert.ok(!cardText.includes('receiver-secret'), 'authorization is masked');
    assert.match(cardText, /dead letters 1/);
    await card.getByRole('button', { name: /Dead letters/ }).click();
    const dead = page.locator('#dead-list li').first();
    await dead.waitFor();
    assert.match(await dead.textContent(), /HTTP 500/);
    await dead.locator('summary').click();
    assert.match(await dead.locator('pre').textContent(), /for the receiver/);
    await page.screenshot({ path: join(OUT, 'console-dead-letters-1280x800.png') });
    answer = 200;
    await dead.getByRole('button', { name: 'Retry' }).click();
    await until(() => document.querySelector('#dead-result')?.textContent === '1 delivery requeued.', null, 'requeued');
    await waitFor(() => seen.some((s) => s.status === 200), { ms: 30000, what: 'the retried delivery' });
    const retried = seen.find((s) => s.status === 200);
    assert.equal(retried.headers['webhook-id'], firstId, 'same webhook-id');
    assert.equal(retried.headers['eventgate-attempt'], '1', 'from the first attempt');
  } finally {
    receiver.close();
    await page.getByRole('tab', { name: 'Live events' }).click();
  }
});

test('reload: the console recovers the events it missed', async () => {
  assert.ok(await hasHistory(gw, WebSocket), 'the gateway keeps a history (§12; the test sets EVENTGATE_WS_HISTORY_SIZE)');
  await gw.publish('shop-1', { event: 'label.update', data: { name: 'before reload' } });
  await until(
    () => [...document.querySelectorAll('#events li')].some((li) => li.textContent.includes('before reload')),
    null,
    'the event before the reload',
  );
  // Leave the page (its socket closes), publish, come back in the same tab.
  await page.goto('about:blank');
  await waitFor(async () => (await gw.clients('shop-1')) === 0, { what: 'the console left' });
  await gw.publish('shop-1', [
    { event: 'label.update', data: { name: 'missed-1' } },
    { event: 'label.update', data: { name: 'missed-2' } },
  ]);
  await openConsole();
  await until(() => document.querySelector('#conn')?.textContent === 'shop-1: live · recovered 2 missed events', null, 'recovered', 20000);
  const recovered = await page.locator('#events li', { hasText: '(recovered)' }).count();
  assert.equal(recovered, 2);
});

test('connection state: a gateway restart reads "reconnecting in N s (attempt N)", then "live"', async () => {
  const history = await hasHistory(gw, WebSocket);
  await until(() => document.querySelector('#conn')?.textContent?.startsWith('shop-1: live'), null, 'live');
  await gw.stop();
  await until(() => /^shop-1: reconnecting in \d+ s \(attempt \d+\)/.test(document.querySelector('#conn')?.textContent ?? ''), null, 'the countdown', 20000);
  const words = await phrase();
  assert.ok(!words.includes('epoch'), words);
  await page.screenshot({ path: join(OUT, 'console-reconnecting-1280x800.png') });
  await gw.spawn();
  await until(() => document.querySelector('#conn')?.textContent?.startsWith('shop-1: live'), null, 'live after the restart', 40000);
  // A restart starts a new epoch (§12): what was missed cannot be replayed, and the page says so.
  assert.ok(history, 'the gateway keeps a history');
  await until(
    () => document.querySelector('#conn')?.textContent === 'shop-1: live · could not recover: reload from your backend',
    null,
    'the failed recovery',
  );
});

test('a TokenInstance sees only its instance and cannot publish; a second tab keeps its own token', async () => {
  const token = await gw.instance('desk-1');
  const other = await context.newPage();
  watch(other);
  try {
    await other.goto(`${gw.base}/console`);
    assert.equal(await other.evaluate(() => sessionStorage.length), 0, 'session storage is per tab');
    await other.getByLabel('Paste a TokenAccount or TokenInstance').fill(token);
    await other.keyboard.press('Enter');
    // Its only instance opens at once.
    await other.waitForFunction(() => document.querySelector('#conn')?.textContent === 'desk-1: live', null, { timeout: 15000 });
    assert.equal(await other.locator('#instances li').count(), 1);
    assert.equal(await other.locator('#who-kind').textContent(), 'Signed in with a TokenInstance');
    assert.ok(await other.locator('#create-form').isHidden(), 'no instance creation with a TokenInstance');
    await other.getByRole('tab', { name: 'Publish test event' }).click();
    assert.ok(await other.locator('#pub-send').isDisabled());
    assert.match(await other.locator('#publish-note').textContent(), /Publishing needs a TokenAccount/);
    await other.getByRole('tab', { name: 'Live events' }).click();
    // "live" comes with the socket's opening; its session joins just after.
    await waitFor(async () => (await gw.clients('desk-1')) === 1, { what: 'the tab joined' });
    await gw.publish('desk-1', { event: 'message.exchange', data: { text: 'to the desk' } });
    await other.locator('#events li[data-type="message.exchange"]').first().waitFor();
    await other.getByRole('button', { name: 'Forget token' }).click();
    await other.getByLabel('Paste a TokenAccount or TokenInstance').waitFor();
    assert.equal(await other.evaluate(() => sessionStorage.length), 0, 'forgetting clears the tab');
    await waitFor(async () => (await gw.clients('desk-1')) === 0, { what: 'the second tab left' });
  } finally {
    await other.close();
  }
});

test('a link to an instance the token does not have says so, and the list stays', async () => {
  // Opened afresh (a new page load), then followed while the console is open.
  await page.goto('about:blank');
  await page.goto(`${gw.base}/console#instance=no-such-instance`);
  await page.locator('#instances button[data-instance="shop-1"]').waitFor();
  await page.locator('#link-error').waitFor({ state: 'visible' });
  assert.match(await page.locator('#link-error').textContent(), /does not have: “no-such-instance”/);
  assert.notEqual(await page.evaluate(() => location.hash), '#instance=no-such-instance', 'the bad link is not kept');
  await page.locator('#instances button[data-instance="shop-1"]').click();
  await until(() => document.querySelector('#conn')?.textContent.startsWith('shop-1: live'), null, 'shop-1');
  assert.ok(await page.locator('#link-error').isHidden(), 'the note goes with the next choice');
  await page.evaluate(() => {
    location.hash = '#instance=another-missing';
  });
  await page.locator('#link-error').waitFor({ state: 'visible' });
  assert.match(await page.locator('#link-error').textContent(), /“another-missing”/);
  assert.equal(await page.evaluate(() => location.hash), '#instance=shop-1', 'the open instance stays in the link');
  assert.match(await phrase(), /^shop-1: live/, 'the open instance stays open');
});

test('a long instance name at phone width: the connection phrase wraps, nothing is wider than the screen', async () => {
  const name = `long-${'n'.repeat(59)}`;
  assert.equal((await gw.call('POST', '/api/instance/new', { name, websocketEnabled: true })).status, 201);
  await page.evaluate(() => document.querySelector('#refresh').click());
  await page.locator(`#instances button[data-instance="${name}"]`).click();
  await until((n) => document.querySelector('#conn')?.textContent === `${n}: live`, name, 'live');
  await page.setViewportSize({ width: 390, height: 844 });
  const box = await page.evaluate(() => ({
    doc: document.documentElement.scrollWidth,
    conn: document.querySelector('#conn').getBoundingClientRect().right,
  }));
  await page.screenshot({ path: join(OUT, 'console-390x844-long-name.png') });
  await page.setViewportSize({ width: 1280, height: 800 });
  assert.ok(box.doc <= 390 && box.conn <= 390, `inside the screen: ${JSON.stringify(box)}`);
  await page.locator('#instances button[data-instance="shop-1"]').click();
  await until(() => document.querySelector('#conn')?.textContent.startsWith('shop-1: live'), null, 'back on shop-1');
});

test('a malformed link (#instance=%) still signs in with the saved token', async () => {
  await page.goto('about:blank');
  await page.goto(`${gw.base}/console#instance=%`);
  await page.locator('#instances button[data-instance="shop-1"]').waitFor();
  assert.equal(await page.locator('#login').isVisible(), false, 'no sign-in card');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('eventgate.console.token')), ACCOUNT, 'the token is kept');
});

test('no failed requests and no script errors on the way', async () => {
  // A 429 or a 404 of an asset (the favicon, a wrong path) would show here.
  // Expected: the wrong token's 401, the webhook list's 404 on a gateway
  // without webhooks, 503s while it shut down (the upgrade's diagnosis, and
  // the list's refresh: a draining gateway refuses new requests), and
  // quiet-1's refusals before it was enabled.
  const webhooks = await gw.has('/api/events/getWebhook/shop-1');
  const unexpected = failures.filter(
    (f) =>
      !(f.startsWith('401 ') && f.endsWith('/api/instance/list')) &&
      !(!webhooks && f.startsWith('404 ') && f.includes('/api/events/getWebhook/')) &&
      !(f.startsWith('503 ') && (f.includes('/ws/shop-1?') || f.endsWith('/api/instance/list'))) &&
      // quiet-1 before its WebSocket was enabled: refused (400) and not configured (404).
      !(f.startsWith('400 ') && f.includes('/ws/quiet-1?')) &&
      !(f.startsWith('404 ') && f.endsWith('/api/events/getWebsocket/quiet-1')),
  );
  assert.deepEqual(unexpected, []);
  assert.deepEqual(pageErrors, []);
});
