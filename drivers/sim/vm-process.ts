// One simulated VM = one OS process (like a qemu process under libvirtd). It owns the guest
// memory, disks and workload, answers probes, and runs its own migration jobs: the source
// streams pages straight to the destination VM process (no relay hop), as QEMU does.
// Usage: vm-process <runtime-dir>   (reads <runtime-dir>/vm.json)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import tls from 'node:tls';
import dgram from 'node:dgram';
import zlib from 'node:zlib';
import { setTimeout as sleep } from 'node:timers/promises';
import { Guest, ZERO_PAGE, type DeviceState } from './guest.js';
import { serveControl } from './control.js';
import { assertOwner, readOwner, updateOwner, writeOwner, FencedError } from './ownership.js';
import { DiskMirror, type MirrorTarget } from './disk-mirror.js';
import { Prefaulter, onHugePagesNow } from './prefault.js';
import { PlacingReader } from '../../dataplane/placing-reader.js';
import { PAGE_SIZE, type VmSpec, type VmState, type MigrationPolicy, type ProgressSample, type CutoverResult, type DiskMirrorStatus } from '../../common/types.js';
import { sendBufferSize } from '../../dataplane/send-buffer.js';
import { FrameChannel, FrameType, FrameFlag, header, jsonFrame, writeAll, crc32, joinPrefix, ZERO_FLAG, parseJson, type Frame } from '../../dataplane/frames.js';
import { connectDataPlane, acceptSecure, dataPlaneTlsFromEnv, secureContextFor, type GrantCheck, type Hello } from '../../dataplane/endpoint.js';
import { faultAt, faultPoint } from '../../common/faults.js';
import { nextThrottle } from '../../workflows/decide.js';

export interface VmRuntimeConfig {
  spec: VmSpec;
  host: string;
  mode: 'boot' | 'incoming';
  epoch: number;
  diskPaths: Record<string, string>;
  ownerPath: string;
  migrationId?: string;
  /** The ownership record lives on storage both hosts read (it arbitrates a lost handoff). */
  sharedOwner?: boolean;
  /** The host asks for huge pages (host.json `hugepages`): the agent also sets glibc.malloc.hugetlb=2 for this process. */
  hugepages?: boolean;
}

export interface VmStatus {
  name: string;
  host: string;
  pid: number;
  state: VmState;
  epoch: number;
  migrationId?: string;
  role?: 'source' | 'destination';
  incoming?: { state: string; bytesReceived: number; pagesReceived: number; error?: string };
  outgoing?: { state: string; round: number; bytesSent: number; error?: string };
  mirror?: DiskMirrorStatus & { migrationId: string };
  device: DeviceState;
  startedAt: string;
  /** Set on a `status` call with unlessIncoming: this process held it until a change (or waitMs). */
  waitHonoured?: boolean;
  /**
   * On a host with `hugepages`: whether the guest's memory did come from the huge-page pool
   * (glibc falls back to 4 KiB pages, silently, when the pool is short). Known once it runs.
   */
  hugePages?: boolean;
}

/**
 * A spare: modules loaded (most of a VM's start time, under tsx), no VM yet. The agent keeps one
 * waiting and sends it the runtime directory when it needs a VM; a spare whose agent goes away
 * has nothing to keep and exits.
 */
function adoption(): Promise<string> {
  return new Promise((resolve) => {
    const onDisconnect = (): void => process.exit(0);
    const onMessage = (m: { type?: string; dir?: string }): void => {
      if (m?.type !== 'adopt' || typeof m.dir !== 'string') return;
      process.off('message', onMessage);
      process.off('disconnect', onDisconnect);
      resolve(path.resolve(m.dir));
    };
    process.on('message', onMessage);
    process.once('disconnect', onDisconnect);
    process.send?.({ type: 'spare-ready' });
  });
}

/** The host's data-plane TLS material, parsed while idle (a spare before adoption, a VM at boot), not in a migration. */
function warmTls(): void {
  try { const t = dataPlaneTlsFromEnv(); if (t) secureContextFor(t); } catch { /* the migration will report it */ }
}
/** Binds and closes a UDP socket: Node loads its resolver on the first bind in a process (~3-8 ms). */
async function bindUdpOnce(): Promise<void> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => { s.once('error', () => resolve()); s.bind(0, '127.0.0.1', () => resolve()); });
  s.close();
}
/**
 * A spare's idle moments, spent on what adoption would otherwise pay on the migration's path
 * (the destination prepares while the source waits to connect): the first UDP socket (the
 * guest probe's, bound at the resume) and the first listening socket (the control socket).
 * Measured at adoption without it: 3-8 ms for the switch-over warm-up, 2-7 ms for the control socket.
 */
async function warmSpare(): Promise<void> {
  warmTls();
  await bindUdpOnce();
  const sock = path.join(os.tmpdir(), `.vmferry-spare-${process.pid}.sock`);
  const server = net.createServer();
  await new Promise<void>((resolve) => { server.once('error', () => resolve()); server.listen(sock, () => resolve()); });
  await new Promise<void>((resolve) => server.close(() => resolve()));
  fs.rmSync(sock, { force: true });
}
if (process.argv[2] === '--spare') await warmSpare().catch(() => undefined);
const runtimeDir = process.argv[2] === '--spare' ? await adoption() : path.resolve(process.argv[2] ?? '.');
if (process.argv[2] !== '--spare') setImmediate(warmTls);
const cfg = JSON.parse(fs.readFileSync(path.join(runtimeDir, 'vm.json'), 'utf8')) as VmRuntimeConfig;
const statePath = path.join(runtimeDir, 'state.json');
const controlPath = path.join(runtimeDir, 'control.sock');
const ZERO_CRC = crc32(ZERO_PAGE) >>> 0;
const BATCH = 64;

const guest = new Guest(cfg.spec, cfg.diskPaths, cfg.mode === 'boot');
let state: VmState = cfg.mode === 'incoming' ? 'incoming' : 'paused';
let epoch = cfg.epoch;
let migrationId = cfg.migrationId;
const sharedOwner = cfg.sharedOwner ?? false;
const startedAt = new Date().toISOString();
/** See reportMemoryBacking. */
let hugePages: boolean | undefined;
let workloadTimer: NodeJS.Timeout | null = null;
let probeSock: dgram.Socket | null = null;

function log(msg: string): void {
  process.stdout.write(`${new Date().toISOString()} [vm ${cfg.spec.name}@${cfg.host}] ${msg}\n`);
}

function persist(): void {
  const st: VmStatus = status();
  const tmp = statePath + '.tmp';
  fs.writeFileSync(tmp, JSON.stringify(st, null, 2));
  fs.renameSync(tmp, statePath);
  for (const w of statusWaiters.splice(0)) w();
}

/** Calls of `status` held until the next state change (every change is persisted). */
const statusWaiters: Array<() => void> = [];
/** The incoming state as the agent's incomingStatus reports it. */
const incomingView = (): string => (state === 'running' ? 'running' : incoming?.state ?? state);

/**
 * With `unlessIncoming`, answers once the incoming state differs from it, or after waitMs, and
 * says so (`waitHonoured`: a VM process of an older version answers at once, without it, and the
 * agent then paces its calls itself).
 */
async function awaitStatus(p: { waitMs?: unknown; unlessIncoming?: unknown }): Promise<VmStatus> {
  const waitMs = Math.min(Number(p.waitMs) || 0, 10_000);
  if (typeof p.unlessIncoming !== 'string' || waitMs <= 0) return status();
  if (incomingView() === p.unlessIncoming) {
    let timer: NodeJS.Timeout | undefined;
    let wake: (() => void) | undefined;
    await new Promise<void>((resolve) => { wake = resolve; statusWaiters.push(resolve); timer = setTimeout(resolve, waitMs); });
    clearTimeout(timer);
    // Timed out: drop the waiter (supervision asks again every second for hours).
    const i = statusWaiters.indexOf(wake!);
    if (i >= 0) statusWaiters.splice(i, 1);
  }
  return { ...status(), waitHonoured: true };
}

/**
 * Bytes a transfer moves between two collections before one is worth its cost again: what TLS
 * leaves on the heap grows with the bytes (a buffer per 16 KiB record), not with time.
 */
const GC_AFTER_BYTES = 4 << 20;
let lastCollection: { job: object; moved: number } | null = null;
/**
 * Frees now what the transfer left on the heap, so that no collection falls inside the pause
 * (--expose-gc); not again in the same job if fewer than GC_AFTER_BYTES moved since (`moved`:
 * the job's bytes sent or received so far).
 * `major`: a full collection, for a transfer that leaves garbage with every byte (TLS records,
 * deflate); ~10-20 ms here. Otherwise (plaintext, pages read into and sent from guest memory)
 * the heap holds little (1 GiB moved: 1.2 MiB freed on the source, 4 MiB on the destination),
 * yet a full collection took 20-37 ms at the pre-settle, where the control plane takes the
 * cutover decision on the same cores: a minor one (young generation, well under 1 ms) then.
 */
const collectGarbage = (job: object, moved: number, major: boolean): void => {
  if (lastCollection?.job === job && moved - lastCollection.moved < GC_AFTER_BYTES) return;
  (globalThis as { gc?: (o?: { type: 'minor' | 'major' }) => void }).gc?.({ type: major ? 'major' : 'minor' });
  lastCollection = { job, moved };
};
/** The source's transfer leaves garbage per byte: TLS records, or deflate's buffers. */
const heapHeavy = (o: Outgoing): boolean => o.chan.sock instanceof tls.TLSSocket || o.policy.compression === 'deflate';

function status(): VmStatus {
  return {
    name: cfg.spec.name,
    host: cfg.host,
    pid: process.pid,
    state,
    epoch,
    migrationId,
    role: outgoing ? 'source' : cfg.mode === 'incoming' ? 'destination' : undefined,
    incoming: incoming ? { state: incoming.state, bytesReceived: incoming.bytes, pagesReceived: incoming.pages, error: incoming.error } : undefined,
    outgoing: outgoing ? { state: outgoing.state, round: outgoing.round, bytesSent: outgoing.bytesSent, error: outgoing.error } : undefined,
    mirror: mirror ? { migrationId: mirror.migrationId, ...mirror.status() } : undefined,
    device: { ...guest.state },
    startedAt,
    ...(hugePages !== undefined ? { hugePages } : {}),
  };
}

/**
 * On a host that asks for huge pages (cfg.hugepages; glibc.malloc.hugetlb=2), says whether the
 * guest got them: nothing else would tell, and receiving 1 GiB into untouched memory takes
 * ~0.6 s on 4 KiB pages against ~0.1 s from the pool here. Read once the guest runs (booted, or
 * resumed here, half a second after the resume), never inside a migration's path.
 */
