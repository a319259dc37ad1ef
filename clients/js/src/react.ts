/**
 * `useEventgate`: a subscription that lives as long as the component, with its status, the
 * last event and a way to listen to every event (to invalidate an SWR or React Query cache).
 */
import { useCallback, useEffect, useRef, useState } from 'react';
import { connect, type ConnectOptions, type EventgateEvent, type Status } from './index.js';

export type { EventgateEvent, Status } from './index.js';

export interface UseEventgateOptions extends Omit<ConnectOptions, 'channels'> {
  /** Event names to receive over SSE (EventSource delivers a named event only to listeners of
   * its name); events without a name always come. The WebSocket transport gets every event. */
  events?: string[];
  /** The gateway could not show that history is complete: refetch these channels' state. */
  onReset?: (channels: string[], reason: string) => void;
}

export interface UseEventgate<T> {
  status: Status;
  lastEvent: EventgateEvent<T> | undefined;
  /** Calls `listener` with every event from now on; returns the function that stops it. */
  subscribe: (listener: (event: EventgateEvent<T>) => void) => () => void;
}

export function useEventgate<T = unknown>(
  channels: string[],
  options: UseEventgateOptions,
): UseEventgate<T> {
  const [status, setStatus] = useState<Status>('connecting');
  const [lastEvent, setLastEvent] = useState<EventgateEvent<T>>();
  const listeners = useRef(new Set<(event: EventgateEvent<T>) => void>());
  // The latest options without reconnecting on every render; a new connection only when
  // what it is made of changes.
  const latest = useRef(options);
  latest.current = options;
  const key = JSON.stringify([channels, options.url, options.transport ?? 'sse', options.events ?? []]);

  useEffect(() => {
    const { events, onReset: _onReset, ...rest } = latest.current;
    const subscription = connect<T>({ ...rest, channels });
    subscription.onStatus(setStatus);
    subscription.on('*', (event) => {
      setLastEvent(event);
      for (const listener of listeners.current) listener(event);
    });
    // Named SSE events reach '*' once their name has a listener.
    for (const name of events ?? []) subscription.on(name, () => {});
    subscription.onReset((resetChannels, reason) => latest.current.onReset?.(resetChannels, reason));
    return () => subscription.close();
    // `key` stands for channels, url, transport and events.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [key]);

  const subscribe = useCallback((listener: (event: EventgateEvent<T>) => void) => {
    listeners.current.add(listener);
    return () => {
      listeners.current.delete(listener);
    };
  }, []);

  return { status, lastEvent, subscribe };
}
