// The host's data-plane endpoint. A peer connects, presents a one-time grant in its HELLO
// frame; only a grant this host issued for that migration and VM is accepted, once. The
// authenticated socket is then given to whoever serves that kind of transfer (for memory:
// handed to the destination VM process itself, so pages take no extra hop).
import net from 'node:net';
import crypto from 'node:crypto';
import { FrameChannel, FrameReader, FrameType, jsonFrame, parseJson } from './frames.js';

export const HELLO_TIMEOUT_MS = 10_000;

export interface Hello {
  migrationId: string;
  vm: string;
  token: string;
  kind: 'memory' | 'disk';
  from: string;
}

export interface Grant {
  migrationId: string;
  vm: string;
  kind: Hello['kind'];
  expiresAt: number;
}

export type TransferHandler = (hello: Hello, sock: net.Socket, rest: Buffer) => void;

export class DataPlaneServer {
  private grants = new Map<string, Grant>();
  private server: net.Server;
  readonly refused: string[] = [];

  constructor(private readonly handlers: Partial<Record<Hello['kind'], TransferHandler>>, private readonly log: (m: string) => void = () => undefined) {
    this.server = net.createServer((sock) => this.onConnection(sock));
  }

  listen(host: string, port: number): Promise<{ host: string; port: number }> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        const a = this.server.address() as net.AddressInfo;
        resolve({ host: a.address, port: a.port });
      });
    });
  }

  close(): void {
    this.server.close();
  }

  /** Issues a one-time grant; the token goes to the source through the workflow. */
  grant(g: Omit<Grant, 'expiresAt'>, ttlMs = 15 * 60_000): string {
    const token = crypto.randomBytes(24).toString('base64url');
    this.grants.set(token, { ...g, expiresAt: Date.now() + ttlMs });
    return token;
  }

  revoke(migrationId: string): void {
    for (const [t, g] of this.grants) if (g.migrationId === migrationId) this.grants.delete(t);
  }

  private refuse(sock: net.Socket, why: string): void {
    this.refused.push(why);
    this.log(`data plane: refused connection from ${sock.remoteAddress}:${sock.remotePort}: ${why}`);
    sock.end(jsonFrame(FrameType.Error, { message: why }));
  }

  private onConnection(sock: net.Socket): void {
    const reader = new FrameReader();
    const timer = setTimeout(() => this.refuse(sock, 'no HELLO in time'), HELLO_TIMEOUT_MS);
    sock.on('error', () => undefined);
    const onData = (chunk: Buffer): void => {
      let frames;
      try { frames = reader.feed(chunk); } catch (e) { clearTimeout(timer); sock.off('data', onData); this.refuse(sock, (e as Error).message); return; }
      if (frames.length === 0) return;
      clearTimeout(timer);
      sock.off('data', onData);
      sock.pause();
      const f = frames[0]!;
      if (f.type !== FrameType.Hello || frames.length > 1) { this.refuse(sock, 'expected a single HELLO frame first'); return; }
      let hello: Hello;
      try { hello = parseJson<Hello>(f); } catch { this.refuse(sock, 'malformed HELLO'); return; }
      const g = typeof hello.token === 'string' ? this.grants.get(hello.token) : undefined;
      if (!g) { this.refuse(sock, `no valid grant for migration ${String(hello.migrationId)}`); return; }
      if (g.migrationId !== hello.migrationId || g.vm !== hello.vm || g.kind !== hello.kind) { this.refuse(sock, `grant does not match migration ${String(hello.migrationId)} / VM ${String(hello.vm)}`); return; }
      if (g.expiresAt < Date.now()) { this.grants.delete(hello.token); this.refuse(sock, 'grant expired'); return; }
      this.grants.delete(hello.token); // one-time: a replayed HELLO finds nothing
      const h = this.handlers[hello.kind];
      if (!h) { this.refuse(sock, `no ${hello.kind} transfers on this host`); return; }
      h(hello, sock, reader.rest());
    };
    sock.on('data', onData);
  }
}

/** Connects to a host's data plane and waits for WELCOME from whoever serves the transfer. */
export async function connectDataPlane(endpoint: { host: string; port: number }, hello: Hello): Promise<FrameChannel> {
  const sock = net.connect(endpoint.port, endpoint.host);
  sock.setNoDelay(true);
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', (e) => reject(new Error(`data plane ${endpoint.host}:${endpoint.port}: ${e.message}`)));
  });
  const chan = new FrameChannel(sock);
  sock.write(jsonFrame(FrameType.Hello, hello));
  try {
    await chan.expect<{ vm: string }>(FrameType.Welcome, HELLO_TIMEOUT_MS);
  } catch (e) {
    sock.destroy();
    throw new Error(`data plane ${endpoint.host}:${endpoint.port} refused the ${hello.kind} transfer: ${(e as Error).message}`);
  }
  return chan;
}
