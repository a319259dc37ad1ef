// The live console: subscribes with the browser client package (client.js, the build of
// clients/js) and shows every event, reset and status change. Credentials come from the URL's
// fragment (never sent to a server, so never in an access log) or the form, and are kept in
// this tab's sessionStorage only. Everything shown is set with textContent: event data is
// untrusted input.
import { connect } from './client.js';

const $ = (id) => document.getElementById(id);
const SETTINGS = 'eventgate-console';
const MAX_ROWS = 500;

const settings = JSON.parse(sessionStorage.getItem(SETTINGS) ?? '{}');
if (location.hash.length > 1) {
  const given = new URLSearchParams(location.hash.slice(1));
  // A new address replaces the credentials saved in this tab: none carry over to another link.
  for (const name of ['token', 'key', 'publisher']) delete settings[name];
  for (const name of ['token', 'key', 'channels']) {
    if (given.has(name)) settings[name] = given.get(name);
  }
  const publisher = onThisHost(given.get('publisher'));
  if (publisher) settings.publisher = publisher;
  sessionStorage.setItem(SETTINGS, JSON.stringify(settings));
  history.replaceState(null, '', location.pathname + location.search);
}

/** The publisher's address on the host this page came from: only its port is taken from the
 * link, so a crafted link cannot send the key to another host. */
function onThisHost(text) {
  try {
    const url = new URL(text);
    if (url.protocol !== location.protocol) return undefined;
    url.hostname = location.hostname;
    return url.origin;
  } catch {
    return undefined;
  }
}
if (settings.token) $('token').value = settings.token;
if (settings.channels) $('channels').value = settings.channels;
// Publishing needs the publisher's address and a key: `eventgate standalone` passes both.
if (settings.publisher && settings.key) $('publish-panel').hidden = false;

let subscription;

const hint = () => { $('sse-hint').hidden = $('transport').value !== 'sse'; };
$('transport').addEventListener('change', hint);
if (settings.transport) $('transport').value = settings.transport;
hint();

function row(className, cells) {
  const tr = document.createElement('tr');
  tr.className = className;
  for (const [name, text] of cells) {
    const td = document.createElement('td');
    td.className = name;
    td.textContent = text;
    tr.append(td);
  }
  const body = $('events');
  body.prepend(tr);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  return tr;
}

const time = () => new Date().toLocaleTimeString();

function showEvent(e) {
  const tr = row('event', [
    ['id', e.id],
    ['channel', e.channel],
    ['event', e.event],
    ['data', JSON.stringify(e.data)],
    ['received', time()],
  ]);
  tr.dataset.id = e.id;
  $('position').textContent = `last id ${subscription?.lastEventId ?? e.id}`;
}

function setStatus(status) {
  $('status').textContent = status;
  $('status').dataset.status = status;
  const live = status !== 'closed';
  $('connect-button').disabled = live;
  $('disconnect-button').disabled = !live;
}

$('connect').addEventListener('submit', (event) => {
  event.preventDefault();
  subscription?.close();
  const channels = $('channels').value.split(',').map((c) => c.trim()).filter(Boolean);
  const token = $('token').value.trim();
  settings.token = token || undefined;
  settings.channels = channels.join(',');
  settings.transport = $('transport').value;
  sessionStorage.setItem(SETTINGS, JSON.stringify(settings));
  const transport = $('transport').value;
  subscription = connect({
    url: '',
    channels,
    transport,
    // No token: the gateway's cookie (AUTH_COOKIE) is the credential.
    getToken: token ? () => token : undefined,
    // A reload resumes where this tab was (positions differ in form per transport).
    storage: sessionStorage,
    storageKey: `eventgate-console:${transport}:${[...channels].sort().join(',')}`,
    backoff: { baseMs: 500, maxMs: 10000 },
  });
  subscription.on('*', showEvent);
  subscription.onReset((channels, reason) => {
    row('reset', [
      ['id', 'reset'],
      ['channel', channels.join(', ')],
      ['event', reason],
      ['data', 'history is incomplete here: an app refetches these channels'],
      ['received', time()],
    ]);
  });
  subscription.onStatus((status) => {
    setStatus(status);
    row('status', [['id', ''], ['channel', ''], ['event', `connection ${status}`], ['data', ''], ['received', time()]]);
  });
  setStatus(subscription.status);
  // For the browser's developer tools: `eventgateSubscription.lastEventId` and the like.
  window.eventgateSubscription = subscription;
});

$('disconnect-button').addEventListener('click', () => {
  subscription?.close();
  subscription = undefined;
  setStatus('closed');
});

$('publish').addEventListener('submit', async (event) => {
  event.preventDefault();
  const result = $('publish-result');
  result.className = 'muted';
  result.dataset.id = '';
  let data;
  try {
    data = JSON.parse($('publish-data').value);
  } catch (e) {
    result.className = 'error';
    result.textContent = `data is not JSON: ${e.message}`;
    return;
  }
  const body = { channel: $('publish-channel').value.trim(), data };
  const name = $('publish-event').value.trim();
  if (name) body.event = name;
  try {
    const response = await fetch(`${settings.publisher}/v1/publish`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${settings.key}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      result.className = 'error';
      result.textContent = `${response.status} ${answer.error?.code ?? ''}: ${answer.error?.message ?? ''}`;
      return;
    }
    result.textContent = `published ${answer.published?.[0]?.id} at ${time()}`;
    result.dataset.id = answer.published?.[0]?.id ?? '';
  } catch (e) {
    result.className = 'error';
    result.textContent = `the publisher did not answer: ${e.message}`;
  }
});

// With a token, or channels from an earlier visit (a cookie login), connect at once.
if (settings.token || settings.channels) $('connect').requestSubmit();
