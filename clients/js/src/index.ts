/**
 * secure-ws-client: an authenticated, self-healing WebSocket client for secure_ws, for browsers and Node ≥ 20.
 *
 * One `Client` keeps one connection up for as long as it is open: it asks `getToken` for a token on every
 * connection and every in-band refresh, refreshes before `expires_at`, reconnects with jittered exponential
 * backoff after the closes worth retrying, stops with a typed error on the others, and re-subscribes every
 * channel with `since` after a reconnect so that each channel's messages arrive exactly once, in offset order.
 * No runtime dependency: the WebSocket is the global one, or the constructor passed in (Node 20: `ws`).
 */

export type State = "connecting" | "connected" | "disconnected" | "closed";

/** Where a channel's history stands: the last offset seen and the history's epoch. */
export interface Position {
  offset: number;
  epoch: string;
}

/** A channel message as delivered to `onMessage` (`from` is absent when the server side published it). */
export interface ChannelMessage {
  channel: string;
  data: unknown;
  from?: string;
  offset?: number;
  epoch?: string;
}

/** A `join` or `leave` on a channel subscribed with `joinLeave: true`. */
export interface PresenceEvent {
  channel: string;
  sub: string;
  connection_id: string;
}

export interface SubscribeOptions {
  /** Each message once, in offset order, across reconnects. */
  onMessage?: (message: ChannelMessage) => void;
  /** Messages may have been missed for good (history lost or too old): reload the channel's state. */
  onRecoveryFailed?: (channel: string) => void;
  joinLeave?: boolean;
  onJoin?: (event: PresenceEvent) => void;
  onLeave?: (event: PresenceEvent) => void;
  /** Start from this position (kept from an earlier session): the server replays what came after it. */
  since?: Position;
}

export interface Subscription {
  readonly channel: string;
  /** Resolves once the server confirmed the subscription; rejects with a `RequestError` if it refused it. */
  readonly ready: Promise<void>;
  /** The last position seen (what the next recovery starts from). */
  readonly position: Position | undefined;
  unsubscribe(): void;
}

export interface CallOptions {
  /** Milliseconds before the call fails with `RequestError` code `timeout` (default: the client's `timeout`; 0: none). */
  timeout?: number;
  /** Aborting it sends `cancel` for the call and rejects it with the signal's reason. */
  signal?: AbortSignal;
}

/** The part of the WHATWG WebSocket this client uses (the browser's, Node 22's, or the `ws` package's). */
export interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  // `any` events: each implementation has its own event classes ({ data }, { code, reason } is what is read)
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
}

/** Called as `new WebSocket(url, protocols)`, or `new WebSocket(url, protocols, socketOptions)`. */
export type WebSocketConstructor = new (...args: any[]) => SocketLike;

export interface ClientOptions {
  /** Returns a JWT; called for every connection attempt and every refresh. Throwing an `AuthError` stops the client. */
  getToken: () => string | Promise<string>;
  /** A WebSocket constructor where there is no global one (Node 20: `import { WebSocket } from "ws"`). */
  WebSocket?: WebSocketConstructor;
  /** `subprotocol` (default; the only one browsers can use) or `header` (`Authorization: Bearer`, needs `ws`). */
  transport?: "subprotocol" | "header";
  /** Third argument of the constructor, e.g. `{ ca }` for `ws` with a private CA. Browsers ignore it. */
  socketOptions?: Record<string, any>;
  /** Refresh this many ms before `expires_at` (or half-way through a shorter life). 0 disables. Default 30000. */
  refreshBefore?: number;
  /** Reconnect delay: a uniform draw below min(backoffMax, backoffInitial · 2^attempt). Defaults 500 and 30000 ms. */
  backoffInitial?: number;
  backoffMax?: number;
  /** A connection that lasted this long resets the backoff. Default 10000 ms. */
  stableAfter?: number;
  /** Default timeout of requests, ms. Default 10000. */
  timeout?: number;
  /** Handshake plus welcome, ms. Default 10000. */
  openTimeout?: number;
  /** Consecutive handshakes refused `token expired` (each with a fresh token) before the client stops. Default 3. */
  maxExpiredRetries?: number;
  /** Allow a `ws://` URL (the token would travel in clear). */
  allowInsecure?: boolean;
  /** Random source in [0, 1) for the jitter. */
  random?: () => number;
}

