// Zero-copy receive for a plaintext data-plane stream: the kernel reads page data straight into
// guest memory. Node's `onread` option lets the socket read into a buffer we choose before each
// read, so the reader always offers exactly what comes next on the wire: the 12-byte header, a
// Pages frame's index table, or the guest-memory range of the next run of pages. Compared with
// 'data' events (a fresh 64 KiB buffer per read, then a copy into guest memory), this saves the
// allocation and the copy: ~1000 against ~550 MiB/s into untouched memory on this machine.
//
// Same wire format and checks as FrameReader: unknown types, oversized bodies and a bad index
// checksum are refused before anything reaches guest memory; the sink validates every page
// index (bounds, stream) before its data is read, and checks each page's CRC once it is in place
// (an incoming VM that fails a check is discarded, never run, so placing first is safe).
// TLS sockets cannot use `onread` (Node ignores it on a wrapped socket): they keep FrameChannel.
import net from 'node:net';
import { FrameType, HEADER, FrameFlag, ProtocolError, checkCovered, checkHeader, indexLength, type Frame } from './frames.js';

export interface PageSink {
  /** Guest memory the page data is read into. */
  readonly memory: Uint8Array;
  /**
   * Validates a Pages frame's index table (count + entries, checksum already verified) and
   * returns where its data goes: [offset, length] runs in guest memory, in wire order.
   */
  pageRuns(index: Buffer, flags: number): Array<[number, number]>;
  /** The frame's data is in guest memory: check it and account for it. */
  pagesPlaced(index: Buffer, flags: number, wireBytes: number): void;
  /** Any other frame (control frames, compressed page frames). A promise holds further reads until it settles. */
  frame(f: Frame): Promise<void> | void;
  /** A protocol or handling error: the stream is finished. */
  fail(e: Error): void;
}

/** Runs shorter than this on average are read into scratch memory and copied (fewer, larger reads). */
const MIN_DIRECT_RUN = 8 * 4096;
const SCRATCH = 1 << 20;

type Phase = 'head' | 'index' | 'body' | 'data';

/**
 * Moves a connected socket's handle into a new net.Socket that reads with Node's `onread`:
 * each read lands in the buffer `buffer()` offers, then `callback(n, buf)` runs. Bytes the old
 * socket already buffered go to `early` first, before the new socket exists: Node asks
 * `buffer()` for the first read's buffer as it constructs the socket. Null when the socket has
 * no movable handle (a TLS socket, say): the caller keeps the copy path.
 */
export function readInto(old: net.Socket, o: { buffer: () => Uint8Array; callback: (n: number, buf: Uint8Array) => boolean | void; early?: (bufs: Buffer[]) => void; pauseOnCreate?: boolean }): net.Socket | null {
  const handle = (old as unknown as { _handle?: { readStop?: () => number } | null })._handle;
  if (!handle || typeof handle.readStop !== 'function') return null;
  handle.readStop();
  const early: Buffer[] = [];
  for (let c: Buffer | null; (c = old.read() as Buffer | null) !== null;) early.push(c);
  (old as unknown as { _handle: unknown })._handle = null;
  old.removeAllListeners();
  o.early?.(early);
  return new net.Socket({ handle, readable: true, writable: true, pauseOnCreate: !!o.pauseOnCreate, onread: { buffer: o.buffer, callback: o.callback } } as net.SocketConstructorOpts);
}

export class PlacingReader {
  private phase: Phase = 'head';
  private readonly head = Buffer.allocUnsafe(HEADER);
  private readonly scratch = Buffer.allocUnsafe(SCRATCH);
  private readonly hold = Buffer.allocUnsafe(64 << 10);
  private have = 0;
  private type = 0;
  private flags = 0;
  private len = 0;
  private crc = 0;
  private index: Buffer = this.head;
  private body: Buffer = this.head;
  private runs: Array<[number, number]> = [];
  private run = 0;
  /** Data gathered in scratch first (short runs), copied to the runs when complete. */
  private gather: Buffer | null = null;
  /** Bytes read before the socket was ours to read (the agent's leftovers, the first read). */
  private backlog: Buffer[] = [];
  private busy = false;
  private failed = false;
  /** The buffer offered for the next read; another one in the callback is a stale first read. */
  private offered: Uint8Array | null = null;
  sock!: net.Socket;

  constructor(private readonly sink: PageSink) {}

  /**
   * Takes over a connected socket (its handle moves to a new net.Socket that reads through us)
   * and feeds `rest` first. Returns null when the socket cannot be taken over (no handle);
   * the caller then uses FrameChannel.
   */
  static attach(old: net.Socket, rest: Buffer, sink: PageSink): PlacingReader | null {
    const r = new PlacingReader(sink);
    const sock = readInto(old, {
      buffer: () => r.next(),
      callback: (n, buf) => r.read(n, buf),
      // The agent's leftovers, then the old socket's: taken before any read of the new one.
      early: (bufs) => { if (rest.length) r.backlog.push(rest); r.backlog.push(...bufs); },
      pauseOnCreate: true,
    });
    if (!sock) return null;
    r.sock = sock;
    queueMicrotask(() => r.drain());
    return r;
  }

  /** The buffer offered for the next read: what the wire carries next, or `hold` while we must not place. */
  private next(): Uint8Array {
    if (this.busy || this.backlog.length || this.failed) { this.offered = null; return this.hold; }
    return (this.offered = this.target());
  }

