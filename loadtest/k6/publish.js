// Publisher API throughput: single events, then batches, at a fixed arrival rate.
//
//   k6 run loadtest/k6/publish.js
//   k6 run -e RATE=2000 -e BATCH_RATE=200 -e BATCH=100 -e DURATION=30s loadtest/k6/publish.js
import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const PUBLISHER = __ENV.PUBLISHER_URL || 'http://127.0.0.1:8081';
const RATE = parseInt(__ENV.RATE || '500', 10);
const BATCH_RATE = parseInt(__ENV.BATCH_RATE || '50', 10);
const BATCH = parseInt(__ENV.BATCH || '100', 10);
const DURATION = __ENV.DURATION || '20s';
const VUS = parseInt(__ENV.VUS || '16', 10);
const HEADERS = { 'Content-Type': 'application/json' };
if (__ENV.PUBLISHER_TOKEN) HEADERS.Authorization = `Bearer ${__ENV.PUBLISHER_TOKEN}`;

const events = new Counter('events_published');

export const options = {
  scenarios: {
    single: {
      executor: 'constant-arrival-rate',
      exec: 'single',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS * 4,
    },
    batch: {
      executor: 'constant-arrival-rate',
      exec: 'batch',
      rate: BATCH_RATE,
      timeUnit: '1s',
      duration: DURATION,
      startTime: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS * 4,
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    'http_req_duration{scenario:single}': [`p(95)<${__ENV.SINGLE_P95_MS || '50'}`],
    'http_req_duration{scenario:batch}': [`p(95)<${__ENV.BATCH_P95_MS || '250'}`],
    checks: ['rate>0.99'],
  },
};

function post(body, count) {
  const r = http.post(`${PUBLISHER}/v1/publish`, body, { headers: HEADERS });
  if (check(r, { 'published (202)': (x) => x.status === 202 })) events.add(count);
}

export function single() {
  const n = exec.scenario.iterationInTest;
  post(JSON.stringify({ channel: `k6-publish-${n % 100}`, event: 'k6', data: { n } }), 1);
}

export function batch() {
  const n = exec.scenario.iterationInTest;
  const list = [];
  for (let i = 0; i < BATCH; i += 1) list.push({ channel: `k6-batch-${(n + i) % 100}`, data: { n, i } });
  post(JSON.stringify({ events: list }), BATCH);
}
