// A small QMP client over a unix socket (node:net only): greeting, capabilities negotiation,
// commands matched to replies by id, asynchronous events. QEMU's QMP monitor serves one client
// at a time, so callers keep sessions short (see withQmp) and never hold one across a long wait.
import net from 'node:net';
import { EventEmitter } from 'node:events';

export interface QmpGreeting {
  QMP: { version: { qemu: { major: number; minor: number; micro: number }; package: string }; capabilities: string[] };
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export class QmpError extends Error {
  constructor(readonly command: string, readonly errorClass: string, readonly desc: string) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

/** The socket could not be reached or closed under us (QEMU gone or busy with another client). */
export class QmpConnectionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QmpConnectionError';
  }
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpClient extends EventEmitter {
  private buf = '';
  private nextId = 1;
  private pending = new Map<string, Pending>();
  private closed = false;
  greeting?: QmpGreeting;

  private constructor(private readonly sock: net.Socket, readonly path: string) {
    super();
  }

  /** Connects, reads the greeting and leaves capabilities-negotiation mode. */
  static async connect(socketPath: string, timeoutMs = 5000): Promise<QmpClient> {
    const sock = net.connect(socketPath);
    const c = new QmpClient(sock, socketPath);
    const greeting = new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new QmpConnectionError(`QMP ${socketPath}: no greeting within ${timeoutMs} ms (another client holds the monitor?)`));
        sock.destroy();
      }, timeoutMs);
      c.once('greeting', (g: QmpGreeting) => { clearTimeout(timer); resolve(g); });
      sock.once('error', (e) => { clearTimeout(timer); reject(new QmpConnectionError(`QMP ${socketPath}: ${e.message}`)); });
      sock.once('close', () => { clearTimeout(timer); reject(new QmpConnectionError(`QMP ${socketPath}: closed before the greeting`)); });
    });
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => c.onData(d));
    sock.on('error', (e) => c.fail(new QmpConnectionError(`QMP ${socketPath}: ${e.message}`)));
    sock.on('close', () => c.fail(new QmpConnectionError(`QMP ${socketPath}: connection closed`)));
    c.greeting = await greeting;
    await c.execute('qmp_capabilities', undefined, timeoutMs);
    return c;
  }

  private onData(d: string): void {
    this.buf += d;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try { msg = JSON.parse(line) as Record<string, unknown>; } catch { continue; }
      if ('QMP' in msg) { this.emit('greeting', msg as unknown as QmpGreeting); continue; }
      if ('event' in msg) { this.emit('event', msg as unknown as QmpEvent); continue; }
      const id = msg.id === undefined ? undefined : String(msg.id);
      const p = id ? this.pending.get(id) : undefined;
      if (!p || !id) continue;
      this.pending.delete(id);
      clearTimeout(p.timer);
      if ('error' in msg) {
        const err = msg.error as { class?: string; desc?: string };
        p.reject(new QmpError(p.command, err.class ?? 'GenericError', err.desc ?? 'unknown error'));
      } else {
        p.resolve(msg.return);
      }
    }
  }

  private fail(e: Error): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pending.values()) { clearTimeout(p.timer); p.reject(e); }
    this.pending.clear();
    this.emit('close', e);
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    if (this.closed) return Promise.reject(new QmpConnectionError(`QMP ${this.path}: connection closed`));
    const id = `vmferry-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpConnectionError(`QMP ${command}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.sock.write(JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id }) + '\n');
    });
  }

  /** Resolves with the first event named `name` (and matching `pred`), or rejects on timeout. */
  waitEvent(name: string, timeoutMs: number, pred: (e: QmpEvent) => boolean = () => true): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent): void => {
        if (e.event !== name || !pred(e)) return;
        cleanup();
        resolve(e);
      };
      const onClose = (e: Error): void => { cleanup(); reject(e); };
      const timer = setTimeout(() => { cleanup(); reject(new Error(`QMP: no ${name} event within ${timeoutMs} ms`)); }, timeoutMs);
      const cleanup = (): void => { clearTimeout(timer); this.off('event', onEvent); this.off('close', onClose); };
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  close(): void {
    this.closed = true;
    for (const p of this.pending.values()) { clearTimeout(p.timer); p.reject(new QmpConnectionError(`QMP ${this.path}: closed by client`)); }
    this.pending.clear();
    this.sock.destroy();
  }
}

/** One short QMP session: connect, run fn, disconnect. */
export async function withQmp<T>(socketPath: string, fn: (q: QmpClient) => Promise<T>, connectTimeoutMs = 5000): Promise<T> {
  const q = await QmpClient.connect(socketPath, connectTimeoutMs);
  try {
    return await fn(q);
  } finally {
    q.close();
  }
}
