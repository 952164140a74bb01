// The simulated guest: real memory (a Buffer of 4 KiB pages), real disk files, and a workload
// that keeps writing both while keeping a ledger *inside guest memory*. Because the ledger
// migrates with the memory it describes, a lost page or a lost disk write is caught by
// verify() on whichever host the VM ends up on.
import fs from 'node:fs';
import { PAGE_SIZE, BLOCK_SIZE, type VmSpec, type DeviceStateSummary } from '../../common/types.js';

const MAGIC = 0x56_4d_46_59; // "VMFY"
const POOL_SIZE = 1 << 20;

/** Deterministic incompressible pool: every page/block content is a slice of it plus a header. */
const POOL: Buffer = (() => {
  const b = Buffer.allocUnsafe(POOL_SIZE);
  let x = 0x9e3779b9 >>> 0;
  for (let i = 0; i < POOL_SIZE; i += 4) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  return b;
})();

/** Writes the content that (kind, index, generation) must have into dst. */
export function fillPattern(dst: Buffer, kind: number, index: number, gen: number, compressible = 0): void {
  dst.writeUInt32LE(MAGIC, 0);
  dst.writeUInt32LE(kind, 4);
  dst.writeUInt32LE(index, 8);
  dst.writeUInt32LE(gen, 12);
  const off = (Math.imul(index, 2654435761) + Math.imul(gen, 40503)) >>> 0;
  const start = (off % (POOL_SIZE - PAGE_SIZE)) & ~7;
  // The tail fraction `compressible` of the page is one repeated byte (like text or sparse data).
  const plain = compressible > 0 ? 16 + Math.floor((dst.length - 16) * (1 - Math.min(1, compressible))) : dst.length;
  POOL.copy(dst, 16, start, start + plain - 16);
  if (plain < dst.length) dst.fill((index + gen) & 0xff, plain);
}

export interface DeviceState extends DeviceStateSummary {
  /** Workload PRNG state: the workload continues exactly where it stopped. */
  rng: number;
  throttle: number;
}

export interface GuestDisk {
  id: string;
  path: string;
  blocks: number;
  fd: number | null;
}

/**
 * Memory layout: page 0 header; then the memory ledger (u32 generation per page); then one
 * disk ledger per disk (u32 sequence per block); the rest are data pages.
 */
export class Guest {
  readonly memory: Buffer;
  readonly pages: number;
  readonly dirty: Uint8Array;
  dirtyCount = 0;
  readonly dataStart: number;
  private readonly memLedgerOff: number;
  private readonly diskLedgerOff: number[] = [];
  readonly disks: GuestDisk[];
  state: DeviceState = { vcpuTicks: 0, memWrites: 0, diskWrites: 0, rng: 0x1234567, throttle: 0 };
  private scratch = Buffer.allocUnsafe(PAGE_SIZE);
  private memCredit = 0;
  private diskCredit = 0;
  /** Pages that turned dirty since the counter was last reset (dirty-rate measurement). */
  dirtiedSinceMark = 0;

  constructor(readonly spec: VmSpec, diskPaths: Record<string, string>, touch = true) {
    this.pages = Math.floor(spec.memoryBytes / PAGE_SIZE);
    // A booting guest touches every page now: first-touch faults must not land in a migration's
    // downtime. An incoming guest skips it (it would cost ~1 s/GiB before the first page can
    // arrive); its pages are faulted in during pre-copy, just ahead of the pages arriving, by a
    // worker thread (prefault.ts): so its memory lives in a SharedArrayBuffer.
    this.memory = touch ? Buffer.alloc(this.pages * PAGE_SIZE) : Buffer.from(new SharedArrayBuffer(this.pages * PAGE_SIZE));
    if (touch) this.memory.fill(0);
    this.dirty = new Uint8Array(this.pages);
    let off = PAGE_SIZE;
    this.memLedgerOff = off;
    off += this.pages * 4;
    this.disks = spec.disks.map((d) => ({ id: d.id, path: diskPaths[d.id]!, blocks: Math.floor(d.sizeBytes / BLOCK_SIZE), fd: null }));
    for (const d of this.disks) {
      this.diskLedgerOff.push(off);
      off += d.blocks * 4;
    }
    this.dataStart = Math.ceil(off / PAGE_SIZE);
    if (this.dataStart >= this.pages) throw new Error(`memory ${spec.memoryBytes} too small for its ledgers`);
  }

  /** First boot: header and initial fill. */
  format(): void {
    this.memory.writeUInt32LE(MAGIC, 0);
    this.memory.writeUInt32LE(this.pages, 4);
    const n = Math.floor((this.pages - this.dataStart) * Math.min(1, Math.max(0, this.spec.fill)));
    for (let i = 0; i < n; i++) this.writePage(this.dataStart + i);
    const df = Math.min(1, Math.max(0, this.spec.diskFill ?? 0));
    this.disks.forEach((d, di) => {
      for (let b = 0; b < Math.floor(d.blocks * df); b++) this.writeBlock(di, b);
    });
    this.markAllClean();
  }

  openDisks(): void {
    for (const d of this.disks) if (d.fd === null) d.fd = fs.openSync(d.path, 'r+');
  }

  closeDisks(): void {
    for (const d of this.disks) if (d.fd !== null) { fs.closeSync(d.fd); d.fd = null; }
  }

  markAllClean(): void {
    this.dirty.fill(0);
    this.dirtyCount = 0;
  }

  /** Every page dirty (a first pre-copy round); not the guest's doing, so not in its dirty rate. */
  markAllDirty(): void {
    this.dirty.fill(1);
    this.dirtyCount = this.pages;
    this.dirtiedSinceMark = 0;
  }

