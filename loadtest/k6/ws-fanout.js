// WebSocket fan-out: SUBSCRIBERS virtual users hold subscriptions while one publisher VU
// publishes RATE events/s for DURATION seconds. Every subscriber checks it received every event
// of its channel in order; publish_to_receive records latency from the event's timestamp.
//
//   k6 run loadtest/k6/ws-fanout.js
//   k6 run -e SUBSCRIBERS=1000 -e CHANNELS=10 -e RATE=200 -e DURATION=60 loadtest/k6/ws-fanout.js
import http from 'k6/http';
import ws from 'k6/ws';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const GATEWAY = __ENV.GATEWAY_URL || 'http://127.0.0.1:8080';
const PUBLISHER = __ENV.PUBLISHER_URL || 'http://127.0.0.1:8081';
const WS_URL = __ENV.WS_URL || `${GATEWAY.replace(/^http/, 'ws')}/v1/ws`;
const SUBSCRIBERS = parseInt(__ENV.SUBSCRIBERS || '100', 10);
const CHANNELS = parseInt(__ENV.CHANNELS || '1', 10);
const RATE = parseFloat(__ENV.RATE || '20');
const DURATION = parseFloat(__ENV.DURATION || '30');
const WARMUP = parseFloat(__ENV.WARMUP || '5');
const DRAIN = parseFloat(__ENV.DRAIN || '15');
const P99_MS = __ENV.P99_MS || '250';
const PUBLISH_HEADERS = { 'Content-Type': 'application/json' };
if (__ENV.PUBLISHER_TOKEN) PUBLISH_HEADERS.Authorization = `Bearer ${__ENV.PUBLISHER_TOKEN}`;
const WS_PARAMS = __ENV.TOKEN ? { headers: { Authorization: `Bearer ${__ENV.TOKEN}` } } : {};

const latency = new Trend('publish_to_receive', true);
const received = new Counter('events_received');
const lost = new Counter('events_lost');
const outOfOrder = new Counter('events_out_of_order');
const incomplete = new Counter('subscribers_without_final_event');
const failures = new Counter('subscription_failures');

export const options = {
  scenarios: {
    subscribers: {
      executor: 'per-vu-iterations',
      exec: 'subscriber',
      vus: SUBSCRIBERS,
      iterations: 1,
      maxDuration: `${WARMUP + DURATION + DRAIN + 30}s`,
    },
    publisher: {
      executor: 'per-vu-iterations',
      exec: 'publisher',
      vus: 1,
      iterations: 1,
      startTime: `${WARMUP}s`,
      maxDuration: `${DURATION + 30}s`,
    },
  },
  thresholds: {
    events_lost: ['count==0'],
    events_out_of_order: ['count==0'],
    subscribers_without_final_event: ['count==0'],
    subscription_failures: ['count==0'],
    publish_to_receive: [`p(99)<${P99_MS}`],
  },
};

// Channel names shared by every VU of this run.
export function setup() {
  return { prefix: `k6-fanout-${Date.now()}` };
}

export function subscriber(data) {
  const channel = `${data.prefix}-${exec.vu.idInTest % CHANNELS}`;
  let last = -1;
  let finished = false;
  const res = ws.connect(WS_URL, WS_PARAMS, (socket) => {
    socket.on('open', () => socket.send(JSON.stringify({ type: 'subscribe', channel, id: 1 })));
    socket.on('message', (text) => {
      const msg = JSON.parse(text);
      if (msg.type === 'error' || msg.type === 'reset') {
        failures.add(1);
        return;
      }
      if (msg.type !== 'event') return;
      const d = msg.data;
      if (d.final) {
        // The publisher's last word: how many events this channel got.
        if (last + 1 < d.count) lost.add(d.count - last - 1);
        finished = true;
        socket.close();
        return;
      }
      latency.add(Date.now() - Date.parse(msg.timestamp));
      received.add(1);
      if (d.n === last + 1) {
        last = d.n;
      } else if (d.n <= last) {
        outOfOrder.add(1);
      } else {
        lost.add(d.n - last - 1);
        last = d.n;
      }
    });
    socket.setTimeout(() => socket.close(), (WARMUP + DURATION + DRAIN) * 1000);
  });
  check(res, { 'websocket upgraded': (r) => r && r.status === 101 });
  if (!finished) incomplete.add(1);
}

export function publisher(data) {
  const counts = new Array(CHANNELS).fill(0);
  const start = Date.now();
  let sent = 0;
  while ((Date.now() - start) / 1000 < DURATION) {
    const c = sent % CHANNELS;
    const body = JSON.stringify({
      channel: `${data.prefix}-${c}`,
      event: 'k6',
      data: { n: counts[c] },
    });
    const r = http.post(`${PUBLISHER}/v1/publish`, body, { headers: PUBLISH_HEADERS });
    // Only accepted events count: the sequence the subscribers check has no holes of ours.
    if (check(r, { 'published (202)': (x) => x.status === 202 })) counts[c] += 1;
    sent += 1;
    const wait = start + (sent * 1000) / RATE - Date.now();
    if (wait > 0) sleep(wait / 1000);
  }
  for (let c = 0; c < CHANNELS; c += 1) {
    const body = JSON.stringify({ channel: `${data.prefix}-${c}`, data: { final: true, count: counts[c] } });
    http.post(`${PUBLISHER}/v1/publish`, body, { headers: PUBLISH_HEADERS });
  }
}
