// Disk mirroring inside the VM process (as QEMU's drive-mirror): a bulk copy of every disk to
// a target, while every guest write issued meanwhile goes to both copies, so the copy converges
// in one pass. The target is either local files (live storage migration on one host) or the
// destination host's data plane (shared-nothing), where the copy survives a broken connection:
// blocks the target has not acknowledged are re-sent on reconnect, the bulk copy restarts
// from the acknowledged checkpoint, and every chunk is safe to write twice.
import fs from 'node:fs';
import { setImmediate as yieldNow } from 'node:timers/promises';
import { BLOCK_SIZE } from '../../common/types.js';
import type { DiskMirrorStatus } from '../../common/types.js';
import type { Guest } from './guest.js';
import { FrameChannel, FrameType, crc32, header, writeAll, parseJson } from '../../dataplane/frames.js';
import { connectDataPlane, dataPlaneTlsFromEnv, type Hello } from '../../dataplane/endpoint.js';

const CHUNK_BLOCKS = 256; // 1 MiB per bulk frame
const LOCAL_CHUNK_BLOCKS = 1024; // 4 MiB per local bulk read/write
const ZERO_BLOCK = Buffer.alloc(BLOCK_SIZE);
const ZERO_CHUNK = Buffer.alloc(LOCAL_CHUNK_BLOCKS * BLOCK_SIZE);
const VERIFY_BLOCKS = 1024; // 4 MiB per compared chunk
const WRITES_IN_FLIGHT = 2; // local bulk copy: chunks written while the next one is read
const VERIFY_IN_FLIGHT = 2; // chunks being read for the comparison
const PENDING = 0xffff_ffff; // written while disconnected: must be sent

/** A line in the VM's log (its stdout): what the copy and the verification cost. */
function log(msg: string): void {
  process.stdout.write(`${new Date().toISOString()} [disk mirror] ${msg}\n`);
}

/** A positional read or write in the thread pool, continued after a short transfer. */
function ioAll(op: 'read' | 'write', fd: number, buf: Buffer, len: number, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const cb = (e: NodeJS.ErrnoException | null, n: number): void => {
      if (e) return reject(e);
      if (n === 0) return reject(Object.assign(new Error(op === 'read' ? 'unexpected end of file' : 'no progress'), { code: 'EIO' }));
      done += n;
      if (done < len) next(); else resolve();
    };
    const next = (): void => {
      if (op === 'read') fs.read(fd, buf, done, len - done, pos + done, cb);
      else fs.write(fd, buf, done, len - done, pos + done, cb);
    };
    next();
  });
}

/**
 * Page-aligned memory, as O_DIRECT needs (a Buffer's address is only 16-byte aligned): a
 * WebAssembly memory starts on a page boundary.
 */
export function alignedBuffer(bytes: number): Buffer {
  // (This project's TypeScript libs do not declare WebAssembly; Node has it.)
  const { Memory } = (globalThis as unknown as { WebAssembly: { Memory: new (d: { initial: number }) => { buffer: ArrayBuffer } } }).WebAssembly;
  return Buffer.from(new Memory({ initial: Math.ceil(bytes / 65536) }).buffer, 0, bytes);
}

export type MirrorTarget =
  | { kind: 'local'; paths: Record<string, string> }
  | { kind: 'remote'; endpoint: { host: string; port: number }; token: string; hello: Omit<Hello, 'token' | 'kind'> };