function reportMemoryBacking(): void {
  if (!cfg.hugepages) return;
  hugePages = onHugePagesNow(cfg.spec.memoryBytes);
  log(hugePages
    ? 'guest memory on reserved huge pages'
    : `guest memory on 4 KiB pages: this host asks for huge pages (host.json hugepages), but its pool could not hold ${cfg.spec.memoryBytes} bytes (see HugePages_Free in /proc/meminfo)`);
  persist();
}

// ---------- running / paused ----------

async function bindProbe(): Promise<void> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const s = dgram.createSocket('udp4');
    s.on('message', (msg, rinfo) => { if (state === 'running') s.send(msg, rinfo.port, rinfo.address); });
    try {
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.bind(cfg.spec.probe.port, cfg.spec.probe.address, () => { s.off('error', reject); resolve(); });
      });
      s.on('error', (e) => log(`probe socket error: ${e.message}`));
      probeSock = s;
      return;
    } catch (e) {
      s.close();
      if ((e as NodeJS.ErrnoException).code !== 'EADDRINUSE') throw e;
      await sleep(2);
    }
  }
  throw new Error(`probe address ${cfg.spec.probe.address}:${cfg.spec.probe.port} stays in use`);
}

function unbindProbe(): void {
  probeSock?.close();
  probeSock = null;
}

async function run(opts: { persist?: boolean; claimed?: boolean } = {}): Promise<void> {
  // (claimed: this process just made itself the owner, under the lock: no need to read it back.)
  if (!opts.claimed) assertOwner(cfg.ownerPath, cfg.host, epoch);
  guest.openDisks();
  state = 'running';
  await bindProbe();
  let last = performance.now();
  workloadTimer = setInterval(() => {
    const now = performance.now();
    workloadOwed = Math.min(100, workloadOwed + (now - last));
    last = now;
    if (!workloadStepping) workloadSlice();
  }, 5);
  if (opts.persist !== false) persist();
}

/** Guest time (ms) the workload still has to run: it catches up on at most 100 ms. */
let workloadOwed = 0;
let workloadStepping = false;
/**
 * The guest runs what it is owed in slices of 2 ms of guest time, yielding to the event loop
 * between them: a guest that dirties memory as fast as its core allows keeps its rate, but
 * control calls (status, progress, cutover) and the sender are served between slices instead
 * of waiting behind one long catch-up step (measured before: status 13 ms median, 42 ms max).
 */
function workloadSlice(): void {
  if (state !== 'running' || workloadOwed <= 0) { workloadStepping = false; return; }
  workloadStepping = true;
  const ms = Math.min(2, workloadOwed);
  workloadOwed -= ms;
  guest.step(ms);
  setImmediate(workloadSlice);
}

function pause(opts: { persist?: boolean } = {}): void {
  if (workloadTimer) clearInterval(workloadTimer);
  workloadTimer = null;
  workloadOwed = 0; // a paused guest owes nothing (a slice still queued finds it paused)
  state = 'paused';
  unbindProbe();
  if (opts.persist !== false) persist();
}

/**
 * Runs, once and outside any downtime, the code paths the switch-over takes for the first time
 * inside it: a UDP bind (Node loads its resolver on the first one, ~3-8 ms) and the ownership
 * lock (exclusive create, read, remove). Cold, they added several ms to the pause.
 */
async function warmSwitchOverPath(): Promise<void> {
  await bindUdpOnce();
  const probe = path.join(path.dirname(cfg.ownerPath), `.warm.${process.pid}.lock`);
  try { fs.closeSync(fs.openSync(probe, 'wx')); readOwner(cfg.ownerPath); } catch { /* only warming */ } finally { fs.rmSync(probe, { force: true }); }
}

// ---------- outgoing memory job (source side) ----------

interface Outgoing {
  id: string;
  state: 'precopy' | 'stopping' | 'cutover' | 'done' | 'failed' | 'cancelled';
  /** Stream 0 (chan.sock): control frames, and its share of the pages. */
  chan: FrameChannel;
  /** Every stream's socket, stream 0 first (policy.streams; see streamOf). */
  socks: net.Socket[];
  /** Barriers sent so far (RoundEnd seq on every stream). */
  barrierSeq: number;
  /** verify 'sequence': the last Pages frame's sequence number (all streams). */
  sendSeq: number;
  policy: MigrationPolicy;
  round: number;
  bytesSent: number;
  pagesSent: number;
  startedAt: number;
  crcs: Uint32Array;
  samples: ProgressSample[];
  waiters: Array<() => void>;
  loop: Promise<void>;
  stop: boolean;
  /** Aborted by stopJob: ends the pre-copy loop's pause between small rounds at once. */
  stopped: AbortController;
  error?: string;
  cutover?: Promise<CutoverResult>;
  result?: CutoverResult;
  bucketAt: number;
  /** Set during cutover: the last dirty pages go out even though pre-copy was stopped. */
  finalFlush?: boolean;
  /** Throttle the cutover's tail raised the guest to (auto-converge after the decision), if it did. */
  tailThrottle?: number;
  /** The rounds before the pause, for its log line and CutoverResult.beforePause (see there). */
  tailRounds?: string[];
  /** bytesSent when the pre-settle barrier (see precopy) was acknowledged; once per job. */
  preSettledAt?: number;
  /** Bytes the frames would have had uncompressed, and CPU spent compressing (µs). */
  rawBytes: number;
  compressCpuUs: number;
  compressSkip: number;
  /**
   * Settles once the kernel has taken every frame written so far: the last frame's write
   * callback (callbacks run in write order, with an error if the socket is destroyed). Not
   * 'drain', which is only emitted after a write returned false: a short queue may never see one.
   * One per stream.
   */
  flushed: Array<Promise<void>>;
}
let outgoing: Outgoing | null = null;

// Page frames: up to FRAME_PAGES pages (1 MiB of data) each, written straight from guest
// memory (contiguous runs as one buffer, one writev per frame): no copy in this process. A
// page's CRC is taken when its frame is built; if the guest rewrites the page before the kernel
// has taken the bytes, that write re-dirtied the page, so it travels again, and the frame's Live
// flag tells the destination that such a mismatch is expected (see FrameFlag.Live). Frames sent
// while the guest is paused are exact.
const FRAME_PAGES = 256;
const HEADER = header(FrameType.Pages, 0, 0).length; // frame header bytes (dataplane/frames.ts)
/** Bytes queued in this process per connection before the sender waits (back-pressure). */
const QUEUE_BYTES = 8 << 20;
/**
 * Kernel send buffer of each memory stream when there are several and the destination is this
 * machine (the lab). Linux doubles it: 1 MiB per stream instead of autotuning's up to 4 MiB.
 * Measured with the engine alone, 1 GiB, 2 streams: 339–370 ms against 385–475 ms autotuned
 * (256 KiB: ~383 ms, 1 MiB: 415–464 ms). One stream is faster autotuned, so it keeps that.
 */
const MULTI_STREAM_SEND_BUFFER = 512 << 10;
/** The sender yields to the event loop (guest workload, probe, control) at least this often, ms. */
const YIELD_MS = 4;

/** True if the page at byte offset `off` of guest memory is all zeroes (no allocation). */
function pageIsZero(off: number): boolean {
  const m = guest.memory;
  if (m[off] !== 0 || m[off + 7] !== 0 || m[off + PAGE_SIZE - 1] !== 0) return false;
  return m.compare(ZERO_PAGE, 0, PAGE_SIZE, off, off + PAGE_SIZE) === 0;
}

/**
 * Back-pressure: resolves once the queue is below the high-water mark again (or the socket
 * closed). Only valid after a write returned false (then 'drain' is due), which any queue above
 * QUEUE_BYTES implies.
 */
function queueBelowMark(sock: net.Socket): Promise<void> {
  if (!sock.writableNeedDrain || sock.destroyed) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = (): void => { sock.off('drain', done); sock.off('close', done); resolve(); };
    sock.once('drain', done);
    sock.once('close', done);
  });
}

const yieldNow = (): Promise<void> => new Promise((r) => setImmediate(r));


/**
 * The stream that carries page p: guest memory in 1 MiB regions, dealt round-robin. A page
 * always travels on the same stream, so its copies arrive in the order they were sent (streams
 * are not ordered with one another); contiguous runs stay within one frame.
 */
const streamOf = (p: number, streams: number): number => (p >>> 8) % streams;

/**
 * Sends `pages` on their streams, all streams at once; stops early when asked to, or at `until`
 * (performance.now() time): pages not sent stay dirty for the next round.
 */
async function sendPages(o: Outgoing, pages: ArrayLike<number>, until = Infinity, skipZero = false): Promise<void> {
  const n = o.socks.length;
  if (n === 1) { await sendOn(o, 0, pages, until, skipZero); return; }
  const lists = byStream(pages, n);
  await Promise.all(lists.map((l, k) => (l.length > 0 ? sendOn(o, k, l, until, skipZero) : undefined)));
}

/** `pages` dealt to their streams (counted first: typed arrays, no per-page push). */
function byStream(pages: ArrayLike<number>, n: number): Int32Array[] {
  const counts = new Int32Array(n);
  for (let i = 0; i < pages.length; i++) counts[streamOf(pages[i]!, n)]!++;
  const lists = Array.from(counts, (c) => new Int32Array(c));
  const at = new Int32Array(n);
  for (let i = 0; i < pages.length; i++) {
    const p = pages[i]!, k = streamOf(p, n);
    lists[k]![at[k]!++] = p;
  }
  return lists;
}

/** Every page of guest memory, in order: round 0's list (262144 pages: 0.7–3.5 ms here, against ~11 ms with Array.from). */
function allPages(): Int32Array {
  const all = new Int32Array(guest.pages);
  for (let p = 0; p < all.length; p++) all[p] = p;
  return all;
}

/** Every frame written so far on every stream is in the kernel. */
const allFlushed = (o: Outgoing): Promise<unknown> => Promise.all(o.flushed);

/**
 * Writes barrier `seq` (a RoundEnd frame) on every stream but 0, after the pages already queued
 * there; stream 0 then names the seq in its own frame (RoundEnd with an Ack wanted, or Device),
 * and the destination handles that one only once every stream has applied up to its barrier.
 */
async function barrier(o: Outgoing): Promise<number> {
  const seq = ++o.barrierSeq;
  await Promise.all(o.socks.slice(1).map((s) => writeAll(s, [jsonFrame(FrameType.RoundEnd, { seq })])));
  return seq;
}

/** A barrier the destination acknowledges once every stream applied everything sent before it. */
async function acknowledgedBarrier(o: Outgoing): Promise<void> {
  const seq = await barrier(o);
  await writeAll(o.chan.sock, [jsonFrame(FrameType.RoundEnd, { barrier: true, seq })]);
  await o.chan.expect(FrameType.Ack, 60_000);
}

