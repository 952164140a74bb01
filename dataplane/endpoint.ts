// The host's data-plane endpoint. A peer connects, presents a one-time grant in its HELLO
// frame; only a grant this host issued for that migration and VM is accepted, once. The
// authenticated socket is then given to whoever serves that kind of transfer (for memory:
// handed to the destination VM process itself, so pages take no extra hop).
//
// With TLS configured (host.json `tls`, always in the lab) the HELLO is only a plaintext
// routing preamble without secrets: the agent checks it names a grant it issued and hands the
// socket over; the receiver (the incoming VM process, or the disk receiver) then answers
// STARTTLS, runs the TLS handshake as server (client certificate required, lab CA), checks the
// certificate's CN is the grant's source host, and only then reads the token (AUTH frame,
// inside TLS). The grant is bound to migration, VM, kind, source and destination host. See
// docs/SECURITY.md.
import net from 'node:net';
import tls from 'node:tls';
import fs from 'node:fs';
import crypto from 'node:crypto';
import type { ChildProcess, Serializable } from 'node:child_process';
import { peerIsLoopback, setSendBuffer } from './send-buffer.js';
import { FrameChannel, FrameReader, FrameType, jsonFrame, parseJson, type Frame } from './frames.js';

export const HELLO_TIMEOUT_MS = 10_000;

/** PEM files: the CA that signs every host's certificate, this host's certificate and key. */
export interface TlsPaths { ca: string; cert: string; key: string }
/** Sender side: the CA to check the receiver against and (always, in practice) its own certificate. */
export interface ClientTls { ca: string; cert?: string; key?: string }

export interface Hello {
  migrationId: string;
  vm: string;
  /** Plaintext mode only: the whole grant token. In TLS mode it travels only inside TLS (AUTH). */
  token?: string;
  kind: 'memory' | 'disk';
  from: string;
  /** TLS mode routing preamble: the destination host and the grant's public id. */
  to?: string;
  grant?: string;
  /**
   * Parallel streams of one memory transfer: this connection's index and how many there are.
   * Stream 0 comes first and fixes the count; each index is taken once. Absent = 0 of 1.
   */
  stream?: number;
  streams?: number;
}

/** Most parallel streams one memory transfer may open. */
export const MAX_STREAMS = 16;

/** AUTH frame body (first frame inside TLS). */
export interface AuthClaim { token: string; migrationId: string; vm: string; kind: Hello['kind']; from: string; to: string; stream?: number; streams?: number }

export interface Grant {
  migrationId: string;
  vm: string;
  kind: Hello['kind'];
  /** The only host that may use it (its certificate's CN, in TLS mode). */
  source?: string;
  expiresAt: number;
  /** SHA-256 of the token's secret part (hex). */
  secretHash: string;
  /** How many streams the receiver was told to expect (stream 0 must claim exactly that). */
  expectStreams?: number;
  /** Streams of the transfer (set by stream 0) and the indices already taken. */
  streams?: number;
  used?: Set<number>;
}

/** What a receiver needs to check a connection after hand-over (serialisable: it crosses IPC). */
export interface GrantCheck {
  grantId: string;
  secretHash: string;
  migrationId: string;
  vm: string;
  kind: Hello['kind'];
  source: string;
  destination: string;
  expiresAt: number;
  tls: TlsPaths;
  /** The stream this connection claimed in its preamble (the AUTH frame must claim the same). */
  stream: number;
  streams: number;
}

/** A TLS-mode hand-over: the receiver authenticates, then settles (true = consume the grant). */
export interface HandOverAuth extends GrantCheck {
  /** ok: consumes the grant, false if it was used (or revoked) meanwhile. !ok: logs the refusal. */
  settle(ok: boolean, why?: string): boolean;
}

export type TransferHandler = (hello: Hello, sock: net.Socket, rest: Buffer, auth?: HandOverAuth) => void;

