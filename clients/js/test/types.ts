// Type-checked, never run (`tsc -p test`, in CI through .ci/browser): the
// README's uses of the client compile under `strict` against index.d.ts,
// with the `ws` package's WebSocket and with the browser's.
import WebSocket from 'ws';
import {
  EventGateApi,
  EventGateClient,
  EventGateError,
  describeState,
  type CreatedInstance,
  type Envelope,
  type EventMeta,
} from '../index.js';

const client = new EventGateClient({
  baseUrl: 'http://127.0.0.1:8080',
  instance: 'sales-1',
  token: 'token',
  events: ['message.exchange'],
  WebSocket,
  heartbeatTimeoutMs: 30000,
  backoff: { initialMs: 500, maxMs: 30000 },
});
client.on('event', (envelope: Envelope, meta: EventMeta) => {
  console.log(envelope.event, envelope.data, meta.replayed ? '(missed, recovered)' : '');
});
client.on('state', (state) => console.log(describeState(state)));
client.on('recovery', (r) => {
  if (r.requested && !r.recovered) console.log('missed events are gone: reload from your backend');
});
client.connect();
client.setEvents(['call.update']);
client.close();

// The browser's constructor (lib "dom") fits as well.
new EventGateClient({ instance: 'sales-1', token: 'token', WebSocket: globalThis.WebSocket });

const api = new EventGateApi({ baseUrl: 'http://127.0.0.1:8080', token: 'token' });
export async function rest(): Promise<void> {
  const created: CreatedInstance = await api.createInstance({ name: 'sales-1' });
  console.log(created.token, created.websocket?.enabled, created.webhook?.secret);
  // @ts-expect-error the 201 carries no client count
  console.log(created.connectedClients);
  try {
    const instances = await api.listInstances();
    console.log(instances.map((i) => i.connectedClients));
    await api.publishEvent('sales-1', 'message.exchange', { text: 'hi' });
    const { deliveries, next } = await api.failedDeliveries('sales-1', { label: 'crm', limit: 100 });
    await api.retryDeliveries('sales-1', { label: 'crm', ids: deliveries.map((d) => d.id) });
    console.log(next);
  } catch (e) {
    if (e instanceof EventGateError) console.log(e.status, e.message, e.retryAfter);
  }
}
