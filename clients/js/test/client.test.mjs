// Unit tests of the client against scripted EventSource, WebSocket, fetch and timers.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, backoffDelay, retryAfterMs } from '../dist/index.js';

/** Timers the test runs by hand. */
function timers() {
  const pending = [];
  return {
    pending,
    setTimeout: (f, ms) => {
      const t = { f, ms, cleared: false };
      pending.push(t);
      return t;
    },
    clearTimeout: (t) => {
      if (t) t.cleared = true;
    },
    /** Runs the next live timer; returns its delay. */
    async next() {
      const t = pending.find((p) => !p.cleared && !p.ran);
      assert.ok(t, 'a timer is pending');
      t.ran = true;
      await t.f();
      await settle();
      return t.ms;
    },
  };
}

const settle = () => new Promise((r) => setImmediate(r));

/** fetch answering tickets t1, t2, ... or the scripted refusals first. */
function tickets(refusals = []) {
  const calls = [];
  let n = 0;
  const fetch = async (url, init) => {
    calls.push({ url, init });
    const refusal = refusals.shift();
    if (refusal) {
      return { ok: false, status: refusal.status, headers: new Map([['retry-after', refusal.retryAfter]]), json: async () => ({}) };
    }
    n += 1;
    return { ok: true, status: 200, headers: new Map(), json: async () => ({ ticket: `t${n}`, expires_in: 30 }) };
  };
  return { fetch, calls };
}

class FakeEventSource {
  static all = [];
  constructor(url, init) {
    this.url = new URL(url, 'http://gateway.test');
    this.init = init;
    this.listeners = {};
    this.closed = false;
    FakeEventSource.all.push(this);
  }
  addEventListener(type, f) {
    (this.listeners[type] ??= []).push(f);
  }
  close() {
    this.closed = true;
  }
  /** What the browser fires for a block. */
  fire(type, data = '', lastEventId = '') {
    for (const f of this.listeners[type] ?? []) f({ type, data, lastEventId });
  }
  event(type, envelope) {
    this.fire(type, JSON.stringify(envelope), envelope.id);
  }
}

class FakeWebSocket {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.readyState = 1;
    this.sent = [];
    this.listeners = {};
    FakeWebSocket.all.push(this);
  }
  addEventListener(type, f) {
    (this.listeners[type] ??= []).push(f);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
  }
  receive(message) {
    for (const f of this.listeners.message ?? []) f({ data: JSON.stringify(message) });
  }
  drop(code) {
    this.readyState = 3;
    for (const f of this.listeners.close ?? []) f({ code });
  }
}

class MemoryStorage {
  map = new Map();
  getItem(k) {
    return this.map.has(k) ? this.map.get(k) : null;
  }
  setItem(k, v) {
    this.map.set(k, v);
  }
}

function sse(extra = {}) {
  FakeEventSource.all = [];
  const clock = timers();
  const api = tickets(extra.refusals);
  let tokens = 0;
  const client = connect({
    url: 'https://gateway.test',
    channels: ['orders', 'user:42'],
    getToken: async () => `jwt-${++tokens}`,
    EventSource: FakeEventSource,
    fetch: api.fetch,
    random: () => 0.5,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: () => 0,
    ...extra.options,
  });
  return { client, clock, api };
}

