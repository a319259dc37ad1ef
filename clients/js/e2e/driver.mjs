// Drives Debian's Chromium (puppeteer-core, no browser download) for eventgate/tests/browser.rs:
// one page per transport uses the built package against the gateways behind nginx. The pages
// are served under nginx's origin by request interception, so tickets, streams and sockets are
// same-origin and real. Protocol on stdout/stdin, a line each:
//   -> ready                   both pages are connected
//   <- until ID,ID,...         wait until each page has these events (at most 60 s)
//   -> result {json}           what each page received, its resets and statuses
//   <- resets N                wait until each page had N resets
//   -> resets
import { readFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import puppeteer from 'puppeteer-core';

const origin = process.env.EVENTGATE_ORIGIN;
const publisher = process.env.EVENTGATE_PUBLISHER;
const publisherKey = process.env.EVENTGATE_PUBLISHER_KEY;
const tokenTtl = Number(process.env.TOKEN_TTL_SECONDS ?? 3600);
let minted = 0;

/** The app's backend: a short-lived token for the page, from the publisher's `/v1/tokens`. */
async function mintToken() {
  const response = await fetch(`${publisher}/v1/tokens`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${publisherKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ sub: 'browser', channels: ['*'], ttl_seconds: tokenTtl }),
  });
  if (!response.ok) throw new Error(`minting failed: ${response.status}`);
  minted += 1;
  return (await response.json()).token;
}
const channels = (process.env.CHANNELS ?? 'a').split(',');
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const client = await readFile(new URL('../dist/index.js', import.meta.url), 'utf8');

// The React hook, rendered by a page an app would build: esbuild bundles React and the hook.
const reactApp = `
import { createElement as h, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { useEventgate } from './dist/react.js';
const initial = new URLSearchParams(location.search).get('channels').split(',');
window.resets = []; window.statuses = [];
// The page's open EventSources, to see the hook close what it no longer needs.
const Native = window.EventSource;
window.liveSources = new Set();
window.EventSource = class extends Native {
  constructor(url, init) { super(url, init); window.liveSources.add(this); }
  close() { window.liveSources.delete(this); super.close(); }
};
function Events({ channels }) {
  const { status, lastEvent, subscribe } = useEventgate(channels, {
    url: '',
    getToken: () => window.eventgateToken(),
    backoff: { baseMs: 200, maxMs: 2000 },
    onReset: (channels, reason) => window.resets.push([channels, reason]),
  });
  const [events, setEvents] = useState([]);
  useEffect(() => subscribe((e) => setEvents((list) => [...list, e])), [subscribe]);
  useEffect(() => { window.statuses.push(status); }, [status]);
  return h('div', null,
    h('p', { id: 'status', 'data-status': status }, status),
    h('p', { id: 'last' }, lastEvent ? lastEvent.id : ''),
    h('ul', null, events.map((e) => h('li', { key: e.id, 'data-channel': e.channel }, e.id))));
}
// What the page shows, in the driver's terms.
Object.defineProperty(window, 'received', {
  get: () => [...document.querySelectorAll('li')].map((li) => [li.dataset.channel, li.textContent]),
});
window.subscription = { get status() { return document.getElementById('status')?.dataset.status; } };
const root = createRoot(document.getElementById('root'));
function App() {
  const [channels, setChannels] = useState(initial);
  window.setChannels = setChannels;
  return h(Events, { channels });
}
root.render(h(App));
window.unmount = () => root.unmount();
`;
const bundled = await esbuild.build({
  stdin: { contents: reactApp, resolveDir: fileURLToPath(new URL('..', import.meta.url)), loader: 'js' },
  bundle: true,
  format: 'esm',
  write: false,
  define: { 'process.env.NODE_ENV': '"production"' },
});
const reactBundle = bundled.outputFiles[0].text;
const react_html = `<!doctype html><meta charset="utf-8"><title>eventgate react</title>
<div id="root"></div><script type="module" src="/app/react.js"></script>`;

const page_html = `<!doctype html><meta charset="utf-8"><title>eventgate</title>
<script type="module">
import { connect } from '/app/client.js';
const params = new URLSearchParams(location.search);
window.received = []; window.resets = []; window.statuses = [];
const subscription = connect({
  url: '',
  channels: params.get('channels').split(','),
  transport: params.get('transport'),
  getToken: () => window.eventgateToken(),
  backoff: { baseMs: 200, maxMs: 2000 },
});
subscription.on('*', (e) => window.received.push([e.channel, e.id]));
subscription.onReset((channels, reason) => window.resets.push([channels, reason]));
subscription.onStatus((status) => window.statuses.push(status));
window.subscription = subscription;
</script>`;

