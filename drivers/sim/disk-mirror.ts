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
const ZERO_BLOCK = Buffer.alloc(BLOCK_SIZE);
const ZERO_CHUNK = Buffer.alloc(CHUNK_BLOCKS * BLOCK_SIZE);
const VERIFY_BLOCKS = 1024; // 4 MiB per compared chunk
const PENDING = 0xffff_ffff; // written while disconnected: must be sent

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
  private loop: Promise<void> = Promise.resolve();
  private stopped = false;
  private ackWaiters: Array<() => void> = [];

  private bucketAt = performance.now();

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
      }
    } else {
      await this.connect(this.target.token);
    }
    this.guest.onDiskWrite = (di, block, data) => this.onGuestWrite(di, block, data);
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
    if (this.state !== 'copying' && this.state !== 'synced' && this.state !== 'disconnected') return;
    if (block >= this.cursor[di]!) return; // the bulk copy has yet to reach it
    this.bytesMirrored += BLOCK_SIZE;
    if (this.target.kind === 'local') {
      try { this.localWrite(di, data, BLOCK_SIZE, block * BLOCK_SIZE); } catch (e) { this.fail(e as Error); }
      return;
    }
    if (!this.chan) { this.sentSeq[di]![block] = PENDING; return; }
    this.sendBlocks(di, [block], Buffer.from(data));
  }

  /** A write to a local target; errors name the file (ENOSPC must say where). */
  private localWrite(di: number, buf: Buffer, len: number, pos: number): void {
    try {
      fs.writeSync(this.localFds[di]!, buf, 0, len, pos);
    } catch (e) {
      const path = this.target.kind === 'local' ? this.target.paths[this.guest.disks[di]!.id] : '?';
      throw new Error(`${(e as NodeJS.ErrnoException).code ?? 'EIO'}: writing the copy of disk ${this.guest.disks[di]!.id} at ${path}: ${(e as Error).message}`);
    }
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
    const buf = Buffer.allocUnsafe(CHUNK_BLOCKS * BLOCK_SIZE);
    for (let di = 0; di < this.guest.disks.length; di++) {
      const d = this.guest.disks[di]!;
      while (this.cursor[di]! < d.blocks) {
        if (this.stopped || this.state === 'disconnected' || this.state === 'failed') return;
        const start = this.cursor[di]!;
        const n = Math.min(CHUNK_BLOCKS, d.blocks - start);
        if (this.maxBandwidth > 0) {
          // Bulk copy rate cap (storage moves churn disks: operators may want them gentle).
          // The wait comes before the read: read and send must share one tick (below).
          this.bucketAt = Math.max(this.bucketAt, performance.now() - 50) + ((n * BLOCK_SIZE) / this.maxBandwidth) * 1000;
          const wait = this.bucketAt - performance.now();
          if (wait > 1) await new Promise((r) => setTimeout(r, wait));
          if (this.stopped || this.state !== 'copying' || (this.target.kind === 'remote' && !this.chan)) return;
        }
        // Read and queue in one tick: a guest write lands either before (and is in the chunk)
        // or after (and is mirrored behind it on the same stream, since the cursor moved past it).
        fs.readSync(d.fd!, buf, 0, n * BLOCK_SIZE, start * BLOCK_SIZE);
        this.cursor[di] = start + n;
        this.bytesCopied += n * BLOCK_SIZE;
        if (this.target.kind === 'local') {
          // The target was created sparse (all zero): a zero chunk is already there. (A guest
          // write to it before this tick is in the chunk; one after is mirrored.)
          if (!buf.subarray(0, n * BLOCK_SIZE).equals(ZERO_CHUNK.subarray(0, n * BLOCK_SIZE))) this.localWrite(di, buf, n * BLOCK_SIZE, start * BLOCK_SIZE);
          await yieldNow();
          continue;
        }
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
    if (this.target.kind === 'remote') {
      try { await this.drain(600_000); } catch { return; /* disconnected or failed: state says so */ }
    }
    if (this.state === 'copying') this.state = 'synced';
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
   * Compares source and local target byte for byte, chunk by chunk, each chunk within one tick;
   * the guest runs between chunks (its writes go to both copies, so every chunk compares as of
   * its own tick). Returns the bytes compared per disk.
   */
  async verifyLocal(): Promise<Record<string, number>> {
    if (this.target.kind !== 'local') throw new Error('verifyLocal on a remote mirror');
    const a = Buffer.allocUnsafe(VERIFY_BLOCKS * BLOCK_SIZE);
    const b = Buffer.allocUnsafe(VERIFY_BLOCKS * BLOCK_SIZE);
    const compared: Record<string, number> = {};
    for (let di = 0; di < this.guest.disks.length; di++) {
      const d = this.guest.disks[di]!;
      for (let s = 0; s < d.blocks; s += VERIFY_BLOCKS) {
        if (this.state !== 'synced') throw new Error(`disk mirror became ${this.state} during the verification`);
        const n = Math.min(VERIFY_BLOCKS, d.blocks - s) * BLOCK_SIZE;
        fs.readSync(d.fd!, a, 0, n, s * BLOCK_SIZE);
        fs.readSync(this.localFds[di]!, b, 0, n, s * BLOCK_SIZE);
        if (!a.subarray(0, n).equals(b.subarray(0, n))) throw new Error(`copy of disk ${d.id} differs from the source at block ${s}..${s + n / BLOCK_SIZE}`);
        await yieldNow();
      }
      compared[d.id] = d.blocks * BLOCK_SIZE;
    }
    return compared;
  }

  /** Local: hands the target files over to the guest (the switch). Returns the new fds. */
  takeLocalFds(): number[] {
    const fds = this.localFds;
    this.localFds = [];
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