/** Most pages looked at for one frame when zero pages are skipped (a long zero stretch yields). */
const SCAN_PAGES = 16384;

/**
 * `skipZero` (round 0): a zero page is not sent at all, not even as a marker: the destination's
 * memory starts zeroed and both checksum tables start at the zero page's value. Its dirty bit is
 * cleared all the same, so a later guest write sends it.
 */
async function sendOn(o: Outgoing, stream: number, pages: ArrayLike<number>, until: number, skipZero = false): Promise<void> {
  const sock = o.socks[stream]!;
  const mem = guest.memory;
  const dirty = guest.dirty;
  const bySeq = o.policy.verify === 'sequence';
  let i = 0;
  let lastYield = performance.now();
  while (i < pages.length) {
    if (o.stop && !o.finalFlush) break;
    if (performance.now() > until) break;
    if (sock.destroyed || !sock.writable) throw new Error('data-plane connection closed');
    const live = state === 'running';
    // verify 'sequence': the index carries this frame's sequence number instead of page CRCs.
    const seqNo = bySeq ? (o.sendSeq = (o.sendSeq + 1) >>> 0 || 1) : 0;
    const full = Buffer.allocUnsafe(HEADER + 4 + Math.min(FRAME_PAGES, pages.length - i) * 8);
    const runs: Buffer[] = [];
    let data = 0;
    let runStart = -1, runEnd = -1; // contiguous run of guest memory
    let n = 0; // index entries in this frame
    for (const scanEnd = Math.min(pages.length, i + SCAN_PAGES); n < FRAME_PAGES && i < scanEnd; i++) {
      const p = pages[i]!;
      // Clear the dirty bit and read the page in the same tick: a later write re-dirties it.
      if (dirty[p]) { dirty[p] = 0; guest.dirtyCount--; }
      const off = p * PAGE_SIZE;
      const zero = pageIsZero(off);
      if (zero && skipZero) continue;
      const ix = HEADER + 4 + n++ * 8;
      let crc: number;
      if (zero) {
        full.writeUInt32LE((p | ZERO_FLAG) >>> 0, ix);
        crc = bySeq ? seqNo : ZERO_CRC;
      } else {
        full.writeUInt32LE(p, ix);
        crc = bySeq ? seqNo : crc32(mem.subarray(off, off + PAGE_SIZE)) >>> 0;
        if (off === runEnd) runEnd += PAGE_SIZE;
        else { if (runStart >= 0) runs.push(mem.subarray(runStart, runEnd)); runStart = off; runEnd = off + PAGE_SIZE; }
        data++;
      }
      full.writeUInt32LE(crc, ix + 4);
      o.crcs[p] = crc;
    }
    if (runStart >= 0) runs.push(mem.subarray(runStart, runEnd));
    if (n === 0) { await yieldNow(); lastYield = performance.now(); continue; } // only zero pages skipped
    const head = full.subarray(0, HEADER + 4 + n * 8);
    head.writeUInt32LE(n, HEADER);
    let flags = (live ? FrameFlag.Live : 0) | (bySeq ? FrameFlag.Seq : 0);
    let payload = runs;
    let dataLen = data * PAGE_SIZE;
    if (o.policy.compression === 'deflate' && data > 0 && o.compressSkip-- <= 0) {
      // Deflate level 1, kept only when it saves; memory that does not compress (saves < 10%)
      // is sent plain for the next 32 frames before trying again, so it costs little CPU.
      const c0 = process.cpuUsage();
      const z = zlib.deflateRawSync(runs.length === 1 ? runs[0]! : Buffer.concat(runs, dataLen), { level: 1 });
      const c = process.cpuUsage(c0);
      o.compressCpuUs += c.user + c.system;
      o.compressSkip = z.length > dataLen * 0.9 ? 32 : 0;
      if (z.length < dataLen) { payload = [z]; dataLen = z.length; flags |= FrameFlag.Deflate; }
    }
    const bodyLen = 4 + n * 8 + dataLen;
    head.writeUInt8(FrameType.Pages, 0);
    head.writeUInt8(flags, 1);
    head.writeUInt16LE(0, 2);
    head.writeUInt32LE(bodyLen, 4);
    head.writeUInt32LE(crc32(head.subarray(HEADER)) >>> 0, 8);
    const bufs = [head, ...payload];
    let written!: () => void;
    o.flushed[stream] = new Promise<void>((r) => { written = r; });
    sock.cork(); // one writev for the frame
    try { bufs.forEach((b, k) => sock.write(b, k === bufs.length - 1 ? () => written() : undefined)); } finally { sock.uncork(); }
    o.bytesSent += bodyLen + HEADER;
    o.rawBytes += HEADER + 4 + n * 8 + data * PAGE_SIZE;
    o.pagesSent += data;
    if (sock.writableLength > QUEUE_BYTES) await queueBelowMark(sock);
    if (o.policy.maxBandwidth > 0) {
      // Token bucket on wall time: sleep until the bytes sent so far are within the cap.
      o.bucketAt = Math.max(o.bucketAt, performance.now() - 50) + ((bodyLen + HEADER) / o.policy.maxBandwidth) * 1000;
      const wait = o.bucketAt - performance.now();
      if (wait > 1) { await sleep(wait); lastYield = performance.now(); }
    }
    if (performance.now() - lastYield > YIELD_MS) { await yieldNow(); lastYield = performance.now(); }
  }
}

function dirtyList(): number[] {
  // indexOf is a native scan: cheap over long clean stretches.
  const out: number[] = [];
  const d = guest.dirty;
  for (let p = d.indexOf(1); p >= 0; p = d.indexOf(1, p + 1)) out.push(p);
  return out;
}

/** Seconds between a sample and the pause it may trigger (workflow decision, round end). */
const DECISION_LAG_S = 0.03;
/** Cutover costs that do not depend on the dirty set (device state, handoff, resume), ms. */
const CUTOVER_FIXED_MS = 10;

/** A dirty set below this goes in the pause itself rather than in one more pre-pause round. */
const PRE_PAUSE_MIN_BYTES = 1 << 20;
/** Longest pre-copy round, ms (see precopy()). */
const ROUND_MAX_MS = 2000;
/** At most this many rounds between the cutover decision and the pause (see precopy()). */
const PRE_PAUSE_ROUNDS = 12;
/**
 * Barriers before the pause, and the dirty set small enough to stop at (see precopy()); up to
 * SETTLE_ROUNDS_MAX while auto-converge can still raise the throttle.
 */
const SETTLE_ROUNDS = 4;
const SETTLE_ROUNDS_MAX = 10;
const SETTLE_BYTES = 256 << 10;

/** Bytes and ms of pre-copy rounds so far: the job's link rate. */
const linkAccounts = new WeakMap<Outgoing, { bytes: number; ms: number }>();
function linkAccount(o: Outgoing): { bytes: number; ms: number } {
  let a = linkAccounts.get(o);
  if (!a) { a = { bytes: 0, ms: 0 }; linkAccounts.set(o, a); }
  return a;
}