const browser = await puppeteer.launch({
  executablePath,
  headless: true,
  // Pages answered by interception have no address, so Chromium counts them as public and
  // would block their requests to 127.0.0.1 (local network access checks); the real page
  // would be served by the same origin as the gateway.
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-dev-shm-usage',
    '--disable-features=LocalNetworkAccessChecks,PrivateNetworkAccessRespectPreflightResults',
  ],
});
const pages = {};
try {
  for (const transport of ['sse', 'websocket', 'react']) {
    const page = await browser.newPage();
    await page.exposeFunction('eventgateToken', mintToken);
    await page.setRequestInterception(true);
    page.on('request', (request) => {
      const url = new URL(request.url());
      if (url.pathname === '/app/index.html') {
        const body = transport === 'react' ? react_html : page_html;
        request.respond({ status: 200, contentType: 'text/html', body });
      } else if (url.pathname === '/app/react.js') {
        request.respond({ status: 200, contentType: 'text/javascript', body: reactBundle });
      } else if (url.pathname === '/app/client.js') {
        request.respond({ status: 200, contentType: 'text/javascript', body: client });
      } else {
        request.continue();
      }
    });
    page.on('pageerror', (e) => console.error(`${transport} page error: ${e}`));
    page.on('console', (m) => console.error(`${transport} console: ${m.text()}`));
    page.on('requestfailed', (r) => console.error(`${transport} request failed: ${r.url()} ${r.failure()?.errorText}`));
    page.on('response', (r) => {
      if (r.status() >= 400) console.error(`${transport} ${r.status()} ${new URL(r.url()).pathname}`);
    });
    const mode = transport === 'react' ? 'sse' : transport;
    await page.goto(`${origin}/app/index.html?transport=${mode}&channels=${channels.join(',')}`);
    pages[transport] = page;
  }
  for (const [transport, page] of Object.entries(pages)) {
    await page.waitForFunction(() => window.subscription?.status === 'open', { timeout: 30000 }).catch(async (e) => {
      const statuses = await page.evaluate(() => window.statuses).catch(() => '?');
      throw new Error(`${transport} never connected (statuses ${JSON.stringify(statuses)}): ${e.message}`);
    });
  }
  // WebSocket subscriptions are confirmed by `subscribed`; wait for each channel's position.
  await pages.websocket.waitForFunction(
    (n) => Object.keys(JSON.parse(window.subscription.lastEventId || '{}')).length === n,
    { timeout: 30000 },
    channels.length,
  );
  console.log('ready');
  for await (const line of createInterface({ input: process.stdin })) {
    const [command, arg] = line.split(' ');
    if (command === 'lifecycle') {
      // The React page changes its channels, then unmounts: one stream for the new channels,
      // then none.
      const page = pages.react;
      const streams = () => page.evaluate(() =>
        [...window.liveSources].map((s) => new URL(s.url).searchParams.getAll('channel')));
      await page.evaluate(() => window.setChannels(['user:42']));
      await page
        .waitForFunction(() => window.liveSources.size === 1 &&
          new URL([...window.liveSources][0].url).searchParams.getAll('channel').join() === 'user:42',
          { timeout: 30000, polling: 100 })
        .catch(() => {});
      const changed = await streams();
      await page.evaluate(() => window.unmount());
      const unmounted = await streams();
      console.log(`lifecycle ${JSON.stringify({ changed, unmounted })}`);
      continue;
    }
    if (command === 'resets') {
      // Wait until each page has had `arg` resets.
      for (const page of Object.values(pages)) {
        await page
          .waitForFunction((want) => window.resets.length >= want, { timeout: 60000, polling: 100 }, Number(arg))
          .catch(() => {});
      }
      console.log('resets');
      continue;
    }
    if (command !== 'until') continue;
    // Wait until each page has every id named (the last of each channel), then report.
    const ids = arg.split(',');
    const result = { tokens_minted: minted };
    for (const [transport, page] of Object.entries(pages)) {
      await page
        .waitForFunction(
          (want) => want.every((id) => window.received.some(([, got]) => got === id)),
          { timeout: 60000, polling: 100 },
          ids,
        )
        .catch(() => {});
      result[transport] = await page.evaluate(() => ({
        received: window.received,
        resets: window.resets,
        statuses: window.statuses,
      }));
    }
    console.log(`result ${JSON.stringify(result)}`);
  }
} finally {
  await browser.close();
}