export class DiskMirror {
  state: DiskMirrorStatus['state'] = 'copying';
  error?: string;
  bytesCopied = 0;
  bytesMirrored = 0;
  private readonly cursor: number[];
  /** Remote: for each block, the sequence of the frame that last carried it (0 = acknowledged). */
  private readonly sentSeq: Uint32Array[];
  private readonly checkpointAt: Array<Array<[number, number]>>; // per disk: (seq, cursor) pairs
  private readonly ackedCursor: number[];
  private seq = 0;
  private ackedSeq = 0;
  private chan: FrameChannel | null = null;
  private localFds: number[] = [];
  /**
   * Local: a second fd per target opened with O_DIRECT (null where the file system refuses it)
   * for the bulk copy and the verification. Buffered, every new page of a 2 GiB copy is
   * allocated, filled and written back by the kernel (≈ 4 s/GiB on the bench VM, where fresh
   * page-cache pages are the cost), and the host's page cache is flushed out by data nobody
   * reads; direct, the copy goes from our buffer to the device. Mirrored guest writes use the
   * buffered fd (the kernel keeps both views coherent), and so does the guest after the switch.
   */
  private directFds: Array<number | null> = [];
  private retiredFds: number[] = [];
  /** Local: bulk chunks being written, with the guest writes to their blocks held meanwhile. */
  private inflight: Array<{ di: number; from: number; to: number; held: Map<number, Buffer> }> = [];
  /** Local: chunks being read for verification, and whether the guest wrote into them meanwhile. */
  private verifying: Array<{ di: number; from: number; to: number; touched: boolean }> = [];
  private loop: Promise<void> = Promise.resolve();
  private stopped = false;
  private ackWaiters: Array<() => void> = [];

  private bucketAt = performance.now();
  private startedAt = 0;

  constructor(readonly migrationId: string, private readonly guest: Guest, readonly target: MirrorTarget, private readonly maxBandwidth = 0) {
    this.cursor = guest.disks.map(() => 0);
    this.ackedCursor = guest.disks.map(() => 0);
    this.checkpointAt = guest.disks.map(() => []);
    this.sentSeq = guest.disks.map((d) => new Uint32Array(target.kind === 'remote' ? d.blocks : 0));
  }

  get totalBytes(): number {
    return this.guest.disks.reduce((a, d) => a + d.blocks * BLOCK_SIZE, 0);
  }

  status(): DiskMirrorStatus {
    const checkpoint: Record<string, number> = {};
    this.guest.disks.forEach((d, i) => { checkpoint[d.id] = this.target.kind === 'local' ? this.cursor[i]! : this.ackedCursor[i]!; });
    return { state: this.state, bytesCopied: this.bytesCopied, bytesMirrored: this.bytesMirrored, checkpoint, totalBytes: this.totalBytes, error: this.error };
  }

  async start(): Promise<void> {
    if (this.target.kind === 'local') {
      for (const d of this.guest.disks) {
        const p = this.target.paths[d.id];
        if (!p) throw new Error(`no target path for disk ${d.id}`);
        const fd = fs.openSync(p, 'wx+'); // exclusive: never overwrite somebody's file
        this.localFds.push(fd);
        fs.ftruncateSync(fd, d.blocks * BLOCK_SIZE);
        let direct: number | null = null;
        // Reopened through the fd, not the path: the very file just created, whatever the path
        // has become since. Refused (no O_DIRECT on this file system, no /proc): buffered.
        try { direct = fs.openSync(`/proc/self/fd/${fd}`, fs.constants.O_RDWR | fs.constants.O_DIRECT); } catch { /* buffered */ }
        this.directFds.push(direct);
      }
    } else {
      await this.connect(this.target.token);
    }
    this.guest.onDiskWrite = (di, block, data) => this.onGuestWrite(di, block, data);
    this.startedAt = performance.now();
    this.loop = this.bulk().catch((e: Error) => this.bulkError(e));
  }

  private bulkError(e: Error): void {
    if (this.target.kind === 'remote' && (this.state === 'disconnected' || !this.chan)) return; // resume() carries on
    this.fail(e);
  }