/** Grant tokens: `v1.<destination host>.<grant id>.<secret>`; id and host are public, the secret is not. */
export function parseToken(token: unknown): { destination: string; id: string; secret: string } | null {
  if (typeof token !== 'string') return null;
  const m = /^v1\.([A-Za-z0-9-]{1,64})\.([A-Za-z0-9_-]{8,64})\.([A-Za-z0-9_-]{16,128})$/.exec(token);
  return m ? { destination: m[1]!, id: m[2]!, secret: m[3]! } : null;
}

/**
 * A fresh grant token for `destination` (same form as DataPlaneServer.grant issues): for a
 * caller that hands it to both ends at once; the destination registers it (grant(…, preMinted)).
 */
export function mintGrantToken(destination: string): string {
  return `v1.${destination}.${crypto.randomBytes(9).toString('base64url')}.${crypto.randomBytes(24).toString('base64url')}`;
}

const sha256 = (s: string): string => crypto.createHash('sha256').update(s).digest('hex');
function sameHash(a: string, b: string): boolean {
  const x = Buffer.from(a, 'hex'), y = Buffer.from(b, 'hex');
  return x.length === y.length && x.length > 0 && crypto.timingSafeEqual(x, y);
}

/** The (stream, streams) a HELLO claims, or why the claim is malformed. */
export function streamClaim(h: { stream?: unknown; streams?: unknown; kind?: unknown }): { stream: number; streams: number } | string {
  const stream = h.stream ?? 0, streams = h.streams ?? 1;
  if (!Number.isInteger(streams) || (streams as number) < 1 || (streams as number) > MAX_STREAMS) return `stream count must be 1 to ${MAX_STREAMS}`;
  if (!Number.isInteger(stream) || (stream as number) < 0 || (stream as number) >= (streams as number)) return `stream index ${String(stream)} outside 0..${(streams as number) - 1}`;
  if (h.kind !== 'memory' && streams !== 1) return 'only memory transfers use parallel streams';
  return { stream: stream as number, streams: streams as number };
}

/**
 * Why a grant cannot take this stream (null: it can). Stream 0 fixes the count; the others
 * follow with the same count, each index once, so a grant opens at most `streams` connections.
 */
function streamRefusal(g: Grant, c: { stream: number; streams: number }): string | null {
  if (c.stream === 0) {
    if (g.streams !== undefined) return `grant for migration ${g.migrationId} already used`;
    return g.expectStreams !== undefined && g.expectStreams !== c.streams ? `the destination was prepared for ${g.expectStreams} stream(s), the sender claims ${c.streams}` : null;
  }
  if (g.streams === undefined) return `stream ${c.stream} before stream 0`;
  if (g.streams !== c.streams) return `stream count ${c.streams} differs from stream 0's ${g.streams}`;
  return g.used?.has(c.stream) ? `stream ${c.stream} of migration ${g.migrationId} already connected` : null;
}

/** The stream this HELLO claims under grant g, or why g cannot take it. */
function claimOn(g: Grant, hello: Hello): { stream: number; streams: number } | string {
  const claim = streamClaim(hello);
  return typeof claim === 'string' ? claim : streamRefusal(g, claim) ?? claim;
}

/** Takes the stream; the grant is gone once every stream of the transfer has connected. */
function takeStream(grants: Map<string, Grant>, id: string, g: Grant, c: { stream: number; streams: number }): void {
  if (c.stream === 0) g.streams = c.streams;
  (g.used ??= new Set()).add(c.stream);
  if (g.used.size >= g.streams!) grants.delete(id);
}

/** A connection refused by the data plane (the message says why; nothing was touched). */
export class DataPlaneRefusal extends Error {}

/** TLS paths for a VM process's outgoing streams, passed down by its agent (see SimDriver). */
export const DATAPLANE_TLS_ENV = 'VMFERRY_DATAPLANE_TLS';
export function dataPlaneTlsFromEnv(): TlsPaths | undefined {
  const v = process.env[DATAPLANE_TLS_ENV];
  if (!v) return undefined;
  const t = JSON.parse(v) as TlsPaths;
  return t && t.ca && t.cert && t.key ? t : undefined;
}

