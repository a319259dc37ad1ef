// SSE smoke test. k6 has no Server-Sent Events consumer and k6/http returns a response only
// once its body ends, so streams are opened with `duration=` (the gateway ends the stream
// after that long) and checked afterwards: status, headers, the opening `retry:` and `id:`
// lines, and an event published meanwhile. For SSE load use the Rust generator
// (loadtest/README.md).
//
//   k6 run loadtest/k6/sse-smoke.js
import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';

const GATEWAY = __ENV.GATEWAY_URL || 'http://127.0.0.1:8080';
const PUBLISHER = __ENV.PUBLISHER_URL || 'http://127.0.0.1:8081';
const VUS = parseInt(__ENV.VUS || '10', 10);
const STREAM = __ENV.STREAM_DURATION || '2s';
const HEADERS = { 'Content-Type': 'application/json' };
if (__ENV.PUBLISHER_TOKEN) HEADERS.Authorization = `Bearer ${__ENV.PUBLISHER_TOKEN}`;
const SSE_HEADERS = { Accept: 'text/event-stream' };
if (__ENV.TOKEN) SSE_HEADERS.Authorization = `Bearer ${__ENV.TOKEN}`;

export const options = {
  scenarios: {
    streams: { executor: 'per-vu-iterations', exec: 'stream', vus: VUS, iterations: 3 },
    publisher: { executor: 'constant-arrival-rate', exec: 'publish', rate: 10, timeUnit: '1s', duration: '10s', preAllocatedVUs: 2 },
    refusals: { executor: 'per-vu-iterations', exec: 'refusal', vus: 1, iterations: 1 },
  },
  thresholds: { checks: ['rate==1'] },
};

export function stream() {
  const res = http.get(`${GATEWAY}/v1/events?channel=k6-smoke&duration=${STREAM}`, { headers: SSE_HEADERS, timeout: '30s' });
  check(res, {
    'status 200': (r) => r.status === 200,
    'text/event-stream': (r) => (r.headers['Content-Type'] || '').startsWith('text/event-stream'),
    'no-cache': (r) => r.headers['Cache-Control'] === 'no-cache',
    'nginx buffering off': (r) => r.headers['X-Accel-Buffering'] === 'no',
    'starts with retry:': (r) => /^retry: \d+\n/.test(r.body),
    'position id line': (r) => /^retry: \d+\nid: \d+\n\n/.test(r.body),
    'an event arrived': (r) => /\nid: \d+\nevent: k6\ndata: \{"id":"\d+","channel":"k6-smoke"/.test(r.body),
  });
  sleep(exec.vu.idInTest % 3);
}

export function publish() {
  const body = JSON.stringify({ channel: 'k6-smoke', event: 'k6', data: { at: Date.now() } });
  check(http.post(`${PUBLISHER}/v1/publish`, body, { headers: HEADERS }), { 'published (202)': (r) => r.status === 202 });
}

export function refusal() {
  const res = http.get(`${GATEWAY}/v1/events?channel=not%20a%20channel`, { headers: SSE_HEADERS });
  check(res, {
    'bad channel is a 400': (r) => r.status === 400,
    'with a JSON error code': (r) => r.json('error.code') === 'invalid_channel',
  });
}