/** The server answered a request with an `error` frame, or the request could not complete. */
export class RequestError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "RequestError";
  }
}

/** Dropped by a rate limit: retry after `retryAfterMs`. */
export class RateLimitedError extends RequestError {
  constructor(
    message: string,
    readonly retryAfterMs: number,
  ) {
    super("rate_limited", message);
    this.name = "RateLimitedError";
  }
}

/** The server closed the connection with a code the client does not retry: the client stopped for good. */
export class CloseError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
  ) {
    super(`server closed the connection: ${code} ${reason}`.trim());
    this.name = "CloseError";
  }
}

/** A 1008 close that a fresh token cannot fix (`token revoked`, `invalid token`…), or `token expired` repeated. */
export class AuthError extends CloseError {
  constructor(code: number, reason: string) {
    super(code, reason);
    this.name = "AuthError";
  }
}

type Frame = Record<string, any>;

interface Events {
  state: State;
  push: unknown;
  error: unknown;
}

interface Pending {
  reply(frame: Frame): void;
  fail(error: unknown): void;
  chunk?(data: unknown): void;
  acked?: boolean; // a chunk came: the server read this request
}

interface Conn {
  ws: SocketLike;
  pending: Map<number, Pending>; // insertion order is send order
  welcomed: boolean;
  at: number; // when welcomed (ms)
  expiresAt: number; // seconds
  refresh?: ReturnType<typeof setTimeout>; // the one refresh chain of this connection
  retries: Set<ReturnType<typeof setTimeout>>; // subscribes waiting out a rate limit: at most one per channel
  done?: boolean;
  finish(code: number, reason: string, fatal?: boolean): void;
}

interface Outcome {
  code: number;
  reason: string;
  welcomedAt: number; // 0 when never welcomed
  fatal?: boolean;
}

interface Sub extends Subscription {
  opts: SubscribeOptions;
  pos: Position | undefined;
  ok(): void;
  ko(error: unknown): void;
  repairing?: boolean;
}

const RETRY_CODES = new Set([1001, 1006, 1011, 1012, 1013]);
const RETRY_REASONS = new Set(["token expired", "too many connections", "rate limit exceeded", "slow consumer", "disconnected"]);
const EXPIRED = "token expired";
const noop = () => {};
const closedError = () => new RequestError("closed", "the client is closed");

export class Client {
  /** The current connection's `welcome` frame (`sub`, `connection_id`, `expires_at`…), while connected. */
  welcome: Frame | undefined;
  state: State = "disconnected";

  private readonly o: Required<Omit<ClientOptions, "WebSocket" | "socketOptions">> & ClientOptions;
  private readonly WS: WebSocketConstructor;
  private ls: Record<string, Set<(value: any) => void> | undefined> = {};
  private subs = new Map<string, Sub>(); // one per channel
  private conn: Conn | undefined; // welcomed and live
  private socket: Conn | undefined; // being opened or live
  private waiters = new Set<() => void>(); // requests waiting for a connection; bounded by their timeouts
  private stopped: unknown; // the error the client stopped with
  private running = false;
  private ids = 0;
  private sleeper: ReturnType<typeof setTimeout> | undefined;
  private wake = noop;

  constructor(
    readonly url: string,
    options: ClientOptions,
  ) {
    if (!/^wss:/i.test(url) && !options.allowInsecure) throw new TypeError("use a wss:// URL: the client sends a bearer token");
    const WS = options.WebSocket ?? (globalThis as any).WebSocket;
    if (!WS) throw new TypeError("no global WebSocket: pass one in the options (Node 20: the `ws` package)");
    this.WS = WS;
    this.o = {
      transport: "subprotocol",
      refreshBefore: 30000,
      backoffInitial: 500,
      backoffMax: 30000,
      stableAfter: 10000,
      timeout: 10000,
      openTimeout: 10000,
      maxExpiredRetries: 3,
      allowInsecure: false,
      random: Math.random,
      ...options,
    };
  }

