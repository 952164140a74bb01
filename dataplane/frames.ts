// Wire format of the data plane. Every frame is
//   u8 type | u8 flags | u16 reserved | u32 body length | u32 CRC-32 of body | body
// Page frames carry an index table then the non-zero pages; control frames carry JSON.
// The reader validates sizes and checksums before anything reaches guest memory or disks
// (PlacingReader, the plaintext zero-copy path, checks each page's CRC once it is in place).
import zlib from 'node:zlib';
import type { Socket } from 'node:net';

export const HEADER = 12;
export const MAX_BODY = 16 << 20;
export const ZERO_FLAG = 0x8000_0000;

/** Frame flags (byte 1 of the header). */
export const FrameFlag = {
  /**
   * Pages frames read from a running guest: a page may have been rewritten after its CRC was
   * taken (it is dirty again at the source and travels again), so a mismatch is not an error
   * there; the cutover digest still compares every page's final CRC.
   */
  Live: 0x01,
  /** The data region (after the index) is deflate-raw compressed. */
  Deflate: 0x02,
  /**
   * The index's second word per page is a send sequence number, not a CRC (policy verify
   * 'sequence'): recorded as it is, the cutover compares the tables.
   */
  Seq: 0x04,
} as const;

export enum FrameType {
  Hello = 1,
  Welcome = 2,
  Pages = 3,
  Device = 4,
  Verified = 5,
  Go = 6,
  Resumed = 7,
  Error = 8,
  Blocks = 9,
  Done = 10,
  RoundEnd = 11,
  Ack = 12,
  /** Plaintext, receiver → sender: routed; start the TLS handshake now (sender is the client). */
  StartTls = 13,
  /** First frame inside TLS, sender → receiver: the grant token and what it claims to be for. */
  Auth = 14,
}

export interface Frame {
  type: FrameType;
  body: Buffer;
  /**
   * Pages frames: the body exactly as it arrived, in pieces (socket reads), so the receiver
   * can checksum and place pages without first joining them; `body` joins on first use.
   */
  parts?: Buffer[];
  /** Header flags (FrameFlag). */
  flags?: number;
}

export const crc32: (data: Buffer | Uint8Array, value?: number) => number = (zlib as unknown as {
  crc32: (data: Buffer | Uint8Array, value?: number) => number;
}).crc32;

export function header(type: FrameType, body: Buffer | number, crc: number, flags = 0): Buffer {
  const h = Buffer.allocUnsafe(HEADER);
  h.writeUInt8(type, 0);
  h.writeUInt8(flags, 1);
  h.writeUInt16LE(0, 2);
  h.writeUInt32LE(typeof body === 'number' ? body : body.length, 4);
  h.writeUInt32LE(crc >>> 0, 8);
  return h;
}

export function jsonFrame(type: FrameType, value: unknown): Buffer {
  const body = Buffer.from(JSON.stringify(value));
  return Buffer.concat([header(type, body, crc32(body)), body]);
}

export function parseJson<T>(frame: Frame): T {
  return JSON.parse(frame.body.toString('utf8')) as T;
}

export class ProtocolError extends Error {}

/** The first n bytes of a body given in pieces (a view when the first piece holds them). */
export function joinPrefix(parts: Buffer[], n: number): Buffer {
  if (parts.length > 0 && parts[0]!.length >= n) return parts[0]!.subarray(0, n);
  return Buffer.concat(parts, n);
}

function partsFrame(type: FrameType, parts: Buffer[]): Frame {
  let joined: Buffer | undefined;
  return {
    type,
    parts,
    get body(): Buffer { return (joined ??= parts.length === 1 ? parts[0]! : Buffer.concat(parts)); },
  };
}

// The checks every reader of the wire applies, in this order, before it reads or places any
// page of a frame: FrameReader (copy path) and PlacingReader (zero-copy path) share them.

/** A frame header: known type, body within the limit. */
export function checkHeader(type: number, len: number): void {
  if (!(type in FrameType)) throw new ProtocolError(`unknown frame type ${type}`);
  if (len > MAX_BODY) throw new ProtocolError(`frame body of ${len} bytes exceeds the ${MAX_BODY} limit`);
}

/**
 * Bytes at the start of a Pages/Blocks body that the header's checksum covers: the fixed part
 * (count; Blocks add disk index and sequence) and `count` index entries of 8 bytes.
 */
export function indexLength(type: FrameType, bodyLen: number, count: number): number {
  const head = type === FrameType.Blocks ? 12 : 4;
  if (bodyLen < head) throw new ProtocolError(`${type === FrameType.Blocks ? 'block' : 'page'} frame without an index`);
  if (head + count * 8 > bodyLen) throw new ProtocolError(`${type === FrameType.Blocks ? 'block' : 'page'} frame index exceeds the frame`);
  return head + count * 8;
}

/** The header's checksum over what it covers (the whole body, or a page/block frame's index). */
export function checkCovered(type: FrameType, covered: Buffer, crc: number): void {
  if ((crc32(covered) >>> 0) !== crc) throw new ProtocolError(`checksum mismatch on frame type ${FrameType[type]}`);
}

