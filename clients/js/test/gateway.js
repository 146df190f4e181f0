// Test helper: a real eventgate binary on a free loopback port with a fresh
// SQLite file, started and stopped by the tests. Builds it with cargo unless
// EVENTGATE_BIN names a binary.

import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ACCOUNT = 'console-test-account-token-0123456789abcdef';
export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

let built = null;

/** The gateway binary: EVENTGATE_BIN, or `cargo build` (once per process). */
export function gatewayBinary() {
  if (process.env.EVENTGATE_BIN) return process.env.EVENTGATE_BIN;
  if (built) return built;
  execFileSync('cargo', ['build', '--quiet', '--bin', 'eventgate'], { cwd: REPO, stdio: 'inherit' });
  const target = process.env.CARGO_TARGET_DIR
    ? resolve(REPO, process.env.CARGO_TARGET_DIR)
    : join(REPO, 'target');
  built = join(target, 'debug', 'eventgate');
  if (!existsSync(built)) throw new Error(`no binary at ${built}`);
  return built;
}

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.on('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/** Polls `check` until it returns a truthy value or `ms` pass. */
export async function waitFor(check, { ms = 10000, every = 25, what = 'condition' } = {}) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${String(last)})`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** A running gateway. */
export class Gateway {
  /**
   * @param {Record<string,string>} env extra EVENTGATE_* settings
   */
  static async start(env = {}) {
    const gw = new Gateway();
    gw.dir = mkdtempSync(join(tmpdir(), 'eventgate-js-'));
    gw.port = await freePort();
    gw.env = env;
    /** The account token REST calls use by default. */
    gw.token = env.EVENTGATE_ACCOUNT_TOKEN ?? ACCOUNT;
    await gw.spawn();
    return gw;
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  async spawn() {
    const clean = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !k.startsWith('EVENTGATE_') || k === 'EVENTGATE_BIN'),
    );
    this.log = '';
    this.proc = spawn(gatewayBinary(), ['serve'], {
      env: {
        ...clean,
        EVENTGATE_BIND: `127.0.0.1:${this.port}`,
        EVENTGATE_DATABASE_URL: join(this.dir, 'eventgate.sqlite3'),
        EVENTGATE_ACCOUNT_TOKEN: ACCOUNT,
        EVENTGATE_RATE_LIMIT_PER_MINUTE: '100000',
        EVENTGATE_LOG: process.env.EVENTGATE_TEST_LOG ?? 'warn',
        ...this.env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc.stdout.on('data', (d) => (this.log += d));
    this.proc.stderr.on('data', (d) => (this.log += d));
    this.exited = new Promise((r) => this.proc.on('exit', (code, signal) => r({ code, signal })));
    await waitFor(
      async () => {
        if (this.proc.exitCode !== null) throw new Error(`gateway exited: ${this.log}`);
        const res = await fetch(`${this.base}/healthz`);
        return res.status === 200;
      },
      { ms: 30000, what: 'the gateway to listen' },
    );
  }

  /** SIGTERM (clients get 1001) and wait for the exit. */
  async stop() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 15000);
    await this.exited;
    clearTimeout(timer);
  }

  /** Stops, then starts again on the same port and database. */
  async restart() {
    await this.stop();
    await this.spawn();
  }

  async close() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** One REST call with the account token; resolves to {status, body, headers}. */
  async call(method, path, body, token = this.token) {
    const headers = { token };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(this.base + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json = null;
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
    return { status: res.status, body: json, text, headers: res.headers };
  }

  /** Creates an instance with its WebSocket enabled; resolves to its TokenInstance. */
  async instance(name, extra = {}) {
    const r = await this.call('POST', '/api/instance/new', { name, websocketEnabled: true, ...extra });
    if (r.status !== 201) throw new Error(`create ${name}: ${r.status} ${r.text}`);
    return r.body.instance.token;
  }

  async publish(name, body) {
    const r = await this.call('POST', `/api/events/publish/${name}`, body);
    if (r.status !== 202) throw new Error(`publish ${name}: ${r.status} ${r.text}`);
    return r.body.accepted;
  }

  /** The value of one series in /metrics (0 when absent). */
  async metric(series) {
    const text = await (await fetch(`${this.base}/metrics`)).text();
    for (const line of text.split('\n')) {
      if (line.startsWith(`${series} `)) return Number(line.slice(series.length + 1));
    }
    return 0;
  }

  /** Connected clients of an instance, as the list reports them. */
  async clients(name) {
    const r = await this.call('GET', '/api/instance/list');
    return r.body.instances.find((i) => i.name === name)?.connectedClients ?? 0;
  }

  /** Whether a route exists (anything but 404 `Not found`). */
  async has(path) {
    const r = await this.call('GET', path);
    return !(r.status === 404 && r.body?.error?.message === 'Not found');
  }
}

/**
 * Does this gateway keep a history (§12)? Connects with ?recover=true and
 * reports whether envelopes carry offsets.
 */
export async function hasHistory(gw, WebSocket) {
  const name = `probe-${Math.random().toString(36).slice(2, 10)}`;
  await gw.instance(name);
  const ws = new WebSocket(`ws://127.0.0.1:${gw.port}/ws/${name}?token=${ACCOUNT}&recover=true`);
  const frames = [];
  ws.on('message', (d) => frames.push(JSON.parse(String(d))));
  await new Promise((ok, fail) => {
    ws.once('open', ok);
    ws.once('error', fail);
  });
  await waitFor(async () => (await gw.clients(name)) === 1, { what: 'probe client' });
  await gw.publish(name, { event: 'label.update', data: { probe: true } });
  await waitFor(() => frames.some((f) => f.event === 'label.update'), { what: 'probe event' });
  ws.close();
  await gw.call('DELETE', `/api/instance/delete/${name}`);
  const env = frames.find((f) => f.event === 'label.update');
  return typeof env.offset === 'number' && typeof env.epoch === 'string' && env.epoch !== '';
}