  private async connect(token: string): Promise<void> {
    if (this.target.kind !== 'remote') return;
    // TLS with this host's certificate when the agent configured it (see SimDriver.spawnVm).
    const chan = await connectDataPlane(this.target.endpoint, { ...this.target.hello, token, kind: 'disk' }, dataPlaneTlsFromEnv());
    chan.onFrame = (f) => {
      if (f.type === FrameType.Ack) this.onAck(parseJson<{ seq: number }>(f).seq);
      else if (f.type === FrameType.Error) this.fail(new Error(`destination: ${parseJson<{ message: string }>(f).message}`));
      return true;
    };
    chan.sock.on('close', () => {
      if (this.chan === chan && (this.state === 'copying' || this.state === 'synced')) {
        this.chan = null;
        this.state = 'disconnected';
        this.error = 'data-plane connection to the destination closed';
        for (const w of this.ackWaiters.splice(0)) w();
      }
    });
    this.chan = chan;
  }

  /** Remote only: after a broken connection, reconnect with a fresh grant and carry on. */
  async resume(token: string): Promise<void> {
    if (this.state !== 'disconnected') return;
    await this.loop.catch(() => undefined); // the old copy loop ends on the broken connection
    // Everything not acknowledged is resent; the bulk copy restarts at its checkpoint.
    this.guest.disks.forEach((_d, di) => {
      const s = this.sentSeq[di]!;
      for (let b = 0; b < s.length; b++) if (s[b]! > this.ackedSeq) s[b] = PENDING;
      this.cursor[di] = this.ackedCursor[di]!;
      this.checkpointAt[di] = [];
    });
    await this.connect(token);
    this.state = 'copying';
    this.error = undefined;
    this.stopped = false;
    const resend: Array<[number, number]> = [];
    this.sentSeq.forEach((s, di) => { for (let b = 0; b < s.length; b++) if (s[b] === PENDING && b < this.cursor[di]!) resend.push([di, b]); });
    for (const [di, b] of resend) this.sendBlocks(di, [b], this.readBlock(di, b));
    this.loop = this.bulk().catch((e: Error) => this.bulkError(e));
  }

  private readBlock(di: number, b: number): Buffer {
    const buf = Buffer.allocUnsafe(BLOCK_SIZE);
    fs.readSync(this.guest.disks[di]!.fd!, buf, 0, BLOCK_SIZE, b * BLOCK_SIZE);
    return buf;
  }

  /** Called synchronously on every acknowledged guest write. */
  private onGuestWrite(di: number, block: number, data: Buffer): void {
    for (const w of this.verifying) if (w.di === di && block >= w.from && block < w.to) w.touched = true;
    if (this.state !== 'copying' && this.state !== 'synced' && this.state !== 'disconnected') return;
    if (block >= this.cursor[di]!) return; // the bulk copy has yet to reach it
    this.bytesMirrored += BLOCK_SIZE;
    if (this.target.kind === 'local') {
      // The bulk write of this block may still be in flight and land after this one: held back
      // until it has landed (bulkWrite), so the newer data wins.
      const w = this.inflight.find((r) => r.di === di && block >= r.from && block < r.to);
      if (w) { w.held.set(block, Buffer.from(data)); return; }
      try { this.localWrite(di, data, BLOCK_SIZE, block * BLOCK_SIZE); } catch (e) { this.fail(e as Error); }
      return;
    }
    if (!this.chan) { this.sentSeq[di]![block] = PENDING; return; }
    this.sendBlocks(di, [block], Buffer.from(data));
  }

  /** A buffered write to a local target; errors name the file (ENOSPC must say where). */
  private localWrite(di: number, buf: Buffer, len: number, pos: number): void {
    try {
      for (let done = 0; done < len;) {
        const n = fs.writeSync(this.localFds[di]!, buf, done, len - done, pos + done);
        if (n === 0) throw Object.assign(new Error('no progress'), { code: 'EIO' });
        done += n;
      }
    } catch (e) {
      throw this.targetError('writing', di, e);
    }
  }

  private targetError(what: string, di: number, e: unknown): Error {
    const path = (this.target.kind === 'local' ? this.target.paths[this.guest.disks[di]!.id] : undefined) ?? '?';
    return new Error(`${(e as NodeJS.ErrnoException).code ?? 'EIO'}: ${what} the copy of disk ${this.guest.disks[di]!.id} at ${path}: ${(e as Error).message}`);
  }