/**
 * TLS material of one host, parsed once per process (PEM parsing and key loading cost several
 * ms on the migration's critical path) and again only when a file changes. One context serves
 * both roles: a VM process sends with its host's certificate and receives with it.
 */
const secureContexts = new Map<string, { context: tls.SecureContext; ca: Buffer }>();
export function secureContextFor(p: ClientTls): { context: tls.SecureContext; ca: Buffer } {
  const files = [p.ca, p.cert, p.key].filter((f): f is string => !!f);
  const key = files.map((f) => `${f}@${fs.statSync(f).mtimeMs}`).join('|');
  let c = secureContexts.get(key);
  if (!c) {
    const ca = fs.readFileSync(p.ca);
    c = { ca, context: tls.createSecureContext({ ca, cert: p.cert ? fs.readFileSync(p.cert) : undefined, key: p.key ? fs.readFileSync(p.key) : undefined, minVersion: 'TLSv1.2' }) };
    secureContexts.set(key, c);
  }
  return c;
}

/**
 * Passes an admitted connection to another process (the incoming VM process), no longer read
 * here. `pause()` stops only the stream: a plain socket's handle goes on reading into its
 * buffer, and Node keeps a handle it sent open, still reading (into nothing), until the child
 * acknowledges it. A read of ours in that window took bytes the VM never saw (~1 move in 100
 * here, at the start of round 0: the first Pages frame's index failed its checksum, or an
 * "unknown frame type" a few frames in, and the move rolled back). The read stops in the same
 * tick as the send: Node would restart it at the next tick (its read-ahead sees `reading` off).
 */
export function sendSocket(child: ChildProcess, message: Serializable, sock: net.Socket): void {
  sock.pause();
  const h = (sock as unknown as { _handle?: { reading?: boolean; readStop?: () => number } | null })._handle;
  if (h && typeof h.readStop === 'function') {
    h.reading = false;
    h.readStop();
  }
  child.send(message, sock);
}

/** Reads exactly one frame off a socket, then pauses it; bytes after the frame come back as `rest`. */
function readOneFrame(sock: net.Socket, timeoutMs: number, what: string): Promise<{ frame: Frame; rest: Buffer }> {
  const reader = new FrameReader();
  return new Promise((resolve, reject) => {
    const finish = (err: Error | null, v?: { frame: Frame; rest: Buffer }): void => {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('close', onClose);
      sock.off('error', onError);
      sock.pause();
      if (err) reject(err); else resolve(v!);
    };
    const onData = (c: Buffer): void => {
      let frames: Frame[];
      try { frames = reader.feed(c); } catch (e) { finish(new DataPlaneRefusal((e as Error).message)); return; }
      if (frames.length === 0) return;
      if (frames.length > 1) { finish(new DataPlaneRefusal(`expected a single ${what} frame`)); return; }
      finish(null, { frame: frames[0]!, rest: reader.rest() });
    };
    const onClose = (): void => finish(new DataPlaneRefusal(`connection closed before ${what}`));
    const onError = (e: Error): void => finish(new DataPlaneRefusal(`${what}: ${e.message}`));
    const timer = setTimeout(() => finish(new DataPlaneRefusal(`no ${what} in time`)), timeoutMs);
    sock.on('data', onData);
    sock.once('close', onClose);
    sock.once('error', onError);
    sock.resume();
  });
}

function commonName(subject: string): string | undefined {
  for (const line of subject.split('\n')) if (line.startsWith('CN=')) return line.slice(3);
  return undefined;
}

/**
 * Receiver side of a TLS-mode hand-over: STARTTLS, TLS handshake as server with a client
 * certificate required and verified against the lab CA, CN = the grant's source host, then the
 * AUTH frame: token and claims checked against the grant. On refusal the connection is closed
 * (with an ERROR frame when TLS is up) and a DataPlaneRefusal thrown; nothing else happens.
 */