async function precopy(o: Outgoing): Promise<void> {
  while (!o.stop) {
    const t0 = performance.now();
    const sentBefore = o.bytesSent;
    guest.dirtiedSinceMark = 0;
    let pages: ArrayLike<number>;
    if (o.round === 0) {
      // Every page dirty, so an interrupted first round leaves the rest for the next one; zero
      // pages are skipped as the round reaches them (sendOn's skipZero), not in a scan of all
      // memory beforehand: that scan read all memory once before the first byte went out.
      guest.markAllDirty();
      pages = allPages();
    } else {
      pages = dirtyList();
    }
    // A round ends after ROUND_MAX_MS at most (the rest stays dirty), so that the policy sees a
    // sample, and can throttle a guest that outruns the link, every few seconds even when one
    // pass over a large memory on a slow link takes much longer.
    await sendPages(o, pages, t0 + ROUND_MAX_MS, o.round === 0);
    if (o.stop) break; // interrupted: unsent pages are still dirty
    // Measure the link on bytes the kernel took, not bytes queued: a small round that only
    // filled the queue would otherwise promise a bandwidth (and a downtime) it never had.
    await allFlushed(o);
    const dt = Math.max(1, performance.now() - t0);
    const roundBytes = o.bytesSent - sentBefore;
    const acct = linkAccount(o);
    acct.bytes += roundBytes;
    acct.ms += dt;
    // Small rounds are dominated by fixed costs: the whole job's rate is the better estimate.
    const bw = roundBytes >= 4 << 20 ? (roundBytes / dt) * 1000 : acct.ms > 0 ? (acct.bytes / acct.ms) * 1000 : 0;
    const bandwidth = bw > 0 ? bw : o.samples.at(-1)?.bandwidth ?? 0;
    const dirtyRate = (guest.dirtiedSinceMark * PAGE_SIZE * 1000) / dt;
    o.round++;
    const sample: ProgressSample = {
      round: o.round,
      elapsedMs: Math.round(performance.now() - o.startedAt),
      bytesSent: o.bytesSent,
      pagesSent: o.pagesSent,
      dirtyPages: guest.dirtyCount,
      dirtyRate: Math.round(dirtyRate),
      bandwidth: Math.round(bandwidth),
      throttle: guest.state.throttle,
      // What the pause will carry: the dirty set now, plus what the guest dirties while the
      // decision travels, at the measured link rate; plus the cutover's fixed costs.
      expectedDowntimeMs: bandwidth > 0 ? Math.round(((guest.dirtyCount * PAGE_SIZE + dirtyRate * DECISION_LAG_S) * 1000) / bandwidth) + CUTOVER_FIXED_MS : 1e9,
      state: 'precopy',
    };
    o.samples.push(sample);
    if (o.samples.length > 64) o.samples.shift();
    for (const w of o.waiters.splice(0)) w();
    if (o.preSettledAt === undefined && !o.stop && sample.expectedDowntimeMs <= o.policy.downtimeLimitMs) {
      // The decision this sample travels to is likely a cutover. While it travels (the workflow's
      // task and the cutover's dispatch, ~30-50 ms here), both ends collect their garbage and
      // the destination catches up with a barrier: work the cutover's settle rounds would
      // otherwise do on its own path (~30-45 ms per move here). The guest still runs. Once per
      // job: a decision to go on leaves the settle rounds to do it again.
      await yieldNow(); // the progress reply goes out first
      const t1 = performance.now();
      collectGarbage(o, o.bytesSent, heapHeavy(o));
      await acknowledgedBarrier(o);
      o.preSettledAt = o.bytesSent;
      (o.tailRounds ??= []).push(`presettle/${Math.round(performance.now() - t1)}`);
      if (o.stop) break;
    }
    // Small dirty sets would spin; give the guest (and the decision) a moment. A stop ends the
    // moment at once: a cutover waited up to 20 ms here before its first tail round.
    const spent = performance.now() - t0;
    if (spent < 20 && !o.stop) await sleep(20 - spent, undefined, { signal: o.stopped.signal }).catch(() => undefined);
  }
  // Cutover is next (doCutover set 'stopping'; a rollback sets 'cancelled'): last rounds while
  // the guest still runs, so the pause carries only what it dirtied during the last one; and
  // frames still queued here reach the kernel before the pause. The guest kept dirtying while
  // the decision travelled to us (longer than DECISION_LAG_S on a busy control plane), so these
  // rounds go on, up to PRE_PAUSE_ROUNDS, until the dirty set fits the downtime limit at the
  // measured link rate; at least until it is under PRE_PAUSE_MIN_BYTES, up to three rounds.
  const acct = linkAccount(o);
  for (let k = 0; k < PRE_PAUSE_ROUNDS && o.state === 'stopping'; k++) {
    const list = dirtyList();
    const bytes = list.length * PAGE_SIZE;
    const rate = acct.ms > 0 ? (acct.bytes / acct.ms) * 1000 : 0;
    const fits = rate > 0 ? (bytes / rate) * 1000 + CUTOVER_FIXED_MS <= o.policy.downtimeLimitMs * 0.8 : bytes < PRE_PAUSE_MIN_BYTES;
    if (bytes < PRE_PAUSE_MIN_BYTES && fits) break;
    if (k >= 3 && fits) break;
    // Still too much after a round: the guest dirties faster than the sample behind the
    // decision said (it was starved of CPU for a while, say). Pausing with it would blow the
    // downtime limit, so auto-converge goes on here, two policy steps per round, as the rounds
    // left are few (reported in the cutover result, which the workflow's history keeps).
    if (k >= 1 && !fits && o.policy.autoConverge && guest.state.throttle < o.policy.throttleMax) {
      const from = guest.state.throttle;
      guest.state.throttle = nextThrottle(o.policy, nextThrottle(o.policy, from));
      o.tailThrottle = guest.state.throttle;
      log(`cutover tail ${o.id}: ${(bytes / 2 ** 20).toFixed(1)} MiB dirty does not fit ${o.policy.downtimeLimitMs} ms at ${(rate / 2 ** 20).toFixed(0)} MiB/s; throttle ${from} → ${guest.state.throttle}`);
    }
    o.finalFlush = true; // send through the stop request
    const t0 = performance.now();
    try { await sendPages(o, list); } finally { o.finalFlush = false; }
    await allFlushed(o);
    acct.bytes += bytes;
    acct.ms += performance.now() - t0;
    (o.tailRounds ??= []).push(`tail ${list.length}/${Math.round(performance.now() - t0)}`);
  }
  await allFlushed(o);
  // Barrier: the kernel having taken the bytes is not the destination having applied them
  // (socket buffers hold megabytes). Pausing before the destination caught up would put that
  // backlog inside the downtime; waiting here, with the guest still running, does not. What the
  // guest dirtied during that wait goes out next, with another barrier, until it is small: the
  // pause then carries only a few hundred KiB, a few ms (fewer lost packets for the guest).
  // With several streams the destination acknowledges once every stream reached the barrier.
  // A guest that dirties more than that in one barrier round never gets there by copying alone
  // (measured: 1434 pages left after four rounds, a 46 ms pause at a 40 ms limit): with
  // auto-converge on, a round that did not halve the dirty set raises the throttle one step,
  // for a few more rounds. The throttle ends with the migration (resume, or rollback).
  let prev = Infinity;
  // The source collects too, before the first barrier (see the destination's RoundEnd): its own
  // share of the pause went from 5-8.5 to 4-6 ms (A/B, 8 moves each, 1 GiB at 5% over TLS).
  collectGarbage(o, o.bytesSent, heapHeavy(o));
  for (let k = 0; k < SETTLE_ROUNDS_MAX && o.state === 'stopping'; k++) {
    const t0 = performance.now();
    let n = 0;
    // Nothing sent since the pre-settle barrier was acknowledged: the destination has applied
    // everything, as this round's barrier would prove again.
    if (k === 0 && o.preSettledAt === o.bytesSent) { (o.tailRounds ??= []).push('settle pre'); continue; }
    if (k > 0) {
      const list = dirtyList();
      n = list.length;
      const bytes = n * PAGE_SIZE;
      if (bytes <= SETTLE_BYTES) break;
      const canThrottle = o.policy.autoConverge && guest.state.throttle < o.policy.throttleMax;
      if (k >= SETTLE_ROUNDS && !canThrottle) break;
      if (k >= 2 && bytes > prev / 2 && canThrottle) {
        const from = guest.state.throttle;
        guest.state.throttle = nextThrottle(o.policy, from);
        o.tailThrottle = guest.state.throttle;
        log(`cutover settle ${o.id}: ${n} pages dirty after a barrier round (${Math.round(prev / PAGE_SIZE)} before); throttle ${from} → ${guest.state.throttle}`);
      }
      prev = bytes;
      o.finalFlush = true;
      try { await sendPages(o, list); } finally { o.finalFlush = false; }
      await allFlushed(o);
    }
    await acknowledgedBarrier(o);
    (o.tailRounds ??= []).push(`settle ${n}/${Math.round(performance.now() - t0)}`);
  }
}

/**
 * A startOutgoing still connecting: rollbackOutgoing of its migration cancels it; a retried
 * startOutgoing of the same migration (the agent restarted meanwhile) waits for its outcome.
 */
interface Connecting { id: string; cancelled: boolean; done?: Promise<{ started: boolean }> }
let connecting: Connecting | null = null;
/**
 * Migrations rolled back here (newest 64). With parallel start the rollback can overtake the
 * start it undoes (the destination refused while startOutgoing was still on its way): a start
 * that arrives after its rollback is refused instead of waiting for a grant that never comes.
 */
const rolledBack: string[] = [];

/**
 * Stream 0's connection. With `grantWaitMs` (parallel start) the destination may still be
 * preparing: its "no valid grant" refusal changes nothing there, so it is retried, briefly
 * spaced, until the grant exists or the wait is over. Any other refusal fails at once.
 */
async function connectFirst(job: Connecting & { attempts: number }, endpoint: { host: string; port: number }, hello: Hello, grantWaitMs: number, sockOpts: { loopbackSendBuffer?: number }): Promise<FrameChannel> {
  const deadline = performance.now() + grantWaitMs;
  // The destination holds a connection for a grant not issued yet (up to 2 s), so a retry is
  // needed only for a long preparation (e.g. waiting for a migration slot). After such a wait
  // the next attempt goes at once (no gap in which the grant could come unseen); a refusal that
  // came at once (the destination holds too many) backs off.
  for (let backoff = 50; ; backoff = Math.min(backoff * 2, 1000)) {
    job.attempts++;
    const t = performance.now();
    try {
      return await connectDataPlane(endpoint, hello, dataPlaneTlsFromEnv(), sockOpts);
    } catch (e) {
      if (job.cancelled || !/no valid grant/.test((e as Error).message) || performance.now() + 10 > deadline) throw e;
    }
    await sleep(performance.now() - t > 1000 ? 10 : backoff);
    if (job.cancelled) throw new Error(`migration ${job.id} was rolled back while connecting`);
  }
}

function startOutgoing(p: Parameters<typeof beginOutgoing>[0]): Promise<{ started: boolean }> {
  if (connecting?.id === p.migrationId && connecting.done) return connecting.done.then(() => ({ started: false }));
  const done = beginOutgoing(p);
  if (connecting?.id === p.migrationId) connecting.done = done;
  return done;
}

async function beginOutgoing(p: { migrationId: string; endpoint: { host: string; port: number }; token: string; policy: MigrationPolicy; grantWaitMs?: number }): Promise<{ started: boolean }> {
  if (outgoing && outgoing.id === p.migrationId && outgoing.state !== 'failed' && outgoing.state !== 'cancelled') return { started: false };
  if (outgoing && (outgoing.state === 'precopy' || outgoing.state === 'cutover' || outgoing.state === 'stopping')) throw new Error(`VM ${cfg.spec.name} is already migrating (${outgoing.id})`);
  if (connecting) throw new Error(`VM ${cfg.spec.name} is already connecting for migration ${connecting.id}`);
  if (rolledBack.includes(p.migrationId)) throw new Error(`migration ${p.migrationId} was rolled back before it started`);
  if (state !== 'running') throw new Error(`VM ${cfg.spec.name} is ${state}, not running`);
  const streams = p.policy.streams ?? 1;
  const hello = (stream: number): Hello => ({ migrationId: p.migrationId, vm: cfg.spec.name, token: p.token, kind: 'memory' as const, from: cfg.host, ...(streams > 1 ? { stream, streams } : {}) });
  const sockOpts = streams > 1 ? { loopbackSendBuffer: MULTI_STREAM_SEND_BUFFER } : {};
  const job: Connecting & { attempts: number; t0: number } = { id: p.migrationId, cancelled: false, attempts: 0, t0: performance.now() };
  connecting = job;
  // Migrating from now on, as the host's slot count sees it (the wait for a grant can be long).
  const before = migrationId; // a shared-nothing move set it already (the disk mirror)
  migrationId = p.migrationId;
  persist();
  // While the connection is being made (the destination may still be preparing), not after it.
  // Only a warm-up: its failure must not fail the move (nor go unhandled if the connect fails).
  const warmed = warmSwitchOverPath().catch(() => undefined);
  let socks: net.Socket[];
  let chan: FrameChannel;
  let ok = false;
  try {
    await faultPoint('source-before-connect');
    // Stream 0 first (it fixes the count at the destination), then the others together.
    chan = await connectFirst(job, p.endpoint, hello(0), Math.min(Math.max(0, p.grantWaitMs ?? 0), 60_000), sockOpts);
    const more = await Promise.allSettled(Array.from({ length: streams - 1 }, (_, k) => connectDataPlane(p.endpoint, hello(k + 1), dataPlaneTlsFromEnv(), sockOpts)));
    socks = [chan.sock, ...more.flatMap((r) => (r.status === 'fulfilled' ? [r.value.sock] : []))];
    const refused = more.find((r) => r.status === 'rejected');
    const why = refused ? (refused as PromiseRejectedResult).reason as Error : job.cancelled ? new Error(`migration ${job.id} was rolled back while connecting`) : null;
    if (why) {
      for (const s of socks) s.destroy();
      throw why;
    }
    ok = true;
  } finally {
    connecting = null;
    if (!ok && migrationId === p.migrationId && outgoing?.id !== p.migrationId) { migrationId = before; persist(); }
  }
  const o: Outgoing = {
    id: p.migrationId, state: 'precopy', chan, socks, barrierSeq: 0, sendSeq: 0, policy: p.policy, round: 0, bytesSent: 0, pagesSent: 0,
    startedAt: performance.now(), crcs: new Uint32Array(guest.pages).fill(ZERO_CRC), samples: [], waiters: [], stop: false,
    loop: Promise.resolve(), stopped: new AbortController(), bucketAt: performance.now(), rawBytes: 0, compressCpuUs: 0, compressSkip: 0, flushed: socks.map(() => Promise.resolve()),
  };
  chan.onFrame = (f) => {
    if (f.type !== FrameType.Error || o.state !== 'precopy') return false;
    fail(o, `destination refused: ${parseJson<{ message: string }>(f).message}`);
    return true;
  };
  migrationId = p.migrationId;
  outgoing = o;
  if (socks.length > 1) {
    const buf = socks.map((s) => sendBufferSize(s));
    log(`memory streams: ${socks.length}; kernel send buffers ${buf.map((b) => (b === null ? 'n/a' : `${Math.round(b / 1024)} KiB`)).join(', ')}`);
  }
  for (const s of socks) {
    s.on('close', () => {
      if (o.state === 'precopy' || o.state === 'stopping') fail(o, 'data-plane connection to the destination closed');
    });
  }
  // The control reply (startOutgoing's answer) goes out first: the first round takes the core.
  o.loop = warmed.then(yieldNow).then(() => precopy(o)).catch((e: Error) => fail(o, e.message));
  persist();
  log(`outgoing migration ${p.migrationId} to ${p.endpoint.host}:${p.endpoint.port}: ${socks.length} stream(s) connected in ${Math.round(performance.now() - job.t0)} ms (${job.attempts} attempt(s) for stream 0)`);
  return { started: true };
}

