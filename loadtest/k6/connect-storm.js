// Reconnect storm: CLIENTS WebSocket clients connect at once and resume with `since`, BEHIND
// events behind, as after a replica restart. Each must catch up completely and in order.
//
//   k6 run loadtest/k6/connect-storm.js
//   k6 run -e CLIENTS=2000 -e BEHIND=1000 loadtest/k6/connect-storm.js
import http from 'k6/http';
import ws from 'k6/ws';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const GATEWAY = __ENV.GATEWAY_URL || 'http://127.0.0.1:8080';
const PUBLISHER = __ENV.PUBLISHER_URL || 'http://127.0.0.1:8081';
const WS_URL = __ENV.WS_URL || `${GATEWAY.replace(/^http/, 'ws')}/v1/ws`;
const CLIENTS = parseInt(__ENV.CLIENTS || '200', 10);
const BEHIND = parseInt(__ENV.BEHIND || '1000', 10);
const TIMEOUT_S = parseFloat(__ENV.TIMEOUT || '30');
const HEADERS = { 'Content-Type': 'application/json' };
if (__ENV.PUBLISHER_TOKEN) HEADERS.Authorization = `Bearer ${__ENV.PUBLISHER_TOKEN}`;
const WS_PARAMS = __ENV.TOKEN ? { headers: { Authorization: `Bearer ${__ENV.TOKEN}` } } : {};

const catchUp = new Trend('catch_up_time', true);
const notCaughtUp = new Counter('clients_not_caught_up');
const outOfOrder = new Counter('events_out_of_order');
const resets = new Counter('resets');

export const options = {
  scenarios: {
    storm: {
      executor: 'per-vu-iterations',
      vus: CLIENTS,
      iterations: 1,
      maxDuration: `${TIMEOUT_S + 30}s`,
    },
  },
  thresholds: {
    clients_not_caught_up: ['count==0'],
    events_out_of_order: ['count==0'],
    resets: ['count==0'],
    catch_up_time: [`p(99)<${__ENV.CATCH_UP_P99_MS || '2000'}`],
  },
};

// Publishes an anchor event and BEHIND events after it; clients resume from the anchor.
export function setup() {
  const channel = `k6-storm-${Date.now()}`;
  const anchor = http.post(`${PUBLISHER}/v1/publish`, JSON.stringify({ channel, data: { n: 0 } }), { headers: HEADERS });
  check(anchor, { 'anchor published': (r) => r.status === 202 });
  for (let n = 1; n <= BEHIND; n += 100) {
    const events = [];
    for (let i = n; i < Math.min(n + 100, BEHIND + 1); i += 1) events.push({ channel, data: { n: i } });
    http.post(`${PUBLISHER}/v1/publish`, JSON.stringify({ events }), { headers: HEADERS });
  }
  return { channel, since: anchor.json('published.0.id') };
}

export default function (data) {
  const started = Date.now();
  let last = 0;
  const res = ws.connect(WS_URL, WS_PARAMS, (socket) => {
    socket.on('open', () => socket.send(JSON.stringify({ type: 'subscribe', channel: data.channel, since: data.since })));
    socket.on('message', (text) => {
      const msg = JSON.parse(text);
      if (msg.type === 'reset') resets.add(1);
      if (msg.type !== 'event') return;
      if (msg.data.n !== last + 1) outOfOrder.add(1);
      last = msg.data.n;
      if (last === BEHIND) {
        catchUp.add(Date.now() - started);
        socket.close();
      }
    });
    socket.setTimeout(() => socket.close(), TIMEOUT_S * 1000);
  });
  check(res, { 'websocket upgraded': (r) => r && r.status === 101 });
  if (last !== BEHIND) notCaughtUp.add(1);
}