  markDirty(page: number): void {
    // Counts clean → dirty transitions: the rate that decides convergence (as QEMU measures it).
    if (this.dirty[page] === 0) { this.dirty[page] = 1; this.dirtyCount++; this.dirtiedSinceMark++; }
  }

  private nextRandom(): number {
    let x = this.state.rng;
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    this.state.rng = x;
    return x;
  }

  private ledgerSet(off: number, index: number, value: number): void {
    this.memory.writeUInt32LE(value, off + index * 4);
    this.markDirty(Math.floor((off + index * 4) / PAGE_SIZE));
  }

  private writePage(page: number): void {
    const gen = this.memory.readUInt32LE(this.memLedgerOff + page * 4) + 1;
    fillPattern(this.memory.subarray(page * PAGE_SIZE, (page + 1) * PAGE_SIZE), 1, page, gen, this.spec.compressible);
    this.markDirty(page);
    this.ledgerSet(this.memLedgerOff, page, gen);
    this.state.memWrites++;
  }

  writeBlock(diskIndex: number, block: number): void {
    const d = this.disks[diskIndex]!;
    if (d.fd === null) throw new Error(`disk ${d.id} is not open for writing`);
    const seq = this.memory.readUInt32LE(this.diskLedgerOff[diskIndex]! + block * 4) + 1;
    fillPattern(this.scratch, 2 + diskIndex, block, seq);
    fs.writeSync(d.fd, this.scratch, 0, BLOCK_SIZE, block * BLOCK_SIZE);
    // The write is acknowledged: only now does the guest record it.
    this.ledgerSet(this.diskLedgerOff[diskIndex]!, block, seq);
    this.state.diskWrites++;
    this.onDiskWrite?.(diskIndex, block, this.scratch);
  }

  /** Hook for I/O mirroring (storage migration): every acknowledged write is seen here. */
  onDiskWrite?: (diskIndex: number, block: number, data: Buffer) => void;

  /** Runs the workload for `ms` milliseconds of guest time at the configured rates. */
  step(ms: number): void {
    const speed = 1 - this.state.throttle;
    this.state.vcpuTicks += Math.round(ms * speed);
    this.memCredit += (this.spec.dirtyRate * speed * ms) / 1000 / PAGE_SIZE;
    this.diskCredit += (this.spec.writeRate * speed * ms) / 1000 / BLOCK_SIZE;
    const dataPages = this.pages - this.dataStart;
    while (this.memCredit >= 1) {
      this.memCredit -= 1;
      this.writePage(this.dataStart + (this.nextRandom() % dataPages));
    }
    if (this.disks.length === 0) { this.diskCredit = 0; return; }
    while (this.diskCredit >= 1) {
      this.diskCredit -= 1;
      const di = this.nextRandom() % this.disks.length;
      this.writeBlock(di, this.nextRandom() % this.disks[di]!.blocks);
    }
  }

  verify(): Array<{ name: string; ok: boolean; detail: string }> {
    const checks: Array<{ name: string; ok: boolean; detail: string }> = [];
    const header = this.memory.readUInt32LE(0) === MAGIC && this.memory.readUInt32LE(4) === this.pages;
    checks.push({ name: 'memory-header', ok: header, detail: header ? 'guest memory header intact' : 'guest memory header corrupt' });
    const expect = Buffer.allocUnsafe(PAGE_SIZE);
    const zero = Buffer.alloc(PAGE_SIZE);
    let bad = 0, written = 0, firstBad = -1;
    for (let p = this.dataStart; p < this.pages; p++) {
      const gen = this.memory.readUInt32LE(this.memLedgerOff + p * 4);
      const actual = this.memory.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      let ok: boolean;
      if (gen === 0) ok = actual.equals(zero);
      else { written++; fillPattern(expect, 1, p, gen, this.spec.compressible); ok = actual.equals(expect); }
      if (!ok) { bad++; if (firstBad < 0) firstBad = p; }
    }
    checks.push({ name: 'memory-ledger', ok: bad === 0, detail: bad === 0 ? `${written} written pages match the guest ledger` : `${bad} pages disagree with the ledger (first: page ${firstBad})` });
    this.disks.forEach((d, di) => {
      const fd = d.fd ?? fs.openSync(d.path, 'r');
      let badB = 0, acked = 0, firstB = -1;
      try {
        for (let b = 0; b < d.blocks; b++) {
          const seq = this.memory.readUInt32LE(this.diskLedgerOff[di]! + b * 4);
          if (seq === 0) continue;
          acked++;
          fs.readSync(fd, this.scratch, 0, BLOCK_SIZE, b * BLOCK_SIZE);
          fillPattern(expect, 2 + di, b, seq);
          if (!this.scratch.equals(expect)) { badB++; if (firstB < 0) firstB = b; }
        }
      } finally {
        if (d.fd === null) fs.closeSync(fd);
      }
      checks.push({ name: `disk-${d.id}-ledger`, ok: badB === 0, detail: badB === 0 ? `${acked} acknowledged blocks present in ${d.path}` : `${badB} acknowledged writes missing (first: block ${firstB}) in ${d.path}` });
    });
    return checks;
  }

  isZeroPage(page: number): boolean {
    const s = page * PAGE_SIZE;
    // Fast path on the first word before a full compare.
    if (this.memory.readUInt32LE(s) !== 0) return false;
    return this.memory.subarray(s, s + PAGE_SIZE).equals(ZERO_PAGE);
  }
}

export const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);