export async function acceptSecure(sock: net.Socket, rest: Buffer, check: GrantCheck, timeoutMs = HELLO_TIMEOUT_MS): Promise<{ sock: tls.TLSSocket; rest: Buffer; peer: string; protocol: string }> {
  sock.on('error', () => undefined);
  if (rest.length > 0) { sock.destroy(); throw new DataPlaneRefusal('data sent before STARTTLS'); }
  let t: tls.TLSSocket | null = null;
  let secure = false;
  try {
    const { ca, context } = secureContextFor(check.tls);
    await new Promise<void>((resolve, reject) => sock.write(jsonFrame(FrameType.StartTls, {}), (e) => (e ? reject(e) : resolve())));
    const ts = new tls.TLSSocket(sock, { isServer: true, secureContext: context, requestCert: true, rejectUnauthorized: true });
    t = ts;
    ts.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new DataPlaneRefusal('no TLS handshake in time')), timeoutMs);
      ts.once('secure', () => { clearTimeout(timer); resolve(); });
      ts.once('error', (e: Error) => { clearTimeout(timer); reject(new DataPlaneRefusal(`TLS handshake failed: ${e.message.split('\n')[0]}`)); });
      ts.once('close', () => { clearTimeout(timer); reject(new DataPlaneRefusal('connection closed during the TLS handshake')); });
    });
    secure = true;
    // A bare server TLSSocket does not set `authorized`: check the chain ourselves, twice over.
    const verifyError = (ts as unknown as { _handle?: { verifyError?: () => Error | null } })._handle?.verifyError?.();
    const peer = ts.getPeerX509Certificate();
    if (!peer) throw new DataPlaneRefusal('no client certificate');
    if (verifyError) throw new DataPlaneRefusal(`client certificate not trusted: ${(verifyError as NodeJS.ErrnoException).code ?? verifyError.message}`);
    const caCert = new crypto.X509Certificate(ca);
    const now = Date.now();
    if (!peer.checkIssued(caCert) || !peer.verify(caCert.publicKey)) throw new DataPlaneRefusal('client certificate not issued by the data-plane CA');
    if (Date.parse(peer.validFrom) > now || Date.parse(peer.validTo) < now) throw new DataPlaneRefusal('client certificate expired or not yet valid');
    const cn = commonName(peer.subject);
    if (cn !== check.source) throw new DataPlaneRefusal(`client certificate is for host ${String(cn)}, the grant for ${check.source}`);
    const { frame, rest: after } = await readOneFrame(ts, timeoutMs, 'AUTH');
    if (frame.type !== FrameType.Auth) throw new DataPlaneRefusal(`expected AUTH, got ${FrameType[frame.type]}`);
    let a: AuthClaim;
    try { a = parseJson<AuthClaim>(frame); } catch { throw new DataPlaneRefusal('malformed AUTH'); }
    const tok = parseToken(a.token);
    if (!tok || tok.id !== check.grantId || tok.destination !== check.destination || !sameHash(sha256(tok.secret), check.secretHash)) throw new DataPlaneRefusal(`no valid grant for migration ${String(a.migrationId)}`);
    if (a.migrationId !== check.migrationId || a.vm !== check.vm || a.kind !== check.kind || a.from !== check.source || a.to !== check.destination) throw new DataPlaneRefusal(`grant does not match migration ${String(a.migrationId)} / VM ${String(a.vm)}`);
    if ((a.stream ?? 0) !== check.stream || (a.streams ?? 1) !== check.streams) throw new DataPlaneRefusal(`AUTH claims stream ${String(a.stream)} of ${String(a.streams)}, the preamble ${check.stream} of ${check.streams}`);
    if (check.expiresAt < Date.now()) throw new DataPlaneRefusal('grant expired');
    return { sock: ts, rest: after, peer: cn, protocol: ts.getProtocol() ?? 'TLS' };
  } catch (e) {
    const why = e instanceof DataPlaneRefusal ? e.message : `TLS set-up failed: ${(e as Error).message}`;
    if (t && secure && !t.destroyed) { t.end(jsonFrame(FrameType.Error, { message: why })); setTimeout(() => t!.destroy(), 1000).unref(); }
    else { t?.destroy(); sock.destroy(); }
    throw new DataPlaneRefusal(why);
  }
}