/** Asks the pre-copy loop to stop (cutover, rollback, failure), without waiting out its pause. */
function stopJob(o: Outgoing): void {
  o.stop = true;
  o.stopped.abort();
}

function fail(o: Outgoing, error: string): void {
  if (o.state === 'done' || o.state === 'failed' || o.state === 'cancelled') return;
  o.error = error;
  o.state = 'failed';
  stopJob(o);
  for (const s of o.socks) s.destroy();
  for (const w of o.waiters.splice(0)) w();
  log(`outgoing migration ${o.id} failed: ${error}`);
  persist();
}

function compressionFigures(o: Outgoing): { rawBytes?: number; compressCpuMs?: number } {
  return o.policy.compression === 'deflate' ? { rawBytes: o.rawBytes, compressCpuMs: Math.round(o.compressCpuUs / 1000) } : {};
}

function requireOutgoing(id: unknown): Outgoing {
  if (!outgoing || outgoing.id !== id) throw new Error(`VM ${cfg.spec.name} has no outgoing migration ${String(id)}`);
  return outgoing;
}

async function progress(p: { migrationId: string; afterRound: number; waitMs?: number }): Promise<ProgressSample> {
  const o = requireOutgoing(p.migrationId);
  const deadline = performance.now() + (p.waitMs ?? 5000);
  while (o.state === 'precopy' && o.round <= p.afterRound && performance.now() < deadline) {
    await Promise.race([new Promise<void>((r) => o.waiters.push(r)), sleep(Math.max(1, deadline - performance.now()))]);
  }
  const last = o.samples.at(-1);
  const base: ProgressSample = last ?? {
    round: 0, elapsedMs: Math.round(performance.now() - o.startedAt), bytesSent: o.bytesSent, pagesSent: o.pagesSent,
    dirtyPages: guest.dirtyCount, dirtyRate: 0, bandwidth: 0, throttle: guest.state.throttle, expectedDowntimeMs: 1e9, state: 'precopy',
  };
  if (o.state === 'failed' || o.state === 'cancelled') return { ...base, state: 'failed', error: o.error ?? o.state };
  // Past pre-copy: a retried awaitProgress joins the cutover instead of waiting for a round.
  if (o.state !== 'precopy') return { ...base, state: 'cutover', bytesSent: o.bytesSent, pagesSent: o.pagesSent, ...compressionFigures(o) };
  return { ...base, bytesSent: o.bytesSent, pagesSent: o.pagesSent, ...compressionFigures(o) };
}

function setPolicy(p: { migrationId: string; throttle?: number; maxBandwidth?: number }): { throttle: number } {
  const o = requireOutgoing(p.migrationId);
  if (typeof p.throttle === 'number') guest.state.throttle = Math.min(0.99, Math.max(0, p.throttle));
  if (typeof p.maxBandwidth === 'number') o.policy.maxBandwidth = p.maxBandwidth;
  return { throttle: guest.state.throttle };
}

async function doCutover(o: Outgoing, verify: MigrationPolicy['verify']): Promise<CutoverResult> {
  o.state = 'stopping'; // before the loop wakes: it runs the tail rounds only in this state
  stopJob(o);
  await o.loop;
  if (o.error) throw new Error(o.error);
  o.state = 'cutover';
  pause({ persist: false }); // state.json follows with 'migrated' (or the failure): not inside the pause
  const pausedAt = Date.now();
  await faultPoint('cutover-after-pause');
  const t0 = performance.now();
  const finalList = dirtyList();
  o.finalFlush = true;
  await sendPages(o, finalList);
  const digest = crc32(Buffer.from(o.crcs.buffer)) >>> 0;
  // Several streams: the destination applies every stream up to this barrier before it checks.
  const seq = o.socks.length > 1 ? await barrier(o) : undefined;
  const tSent = performance.now();
  await writeAll(o.chan.sock, [jsonFrame(FrameType.Device, { device: guest.state, digest, verify, seq })]);
  // 'full': both ends CRC all memory at once, each its own copy (the guest is paused: nothing
  // changes here after the frame), so the pause pays for one pass, not two (~55 ms per 256 MiB).
  const sourceFullCrc = verify === 'full' ? crc32(guest.memory) >>> 0 : undefined;
  const verified = o.chan.expect<{ digest: number; fullCrc?: number }>(FrameType.Verified).then((v) => {
    if (v.digest !== digest) throw new Error(`memory digest mismatch at cutover: source ${digest}, destination ${v.digest}`);
    if (verify === 'full' && v.fullCrc !== sourceFullCrc) throw new Error(`full memory CRC mismatch: source ${sourceFullCrc}, destination ${v.fullCrc}`);
    return v;
  });
  verified.catch(() => undefined); // awaited below; not unhandled meanwhile
  // The destination checks the digest itself (it is in the device frame) and claims the VM only
  // if it matches, so the handoff and GO need not wait for its answer: one round trip less in
  // the pause. A mismatch then fails the move after the handoff, and the rollback reclaims the
  // VM (the destination never claimed it). 'full' keeps the wait: only the source knows its CRC.
  // So does a receiver that does not say it checks (an older VM process during an upgrade).
  if (verify === 'full' || o.chan.welcome.digestBeforeClaim !== true) await verified;
  // Shared-nothing: every guest write must be on the destination's disks before it runs.
  if (mirror && mirror.target.kind === 'remote') await mirror.drain();
  const tReady = performance.now();
  // Handoff. From the rename on, this process can never write or run again (fencing).
  guest.closeDisks();
  const newEpoch = epoch + 1;
  updateOwner(cfg.ownerPath, (cur) => {
    if (!cur || cur.host !== cfg.host || cur.epoch !== epoch || cur.state !== 'active') throw new FencedError(cfg.host, epoch, cur);
    return { host: destHost!, epoch: newEpoch, state: 'handoff', from: cfg.host, migrationId: o.id };
  });
  state = 'migrated';
  // GO first: the ownership record above is what counts; state.json (for the agent) can follow.
  const tHandoff = performance.now();
  // A destination that refused the device frame may have closed the stream: its reason, not
  // the write's, is the one to report.
  const go = Promise.resolve(writeAll(o.chan.sock, [jsonFrame(FrameType.Go, { epoch: newEpoch })])).then(() => null, (e: Error) => e);
  // state.json after RESUMED (in any case): written meanwhile, it would delay noticing RESUMED.
  let r: { resumedAt: number; tookMs?: number };
  let v: { digest: number; fullCrc?: number };
  let tEnd: number;
  try {
    v = await verified;
    const goFailed = await go;
    if (goFailed) throw goFailed;
    r = await o.chan.expect<{ resumedAt: number; tookMs?: number }>(FrameType.Resumed, 30_000);
    tEnd = performance.now();
  } finally { persist(); }
  const downtimeMs = Math.round(tEnd - t0);
  const ms = (a: number, b: number): number => Math.round((b - a) * 10) / 10;
  // verify: what the source waited for before the handoff ('full' check, disk mirror drain);
  // the destination's digest check is part of resume now.
  const downtimePhasesMs = { finalPages: ms(t0, tSent), verify: ms(tSent, tReady), handoff: ms(tReady, tHandoff), resume: ms(tHandoff, tEnd), resumeOnDestination: r.tookMs };
  o.state = 'done';
  for (const s of o.socks) s.end();
  mirror?.close(); // break the mirror: the destination's copy is the VM's disk now
  const result: CutoverResult = {
    pausedAt, resumedAt: r.resumedAt, downtimeMs, finalPages: finalList.length, bytesSent: o.bytesSent, ...compressionFigures(o),
    ...(o.tailThrottle !== undefined ? { tailThrottle: o.tailThrottle } : {}),
    downtimePhasesMs,
    ...(o.tailRounds ? { beforePause: o.tailRounds } : {}),
    sourceDigest: digest, destinationDigest: v.digest, sourceFullCrc, destinationFullCrc: v.fullCrc, epoch: newEpoch,
    deviceState: { vcpuTicks: guest.state.vcpuTicks, memWrites: guest.state.memWrites, diskWrites: guest.state.diskWrites },
  };
  o.result = result;
  fs.writeFileSync(path.join(runtimeDir, `cutover-${o.id}.json`), JSON.stringify(result));
  log(`cutover ${o.id} done: downtime ${downtimeMs} ms (${Object.entries(downtimePhasesMs).map(([k, v]) => `${k} ${v}`).join(', ')}), final ${finalList.length} pages; before the pause (pages/ms): ${o.tailRounds?.join(', ') ?? 'none'}`);
  return result;
}
let destHost: string | undefined;