test('SSE: a ticket per connection, events by name, and exact resume after an error', async () => {
  const storage = new MemoryStorage();
  const { client, clock, api } = sse({ options: { storage } });
  const statuses = [];
  client.onStatus((s) => statuses.push(s));
  const named = [];
  const plain = [];
  client.on('order:created', (e) => named.push(e));
  client.on('message', (e) => plain.push(e));
  await settle();

  assert.equal(api.calls[0].url, 'https://gateway.test/v1/tickets');
  assert.equal(api.calls[0].init.headers.Authorization, 'Bearer jwt-1');
  const first = FakeEventSource.all[0];
  assert.deepEqual(first.url.searchParams.getAll('channel'), ['orders', 'user:42']);
  assert.equal(first.url.searchParams.get('ticket'), 't1');
  assert.equal(first.url.searchParams.get('position_events'), 'true');
  assert.equal(first.url.searchParams.get('last_event_id'), null);

  first.fire('open');
  first.fire('eventgate-position', '{"id":"100"}', '100');
  assert.equal(client.lastEventId, '100', 'a quiet stream knows its position');
  first.event('order:created', { id: '101', channel: 'orders', event: 'order:created', data: { n: 1 }, timestamp: 't' });
  first.event('message', { id: '102', channel: 'user:42', data: 'hi', timestamp: 't' });
  assert.deepEqual(named.map((e) => e.data), [{ n: 1 }]);
  assert.deepEqual(plain.map((e) => e.data), ['hi']);
  assert.equal(client.lastEventId, '102');
  assert.equal(storage.getItem('eventgate:orders,user:42'), '102');

  // The connection drops: the spent ticket is not reused; a new one, and the last id.
  first.fire('error');
  assert.ok(first.closed);
  assert.deepEqual(statuses, ['open', 'reconnecting']);
  const delay = await clock.next();
  assert.ok(delay >= 0 && delay <= 1000, `first backoff within 1 s: ${delay}`);
  const second = FakeEventSource.all[1];
  assert.equal(second.url.searchParams.get('ticket'), 't2');
  assert.equal(second.url.searchParams.get('last_event_id'), '102');
  assert.equal(api.calls[1].init.headers.Authorization, 'Bearer jwt-2', 'a fresh token');
  client.close();
  assert.equal(client.status, 'closed');
});

test('a reload resumes from the position kept in storage', async () => {
  const storage = new MemoryStorage();
  storage.setItem('eventgate:orders,user:42', '102');
  const { client } = sse({ options: { storage } });
  await settle();
  assert.equal(FakeEventSource.all[0].url.searchParams.get('last_event_id'), '102');
  client.close();
});

test('SSE: a handler added later gets its named events', async () => {
  const { client } = sse();
  await settle();
  const source = FakeEventSource.all[0];
  const got = [];
  client.on('invoice:paid', (e) => got.push(e.id));
  source.event('invoice:paid', { id: '7', channel: 'orders', event: 'invoice:paid', data: 1, timestamp: 't' });
  assert.deepEqual(got, ['7']);
});

test('SSE: reset reaches the app with its channels, and its id is kept', async () => {
  const { client } = sse();
  await settle();
  const resets = [];
  client.onReset((channels, reason) => resets.push({ channels, reason }));
  FakeEventSource.all[0].fire('reset', '{"channels":["orders"],"reason":"data_lost"}', '500');
  assert.deepEqual(resets, [{ channels: ['orders'], reason: 'data_lost' }]);
  assert.equal(client.lastEventId, '500');
});

test('SSE: expired comes back at once with a fresh credential and the position', async () => {
  const { client, api } = sse();
  await settle();
  const first = FakeEventSource.all[0];
  first.fire('eventgate-position', '{"id":"41"}', '41');
  first.fire('expired', '{"reason":"token_expired"}');
  await settle();
  assert.ok(first.closed);
  const second = FakeEventSource.all[1];
  assert.equal(second.url.searchParams.get('last_event_id'), '41');
  assert.equal(api.calls.length, 2);
  client.close();
});

test('a refused ticket request waits its Retry-After', async () => {
  const { client, clock } = sse({ refusals: [{ status: 429, retryAfter: '3' }] });
  await settle();
  assert.equal(FakeEventSource.all.length, 0);
  assert.equal(client.status, 'reconnecting');
  const delay = await clock.next();
  assert.ok(delay >= 3000, `waited ${delay} ms`);
  assert.equal(FakeEventSource.all.length, 1);
  client.close();
});

test('a cookie deployment needs no ticket', async () => {
  FakeEventSource.all = [];
  const client = connect({ url: '', channels: ['orders'], EventSource: FakeEventSource, fetch: () => assert.fail('no fetch') });
  await settle();
  const source = FakeEventSource.all[0];
  assert.equal(source.url.searchParams.get('ticket'), null);
  assert.equal(source.init.withCredentials, true);
  client.close();
});

test('SSE: subscribe at runtime needs the WebSocket transport', () => {
  const { client } = sse();
  assert.throws(() => client.subscribe('more'), /websocket/);
  client.close();
});