/**
 * Live grants by id, remembering (boundedly) the ones that ended (used, revoked, expired): a
 * source that finds its grant gone learns it was used, not that it is still to come (with
 * parallel start the source retries only the latter), and a used grant is never re-opened.
 */
class GrantBook extends Map<string, Grant> {
  /** Ended grant id → its migration. */
  readonly ended = new Map<string, string>();
  override delete(id: string): boolean {
    const g = this.get(id);
    if (g) {
      this.ended.set(id, g.migrationId);
      if (this.ended.size > 4096) this.ended.delete(this.ended.keys().next().value!);
    }
    return super.delete(id);
  }
  /** Why a connection naming grant `id` finds none. */
  missing(id: string, migrationId: unknown): string {
    return this.ended.has(id) ? `grant for migration ${String(migrationId)} already used or revoked` : `no valid grant for migration ${String(migrationId)}`;
  }
}

/** How long a connection naming a grant not issued yet is held for it (parallel start), ms. */
const PARK_MS = 2000;
/** At most this many such connections held at once (the rest are refused; the sender retries). */
const MAX_PARKED = 32;

export class DataPlaneServer {
  private grants = new GrantBook();
  /** Connections waiting for their grant, by grant id: each resumes its admission once issued. */
  private parked = new Map<string, Set<() => void>>();
  private parkedCount = 0;
  private server: net.Server;
  readonly refused: string[] = [];

  /** This host's name (the destination every grant names) and, when set, TLS for every transfer. */
  readonly hostName: string;
  readonly tls?: TlsPaths;

