// Drives Debian's Chromium (puppeteer-core) through the console page `eventgate standalone`
// serves, for eventgate/tests/browser.rs. The console is opened at the address standalone
// printed (CONSOLE_URL, credentials in its fragment). Protocol on stdout/stdin, a line each:
//   -> published ID        the console connected (WebSocket) and published from its form
//   <- until ID            wait until the console shows this event (published by the test)
//   -> shown
//   <- sse                 reconnect the console over Server-Sent Events
//   -> open
//   <- screenshot          save a screenshot (SCREENSHOT) and report what the page shows
//   -> result {json}
//   <- crafted             open the console from a link that names another publisher and no key
//   -> crafted {json}      whether the publish form shows and what the tab kept
import { createInterface } from 'node:readline';
import puppeteer from 'puppeteer-core';

const consoleUrl = process.env.CONSOLE_URL;
const screenshot = process.env.SCREENSHOT;
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const timeout = 30000;

const browser = await puppeteer.launch({
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  defaultViewport: { width: 1200, height: 720 },
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => console.error(`console page: ${m.text()}`));
  page.on('requestfailed', (r) => console.error(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  await page.goto(consoleUrl);
  const open = () => page.waitForSelector('#status[data-status="open"]', { timeout });
  // Subscribed once the gateway confirmed the channel with its position.
  const subscribed = () =>
    page.waitForFunction(
      () => 'orders' in JSON.parse(window.eventgateSubscription?.lastEventId || '{}'),
      { timeout },
    );
  await open();
  await subscribed();
  const row = (id) => page.waitForSelector(`tr[data-id="${id}"]`, { timeout });

  // Publish from the form with the key standalone generated.
  await page.$eval('#publish-event', (e) => { e.value = 'invoice:paid'; });
  await page.$eval('#publish-data', (e) => { e.value = '{"invoice": 7, "amount": "12.50"}'; });
  await page.click('#publish-button');
  await page.waitForSelector('#publish-result[data-id]:not([data-id=""])', { timeout });
  const published = await page.$eval('#publish-result', (e) => e.dataset.id);
  await row(published);
  console.log(`published ${published}`);

  for await (const line of createInterface({ input: process.stdin })) {
    const [command, arg] = line.split(' ');
    if (command === 'until') {
      await row(arg);
      console.log('shown');
    } else if (command === 'sse') {
      await page.click('#disconnect-button');
      await page.waitForSelector('#status[data-status="closed"]', { timeout });
      await page.select('#transport', 'sse');
      await page.click('#connect-button');
      // A stream is subscribed before the gateway answers, so open means subscribed.
      await open();
      console.log('open');
    } else if (command === 'screenshot') {
      await page.screenshot({ path: screenshot });
      const result = await page.evaluate(() => ({
        // The credentials left the address bar once read.
        hash: location.hash,
        status: document.getElementById('status').dataset.status,
        rows: [...document.querySelectorAll('#events tr')].map((tr) =>
          [tr.className, ...[...tr.cells].slice(0, 4).map((td) => td.textContent)]),
        position: document.getElementById('position').textContent,
      }));
      console.log(`result ${JSON.stringify({ ...result, errors })}`);
    } else if (command === 'crafted') {
      // Another site first (the tab keeps its sessionStorage), then the link: a new document.
      const here = new URL(page.url());
      await page.goto('about:blank');
      await page.goto(`${here.origin}/console#publisher=http://127.0.0.9:9`);
      await page.waitForFunction(() => location.hash === '', { timeout });
      const crafted = await page.evaluate(() => ({
        publish_form_hidden: document.getElementById('publish-panel').hidden,
        kept: JSON.parse(sessionStorage.getItem('eventgate-console') ?? '{}'),
      }));
      console.log(`crafted ${JSON.stringify(crafted)}`);
      break;
    }
  }
} finally {
  await browser.close();
}