async function cutover(p: { migrationId: string; verify?: MigrationPolicy['verify']; destination: string }): Promise<CutoverResult> {
  // Idempotent: a retried activity gets the running or finished cutover, never a second one.
  const saved = path.join(runtimeDir, `cutover-${p.migrationId}.json`);
  if (fs.existsSync(saved)) return JSON.parse(fs.readFileSync(saved, 'utf8')) as CutoverResult;
  const o = requireOutgoing(p.migrationId);
  if (o.state === 'failed' || o.state === 'cancelled') throw new Error(`migration ${o.id} already ${o.state}: ${o.error ?? ''}`);
  destHost = p.destination;
  if (!o.cutover) {
    o.cutover = doCutover(o, p.verify ?? 'digest').catch((e: Error) => {
      fail(o, `cutover failed: ${e.message}`);
      throw e;
    });
  }
  return o.cutover;
}

/**
 * Rollback of the source side, safe at any point: stops the job; if this host still owns the
 * VM it runs again; if a handoff was written but the destination never claimed it, the VM is
 * reclaimed at a new epoch (compare-and-set: the destination's late claim then fails). If the
 * destination did claim it, the VM lives there now and this reports so: never two copies.
 */
async function rollbackOutgoing(p: { migrationId: string; allowReclaim?: boolean }): Promise<{ runsOn: 'source' | 'destination' | 'undecided'; state: VmState; epoch: number }> {
  if (connecting?.id === p.migrationId) connecting.cancelled = true;
  if (!rolledBack.includes(p.migrationId)) { rolledBack.push(p.migrationId); if (rolledBack.length > 64) rolledBack.shift(); }
  // This VM's migration (not a late rollback of another): its auto-converge throttle goes with it.
  const ours = outgoing?.id === p.migrationId || migrationId === p.migrationId;
  if (outgoing && outgoing.id === p.migrationId) {
    const o = outgoing;
    if (o.state !== 'done' && o.state !== 'failed') { o.error = 'cancelled'; o.state = 'cancelled'; }
    stopJob(o);
    for (const s of o.socks) s.destroy();
    await o.loop.catch(() => undefined);
    if (o.cutover) await o.cutover.catch(() => undefined);
    for (const w of o.waiters.splice(0)) w();
  }
  if (state === 'running') {
    if (ours) guest.state.throttle = 0;
    if (migrationId === p.migrationId) { migrationId = undefined; outgoing = null; persist(); }
    return { runsOn: 'source', state, epoch };
  }
  let runsOn = 'source' as 'source' | 'destination' | 'undecided';
  const rec = updateOwner(cfg.ownerPath, (cur) => {
    if (cur && cur.host === cfg.host && cur.state === 'active' && cur.epoch === epoch) return cur;
    if (cur && cur.state === 'handoff' && cur.from === cfg.host && cur.migrationId === p.migrationId) {
      // Handed off, not (yet) claimed here. With shared storage this record is the arbiter:
      // a claim by the destination would have changed it. With local storage the destination
      // claims its own copy, so only the caller, having aborted the destination, may reclaim.
      if (!p.allowReclaim && !sharedOwner) { runsOn = 'undecided'; return cur; }
      return { host: cfg.host, epoch: cur.epoch + 1, state: 'active', migrationId: p.migrationId };
    }
    runsOn = 'destination';
    if (!cur) throw new FencedError(cfg.host, epoch, cur);
    return cur;
  });
  if (runsOn !== 'source') {
    state = 'migrated';
    persist();
    return { runsOn, state, epoch };
  }
  epoch = rec.epoch;
  if (ours) guest.state.throttle = 0;
  await run();
  migrationId = undefined;
  outgoing = null;
  persist();
  log(`rolled back ${p.migrationId}: running again at epoch ${epoch}`);
  return { runsOn, state, epoch };
}

// ---------- disk mirror (storage migration, shared-nothing) ----------

let mirror: DiskMirror | null = null;

function requireMirror(id: unknown): DiskMirror {
  if (!mirror || mirror.migrationId !== id) throw new Error(`VM ${cfg.spec.name} has no disk mirror for ${String(id)}`);
  return mirror;
}

async function startDiskMirror(p: { migrationId: string; target: MirrorTarget; maxBandwidth?: number }): Promise<DiskMirrorStatus> {
  if (mirror && mirror.migrationId === p.migrationId && mirror.state !== 'aborted') return mirror.status();
  if (mirror && (mirror.state === 'copying' || mirror.state === 'synced' || mirror.state === 'disconnected')) throw new Error(`VM ${cfg.spec.name} already mirrors its disks (${mirror.migrationId})`);
  if (state !== 'running') throw new Error(`VM ${cfg.spec.name} is ${state}, not running`);
  if (migrationId && migrationId !== p.migrationId) throw new Error(`VM ${cfg.spec.name} is already migrating (${migrationId})`);
  const m = new DiskMirror(p.migrationId, guest, p.target, p.maxBandwidth ?? 0);
  await m.start();
  mirror = m;
  migrationId = p.migrationId;
  persist();
  log(`disk mirror ${p.migrationId} to ${p.target.kind === 'local' ? Object.values(p.target.paths).join(', ') : `${p.target.endpoint.host}:${p.target.endpoint.port}`}`);
  return m.status();
}

async function abortDiskMirror(p: { migrationId: string }): Promise<{ aborted: boolean }> {
  if (!mirror || mirror.migrationId !== p.migrationId) return { aborted: false };
  if (mirror.state === 'switched') return { aborted: false };
  await mirror.abort();
  if (migrationId === p.migrationId && !outgoing) migrationId = undefined;
  persist();
  return { aborted: true };
}

/** The switch of a live storage migration: guest I/O moves to the new files in one tick. */
let switching: Promise<{ switched: boolean; ownerPath: string; epoch: number; crcs: Record<string, number> }> | null = null;

function switchDisks(p: { migrationId: string; disks: VmSpec['disks']; diskPaths: Record<string, string> }): Promise<{ switched: boolean; ownerPath: string; epoch: number; crcs: Record<string, number> }> {
  // One switch at a time: a retried call joins the running one.
  switching ??= doSwitchDisks(p).finally(() => { switching = null; });
  return switching;
}

async function doSwitchDisks(p: { migrationId: string; disks: VmSpec['disks']; diskPaths: Record<string, string> }): Promise<{ switched: boolean; ownerPath: string; epoch: number; crcs: Record<string, number> }> {
  const m = requireMirror(p.migrationId);
  if (m.state === 'switched') return { switched: true, ownerPath: cfg.ownerPath, epoch, crcs: {} };
  if (m.state !== 'synced') throw new Error(`disk mirror is ${m.state}, not synced${m.error ? `: ${m.error}` : ''}`);
  // Byte-for-byte comparison (no checksum to report: the copies were compared directly).
  await m.verifyLocal();
  const crcs: Record<string, number> = {};
  const fds = m.takeLocalFds();
  const oldFds = guest.disks.map((d) => d.fd);
  guest.disks.forEach((d, i) => { d.fd = fds[i]!; d.path = p.diskPaths[d.id]!; });
  for (const fd of oldFds) if (fd !== null) fs.closeSync(fd);
  const newOwner = path.join(path.dirname(p.diskPaths[guest.disks[0]!.id]!), 'owner.json');
  epoch += 1;
  writeOwner(newOwner, { host: cfg.host, epoch, state: 'active', migrationId: p.migrationId });
  cfg.ownerPath = newOwner;
  cfg.diskPaths = p.diskPaths;
  cfg.spec.disks = p.disks;
  const tmp = path.join(runtimeDir, 'vm.json.tmp');
  fs.writeFileSync(tmp, JSON.stringify(cfg, null, 2));
  fs.renameSync(tmp, path.join(runtimeDir, 'vm.json'));
  mirror = null;
  migrationId = undefined;
  persist();
  log(`switched disks to ${Object.values(p.diskPaths).join(', ')} at epoch ${epoch}`);
  return { switched: true, ownerPath: newOwner, epoch, crcs };
}

// ---------- incoming (destination side) ----------

interface Incoming {
  state: 'waiting' | 'receiving' | 'verified' | 'running' | 'failed' | 'aborted';
  bytes: number;
  pages: number;
  crcs: Uint32Array;
  /** Live pages whose bytes no longer matched their CRC (rewritten at the source meanwhile). */
  torn: number;
  error?: string;
  /** Stream 0 (control frames and its share of pages). */
  sock?: net.Socket;
  /** Streams of the transfer (stream 0's claim), their sockets, and the barrier each applied. */
  streams: number;
  socks: Array<net.Socket | undefined>;
  reached: number[];
  /** Checks waiting on barriers; each returns true once settled. */
  barrierWaits: Array<() => boolean>;
  /** Compressed frames arrived (inflating leaves garbage, as TLS records do). */
  inflated?: boolean;
  /** Fault injection only: acts as a receiver from before the digest check moved here. */
  legacy?: boolean;
}
let incoming: Incoming | null = cfg.mode === 'incoming'
  ? { state: 'waiting', bytes: 0, pages: 0, torn: 0, crcs: new Uint32Array(guest.pages).fill(ZERO_CRC), streams: 1, socks: [], reached: [], barrierWaits: [] }
  : null;
/** Faults guest memory in just ahead of the pages arriving (until every page is in, or the end). */
const prefaulter = cfg.mode === 'incoming' ? new Prefaulter(guest.memory) : null;

/** Re-runs the barrier checks (a stream reached a barrier, or the transfer failed). */
function wakeBarriers(inc: Incoming): void {
  inc.barrierWaits = inc.barrierWaits.filter((check) => !check());
}

/** Resolves once every stream but 0 has applied everything up to its barrier `seq`. */
function streamsReached(inc: Incoming, seq: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const check = (): boolean => {
      if (inc.state === 'failed' || inc.state === 'aborted') { reject(new Error(inc.error ?? `incoming ${inc.state}`)); return true; }
      for (let k = 1; k < inc.streams; k++) if ((inc.reached[k] ?? 0) < seq) return false;
      resolve();
      return true;
    };
    if (!check()) inc.barrierWaits.push(check);
  });
}

/** Why stream `stream` of `streams` cannot join this incoming transfer now (null: it can). */
function streamRefusal(inc: Incoming | null, stream: number, streams: number): string | null {
  if (!inc) return `VM ${cfg.spec.name} is not waiting for a migration`;
  if (stream === 0) return inc.state === 'waiting' ? null : `VM ${cfg.spec.name} is not waiting for a migration`;
  if (inc.state !== 'receiving') return `VM ${cfg.spec.name} is not receiving a migration`;
  if (streams !== inc.streams) return `stream count ${streams} differs from stream 0's ${inc.streams}`;
  return inc.socks[stream] ? `stream ${stream} already connected` : null;
}

/**
 * Validates a Pages frame's index table (u32 count, then u32 page | ZERO_FLAG and u32 CRC per
 * page) before any of its data reaches guest memory, applies its zero pages, and returns where
 * its data goes: runs of guest memory ([offset, length]) in wire order.
 */