  /** Exactly what the wire carries next (never empty). */
  private target(): Uint8Array {
    let b: Uint8Array;
    if (this.phase === 'head') b = this.head.subarray(this.have);
    else if (this.phase === 'index') b = this.index.subarray(this.have);
    else if (this.phase === 'body') b = this.body.subarray(this.have);
    else if (this.gather) b = this.gather.subarray(this.have);
    else {
      const [off, len] = this.runs[this.run]!;
      b = this.sink.memory.subarray(off + this.have, off + len);
    }
    return b;
  }

  private read(n: number, buf: Uint8Array): boolean {
    if (this.failed) return false;
    if (buf !== this.offered || this.busy || this.backlog.length) {
      // Read into `hold` or a buffer offered before the state moved on (the first read after
      // the backlog, or after a handler held us): copy it through.
      this.backlog.push(Buffer.from(buf.subarray(0, n)));
      this.drain();
      return !this.busy && !this.failed;
    }
    this.advance(n);
    return !this.busy && !this.failed;
  }

  /** Copies backlog bytes into whatever comes next, until it is empty or a handler holds us. */
  private drain(): void {
    while (this.backlog.length && !this.busy && !this.failed) {
      const b = this.backlog[0]!;
      const target = this.target();
      const n = Math.min(b.length, target.length);
      target.set(b.subarray(0, n));
      if (n === b.length) this.backlog.shift(); else this.backlog[0] = b.subarray(n);
      this.advance(n);
    }
    if (!this.busy && !this.failed && !this.backlog.length && this.sock && !this.sock.destroyed) this.sock.resume();
  }

  private advance(n: number): void {
    this.have += n;
    try {
      switch (this.phase) {
        case 'head': if (this.have === HEADER) this.onHead(); return;
        case 'index': if (this.have === this.index.length) this.onIndex(); return;
        case 'body': if (this.have === this.body.length) this.deliver({ type: this.type, body: this.body, parts: this.type === FrameType.Pages ? [this.body] : undefined, ...(this.flags ? { flags: this.flags } : {}) }); return;
        case 'data': this.onData(); return;
      }
    } catch (e) {
      this.failed = true;
      this.sink.fail(e instanceof Error ? e : new Error(String(e)));
    }
  }

  private onHead(): void {
    const h = this.head;
    this.type = h.readUInt8(0);
    this.flags = h.readUInt8(1);
    this.len = h.readUInt32LE(4);
    this.crc = h.readUInt32LE(8);
    checkHeader(this.type, this.len);
    this.have = 0;
    if (this.type === FrameType.Pages && !(this.flags & FrameFlag.Deflate)) {
      indexLength(FrameType.Pages, this.len, 0); // refuses a body too short for the count
      this.phase = 'index';
      this.index = Buffer.allocUnsafe(4); // the count first, then the whole table
      return;
    }
    this.body = Buffer.allocUnsafe(this.len);
    if (this.len === 0) { this.deliver({ type: this.type, body: this.body }); return; }
    this.phase = 'body';
  }

  private onIndex(): void {
    if (this.index.length === 4) {
      const n = this.index.readUInt32LE(0);
      const indexLen = indexLength(FrameType.Pages, this.len, n);
      if (n > 0) {
        const full = Buffer.allocUnsafe(indexLen);
        this.index.copy(full);
        this.index = full;
        return; // `have` stays 4: the entries follow
      }
    }
    checkCovered(FrameType.Pages, this.index, this.crc);
    this.runs = this.sink.pageRuns(this.index, this.flags);
    let data = 0;
    for (const [, l] of this.runs) data += l;
    if (this.index.length + data !== this.len) throw new ProtocolError(this.index.length + data > this.len ? 'page frame truncated' : 'page frame has trailing bytes');
    this.have = 0;
    this.run = 0;
    if (data === 0) { this.placed(); return; }
    // Scattered pages (short runs) are cheaper as one read into scratch plus copies.
    this.gather = data / this.runs.length < MIN_DIRECT_RUN ? (data <= SCRATCH ? this.scratch.subarray(0, data) : Buffer.allocUnsafe(data)) : null;
    this.phase = 'data';
  }

  private onData(): void {
    if (this.gather) {
      if (this.have < this.gather.length) return;
      let at = 0;
      for (const [off, len] of this.runs) { this.sink.memory.set(this.gather.subarray(at, at + len), off); at += len; }
      this.gather = null;
      this.placed();
      return;
    }
    if (this.have < this.runs[this.run]![1]) return;
    this.have = 0;
    if (++this.run === this.runs.length) this.placed();
  }

  private placed(): void {
    this.phase = 'head';
    this.have = 0;
    this.sink.pagesPlaced(this.index, this.flags, this.len);
  }

  private deliver(f: Frame): void {
    this.phase = 'head';
    this.have = 0;
    // A compressed page (or a block) frame: the header covers its index table, as in FrameReader.
    const indexed = f.type === FrameType.Pages || f.type === FrameType.Blocks;
    const n = indexed && f.body.length >= 4 ? f.body.readUInt32LE(0) : 0;
    checkCovered(f.type, indexed ? f.body.subarray(0, indexLength(f.type, f.body.length, n)) : f.body, this.crc);
    const r = this.sink.frame(f);
    if (r && typeof (r as Promise<void>).then === 'function') {
      this.busy = true;
      (r as Promise<void>).then(
        () => { this.busy = false; this.drain(); },
        (e: Error) => { this.busy = false; this.failed = true; this.sink.fail(e); },
      );
    }
  }
}