  constructor(
    private readonly handlers: Partial<Record<Hello['kind'], TransferHandler>>,
    private readonly log: (m: string) => void = () => undefined,
    opts: { hostName?: string; tls?: TlsPaths } = {},
  ) {
    this.hostName = opts.hostName ?? 'local';
    this.tls = opts.tls;
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

  /**
   * Holds a connection whose grant is not issued (yet): with parallel start the source connects
   * while this host prepares, and `grant()` then resumes it at once (no polling). Refused as
   * before after PARK_MS, on close, or when too many wait. A grant that ended is never waited for.
   */
  private park(id: string, sock: net.Socket, resume: () => void): boolean {
    if (this.grants.ended.has(id) || this.parkedCount >= MAX_PARKED || sock.destroyed) return false;
    const waiting = this.parked.get(id) ?? new Set<() => void>();
    this.parked.set(id, waiting);
    let done = false;
    const leave = (): boolean => {
      if (done) return false;
      done = true;
      clearTimeout(timer);
      sock.off('close', onClose);
      waiting.delete(entry);
      if (waiting.size === 0 && this.parked.get(id) === waiting) this.parked.delete(id);
      this.parkedCount--;
      return true;
    };
    const entry = (): void => { if (leave()) resume(); };
    const onClose = (): void => { leave(); };
    const timer = setTimeout(() => { if (leave()) resume(); }, PARK_MS);
    sock.once('close', onClose);
    waiting.add(entry);
    this.parkedCount++;
    return true;
  }

  private unpark(id: string): void {
    const set = this.parked.get(id);
    if (set) for (const resume of [...set]) resume();
  }

  /**
   * Issues a one-time grant, bound to migration, VM, kind, source host (`source`) and this host;
   * the token goes to the source through the workflow.
   */
  grant(g: Omit<Grant, 'expiresAt' | 'secretHash'>, ttlMs = 15 * 60_000, preMinted?: string): string {
    if (preMinted === undefined) {
      const id = crypto.randomBytes(9).toString('base64url');
      const secret = crypto.randomBytes(24).toString('base64url');
      this.grants.set(id, { ...g, expiresAt: Date.now() + ttlMs, secretHash: sha256(secret) });
      return `v1.${this.hostName}.${id}.${secret}`; // nobody can be waiting for a fresh id
    }
    // Minted by the orchestrator, so that the source could start connecting while this host
    // prepared (see park()). Registering it again for the same transfer (a retried activity)
    // is a no-op, and a used one is not re-opened; an id held by anything else is refused.
    const why = this.preMintedRefusal(preMinted, g);
    if (why) throw new Error(why);
    const tok = parseToken(preMinted)!;
    if (this.grants.has(tok.id) || this.grants.ended.has(tok.id)) return preMinted;
    this.grants.set(tok.id, { ...g, expiresAt: Date.now() + ttlMs, secretHash: sha256(tok.secret) });
    this.unpark(tok.id);
    return preMinted;
  }

  /** Why `token` cannot be registered for transfer `g` (null: it can), checked before anything is prepared. */
  preMintedRefusal(token: string, g: Pick<Grant, 'migrationId' | 'vm' | 'kind'>): string | null {
    const tok = parseToken(token);
    if (!tok || tok.destination !== this.hostName) return `grant token is malformed or not for ${this.hostName}`;
    const cur = this.grants.get(tok.id);
    const ended = this.grants.ended.get(tok.id);
    if (cur && (cur.migrationId !== g.migrationId || cur.vm !== g.vm || cur.kind !== g.kind || !sameHash(cur.secretHash, sha256(tok.secret)))) return `grant ${tok.id} is already held by another transfer`;
    if (!cur && ended !== undefined && ended !== g.migrationId) return `grant ${tok.id} is already held by another transfer`;
    return null;
  }

  revoke(migrationId: string): void {
    for (const [t, g] of this.grants) if (g.migrationId === migrationId) this.grants.delete(t);
  }

  /**
   * Refuses a connection whose sender did not wait for the receiver's answer (WELCOME, or
   * STARTTLS) before sending more: bytes read here since HELLO (a connection held for its grant
   * reads on) would be dropped when the socket is passed on. Checked before the grant's stream
   * is taken, so a well-behaved retry still finds it.
   */
  private premature(sock: net.Socket): boolean {
    if (sock.readableLength === 0) return false;
    this.refuse(sock, 'data sent before the receiver answered');
    return true;
  }

  private refuse(sock: net.Socket, why: string): void {
    this.noteRefusal(`${sock.remoteAddress}:${sock.remotePort}`, why);
    sock.end(jsonFrame(FrameType.Error, { message: why }));
  }

  private noteRefusal(peer: string, why: string): void {
    this.refused.push(why);
    if (this.refused.length > 1000) this.refused.shift();
    this.log(`data plane: refused connection from ${peer}: ${why}`);
  }

  /** TLS mode: route on the plaintext preamble; the receiver authenticates after hand-over. */
  private route(sock: net.Socket, hello: Hello, rest: Buffer, parked = false): void {
    if (hello.token !== undefined) { this.refuse(sock, 'this host takes grant tokens only inside TLS (STARTTLS); the source has a plaintext data plane (no tls in its host.json), this host has TLS: both ends must use the same mode'); return; }
    if (rest.length > 0) { this.refuse(sock, 'data sent before STARTTLS'); return; }
    const id = typeof hello.grant === 'string' ? hello.grant : '';
    const g = this.grants.get(id);
    if (!g) {
      if (!parked && id && hello.to === this.hostName && this.park(id, sock, () => this.route(sock, hello, rest, true))) return;
      this.refuse(sock, this.grants.missing(id, hello.migrationId));
      return;
    }
    if (g.migrationId !== hello.migrationId || g.vm !== hello.vm || g.kind !== hello.kind || hello.to !== this.hostName || (g.source !== undefined && g.source !== hello.from)) {
      this.refuse(sock, `grant does not match migration ${String(hello.migrationId)} / VM ${String(hello.vm)}`);
      return;
    }
    if (g.expiresAt < Date.now()) { this.grants.delete(id); this.refuse(sock, 'grant expired'); return; }
    const claim = claimOn(g, hello);
    if (typeof claim === 'string') { this.refuse(sock, claim); return; }
    const h = this.handlers[hello.kind];
    if (!h) { this.refuse(sock, `no ${hello.kind} transfers on this host`); return; }
    const peer = `${sock.remoteAddress}:${sock.remotePort}`;
    const auth: HandOverAuth = {
      grantId: id, secretHash: g.secretHash, migrationId: g.migrationId, vm: g.vm, kind: g.kind,
      source: g.source ?? String(hello.from), destination: this.hostName, expiresAt: g.expiresAt, tls: this.tls!, ...claim,
      settle: (ok, why) => {
        if (!ok) { this.noteRefusal(peer, why ?? 'refused by the receiver'); return false; }
        // Checked again: another connection may have taken the stream during the handshake.
        const again = this.grants.get(id) !== g ? `grant for migration ${g.migrationId} already used` : streamRefusal(g, claim);
        if (again) { this.noteRefusal(peer, again); return false; }
        takeStream(this.grants, id, g, claim); // a replayed grant finds nothing
        return true;
      },
    };
    if (this.premature(sock)) return;
    h({ ...hello, ...claim }, sock, Buffer.alloc(0), auth);
  }

  private onConnection(sock: net.Socket): void {
    // Small control frames go out back to back (VERIFIED then RESUMED at the cutover): with
    // Nagle the second waits for the peer's delayed ACK of the first, ~40 ms inside the pause.
    // The option lives on the socket, so it holds in the VM process the connection goes to.
    sock.setNoDelay(true);
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
      if (!hello || typeof hello !== 'object') { this.refuse(sock, 'malformed HELLO'); return; }
      if (this.tls) { this.route(sock, hello, reader.rest()); return; }
      this.admitPlain(sock, hello, reader.rest());
    };
    sock.on('data', onData);
  }