  /** Stops using disk `di`'s O_DIRECT fd (closed with the others: an operation may still hold it). */
  private noDirect(di: number): void {
    const fd = this.directFds[di];
    this.directFds[di] = null;
    if (fd != null) this.retiredFds.push(fd);
  }

  private closeDirect(): void {
    for (const fd of [...this.directFds, ...this.retiredFds]) if (fd != null) { try { fs.closeSync(fd); } catch { /* closed */ } }
    this.directFds = [];
    this.retiredFds = [];
  }

  /** Local target I/O off the event loop, through the O_DIRECT fd when there is one (`buf` aligned). */
  private async targetIo(op: 'read' | 'write', di: number, buf: Buffer, len: number, pos: number): Promise<void> {
    const dfd = this.directFds[di];
    if (dfd != null) {
      try { return await ioAll(op, dfd, buf, len, pos); } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        this.noDirect(di); // the device wants a coarser alignment: buffered from here on
      }
    }
    await ioAll(op, this.localFds[di]!, buf, len, pos);
  }

  /** The same, synchronous (a comparison that must happen within one tick). */
  private targetReadSync(di: number, buf: Buffer, len: number, pos: number): void {
    for (let done = 0; done < len;) {
      const dfd = this.directFds[di];
      let n: number;
      try {
        n = fs.readSync(dfd ?? this.localFds[di]!, buf, done, len - done, pos + done);
      } catch (e) {
        if (dfd == null || (e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        this.noDirect(di);
        continue;
      }
      if (n === 0) throw new Error(`the copy of disk ${this.guest.disks[di]!.id} is shorter than the disk`);
      done += n;
    }
  }

  /**
   * Local: writes a bulk chunk in the background. Until it has landed, guest writes to its
   * blocks are held (onGuestWrite); they go to the target in the tick the chunk completes.
   */
  private bulkWrite(di: number, buf: Buffer, start: number, n: number): Promise<void> {
    const w = { di, from: start, to: start + n, held: new Map<number, Buffer>() };
    this.inflight.push(w);
    const done = () => { this.inflight.splice(this.inflight.indexOf(w), 1); };
    const p = this.targetIo('write', di, buf, n * BLOCK_SIZE, start * BLOCK_SIZE).then(
      () => { done(); for (const [b, data] of w.held) this.localWrite(di, data, BLOCK_SIZE, b * BLOCK_SIZE); },
      (e: unknown) => { done(); throw this.targetError('writing', di, e); },
    );
    p.catch(() => undefined); // awaited by the copy loop; never an unhandled rejection meanwhile
    return p;
  }

  /** Queues one Blocks frame (order on the stream = order of the writes). */
  private sendBlocks(di: number, blocks: number[], data: Buffer, waitForDrain = false): Promise<void> | void {
    const chan = this.chan;
    if (!chan) {
      // Disconnected: remember what the target misses; resume() sends it.
      for (const b of blocks) this.sentSeq[di]![b] = PENDING;
      return;
    }
    const seq = ++this.seq;
    const meta = Buffer.allocUnsafe(12 + blocks.length * 8);
    meta.writeUInt32LE(blocks.length, 0);
    meta.writeUInt32LE(di, 4);
    meta.writeUInt32LE(seq, 8);
    blocks.forEach((b, k) => {
      meta.writeUInt32LE(b, 12 + k * 8);
      meta.writeUInt32LE(crc32(data.subarray(k * BLOCK_SIZE, (k + 1) * BLOCK_SIZE)) >>> 0, 16 + k * 8);
      this.sentSeq[di]![b] = seq;
    });
    const frame = [header(FrameType.Blocks, meta.length + data.length, crc32(meta)), meta, data];
    // Only the bulk copy waits for the socket to drain; mirrored guest writes just queue up
    // (in order) and the bulk copy's back-pressure bounds how far they can run ahead.
    if (waitForDrain) return writeAll(chan.sock, frame);
    if (!chan.sock.destroyed) for (const b of frame) chan.sock.write(b);
  }

  private onAck(seq: number): void {
    this.ackedSeq = Math.max(this.ackedSeq, seq);
    this.checkpointAt.forEach((list, di) => {
      while (list.length && list[0]![0] <= this.ackedSeq) this.ackedCursor[di] = list.shift()![1];
    });
    for (const w of this.ackWaiters.splice(0)) w();
  }

  private async bulk(): Promise<void> {
    if (this.target.kind === 'local') return this.bulkLocal();
    const buf = Buffer.allocUnsafe(CHUNK_BLOCKS * BLOCK_SIZE);
    for (let di = 0; di < this.guest.disks.length; di++) {
      const d = this.guest.disks[di]!;
      while (this.cursor[di]! < d.blocks) {
        if (this.stopped || this.state === 'disconnected' || this.state === 'failed') return;
        const start = this.cursor[di]!;
        const n = Math.min(CHUNK_BLOCKS, d.blocks - start);
        if (!(await this.pace(n))) return;
        // Read and queue in one tick: a guest write lands either before (and is in the chunk)
        // or after (and is mirrored behind it on the same stream, since the cursor moved past it).
        fs.readSync(d.fd!, buf, 0, n * BLOCK_SIZE, start * BLOCK_SIZE);
        this.cursor[di] = start + n;
        this.bytesCopied += n * BLOCK_SIZE;
        const blocks: number[] = [];
        const datas: Buffer[] = [];
        for (let k = 0; k < n; k++) {
          const blk = buf.subarray(k * BLOCK_SIZE, (k + 1) * BLOCK_SIZE);
          if (blk.equals(ZERO_BLOCK)) continue; // the target file starts sparse (zero)
          blocks.push(start + k);
          datas.push(Buffer.from(blk));
        }
        if (blocks.length === 0) {
          // Nothing to send; the checkpoint moves once everything before it is acknowledged.
          this.checkpointAt[di]!.push([this.seq, start + n]);
          if (this.seq <= this.ackedSeq) this.onAck(this.ackedSeq);
          await yieldNow();
          continue;
        }
        const p = this.sendBlocks(di, blocks, Buffer.concat(datas), true);
        this.checkpointAt[di]!.push([this.seq, start + n]);
        if (p) await p;
      }
    }
    // Synced means the target holds the whole bulk copy: wait for its acknowledgement.
    try { await this.drain(600_000); } catch { return; /* disconnected or failed: state says so */ }
    if (this.state === 'copying') this.state = 'synced';
  }

  /**
   * Bulk copy rate cap (storage moves churn disks: operators may want them gentle). The wait
   * comes before the read: the read and what follows it share one tick. False: stop copying.
   */
  private async pace(n: number): Promise<boolean> {
    if (this.maxBandwidth <= 0) return true;
    this.bucketAt = Math.max(this.bucketAt, performance.now() - 50) + ((n * BLOCK_SIZE) / this.maxBandwidth) * 1000;
    const wait = this.bucketAt - performance.now();
    if (wait > 1) await new Promise((r) => setTimeout(r, wait));
    return !(this.stopped || this.state !== 'copying' || (this.target.kind === 'remote' && !this.chan));
  }

  /**
   * Local bulk copy: each chunk is read (page cache, main thread) while the previous ones are
   * written (device, thread pool), so reading and writing overlap.
   */
  private async bulkLocal(): Promise<void> {
    const slots = Array.from({ length: WRITES_IN_FLIGHT }, () => ({ buf: alignedBuffer(LOCAL_CHUNK_BLOCKS * BLOCK_SIZE), write: null as Promise<void> | null }));
    const landed = async (slot: (typeof slots)[number]): Promise<void> => { const w = slot.write; slot.write = null; if (w) await w; };
    let k = 0;
    try {
      for (let di = 0; di < this.guest.disks.length; di++) {
        const d = this.guest.disks[di]!;
        while (this.cursor[di]! < d.blocks) {
          await yieldNow(); // the guest runs between chunks
          if (this.stopped || this.state !== 'copying') return;
          const n = Math.min(LOCAL_CHUNK_BLOCKS, d.blocks - this.cursor[di]!);
          if (!(await this.pace(n))) return;
          const slot = slots[k++ % slots.length]!;
          await landed(slot); // its buffer is free again (and a failed write stops the copy here)
          if (this.stopped || this.state !== 'copying') return;
          const start = this.cursor[di]!;
          const len = n * BLOCK_SIZE;
          // Read and move the cursor in one tick: a guest write lands either before (and is in
          // the chunk) or after (and is mirrored, held back while this chunk is in flight).
          fs.readSync(d.fd!, slot.buf, 0, len, start * BLOCK_SIZE);
          this.cursor[di] = start + n;
          this.bytesCopied += len;
          // The target was created sparse (all zero): a zero chunk is already there.
          if (!slot.buf.subarray(0, len).equals(ZERO_CHUNK.subarray(0, len))) slot.write = this.bulkWrite(di, slot.buf, start, n);
        }
      }
      for (const slot of slots) await landed(slot);
    } finally {
      // Nothing stays in flight once the loop ends (abort closes the fds after it).
      await Promise.allSettled(slots.map((sl) => sl.write));
    }
    const copiedAt = performance.now();
    // Synced means on the device (the old files go after the switch), as QEMU's mirror flushes
    // its target before it reports ready. In the thread pool: the guest keeps running.
    for (let di = 0; di < this.localFds.length; di++) {
      if (this.state !== 'copying') return;
      try { await new Promise<void>((resolve, reject) => fs.fdatasync(this.localFds[di]!, (e) => (e ? reject(e) : resolve()))); } catch (e) {
        throw this.targetError('flushing', di, e);
      }
    }
    if (this.state !== 'copying') return;
    this.state = 'synced';
    log(`bulk copy of ${(this.totalBytes / 2 ** 20).toFixed(0)} MiB in ${(copiedAt - this.startedAt).toFixed(0)} ms, flush ${(performance.now() - copiedAt).toFixed(0)} ms (${this.directFds.some((fd) => fd != null) ? 'O_DIRECT' : 'buffered'}); ${(this.bytesMirrored / 2 ** 20).toFixed(1)} MiB of guest writes mirrored so far`);
  }

  /** Remote: resolves once the target acknowledged everything sent so far. */
  async drain(timeoutMs = 30_000): Promise<void> {
    if (this.target.kind === 'local') return;
    const deadline = Date.now() + timeoutMs;
    while (this.ackedSeq < this.seq) {
      if (this.state === 'failed' || this.state === 'disconnected' || !this.chan) throw new Error(`disk mirror ${this.state}: ${this.error ?? ''}`);
      if (Date.now() > deadline) throw new Error('disk mirror did not drain in time');
      await new Promise<void>((r) => { this.ackWaiters.push(r); setTimeout(r, 100); });
    }
  }

  /**
   * Compares source and local target byte for byte, chunk by chunk, the target as the device
   * holds it (O_DIRECT). Both reads of a chunk run in the thread pool while the guest runs; its
   * writes go to both copies, and a chunk it wrote into meanwhile (or that differs) is compared
   * again within one tick. Returns the bytes compared per disk.
   */
  async verifyLocal(): Promise<Record<string, number>> {
    if (this.target.kind !== 'local') throw new Error('verifyLocal on a remote mirror');
    const size = VERIFY_BLOCKS * BLOCK_SIZE;
    const slots = Array.from({ length: VERIFY_IN_FLIGHT }, () => ({ a: alignedBuffer(size), b: alignedBuffer(size) }));
    type Chunk = { w: { di: number; from: number; to: number; touched: boolean }; slot: (typeof slots)[number]; done: Promise<unknown> };
    const pending: Chunk[] = [];
    const check = async (c: Chunk): Promise<void> => {
      try { await c.done; } finally { this.verifying.splice(this.verifying.indexOf(c.w), 1); }
      // From here to the end, one tick.
      if (this.state !== 'synced') throw new Error(`disk mirror became ${this.state} during the verification`);
      const { di, from, to } = c.w;
      const d = this.guest.disks[di]!;
      const n = (to - from) * BLOCK_SIZE;
      const { a, b } = c.slot;
      if (!c.w.touched && a.subarray(0, n).equals(b.subarray(0, n))) return;
      fs.readSync(d.fd!, a, 0, n, from * BLOCK_SIZE);
      this.targetReadSync(di, b, n, from * BLOCK_SIZE);
      if (!a.subarray(0, n).equals(b.subarray(0, n))) throw new Error(`copy of disk ${d.id} differs from the source at block ${from}..${to}`);
    };
    const compared: Record<string, number> = {};
    const t0 = performance.now();
    let k = 0;
    try {
      for (let di = 0; di < this.guest.disks.length; di++) {
        const d = this.guest.disks[di]!;
        for (let s = 0; s < d.blocks; s += VERIFY_BLOCKS) {
          if (pending.length === slots.length) await check(pending.shift()!);
          if (this.state !== 'synced') throw new Error(`disk mirror became ${this.state} during the verification`);
          const slot = slots[k++ % slots.length]!;
          const w = { di, from: s, to: Math.min(d.blocks, s + VERIFY_BLOCKS), touched: false };
          const n = (w.to - w.from) * BLOCK_SIZE;
          this.verifying.push(w);
          const done = Promise.all([ioAll('read', d.fd!, slot.a, n, s * BLOCK_SIZE), this.targetIo('read', di, slot.b, n, s * BLOCK_SIZE)]);
          done.catch(() => undefined); // awaited by check()
          pending.push({ w, slot, done });
        }
        compared[d.id] = d.blocks * BLOCK_SIZE;
      }
      while (pending.length) await check(pending.shift()!);
      log(`verified ${(Object.values(compared).reduce((x, y) => x + y, 0) / 2 ** 20).toFixed(0)} MiB byte for byte in ${(performance.now() - t0).toFixed(0)} ms`);
    } finally {
      await Promise.allSettled(pending.map((c) => c.done));
      this.verifying = [];
    }
    return compared;
  }

  /** Local: hands the target files over to the guest (the switch). Returns the new fds. */
  takeLocalFds(): number[] {
    const fds = this.localFds;
    this.localFds = [];
    this.closeDirect();
    this.state = 'switched';
    this.guest.onDiskWrite = undefined;
    return fds;
  }

  private fail(e: Error): void {
    if (this.state === 'aborted' || this.state === 'switched') return;
    this.state = 'failed';
    this.error = e.message;
    this.stopped = true;
    this.chan?.sock.destroy();
    for (const w of this.ackWaiters.splice(0)) w();
  }

  /** Stops mirroring and deletes local target files. The guest keeps its original disks. */
  async abort(): Promise<void> {
    this.stopped = true;
    if (this.state !== 'switched') this.state = 'aborted';
    this.guest.onDiskWrite = undefined;
    this.chan?.sock.destroy();
    this.chan = null;
    await this.loop.catch(() => undefined);
    for (const fd of this.localFds) { try { fs.closeSync(fd); } catch { /* closed */ } }
    this.localFds = [];
    this.closeDirect();
    if (this.target.kind === 'local') for (const p of Object.values(this.target.paths)) fs.rmSync(p, { force: true });
  }

  /** Remote, after the cutover: the mirror is broken, the source copy is about to go. */
  close(): void {
    this.stopped = true;
    this.guest.onDiskWrite = undefined;
    this.chan?.sock.end();
    this.chan = null;
  }
}