function pageRuns(inc: Incoming, index: Buffer, stream: number, flags: number): Array<[number, number]> {
  const n = index.readUInt32LE(0);
  const bySeq = (flags & FrameFlag.Seq) !== 0;
  const mem = guest.memory;
  const runs: Array<[number, number]> = [];
  let highest = -1;
  for (let k = 0; k < n; k++) {
    const raw = index.readUInt32LE(4 + k * 8);
    const crc = index.readUInt32LE(8 + k * 8);
    const p = (raw & ~ZERO_FLAG) >>> 0;
    if (p >= guest.pages) throw new Error(`page ${p} outside guest memory of ${guest.pages} pages`);
    if (p > highest) highest = p;
    // Each page has one stream: a copy on another could overtake a newer one.
    if (inc.streams > 1 && streamOf(p, inc.streams) !== stream) throw new Error(`page ${p} arrived on stream ${stream}, not its own (${streamOf(p, inc.streams)})`);
    const dst = p * PAGE_SIZE;
    if ((raw & ZERO_FLAG) !== 0) {
      if (!bySeq && crc !== ZERO_CRC) throw new Error(`zero page ${p} with a non-zero checksum`);
      mem.fill(0, dst, dst + PAGE_SIZE);
      inc.crcs[p] = crc;
      continue;
    }
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === dst) last[1] += PAGE_SIZE;
    else runs.push([dst, PAGE_SIZE]);
  }
  if (highest >= 0) prefaulter?.advance(highest);
  return runs;
}

/**
 * A Pages frame's data is in guest memory: each page against the CRC of its index entry. A Live
 * frame's page may have been rewritten at the source after its CRC was taken (it is dirty there
 * and travels again): our table then keeps the CRC of what arrived, and the cutover digest
 * settles it. A paused frame must match exactly.
 */
function pagesPlaced(inc: Incoming, index: Buffer, flags: number, wireBytes: number): void {
  const n = index.readUInt32LE(0);
  const live = (flags & FrameFlag.Live) !== 0;
  const mem = guest.memory;
  const crcs = inc.crcs;
  if (flags & FrameFlag.Seq) {
    // Sequence numbers: recorded as sent (pageRuns recorded the zero pages').
    for (let k = 0; k < n; k++) {
      const raw = index.readUInt32LE(4 + k * 8);
      if ((raw & ZERO_FLAG) !== 0) continue;
      crcs[raw] = index.readUInt32LE(8 + k * 8);
      inc.pages++;
    }
    inc.bytes += wireBytes + 12;
    return;
  }
  for (let k = 0; k < n; k++) {
    const raw = index.readUInt32LE(4 + k * 8);
    if ((raw & ZERO_FLAG) !== 0) continue;
    const crc = index.readUInt32LE(8 + k * 8);
    const off = raw * PAGE_SIZE;
    const got = crc32(mem.subarray(off, off + PAGE_SIZE)) >>> 0;
    if (got !== crc) {
      if (!live) throw new Error(`page ${raw} failed its checksum`);
      inc.torn++;
    }
    crcs[raw] = got;
    inc.pages++;
  }
  inc.bytes += wireBytes + 12;
}

/** Places one Pages frame given as the pieces it arrived in (TLS streams, compressed frames). */
function applyPages(inc: Incoming, parts: Buffer[], flags = 0, stream = 0): void {
  let total = 0;
  for (const b of parts) total += b.length;
  if (total < 4) throw new Error('page frame shorter than its index');
  const n = joinPrefix(parts, 4).readUInt32LE(0);
  const idxLen = 4 + n * 8;
  if (total < idxLen) throw new Error('page frame shorter than its index');
  const index = Buffer.from(joinPrefix(parts, idxLen));
  const wireBytes = total;
  const runs = pageRuns(inc, index, stream, flags);
  let need = 0;
  for (const [, l] of runs) need += l;
  let data: Buffer[];
  if (flags & FrameFlag.Deflate) {
    inc.inflated = true;
    // Inflate the data region; the limit refuses a frame that would expand beyond its pages.
    const z = Buffer.concat(parts).subarray(idxLen);
    try { data = [zlib.inflateRawSync(z, { maxOutputLength: n * PAGE_SIZE })]; } catch (e) { throw new Error(`page frame does not inflate: ${(e as Error).message}`); }
  } else {
    // The data region as views of the pieces (no joining copy).
    data = [];
    let skip = idxLen;
    for (const b of parts) { if (skip >= b.length) { skip -= b.length; continue; } data.push(skip ? b.subarray(skip) : b); skip = 0; }
  }
  let have = 0;
  for (const b of data) have += b.length;
  if (have < need) throw new Error('page frame truncated');
  if (have > need) throw new Error('page frame has trailing bytes');
  // Copy the data into its runs, piece by piece.
  const mem = guest.memory;
  let di = 0, dpos = 0;
  for (const [off, len] of runs) {
    for (let at = off, left = len; left > 0;) {
      const piece = data[di]!;
      const take = Math.min(left, piece.length - dpos);
      mem.set(piece.subarray(dpos, dpos + take), at);
      at += take; left -= take; dpos += take;
      if (dpos === piece.length) { di++; dpos = 0; }
    }
  }
  pagesPlaced(inc, index, flags, wireBytes);
}

async function onIncomingFrame(inc: Incoming, f: Frame): Promise<void> {
  switch (f.type) {
    case FrameType.Pages:
      applyPages(inc, f.parts ?? [f.body], f.flags);
      return;
    case FrameType.RoundEnd: {
      // Everything sent before this frame is in guest memory now (frames apply in order), on
      // the other streams once they reached the barrier it names.
      const r = parseJson<{ seq?: number; barrier?: boolean }>(f);
      if (inc.streams > 1 && r.seq) await streamsReached(inc, r.seq);
      // A settle barrier (or the one before the cutover decision): the pause is near. A
      // transfer over TLS leaves a heap full of garbage (a buffer per 16 KiB record), and a
      // collection that falls inside the pause costs its length in downtime (seen: 8-23 ms of
      // a resume that takes 3-4 ms; A/B, 8 moves each, 1 GiB at 5% over TLS: worst pause 33 ms
      // without, 14 ms with). Collected here, the guest still running on the source.
      // (--expose-gc: the driver starts VM processes with it.)
      // (Plaintext and not compressed: pages went straight into guest memory, a minor one.)
      if (r.barrier) collectGarbage(inc, inc.bytes, inc.sock instanceof tls.TLSSocket || inc.inflated === true); // not again unless megabytes arrived since
      await writeAll(inc.sock!, [jsonFrame(FrameType.Ack, { bytesReceived: inc.bytes })]);
      return;
    }
    case FrameType.Device: {
      const d = parseJson<{ device: DeviceState; digest: number; verify: MigrationPolicy['verify']; seq?: number }>(f);
      if (inc.streams > 1) {
        if (!d.seq) throw new Error('device state without a stream barrier on a multi-stream transfer');
        await streamsReached(inc, d.seq);
      }
      guest.state = { ...d.device };
      // Opened now, not at GO (shortens the pause): opening writes nothing; only a claimed,
      // running VM writes to them.
      guest.openDisks();
      const digest = crc32(Buffer.from(inc.crcs.buffer)) >>> 0;
      // Checked here, not only by the source: GO may already be on its way (see doCutover), and
      // a VM whose memory differs from the source's must never run. Failing the incoming sends
      // the source an error and refuses the GO.
      const injected = (await faultPoint('destination-digest')) === 'mismatch' ? ' (fault injection)' : '';
      if (!inc.legacy && (injected || d.digest !== digest)) throw new Error(`memory digest mismatch at cutover: source ${d.digest}, destination ${digest}${injected}`);
      const fullCrc = d.verify === 'full' ? crc32(guest.memory) >>> 0 : undefined;
      inc.state = 'verified';
      prefaulter?.stop();
      await writeAll(inc.sock!, [jsonFrame(FrameType.Verified, { digest: inc.legacy ? (digest ^ 1) >>> 0 : digest, fullCrc })]);
      // Not persisted, and waiting status calls are not woken: the supervision's completion
      // (and the workflow task it causes) inside the pause lengthened it (A/B, 256 MiB at 5%:
      // median 9 vs 6 ms, tails 15-19 vs 9-11 ms). Supervision ends at the resume.
      return;
    }
    case FrameType.Go: {
      const tGo = performance.now();
      const g = parseJson<{ epoch: number }>(f);
      if (inc.state !== 'verified') throw new Error(`GO before verification (state ${inc.state})`);
      // Claim (compare-and-set): fails if the source reclaimed the VM meanwhile.
      updateOwner(cfg.ownerPath, (o) => {
        if (!o || o.state !== 'handoff' || o.host !== cfg.host || o.epoch !== g.epoch) throw new FencedError(cfg.host, g.epoch, o);
        return { host: cfg.host, epoch: g.epoch, state: 'active', migrationId };
      });
      epoch = g.epoch;
      inc.state = 'running';
      guest.markAllClean();
      migrationId = undefined; // the migration is over for this copy: it is now the VM
      // The downtime ends here: RESUMED goes out before the bookkeeping (state.json, log).
      await run({ persist: false, claimed: true });
      const resumedAt = Date.now();
      // Auto-converge ends with the migration (QEMU lifts its CPU throttle then too): the
      // throttle came over with the device state; lifted once RESUMED is out (a full-speed
      // guest slice before it would lengthen the downtime).
      const unthrottle = (): void => { guest.state.throttle = 0; };
      if ((await faultPoint('destination-after-resume')) === 'drop-ack') {
        // Fault injection: the VM runs here, but the source never hears of it.
        unthrottle();
        persist();
        inc.sock!.destroy();
        log(`resumed at epoch ${epoch}; acknowledgement dropped (fault injection)`);
        return;
      }
      try { await writeAll(inc.sock!, [jsonFrame(FrameType.Resumed, { resumedAt, tookMs: Math.round((performance.now() - tGo) * 10) / 10 })]); } finally { unthrottle(); }
      persist();
      log(`resumed at epoch ${epoch}`);
      // Later, not now: the move's last steps (the source's release, the workflow's last tasks)
      // share these cores.
      setTimeout(() => { try { if (state === 'running') reportMemoryBacking(); } catch { /* only a report */ } }, 500).unref();
      return;
    }
    default:
      throw new Error(`unexpected ${FrameType[f.type]} frame on an incoming migration`);
  }
}

