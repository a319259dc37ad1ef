/**
 * A browser client for eventgate: one subscription over Server-Sent Events (the browser's own
 * `EventSource`) or a WebSocket, with one-time tickets, exact resume from the last id,
 * full-jitter backoff, and `reset` and `expired` handled as the gateway documents them.
 */
/** A refusal the client waits out before trying again. */
class Refused extends Error {
    constructor(message, retryAfterMs) {
        super(message);
        this.retryAfterMs = retryAfterMs;
    }
}
/** Full jitter: a crowd of clients does not come back in the same second. */
export function backoffDelay(failures, random, baseMs = 1000, maxMs = 30000) {
    return Math.floor(random() * Math.min(maxMs, baseMs * 2 ** Math.min(failures, 30)));
}
/** `Retry-After` in seconds (or an HTTP date) as milliseconds. */
export function retryAfterMs(header, now) {
    if (!header)
        return undefined;
    const seconds = Number(header);
    if (Number.isFinite(seconds))
        return Math.max(0, seconds * 1000);
    const date = Date.parse(header);
    return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}
const POSITION_EVENT = 'eventgate-position';
export function connect(options) {
    return new Client(options);
}
class Client {
    constructor(options) {
        this.options = options;
        this.handlers = new Map();
        this.resetHandlers = new Set();
        this.statusHandlers = new Set();
        this.failures = 0;
        /** WebSocket: each channel's `since`. */
        this.since = {};
        this.current = 'connecting';
        this.closed = false;
        if (options.channels.length === 0)
            throw new Error('eventgate: name at least one channel');
        this.channels = [...options.channels];
        this.env = {
            fetch: options.fetch ?? ((...args) => globalThis.fetch(...args)),
            random: options.random ?? Math.random,
            setTimeout: options.setTimeout ?? ((f, ms) => globalThis.setTimeout(f, ms)),
            clearTimeout: options.clearTimeout ?? ((h) => globalThis.clearTimeout(h)),
            now: options.now ?? Date.now,
        };
        this.storageKey = options.storageKey ?? `eventgate:${[...this.channels].sort().join(',')}`;
        const stored = options.storage?.getItem(this.storageKey) ?? undefined;
        const start = options.lastEventId ?? stored;
        if (this.transport === 'sse') {
            this.cursor = start;
        }
        else if (start !== undefined) {
            this.since = parseSince(start, this.channels);
        }
        void this.open();
    }
    get lastEventId() {
        return this.transport === 'sse' ? this.cursor : JSON.stringify(this.since);
    }
    get status() {
        return this.current;
    }
    get transport() {
        return this.options.transport ?? 'sse';
    }
    on(event, handler) {
        let set = this.handlers.get(event);
        if (!set) {
            set = new Set();
            this.handlers.set(event, set);
            // EventSource dispatches a named event only to listeners of that name.
            if (this.source && event !== '*' && event !== 'message')
                this.listen(this.source, event);
        }
        set.add(handler);
        return () => set.delete(handler);
    }
    onReset(handler) {
        this.resetHandlers.add(handler);
        return () => this.resetHandlers.delete(handler);
    }
    onStatus(handler) {
        this.statusHandlers.add(handler);
        return () => this.statusHandlers.delete(handler);
    }
    subscribe(channel) {
        this.requireWebSocket('subscribe');
        if (this.channels.includes(channel))
            return;
        this.channels.push(channel);
        this.sendSubscribe(channel);
    }
    unsubscribe(channel) {
        this.requireWebSocket('unsubscribe');
        this.channels = this.channels.filter((c) => c !== channel);
        delete this.since[channel];
        this.save();
        this.sendJson({ type: 'unsubscribe', channel });
    }
    close() {
        this.closed = true;
        this.env.clearTimeout(this.timer);
        this.env.clearTimeout(this.refreshTimer);
        this.source?.close();
        this.socket?.close(1000, 'closed');
        this.setStatus('closed');
    }
    requireWebSocket(what) {
        if (this.transport !== 'websocket') {
            throw new Error(`eventgate: ${what} at runtime needs transport 'websocket'; reconnect with other channels over SSE`);
        }
    }
    setStatus(status) {
        if (status === this.current)
            return;
        this.current = status;
        for (const handler of this.statusHandlers)
            handler(status);
    }
    /** Opens the next connection: a fresh ticket each time (a ticket works once). */
    async open() {
        if (this.closed)
            return;
        let ticket;
        try {
            ticket = await this.ticket();
        }
        catch (error) {
            this.retry(error instanceof Refused ? error.retryAfterMs : undefined);
            return;
        }
        if (this.closed)
            return;
        if (this.transport === 'sse')
            this.openSse(ticket);
        else
            this.openWebSocket(ticket);
    }
    async ticket() {
        if (!this.options.getToken)
            return undefined;
        const token = await this.options.getToken();
        const url = this.options.ticketUrl ?? `${this.options.url}/v1/tickets`;
        const response = await this.env.fetch(url, {
            method: 'POST',
            headers: { Authorization: `Bearer ${token}` },
            credentials: 'include',
        });
        if (!response.ok) {
            const wait = retryAfterMs(response.headers.get('retry-after'), this.env.now());
            throw new Refused(`ticket refused: ${response.status}`, wait);
        }
        const body = (await response.json());
        if (!body.ticket)
            throw new Refused('no ticket in the answer');
        return body.ticket;
    }
    /** Tries again after `waitMs` (a server's `Retry-After`) or the backoff, whichever is longer. */
    retry(waitMs) {
        if (this.closed)
            return;
        this.setStatus('reconnecting');
        const { baseMs, maxMs } = this.options.backoff ?? {};
        const delay = Math.max(waitMs ?? 0, backoffDelay(this.failures++, this.env.random, baseMs, maxMs));
        this.env.clearTimeout(this.timer);
        this.timer = this.env.setTimeout(() => void this.open(), delay);
    }
    remember(id) {
        if (!id)
            return;
        this.cursor = id;
        this.save();
    }
    save() {
        const value = this.lastEventId;
        if (value !== undefined)
            this.options.storage?.setItem(this.storageKey, value);
    }
    dispatch(envelope) {
        const name = envelope.event ?? 'message';
        for (const key of [name, '*']) {
            for (const handler of this.handlers.get(key) ?? [])
                handler(envelope);
        }
    }
    reset(channels, reason) {
        for (const handler of this.resetHandlers)
            handler(channels, reason);
    }
    // --- Server-Sent Events ---
    openSse(ticket) {
        const Source = this.options.EventSource ?? globalThis.EventSource;
        const query = new URLSearchParams();
        for (const channel of this.channels)
            query.append('channel', channel);
        query.set('position_events', 'true');
        if (ticket)
            query.set('ticket', ticket);
        if (this.cursor)
            query.set('last_event_id', this.cursor);
        const source = new Source(`${this.options.url}/v1/events?${query}`, {
            withCredentials: !this.options.getToken,
        });
        this.source = source;
        source.addEventListener('open', () => {
            this.failures = 0;
            this.setStatus('open');
        });
        this.listen(source, 'message');
        for (const name of this.handlers.keys()) {
            if (name !== '*' && name !== 'message')
                this.listen(source, name);
        }
        source.addEventListener(POSITION_EVENT, (e) => this.remember(e.lastEventId));
        source.addEventListener('reset', (e) => {
            this.remember(e.lastEventId);
            const body = parse(e.data);
            this.reset(body?.channels ?? this.channels, body?.reason ?? 'unknown');
        });
        // The token ran out: a fresh credential, and resume where the stream stood.
        source.addEventListener('expired', () => this.replaceSource(source, 0));
        // EventSource would retry the same URL, whose ticket is spent: reconnect with a new one.
        source.addEventListener('error', () => this.replaceSource(source));
    }
    replaceSource(source, waitMs) {
        if (this.source !== source)
            return;
        source.close();
        this.source = undefined;
        if (waitMs === 0) {
            this.setStatus('reconnecting');
            void this.open();
        }
        else {
            this.retry(waitMs);
        }
    }
    listen(source, name) {
        source.addEventListener(name, (e) => {
            if (this.source !== source)
                return;
            const envelope = parse(e.data);
            if (!envelope || typeof envelope.channel !== 'string')
                return;
            this.remember(e.lastEventId || envelope.id);
            this.dispatch(envelope);
        });
    }
    // --- WebSocket ---
    openWebSocket(ticket) {
        const Socket = this.options.WebSocket ?? globalThis.WebSocket;
        const base = this.options.url || globalThis.location?.origin || '';
        const url = new URL('/v1/ws', base.replace(/^http/, 'ws'));
        if (ticket)
            url.searchParams.set('ticket', ticket);
        const socket = new Socket(url.toString());
        this.socket = socket;
        socket.addEventListener('message', (m) => {
            if (this.socket !== socket)
                return;
            const message = parse(typeof m.data === 'string' ? m.data : '');
            if (message)
                this.onMessage(socket, message);
        });
        socket.addEventListener('close', (e) => {
            if (this.socket !== socket)
                return;
            this.socket = undefined;
            this.env.clearTimeout(this.refreshTimer);
            // 1008 "token expired", 1001 going away, 1013 too slow: come back with `since`.
            this.retry(e.code === 1001 ? 0 : undefined);
        });
    }
    onMessage(socket, message) {
        switch (message.type) {
            case 'connected':
                this.failures = 0;
                this.setStatus('open');
                for (const channel of this.channels)
                    this.sendSubscribe(channel);
                this.scheduleRefresh(message.expires_at);
                break;
            case 'subscribed':
                if (this.since[message.channel] === undefined && message.position) {
                    this.since[message.channel] = String(message.position);
                    this.save();
                }
                break;
            case 'event': {
                const { type: _type, ...envelope } = message;
                this.since[message.channel] = String(message.id);
                this.save();
                this.dispatch(envelope);
                break;
            }
            case 'reset':
                if (message.position !== undefined) {
                    for (const channel of message.channels ?? [])
                        this.since[channel] = String(message.position);
                    this.save();
                }
                this.reset(message.channels ?? [], message.reason ?? 'unknown');
                break;
            case 'refreshed':
                this.scheduleRefresh(message.expires_at);
                break;
            case 'error':
                // A subscribe refused for its rate: send it again once allowed.
                if (message.code === 'rate_limited' && typeof message.id === 'string' && message.id.startsWith('sub:')) {
                    const channel = message.id.slice(4);
                    this.env.setTimeout(() => {
                        if (this.socket === socket && this.channels.includes(channel))
                            this.sendSubscribe(channel);
                    }, Number(message.retry_after_ms) || 1000);
                }
                break;
        }
    }
    sendSubscribe(channel) {
        const since = this.since[channel];
        this.sendJson({ type: 'subscribe', channel, id: `sub:${channel}`, ...(since ? { since } : {}) });
    }
    sendJson(message) {
        if (this.socket && this.socket.readyState === 1)
            this.socket.send(JSON.stringify(message));
    }
    /** Refreshes the token a minute (or a fifth of its life) before it runs out. */
    scheduleRefresh(expiresAt) {
        this.env.clearTimeout(this.refreshTimer);
        if (!this.options.getToken || typeof expiresAt !== 'number')
            return;
        const left = expiresAt * 1000 - this.env.now();
        const delay = Math.max(0, left - Math.min(60000, left / 5));
        this.refreshTimer = this.env.setTimeout(async () => {
            try {
                const token = await this.options.getToken();
                this.sendJson({ type: 'refresh', token });
            }
            catch {
                // Without a fresh token the server closes with 1008 and the client reconnects.
            }
        }, delay);
    }
}
function parse(text) {
    try {
        return JSON.parse(text);
    }
    catch {
        return undefined;
    }
}
/** A stored WebSocket position: a JSON map, or one id for every channel. */
function parseSince(text, channels) {
    const parsed = parse(text);
    if (parsed && typeof parsed === 'object') {
        return Object.fromEntries(Object.entries(parsed).map(([k, v]) => [k, String(v)]));
    }
    return Object.fromEntries(channels.map((c) => [c, text]));
}