/** Incremental frame parser; feed() returns every complete, checksum-verified frame. */
export class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;

  feed(chunk: Buffer): Frame[] {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const out: Frame[] = [];
    for (;;) {
      if (this.buffered < HEADER) break;
      const head = this.peek(HEADER);
      const type = head.readUInt8(0);
      const flags = head.readUInt8(1);
      const len = head.readUInt32LE(4);
      const crc = head.readUInt32LE(8);
      checkHeader(type, len);
      if (this.buffered < HEADER + len) break;
      let frame: Frame;
      if (type === FrameType.Pages && this.chunks[0]!.length < HEADER + len) {
        // A large page frame spans socket reads: hand it over in pieces, no copy.
        this.take(HEADER);
        frame = partsFrame(type, this.takeParts(len));
      } else {
        const body = this.take(HEADER + len).subarray(HEADER);
        frame = { type, body, parts: type === FrameType.Pages ? [body] : undefined };
      }
      // Page frames checksum their index table here; each page carries its own CRC in that
      // table, which the receiver checks as it copies the page (one pass over the data).
      let covered: Buffer;
      if (type === FrameType.Pages || type === FrameType.Blocks) {
        const parts = frame.parts ?? [frame.body];
        const n = len >= 4 ? joinPrefix(parts, 4).readUInt32LE(0) : 0;
        covered = joinPrefix(parts, indexLength(type, len, n));
      } else covered = frame.body;
      checkCovered(type, covered, crc);
      if (flags) frame.flags = flags;
      out.push(frame);
    }
    return out;
  }

  /** Bytes received but not yet framed (handed over with a socket). */
  rest(): Buffer {
    return Buffer.concat(this.chunks);
  }

  private peek(n: number): Buffer {
    if (this.chunks[0]!.length >= n) return this.chunks[0]!.subarray(0, n);
    return Buffer.concat(this.chunks).subarray(0, n);
  }

  /** The next n bytes as the received pieces themselves (subarrays, no copy). */
  private takeParts(n: number): Buffer[] {
    const parts: Buffer[] = [];
    let need = n;
    while (need > 0) {
      const c = this.chunks[0]!;
      if (c.length <= need) { parts.push(c); this.chunks.shift(); need -= c.length; }
      else { parts.push(c.subarray(0, need)); this.chunks[0] = c.subarray(need); need = 0; }
    }
    this.buffered -= n;
    return parts;
  }

  private take(n: number): Buffer {
    let first = this.chunks[0]!;
    if (first.length < n) {
      first = Buffer.concat(this.chunks);
      this.chunks = [first];
    }
    const out = first.subarray(0, n);
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.buffered -= n;
    return out;
  }
}

/** Writes with back-pressure: resolves once the socket can take more. */
export function writeAll(sock: Socket, bufs: Buffer[]): Promise<void> | void {
  if (sock.destroyed || !sock.writable) return Promise.reject(new Error('data-plane connection closed'));
  let ok = true;
  for (const b of bufs) ok = sock.write(b) && ok;
  if (ok) return;
  return new Promise<void>((resolve, reject) => {
    const onDrain = (): void => { sock.off('close', onClose); resolve(); };
    const onClose = (): void => { sock.off('drain', onDrain); reject(new Error('data-plane connection closed')); };
    sock.once('drain', onDrain);
    sock.once('close', onClose);
  });
}

/** Pulls frames off a socket one at a time (for request/response phases). */
export class FrameChannel {
  private reader = new FrameReader();
  private queue: Frame[] = [];
  private waiters: Array<{ resolve: (f: Frame) => void; reject: (e: Error) => void }> = [];
  private failure: Error | null = null;
  onFrame?: (f: Frame) => boolean;
  /** The receiver's WELCOME (what it says it can do), once connected. */
  welcome: Record<string, unknown> = {};

  constructor(readonly sock: Socket, initial?: Buffer) {
    sock.on('data', (c: Buffer) => this.push(c));
    sock.on('error', (e) => this.fail(e));
    sock.on('close', () => this.fail(new Error('data-plane connection closed')));
    if (initial && initial.length) queueMicrotask(() => this.push(initial));
  }

  private push(chunk: Buffer): void {
    let frames: Frame[];
    try { frames = this.reader.feed(chunk); } catch (e) { this.fail(e as Error); this.sock.destroy(); return; }
    for (const f of frames) {
      if (this.onFrame?.(f)) continue;
      const w = this.waiters.shift();
      if (w) w.resolve(f); else this.queue.push(f);
    }
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    for (const w of this.waiters.splice(0)) w.reject(e);
  }

  next(timeoutMs = 30_000): Promise<Frame> {
    const f = this.queue.shift();
    if (f) return Promise.resolve(f);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<Frame>((resolve, reject) => {
      const t = setTimeout(() => { this.waiters = this.waiters.filter((w) => w.resolve !== res); reject(new Error(`no data-plane reply within ${timeoutMs} ms`)); }, timeoutMs);
      const res = (fr: Frame): void => { clearTimeout(t); resolve(fr); };
      this.waiters.push({ resolve: res, reject: (e) => { clearTimeout(t); reject(e); } });
    });
  }

  async expect<T>(type: FrameType, timeoutMs?: number): Promise<T> {
    const f = await this.next(timeoutMs);
    if (f.type === FrameType.Error) throw new Error(`peer: ${parseJson<{ message: string }>(f).message}`);
    if (f.type !== type) throw new ProtocolError(`expected ${FrameType[type]}, got ${FrameType[f.type]}`);
    return parseJson<T>(f);
  }
}