function acceptIncoming(sock: net.Socket, rest: Buffer, handOver?: { auth?: GrantCheck; nonce?: string; stream?: number; streams?: number }): void {
  const auth = handOver?.auth;
  const stream = auth?.stream ?? handOver?.stream ?? 0;
  const streams = auth?.streams ?? handOver?.streams ?? 1;
  if (auth) {
    // TLS mode: this process is the TLS server. Nothing changes here (state, memory, files)
    // until the sender proved it is the grant's source host and holds the token; the agent
    // hears the outcome (it consumes the grant, or logs the refusal).
    const settle = (ok: boolean, why?: string): void => {
      if (!ok) log(`refused incoming data-plane connection: ${why}`);
      try { process.send?.({ type: 'dataplane-auth', nonce: handOver!.nonce, ok, why }); } catch { /* agent gone */ }
    };
    const early = auth.migrationId !== migrationId || auth.vm !== cfg.spec.name || auth.kind !== 'memory' ? `VM ${cfg.spec.name} is not waiting for migration ${auth.migrationId}` : streamRefusal(incoming, stream, streams);
    if (early) {
      sock.end(jsonFrame(FrameType.Error, { message: early }));
      settle(false, early);
      return;
    }
    acceptSecure(sock, rest, auth).then(
      (sec) => {
        const late = streamRefusal(incoming, stream, streams);
        if (late) {
          sec.sock.end(jsonFrame(FrameType.Error, { message: late }));
          settle(false, stream === 0 ? 'a second authenticated connection for the same migration' : late);
          return;
        }
        settle(true);
        log(`incoming data plane${streams > 1 ? ` (stream ${stream} of ${streams})` : ''}: ${sec.protocol} from ${sec.peer}, client certificate verified`);
        acceptIncoming(sec.sock, sec.rest, { stream, streams });
        sec.sock.resume();
      },
      (e: Error) => settle(false, e.message),
    );
    return;
  }
  const inc = incoming;
  const refusal = streamRefusal(inc, stream, streams);
  if (!inc || refusal) {
    sock.end(jsonFrame(FrameType.Error, { message: refusal }));
    return;
  }
  if (stream > 0) { acceptDataStream(inc, stream, sock, rest); return; }
  inc.state = 'receiving';
  inc.streams = streams;
  inc.reached = new Array<number>(streams).fill(0);
  const failed = (e: Error): void => {
    inc.error = e.message;
    if (inc.state !== 'running') inc.state = 'failed';
    prefaulter?.stop();
    log(`incoming failed: ${e.message}`);
    inc.sock!.end(jsonFrame(FrameType.Error, { message: e.message }));
    for (const s of inc.socks.slice(1)) s?.destroy();
    wakeBarriers(inc);
    persist();
  };
  // Plaintext: pages are read straight into guest memory. TLS: frames, then a copy.
  const placing = sock instanceof tls.TLSSocket ? null : PlacingReader.attach(sock, rest, {
    memory: guest.memory,
    pageRuns: (index, flags) => pageRuns(inc, index, 0, flags),
    pagesPlaced: (index, flags, wireBytes) => pagesPlaced(inc, index, flags, wireBytes),
    frame: (f) => onIncomingFrame(inc, f),
    fail: failed,
  });
  if (placing) {
    sock = placing.sock;
    log(`incoming data plane: plaintext${streams > 1 ? `, ${streams} streams` : ''}, pages read straight into guest memory`);
  } else {
    const chan = new FrameChannel(sock, rest);
    let chain = Promise.resolve();
    chan.onFrame = (f) => {
      chain = chain.then(() => onIncomingFrame(inc, f)).catch(failed);
      return true;
    };
  }
  inc.sock = sock;
  inc.socks = [sock];
  sock.on('close', () => closedEarly(inc));
  // digestBeforeClaim: this receiver checks the cutover digest itself before it claims the VM,
  // so the source may send GO without waiting for VERIFIED (an older receiver does not).
  // (Fault injection 'legacy-mismatch': behaves as an older receiver whose memory differs.)
  inc.legacy = faultAt('destination-digest') === 'legacy-mismatch';
  void writeAll(sock, [jsonFrame(FrameType.Welcome, { vm: cfg.spec.name, pages: guest.pages, ...(inc.legacy ? {} : { digestBeforeClaim: true }) })]);
  persist();
}

/** Any stream lost before the switchover fails the transfer (the source rolls back). */
function closedEarly(inc: Incoming, why = 'data-plane connection closed before the switchover'): void {
  if (inc.state !== 'receiving' && inc.state !== 'verified') return;
  inc.state = 'failed';
  prefaulter?.stop();
  inc.error = why;
  for (const s of inc.socks) s?.destroy();
  wakeBarriers(inc);
  persist();
}

/** Streams 1..n-1 carry pages and barriers only; frames apply as they arrive (pages are partitioned by stream). */
function acceptDataStream(inc: Incoming, stream: number, sock: net.Socket, rest: Buffer): void {
  const failed = (e: Error): void => {
    const why = e.message;
    // Past the switch-over (or after a failure) a late frame only closes its own stream.
    if (inc.state !== 'receiving') { sock.destroy(); return; }
    log(`incoming failed on stream ${stream}: ${why}`);
    inc.sock?.end(jsonFrame(FrameType.Error, { message: why })); // the source hears it on stream 0
    closedEarly(inc, why);
  };
  const frame = (f: Frame): void => {
    if (inc.state !== 'receiving') return;
    if (f.type === FrameType.Pages) applyPages(inc, f.parts ?? [f.body], f.flags, stream);
    else if (f.type === FrameType.RoundEnd) { inc.reached[stream] = parseJson<{ seq: number }>(f).seq; wakeBarriers(inc); }
    else throw new Error(`unexpected ${FrameType[f.type]} frame on data stream ${stream}`);
  };
  const placing = sock instanceof tls.TLSSocket ? null : PlacingReader.attach(sock, rest, {
    memory: guest.memory,
    pageRuns: (index, flags) => {
      if (inc.state !== 'receiving') throw new Error(`incoming ${inc.state}`);
      return pageRuns(inc, index, stream, flags);
    },
    pagesPlaced: (index, flags, wireBytes) => pagesPlaced(inc, index, flags, wireBytes),
    frame,
    fail: failed,
  });
  if (placing) sock = placing.sock;
  else {
    const chan = new FrameChannel(sock, rest);
    chan.onFrame = (f) => {
      try { frame(f); } catch (e) { failed(e as Error); }
      return true;
    };
  }
  inc.socks[stream] = sock;
  sock.on('close', () => closedEarly(inc));
  void writeAll(sock, [jsonFrame(FrameType.Welcome, { vm: cfg.spec.name, pages: guest.pages, stream })]);
}

/** Destroys an incoming VM unless it already runs (then the caller must go forward instead). */
function abortIncoming(): { aborted: boolean; state: VmState } {
  if (state === 'running') return { aborted: false, state };
  if (incoming) { incoming.state = 'aborted'; for (const s of incoming.socks) s?.destroy(); wakeBarriers(incoming); }
  prefaulter?.stop();
  state = 'stopped';
  persist();
  setTimeout(() => process.exit(0), 20);
  return { aborted: true, state };
}

// ---------- control ----------

function shutdown(): { state: VmState } {
  if (workloadTimer) clearInterval(workloadTimer);
  unbindProbe();
  guest.closeDisks();
  state = 'stopped';
  persist();
  setTimeout(() => process.exit(0), 20);
  return { state };
}

serveControl(controlPath, {
  status: (p) => awaitStatus(p as Parameters<typeof awaitStatus>[0]),
  pause: () => { if (state !== 'running') throw new Error(`VM is ${state}`); pause(); return status(); },
  resume: async () => { if (state === 'running') return status(); if (state !== 'paused' && state !== 'migrated') throw new Error(`VM is ${state}`); await run(); return status(); },
  verify: () => ({ state, checks: guest.verify() }),
  startOutgoing: (p) => startOutgoing(p as Parameters<typeof startOutgoing>[0]),
  progress: (p) => progress(p as Parameters<typeof progress>[0]),
  setPolicy: (p) => setPolicy(p as Parameters<typeof setPolicy>[0]),
  cutover: (p) => cutover(p as Parameters<typeof cutover>[0]),
  rollbackOutgoing: (p) => rollbackOutgoing(p as Parameters<typeof rollbackOutgoing>[0]),
  startDiskMirror: (p) => startDiskMirror(p as Parameters<typeof startDiskMirror>[0]),
  diskMirrorStatus: (p) => requireMirror(p.migrationId).status(),
  resumeDiskMirror: async (p) => { const m = requireMirror(p.migrationId); await m.resume(String(p.token)); return m.status(); },
  abortDiskMirror: (p) => abortDiskMirror(p as Parameters<typeof abortDiskMirror>[0]),
  switchDisks: (p) => switchDisks(p as Parameters<typeof switchDisks>[0]),
  abortIncoming: () => abortIncoming(),
  /** A guest disk write on demand, through the same fencing check as every open (used by tests). */
  guestWrite: () => {
    assertOwner(cfg.ownerPath, cfg.host, epoch);
    if (state !== 'running') throw new Error(`VM is ${state}`);
    guest.step(1000 * (4096 / Math.max(4096, cfg.spec.writeRate)));
    return { diskWrites: guest.state.diskWrites };
  },
  shutdown: () => shutdown(),
});

// The agent hands an authenticated data-plane connection over its IPC channel (SCM_RIGHTS),
// so pages flow socket → this process with no relay in between.
process.on('message', (msg: { type?: string; rest?: string }, handle?: unknown) => {
  if (msg?.type === 'dataplane' && handle instanceof net.Socket) acceptIncoming(handle, Buffer.from(msg.rest ?? '', 'base64'), msg as { auth?: GrantCheck; nonce?: string; stream?: number; streams?: number });
});
// Losing the agent must not take the VM down: the IPC channel is only for hand-overs.
process.on('disconnect', () => log('agent IPC channel closed; VM keeps running'));
process.on('SIGTERM', () => shutdown());

async function main(): Promise<void> {
  if (cfg.mode === 'boot') {
    // The fencing check comes before the first byte the guest writes, its initial fill included.
    assertOwner(cfg.ownerPath, cfg.host, epoch);
    guest.openDisks();
    guest.format();
    await run();
    log(`booted: ${cfg.spec.memoryBytes} bytes memory, ${cfg.spec.disks.length} disk(s), epoch ${epoch}`);
    reportMemoryBacking();
  } else {
    await warmSwitchOverPath();
    persist();
    log(`waiting for incoming migration ${migrationId ?? ''}`);
  }
  if (process.send) process.send({ type: 'ready', state });
}

main().catch((e: Error) => {
  log(`fatal: ${e.stack ?? e.message}`);
  state = 'failed';
  try { persist(); } catch { /* ignore */ }
  process.exit(1);
});