  // -- events ------------------------------------------------------------------------------------

  /** Listen to `state`, `push` (each push's data) or `error`; returns a function that removes the listener. */
  on<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): () => void {
    (this.ls[event] ??= new Set()).add(listener);
    return () => this.off(event, listener);
  }

  off<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): void {
    this.ls[event]?.delete(listener);
  }

  private emit<K extends keyof Events>(event: K, value: Events[K]): void {
    this.ls[event]?.forEach((listener) => {
      try {
        listener(value);
      } catch {
        // a listener's bug must not break the client
      }
    });
  }

  private setState(state: State): void {
    if (this.state !== state) this.emit("state", (this.state = state));
  }

  // -- lifecycle ---------------------------------------------------------------------------------

  /** Start, and resolve on the first welcome; rejects with the error that stopped the client (`AuthError`…). */
  connect(): Promise<void> {
    if (this.stopped) return Promise.reject(this.stopped);
    if (this.conn) return Promise.resolve();
    const ready = new Promise<void>((resolve, reject) => {
      const check = () => {
        this.waiters.delete(check);
        this.stopped ? reject(this.stopped) : resolve();
      };
      this.waiters.add(check);
    });
    if (!this.running) {
      this.running = true;
      this.run().catch((error) => this.stop(error)); // a bug in the loop stops the client, never an unhandled rejection
    }
    return ready;
  }

  /** Close the connection and stop for good: every timer, listener and pending request is let go. */
  close(): void {
    this.stop(closedError());
  }

  private stop(error: unknown): void {
    if (this.stopped) return;
    this.stopped = error;
    this.wake();
    this.socket?.finish(1000, "client closed");
    this.subs.forEach((sub) => sub.ko(error));
    this.subs.clear();
    this.waiters.forEach((waiter) => waiter());
    this.setState("closed");
    if (!(error instanceof RequestError)) this.emit("error", error); // after the state: listeners see "closed"
    this.ls = {};
  }

  private async run(): Promise<void> {
    let attempt = 0;
    let expired = 0;
    while (!this.stopped) {
      this.setState("connecting");
      let outcome: Outcome = { code: 1006, reason: "", welcomedAt: 0 };
      let token: string | undefined;
      try {
        token = await this.token();
      } catch (error) {
        if (this.stopped) return;
        if (error instanceof AuthError) return this.stop(error); // the provider said no for good
        this.emit("error", error); // retried after a backoff
      }
      if (this.stopped) return;
      if (token !== undefined) {
        try {
          outcome = await this.open(token);
        } catch (error) {
          return this.stop(error); // the URL or the constructor cannot work
        }
      }
      if (this.stopped) return;
      const { code, reason, welcomedAt } = outcome;
      if (outcome.fatal || !(RETRY_CODES.has(code) || (code === 1008 && RETRY_REASONS.has(reason)))) {
        this.stop(code === 1008 ? new AuthError(code, reason) : new CloseError(code, reason));
        return;
      }
      // A token from the provider that is already expired would loop forever: bounded.
      if (welcomedAt) expired = 0;
      else if (reason === EXPIRED && ++expired >= this.o.maxExpiredRetries) {
        this.stop(new AuthError(code, reason));
        return;
      }
      if (welcomedAt && Date.now() - welcomedAt >= this.o.stableAfter) attempt = 0;
      this.setState("disconnected");
      const ceiling = Math.min(this.o.backoffMax, this.o.backoffInitial * 2 ** Math.min(attempt++, 30));
      await new Promise<void>((resolve) => {
        // A browser that comes back online retries at once instead of sleeping out the backoff.
        const g = globalThis as any;
        const wake = (this.wake = () => {
          clearTimeout(this.sleeper);
          g.removeEventListener?.("online", wake);
          this.wake = noop;
          resolve();
        });
        this.sleeper = setTimeout(wake, ceiling * this.o.random());
        g.addEventListener?.("online", wake);
      });
    }
  }

  private async token(): Promise<string> {
    const token = await this.o.getToken();
    if (typeof token !== "string" || !/^[^\s]+$/.test(token)) throw new Error("getToken must return a non-empty JWT string");
    return token;
  }

  /** One connection, from the handshake to its close. */
  private open(token: string): Promise<Outcome> {
    return new Promise((resolve) => {
      const { transport, socketOptions } = this.o;
      let protocols = ["secure-ws.v1", "bearer." + token];
      let options = socketOptions;
      if (transport === "header") {
        protocols = ["secure-ws.v1"];
        options = { ...options, headers: { ...options?.headers, Authorization: "Bearer " + token } };
      }
      const ws = options ? new this.WS(this.url, protocols, options) : new this.WS(this.url, protocols);
      const timer = setTimeout(() => conn.finish(1006, "no welcome in time"), this.o.openTimeout);
      const conn: Conn = {
        ws,
        pending: new Map(),
        retries: new Set(),
        welcomed: false,
        at: 0,
        expiresAt: 0,
        finish: (code, reason, fatal) => {
          if (conn.done) return;
          conn.done = true;
          clearTimeout(timer);
          clearTimeout(conn.refresh);
          conn.retries.forEach(clearTimeout);
          if (this.conn === conn) {
            this.conn = this.welcome = undefined;
          }
          if (this.socket === conn) this.socket = undefined;
          ws.onmessage = ws.onclose = null;
          ws.onerror = noop; // `ws` throws on an error event nobody listens to
          try {
            if (ws.readyState < 2) ws.close(1000);
          } catch {
            // already closing
          }
          const lost = this.stopped ?? new RequestError("disconnected", `connection closed before the reply (${code} ${reason})`.trim());
          conn.pending.forEach((p) => p.fail(lost));
          conn.pending.clear();
          resolve({ code, reason, welcomedAt: conn.at, fatal });
        },
      };
      this.socket = conn;
      ws.onerror = noop; // the close event that follows carries the code
      ws.onclose = (event) => conn.finish(event.code, event.reason || "");
      ws.onmessage = (event) => this.frame(conn, event.data);
    });
  }

  // -- inbound -----------------------------------------------------------------------------------

  /** One inbound frame. The first must be the welcome (else a fatal protocol error); after it, a frame that is
   * not a JSON object, a binary frame, a reply nobody waits for, or an unknown type is ignored. */
  private frame(conn: Conn, raw: unknown): void {
    if (conn.done) return;
    let f: Frame | undefined;
    try {
      if (typeof raw === "string") f = JSON.parse(raw); // a binary frame stays undefined
    } catch {
      // not JSON: ignored once welcomed
    }
    if (!f || typeof f !== "object" || Array.isArray(f)) f = undefined;
    if (!conn.welcomed) {
      if (f?.type !== "welcome") return conn.finish(1002, "protocol error: the first frame is not a welcome", true);
      conn.welcomed = true;
      conn.at = Date.now();
      conn.expiresAt = typeof f.expires_at === "number" ? f.expires_at : 0;
      this.conn = conn;
      this.welcome = f;
      this.setState("connected");
      this.subs.forEach((sub) => this.subscribeOn(conn, sub));
      this.scheduleRefresh(conn);
      this.waiters.forEach((waiter) => waiter());
      return;
    }
    if (!f) return;
    const type = f.type;
    if (type === "message") return this.message(f);
    if (type === "push") return this.emit("push", f.data);
    if (type === "join" || type === "leave") {
      const opts = this.subs.get(f.channel)?.opts;
      return this.guard(type === "join" ? opts?.onJoin : opts?.onLeave, f as PresenceEvent);
    }
    let pending: Pending | undefined;
    if (f.id !== undefined && f.id !== null) {
      pending = conn.pending.get(f.id);
      if (pending && type === "chunk") {
        pending.acked = true;
        return pending.chunk?.(f.data);
      }
    } else if (type === "error" && f.code === "rate_limited") {
      // The server drops a frame over the limit unread, so its error has no id: it is the oldest one unanswered.
      for (const [id, p] of conn.pending) {
        if (!p.acked) {
          f.id = id;
          pending = p;
          break;
        }
      }
    } else if (type === "error" && f.code === "forbidden" && this.subs.has(f.channel)) {
      // A refreshed token no longer grants this channel: the server dropped the subscription.
      this.subs.get(f.channel)!.unsubscribe();
      return this.emit("error", toError(f));
    }
    if (!pending) return;
    conn.pending.delete(f.id);
    type === "error" ? pending.fail(toError(f)) : pending.reply(f);
  }

  private guard<T>(callback: ((value: T) => void) | undefined, value: T): void {
    try {
      callback?.(value);
    } catch (error) {
      this.emit("error", error);
    }
  }

  /** A channel message: delivered once, in offset order; a gap asks the server for what is missing. */
  private message(f: Frame): void {
    const sub = this.subs.get(f.channel);
    if (!sub) return;
    const { offset, epoch } = f;
    if (typeof offset === "number" && typeof epoch === "string") {
      const pos = sub.pos;
      if (pos && pos.epoch === epoch) {
        if (offset <= pos.offset) return; // seen already
        if (offset > pos.offset + 1) return this.repair(sub); // the replay brings it, in order
      } else if (pos) {
        this.guard(sub.opts.onRecoveryFailed, sub.channel); // the history was lost: a new epoch
      }
      sub.pos = { offset, epoch };
    }
    const m: ChannelMessage = { channel: f.channel, data: f.data };
    if (typeof f.from === "string") m.from = f.from;
    if (sub.pos && typeof offset === "number") {
      m.offset = offset;
      m.epoch = epoch;
    }
    this.guard(sub.opts.onMessage, m);
  }

  private repair(sub: Sub): void {
    if (sub.repairing || !this.conn) return;
    sub.repairing = true;
    this.subscribeOn(this.conn, sub);
  }

  // -- outbound ----------------------------------------------------------------------------------

  private issue(conn: Conn, message: Frame, pending: Pending): number {
    const id = (message.id = ++this.ids); // every message is the caller's own fresh object
    conn.pending.set(id, pending);
    try {
      conn.ws.send(JSON.stringify(message));
    } catch (error) {
      conn.pending.delete(id);
      pending.fail(error);
    }
    return id;
  }

  /** A request, sent on the live connection (waiting for one if needed); resolves with the reply frame. */
  private request(message: Frame, options: CallOptions = {}, chunk?: (data: unknown) => void): Promise<Frame> {
    return new Promise((resolve, reject) => {
      const { signal } = options;
      const timeout = options.timeout ?? this.o.timeout;
      let conn: Conn | undefined;
      let id = 0;
      let settled = false;
      const cancelable = !!chunk || !BUILT_IN.has(message.type);
      const cancel = () => {
        if (cancelable && conn && conn === this.conn && conn.pending.delete(id)) conn.ws.send(JSON.stringify({ type: "cancel", id }));
      };
      const done = (error: unknown, frame?: Frame) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.waiters.delete(go);
        signal?.removeEventListener("abort", abort);
        error === undefined ? resolve(frame!) : reject(error);
      };
      const abort = () => {
        cancel();
        done(signal!.reason);
      };
      const go = () => {
        this.waiters.delete(go);
        if (settled) return;
        if (this.stopped) return done(this.stopped);
        if (!(conn = this.conn)) return void this.waiters.add(go);
        id = this.issue(conn, message, { reply: (frame) => done(undefined, frame), fail: done, chunk });
      };
      if (signal?.aborted) return reject(signal.reason);
      signal?.addEventListener("abort", abort);
      const timer =
        timeout > 0
          ? setTimeout(() => {
              cancel();
              done(new RequestError("timeout", `no reply within ${timeout} ms`));
            }, timeout)
          : undefined;
      go();
    });
  }

  /** An application call (`@api.handler`): resolves with the result's `data`. */
  async call(type: string, data?: unknown, options?: CallOptions): Promise<any> {
    return (await this.request({ type, data }, options)).data;
  }

  /** A streamed call (`@api.stream`): each chunk's `data`. Aborting `signal` or leaving the loop early sends `cancel`. */
  async *stream(type: string, data?: unknown, options: { signal?: AbortSignal } = {}): AsyncGenerator<any, void, undefined> {
    const queue: unknown[] = []; // bounded by what the server streams for this one call
    let wake = noop;
    let end: { error?: unknown } | undefined;
    const controller = new AbortController();
    const outer = options.signal;
    const abort = () => controller.abort(outer!.reason);
    outer?.aborted ? abort() : outer?.addEventListener("abort", abort);
    this.request({ type, data }, { timeout: 0, signal: controller.signal }, (chunk) => {
      queue.push(chunk);
      wake();
    }).then(
      () => ((end = {}), wake()),
      (error) => ((end = { error }), wake()),
    );
    try {
      for (;;) {
        if (queue.length) {
          yield queue.shift();
        } else if (end) {
          if ("error" in end) throw end.error;
          return;
        } else {
          await new Promise<void>((resolve) => (wake = resolve));
        }
      }
    } finally {
      outer?.removeEventListener("abort", abort);
      if (!end) controller.abort(new RequestError("cancelled", "the stream was left early"));
    }
  }

  /** `ping` → `pong`; resolves with the round trip in ms. */
  async ping(options?: CallOptions): Promise<number> {
    const started = Date.now();
    await this.request({ type: "ping" }, options);
    return Date.now() - started;
  }

  /** The server echoes `data` back. */
  async echo(data: unknown, options?: CallOptions): Promise<unknown> {
    return (await this.request({ type: "echo", data }, options)).data;
  }

  /** Publish on a channel (needs `publish:<pattern>`). Not resent after a drop: `disconnected` means "maybe". */
  async publish(channel: string, data: unknown, options?: CallOptions): Promise<void> {
    await this.request({ type: "publish", channel, data }, options);
  }

  /** The channel's kept messages: `{ messages, offset, epoch }` (`since`: only those after a position). */
  async history(channel: string, options: CallOptions & { limit?: number; since?: Position } = {}): Promise<{ messages: Frame[]; offset?: number; epoch?: string; recovered?: boolean }> {
    const { type, id, channel: _, ...reply } = await this.request({ type: "history", channel, limit: options.limit, since: options.since }, options);
    return reply as any;
  }

  /** Who is subscribed to the channel: `{ clients: { connection_id: { sub } }, count }`. */
  async presence(channel: string, options?: CallOptions): Promise<{ clients: Record<string, { sub: string }>; count?: number }> {
    const { type, id, channel: _, ...reply } = await this.request({ type: "presence", channel }, options);
    return reply as any;
  }

  // -- channels ----------------------------------------------------------------------------------

  /** Subscribe now and after every reconnect, recovering what was missed (`since`), until `unsubscribe()`. */
  subscribe(channel: string, options: SubscribeOptions = {}): Subscription {
    if (this.stopped) throw this.stopped;
    if (this.subs.has(channel)) throw new Error(`already subscribed to ${channel}`);
    let ok = noop;
    let ko: (error: unknown) => void = noop;
    const ready = new Promise<void>((resolve, reject) => ((ok = resolve), (ko = reject)));
    ready.catch(noop); // rejected when nobody awaits it: not an unhandled rejection
    const sub: Sub = {
      channel,
      ready,
      opts: options,
      pos: options.since && { ...options.since },
      get position() {
        return sub.pos && { ...sub.pos };
      },
      ok,
      ko,
      unsubscribe: () => {
        if (this.subs.get(channel) !== sub) return;
        this.subs.delete(channel);
        ko(new RequestError("cancelled", "unsubscribed"));
        if (this.conn) this.issue(this.conn, { type: "unsubscribe", channel }, { reply: noop, fail: noop });
      },
    };
    this.subs.set(channel, sub);
    if (this.conn) this.subscribeOn(this.conn, sub);
    return sub;
  }

  private subscribeOn(conn: Conn, sub: Sub): void {
    const message: Frame = { type: "subscribe", channel: sub.channel };
    if (sub.pos) message.since = sub.pos;
    if (sub.opts.joinLeave) message.join_leave = true;
    this.issue(conn, message, {
      reply: (f) => {
        if (this.subs.get(sub.channel) !== sub) return;
        sub.repairing = false;
        const { offset, epoch, recovered } = f;
        if (recovered === false) this.guard(sub.opts.onRecoveryFailed, sub.channel);
        // Recovered: the replayed messages that follow move the position. A plain re-subscribe in the same epoch
        // keeps it (messages sent before this reply are still to come, and are not duplicates).
        if (recovered !== true && typeof offset === "number" && typeof epoch === "string") {
          if (recovered === false || !sub.pos || sub.pos.epoch !== epoch) sub.pos = { offset, epoch };
        }
        sub.ok();
      },
      fail: (error) => {
        sub.repairing = false;
        if (this.subs.get(sub.channel) !== sub || this.conn !== conn) return; // the next connection tries again
        if (error instanceof RateLimitedError) {
          const retry = setTimeout(() => {
            conn.retries.delete(retry);
            if (this.subs.get(sub.channel) === sub) this.subscribeOn(conn, sub);
          }, Math.max(error.retryAfterMs, 50));
          conn.retries.add(retry); // cleared with the connection
          return;
        }
        this.subs.delete(sub.channel);
        sub.ko(error);
        this.emit("error", error);
      },
    });
  }

  // -- refresh -----------------------------------------------------------------------------------

  /** The one refresh chain of `conn`: a timer on the connection itself, so a reconnect never doubles it. */
  private scheduleRefresh(conn: Conn, retryMs = 0): void {
    const before = this.o.refreshBefore;
    if (!before || !conn.expiresAt || conn.done) return;
    const remaining = conn.expiresAt * 1000 - Date.now();
    const delay = Math.max(remaining - before, remaining / 2, retryMs);
    clearTimeout(conn.refresh);
    conn.refresh = setTimeout(() => this.refresh(conn), Math.min(delay, 2 ** 31 - 1));
  }

  private async refresh(conn: Conn): Promise<void> {
    let token: string;
    try {
      token = await this.token();
    } catch (error) {
      if (conn === this.conn) {
        this.emit("error", error);
        this.scheduleRefresh(conn, 1000);
      }
      return;
    }
    if (conn !== this.conn) return; // a reconnect came meanwhile: that connection runs its own chain
    this.issue(conn, { type: "refresh", token }, {
      reply: (f) => {
        // A token that does not move the deadline: the server closes `token expired` and the reconnect gets a fresh one.
        if (typeof f.expires_at === "number" && f.expires_at > conn.expiresAt) {
          conn.expiresAt = f.expires_at;
          this.scheduleRefresh(conn);
        }
      },
      fail: (error) => this.scheduleRefresh(conn, error instanceof RateLimitedError ? error.retryAfterMs : 1000),
    });
  }
}

const BUILT_IN = new Set(["ping", "echo", "subscribe", "unsubscribe", "publish", "history", "presence", "refresh"]);

function toError(f: Frame): RequestError {
  const message = typeof f.message === "string" ? f.message : String(f.code);
  return f.code === "rate_limited" ? new RateLimitedError(message, Number(f.retry_after_ms) || 0) : new RequestError(String(f.code), message);
}