test('backoff is full jitter, capped', () => {
  assert.equal(backoffDelay(0, () => 0.999, 1000, 30000), 999);
  assert.equal(backoffDelay(3, () => 0.5, 1000, 30000), 4000);
  assert.equal(backoffDelay(20, () => 0.999, 1000, 30000), 29970);
  assert.equal(backoffDelay(5, () => 0), 0);
  assert.equal(retryAfterMs('2', 0), 2000);
  assert.equal(retryAfterMs(new Date(5000).toUTCString(), 0), 5000);
  assert.equal(retryAfterMs(null, 0), undefined);
});

function ws(extra = {}) {
  FakeWebSocket.all = [];
  const clock = timers();
  const api = tickets();
  let tokens = 0;
  const client = connect({
    url: 'https://gateway.test',
    channels: ['orders', 'chat'],
    transport: 'websocket',
    getToken: async () => `jwt-${++tokens}`,
    WebSocket: FakeWebSocket,
    fetch: api.fetch,
    random: () => 0.5,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: () => 1_000_000,
    ...extra,
  });
  return { client, clock, api };
}

test('WebSocket: subscribes with since, keeps each channel position, and resubscribes after a drop', async () => {
  const { client, clock } = ws({ lastEventId: '{"orders":"10"}' });
  await settle();
  const socket = FakeWebSocket.all[0];
  assert.equal(socket.url.href, 'wss://gateway.test/v1/ws?ticket=t1');
  const got = [];
  client.on('*', (e) => got.push([e.channel, e.id]));
  socket.receive({ type: 'connected', connection_id: 'c', replica: 'r', expires_at: 2000 });
  assert.deepEqual(socket.sent, [
    { type: 'subscribe', channel: 'orders', id: 'sub:orders', since: '10' },
    { type: 'subscribe', channel: 'chat', id: 'sub:chat' },
  ]);
  socket.receive({ type: 'subscribed', channel: 'chat', position: '20' });
  socket.receive({ type: 'event', id: '11', channel: 'orders', data: 1, timestamp: 't' });
  socket.receive({ type: 'reset', channels: ['chat'], reason: 'data_lost', position: '30' });
  assert.deepEqual(got, [['orders', '11']]);
  assert.deepEqual(JSON.parse(client.lastEventId), { orders: '11', chat: '30' });

  socket.drop(1006);
  await clock.next();
  const again = FakeWebSocket.all[1];
  assert.equal(again.url.searchParams.get('ticket'), 't2');
  again.receive({ type: 'connected', expires_at: 2000 });
  assert.deepEqual(again.sent, [
    { type: 'subscribe', channel: 'orders', id: 'sub:orders', since: '11' },
    { type: 'subscribe', channel: 'chat', id: 'sub:chat', since: '30' },
  ]);
  client.close();
});

test('WebSocket: a rate-limited subscribe is sent again after retry_after_ms; the token is refreshed before expiry', async () => {
  const { client, clock } = ws();
  await settle();
  const socket = FakeWebSocket.all[0];
  // Expires in 1,000 s: refreshed a minute before.
  socket.receive({ type: 'connected', expires_at: 2000 });
  socket.receive({ type: 'error', code: 'rate_limited', id: 'sub:chat', retry_after_ms: 250 });
  const refresh = clock.pending.find((t) => t.ms === 940_000);
  assert.ok(refresh, `refresh timer: ${clock.pending.map((t) => t.ms)}`);
  const resend = clock.pending.find((t) => t.ms === 250);
  assert.ok(resend);
  socket.sent = [];
  resend.f();
  assert.deepEqual(socket.sent, [{ type: 'subscribe', channel: 'chat', id: 'sub:chat' }]);
  socket.sent = [];
  await refresh.f();
  assert.deepEqual(socket.sent, [{ type: 'refresh', token: 'jwt-2' }]);

  client.subscribe('more');
  client.unsubscribe('orders');
  assert.deepEqual(socket.sent.slice(1), [
    { type: 'subscribe', channel: 'more', id: 'sub:more' },
    { type: 'unsubscribe', channel: 'orders' },
  ]);
  client.close();
});