  /** Plaintext mode (a trusted migration network): the token itself admits the connection. */
  private admitPlain(sock: net.Socket, hello: Hello, rest: Buffer, parked = false): void {
    if (hello.token === undefined && typeof hello.grant === 'string') { this.refuse(sock, 'this host has a plaintext data plane (no tls in its host.json) and the source speaks TLS: both ends must use the same mode'); return; }
    const tok = parseToken(hello.token);
    const g = tok ? this.grants.get(tok.id) : undefined;
    if (tok && !g && tok.destination === this.hostName) {
      if (!parked && this.park(tok.id, sock, () => this.admitPlain(sock, hello, rest, true))) return;
      this.refuse(sock, this.grants.missing(tok.id, hello.migrationId));
      return;
    }
    if (!tok || !g || tok.destination !== this.hostName || !sameHash(sha256(tok.secret), g.secretHash)) { this.refuse(sock, `no valid grant for migration ${String(hello.migrationId)}`); return; }
    if (g.migrationId !== hello.migrationId || g.vm !== hello.vm || g.kind !== hello.kind || (g.source !== undefined && g.source !== hello.from)) { this.refuse(sock, `grant does not match migration ${String(hello.migrationId)} / VM ${String(hello.vm)}`); return; }
    if (g.expiresAt < Date.now()) { this.grants.delete(tok.id); this.refuse(sock, 'grant expired'); return; }
    const claim = claimOn(g, hello);
    if (typeof claim === 'string') { this.refuse(sock, claim); return; }
    const h = this.handlers[hello.kind];
    if (!h) { this.refuse(sock, `no ${hello.kind} transfers on this host`); return; }
    if (this.premature(sock)) return;
    takeStream(this.grants, tok.id, g, claim); // a replayed HELLO finds nothing
    h({ ...hello, ...claim }, sock, rest);
  }
}

/**
 * Connects to a host's data plane and waits for WELCOME from whoever serves the transfer. With
 * `tls`, the token never leaves this process in plaintext: routing preamble, STARTTLS, TLS with
 * this host's certificate (the receiver's must be the grant's destination host, lab CA), AUTH.
 */
export async function connectDataPlane(endpoint: { host: string; port: number }, hello: Hello, tlsOpts?: ClientTls, o: { loopbackSendBuffer?: number } = {}): Promise<FrameChannel> {
  const sock = net.connect(endpoint.port, endpoint.host);
  sock.setNoDelay(true);
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', (e) => reject(new Error(`data plane ${endpoint.host}:${endpoint.port}: ${e.message}`)));
  });
  // Only towards this machine: on a real link the buffer must cover bandwidth × round trip.
  if (o.loopbackSendBuffer && peerIsLoopback(sock)) setSendBuffer(sock, o.loopbackSendBuffer);
  if (tlsOpts) return connectSecure(endpoint, sock, hello, tlsOpts);
  const chan = new FrameChannel(sock);
  sock.write(jsonFrame(FrameType.Hello, hello));
  try {
    chan.welcome = await chan.expect<Record<string, unknown>>(FrameType.Welcome, HELLO_TIMEOUT_MS);
  } catch (e) {
    sock.destroy();
    throw new Error(`data plane ${endpoint.host}:${endpoint.port} refused the ${hello.kind} transfer: ${(e as Error).message}`);
  }
  return chan;
}

async function connectSecure(endpoint: { host: string; port: number }, sock: net.Socket, hello: Hello, opts: ClientTls): Promise<FrameChannel> {
  const where = `data plane ${endpoint.host}:${endpoint.port}`;
  const fail = (why: string): Error => { sock.destroy(); return new Error(`${where} refused the ${hello.kind} transfer: ${why}`); };
  sock.on('error', () => undefined);
  const tok = parseToken(hello.token);
  if (!tok) throw fail('malformed grant token');
  const preamble: Hello = { migrationId: hello.migrationId, vm: hello.vm, kind: hello.kind, from: hello.from, to: tok.destination, grant: tok.id, stream: hello.stream, streams: hello.streams };
  sock.write(jsonFrame(FrameType.Hello, preamble));
  let first: { frame: Frame; rest: Buffer };
  try { first = await readOneFrame(sock, HELLO_TIMEOUT_MS, 'STARTTLS'); } catch (e) { throw fail((e as Error).message); }
  if (first.frame.type === FrameType.Error) throw fail(`peer: ${parseJson<{ message: string }>(first.frame).message}`);
  if (first.frame.type !== FrameType.StartTls || first.rest.length > 0) throw fail(`expected STARTTLS, got ${FrameType[first.frame.type]}`);
  let ts: tls.TLSSocket;
  try {
    ts = tls.connect({
      socket: sock,
      secureContext: secureContextFor(opts).context, // CA, certificate, key, TLS 1.2 at least
      servername: tok.destination,
      // The receiver must be the host that issued the grant (the workflow told us which).
      checkServerIdentity: (_name, cert) => (cert.subject?.CN === tok.destination ? undefined : new Error(`receiver certificate is for ${String(cert.subject?.CN)}, expected ${tok.destination}`)),
    });
    ts.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no TLS handshake in time')), HELLO_TIMEOUT_MS);
      ts.once('secureConnect', () => { clearTimeout(timer); resolve(); });
      ts.once('error', (e: Error) => { clearTimeout(timer); reject(new Error(`TLS: ${e.message.split('\n')[0]}`)); });
      ts.once('close', () => { clearTimeout(timer); reject(new Error('connection closed during the TLS handshake')); });
    });
  } catch (e) {
    throw fail((e as Error).message);
  }
  const chan = new FrameChannel(ts);
  const auth: AuthClaim = { token: hello.token!, migrationId: hello.migrationId, vm: hello.vm, kind: hello.kind, from: hello.from, to: tok.destination, stream: hello.stream, streams: hello.streams };
  ts.write(jsonFrame(FrameType.Auth, auth));
  try {
    chan.welcome = await chan.expect<Record<string, unknown>>(FrameType.Welcome, HELLO_TIMEOUT_MS);
  } catch (e) {
    ts.destroy();
    throw fail((e as Error).message);
  }
  return chan;
}
