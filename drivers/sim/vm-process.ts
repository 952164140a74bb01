// One simulated VM = one OS process (like a qemu process under libvirtd). It owns the guest
// memory, disks and workload, answers probes, and runs its own migration jobs: the source
// streams pages straight to the destination VM process (no relay hop), as QEMU does.
// Usage: vm-process <runtime-dir>   (reads <runtime-dir>/vm.json)
import fs from 'node:fs';
import path from 'node:path';
import net from 'node:net';
import dgram from 'node:dgram';
import { setTimeout as sleep } from 'node:timers/promises';
import { Guest, ZERO_PAGE, type DeviceState } from './guest.js';
import { serveControl } from './control.js';
import { assertOwner, updateOwner, FencedError } from './ownership.js';
import { PAGE_SIZE, type VmSpec, type VmState, type MigrationPolicy, type ProgressSample, type CutoverResult } from '../../common/types.js';
import { FrameChannel, FrameType, header, jsonFrame, writeAll, crc32, ZERO_FLAG, parseJson, type Frame } from '../../dataplane/frames.js';
import { connectDataPlane } from '../../dataplane/endpoint.js';

export interface VmRuntimeConfig {
  spec: VmSpec;
  host: string;
  mode: 'boot' | 'incoming';
  epoch: number;
  diskPaths: Record<string, string>;
  ownerPath: string;
  migrationId?: string;
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
  device: DeviceState;
  startedAt: string;
}

const runtimeDir = path.resolve(process.argv[2] ?? '.');
const cfg = JSON.parse(fs.readFileSync(path.join(runtimeDir, 'vm.json'), 'utf8')) as VmRuntimeConfig;
const statePath = path.join(runtimeDir, 'state.json');
const controlPath = path.join(runtimeDir, 'control.sock');
const ZERO_CRC = crc32(ZERO_PAGE) >>> 0;
const BATCH = 64;

const guest = new Guest(cfg.spec, cfg.diskPaths);
let state: VmState = cfg.mode === 'incoming' ? 'incoming' : 'paused';
let epoch = cfg.epoch;
let migrationId = cfg.migrationId;
const startedAt = new Date().toISOString();
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
}

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
    device: { ...guest.state },
    startedAt,
  };
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

async function run(): Promise<void> {
  assertOwner(cfg.ownerPath, cfg.host, epoch);
  guest.openDisks();
  state = 'running';
  await bindProbe();
  let last = performance.now();
  workloadTimer = setInterval(() => {
    const now = performance.now();
    guest.step(Math.min(100, now - last));
    last = now;
  }, 5);
  persist();
}

function pause(): void {
  if (workloadTimer) clearInterval(workloadTimer);
  workloadTimer = null;
  state = 'paused';
  unbindProbe();
  persist();
}

// ---------- outgoing memory job (source side) ----------

interface Outgoing {
  id: string;
  state: 'precopy' | 'stopping' | 'cutover' | 'done' | 'failed' | 'cancelled';
  sock: net.Socket;
  chan: FrameChannel;
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
  error?: string;
  cutover?: Promise<CutoverResult>;
  result?: CutoverResult;
  bucketAt: number;
  /** Set during cutover: the last dirty pages go out even though pre-copy was stopped. */
  finalFlush?: boolean;
}
let outgoing: Outgoing | null = null;

async function sendPages(o: Outgoing, pages: number[], from: number): Promise<number> {
  // Returns how many of `pages` (starting at `from`) went out; stops early when asked to.
  let i = from;
  while (i < pages.length) {
    if (o.stop && !o.finalFlush) break;
    const batch = pages.slice(i, i + BATCH);
    i += batch.length;
    const meta = Buffer.allocUnsafe(4 + batch.length * 8);
    meta.writeUInt32LE(batch.length, 0);
    const datas: Buffer[] = [];
    batch.forEach((p, k) => {
      // Clear the dirty bit and copy in the same tick: a later write re-dirties the page.
      if (guest.dirty[p]) { guest.dirty[p] = 0; guest.dirtyCount--; }
      const src = guest.memory.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      let crc: number;
      if (src.readUInt32LE(0) === 0 && src.equals(ZERO_PAGE)) {
        meta.writeUInt32LE((p | ZERO_FLAG) >>> 0, 4 + k * 8);
        crc = ZERO_CRC;
      } else {
        const copy = Buffer.from(src);
        datas.push(copy);
        meta.writeUInt32LE(p, 4 + k * 8);
        crc = crc32(copy) >>> 0;
      }
      meta.writeUInt32LE(crc, 8 + k * 8);
      o.crcs[p] = crc;
    });
    const bodyLen = meta.length + datas.length * PAGE_SIZE;
    await writeAll(o.sock, [header(FrameType.Pages, bodyLen, crc32(meta)), meta, ...datas]);
    o.bytesSent += bodyLen + 12;
    o.pagesSent += datas.length;
    if (o.policy.maxBandwidth > 0) {
      // Token bucket on wall time: sleep until the bytes sent so far are within the cap.
      o.bucketAt = Math.max(o.bucketAt, performance.now() - 50) + ((bodyLen + 12) / o.policy.maxBandwidth) * 1000;
      const wait = o.bucketAt - performance.now();
      if (wait > 1) await sleep(wait);
    }
  }
  return i;
}

function dirtyList(): number[] {
  const out: number[] = [];
  const d = guest.dirty;
  for (let p = 0; p < d.length; p++) if (d[p]) out.push(p);
  return out;
}

async function precopy(o: Outgoing): Promise<void> {
  while (!o.stop) {
    const t0 = performance.now();
    const sentBefore = o.bytesSent;
    guest.dirtiedSinceMark = 0;
    let pages: number[];
    if (o.round === 0) {
      guest.markAllClean();
      pages = [];
      for (let p = 0; p < guest.pages; p++) if (!guest.isZeroPage(p)) pages.push(p);
      // Mark them dirty so an interrupted first round leaves them for the final copy.
      for (const p of pages) guest.markDirty(p);
    } else {
      pages = dirtyList();
    }
    await sendPages(o, pages, 0);
    if (o.stop) break; // interrupted: unsent pages are still dirty
    const dt = Math.max(1, performance.now() - t0);
    const bw = ((o.bytesSent - sentBefore) / dt) * 1000;
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
      expectedDowntimeMs: bandwidth > 0 ? Math.round((guest.dirtyCount * PAGE_SIZE * 1000) / bandwidth) + 2 : 1e9,
      state: 'precopy',
    };
    o.samples.push(sample);
    if (o.samples.length > 64) o.samples.shift();
    for (const w of o.waiters.splice(0)) w();
    // Small dirty sets would spin; give the guest (and the decision) a moment.
    const spent = performance.now() - t0;
    if (spent < 20) await sleep(20 - spent);
  }
}

async function startOutgoing(p: { migrationId: string; endpoint: { host: string; port: number }; token: string; policy: MigrationPolicy }): Promise<{ started: boolean }> {
  if (outgoing && outgoing.id === p.migrationId && outgoing.state !== 'failed' && outgoing.state !== 'cancelled') return { started: false };
  if (outgoing && (outgoing.state === 'precopy' || outgoing.state === 'cutover' || outgoing.state === 'stopping')) throw new Error(`VM ${cfg.spec.name} is already migrating (${outgoing.id})`);
  if (state !== 'running') throw new Error(`VM ${cfg.spec.name} is ${state}, not running`);
  const chan = await connectDataPlane(p.endpoint, { migrationId: p.migrationId, vm: cfg.spec.name, token: p.token, kind: 'memory', from: cfg.host });
  const sock = { sock: chan.sock };
  const o: Outgoing = {
    id: p.migrationId, state: 'precopy', sock: sock.sock, chan, policy: p.policy, round: 0, bytesSent: 0, pagesSent: 0,
    startedAt: performance.now(), crcs: new Uint32Array(guest.pages).fill(ZERO_CRC), samples: [], waiters: [], stop: false,
    loop: Promise.resolve(), bucketAt: performance.now(),
  };
  chan.onFrame = (f) => {
    if (f.type !== FrameType.Error || o.state !== 'precopy') return false;
    fail(o, `destination refused: ${parseJson<{ message: string }>(f).message}`);
    return true;
  };
  migrationId = p.migrationId;
  outgoing = o;
  sock.sock.on('close', () => {
    if (o.state === 'precopy' || o.state === 'stopping') fail(o, 'data-plane connection to the destination closed');
  });
  o.loop = precopy(o).catch((e: Error) => fail(o, e.message));
  persist();
  log(`outgoing migration ${p.migrationId} to ${p.endpoint.host}:${p.endpoint.port}`);
  return { started: true };
}

function fail(o: Outgoing, error: string): void {
  if (o.state === 'done' || o.state === 'failed' || o.state === 'cancelled') return;
  o.error = error;
  o.state = 'failed';
  o.stop = true;
  o.sock.destroy();
  for (const w of o.waiters.splice(0)) w();
  log(`outgoing migration ${o.id} failed: ${error}`);
  persist();
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
  return { ...base, bytesSent: o.bytesSent, pagesSent: o.pagesSent };
}

function setPolicy(p: { migrationId: string; throttle?: number; maxBandwidth?: number }): { throttle: number } {
  const o = requireOutgoing(p.migrationId);
  if (typeof p.throttle === 'number') guest.state.throttle = Math.min(0.99, Math.max(0, p.throttle));
  if (typeof p.maxBandwidth === 'number') o.policy.maxBandwidth = p.maxBandwidth;
  return { throttle: guest.state.throttle };
}

async function doCutover(o: Outgoing, verify: 'digest' | 'full'): Promise<CutoverResult> {
  o.stop = true;
  o.state = 'stopping';
  await o.loop;
  if (o.error) throw new Error(o.error);
  o.state = 'cutover';
  pause();
  const pausedAt = Date.now();
  const t0 = performance.now();
  const finalList = dirtyList();
  o.finalFlush = true;
  await sendPages(o, finalList, 0);
  const digest = crc32(Buffer.from(o.crcs.buffer)) >>> 0;
  const sourceFullCrc = verify === 'full' ? crc32(guest.memory) >>> 0 : undefined;
  await writeAll(o.sock, [jsonFrame(FrameType.Device, { device: guest.state, digest, verify })]);
  const v = await o.chan.expect<{ digest: number; fullCrc?: number }>(FrameType.Verified);
  if (v.digest !== digest) throw new Error(`memory digest mismatch at cutover: source ${digest}, destination ${v.digest}`);
  if (verify === 'full' && v.fullCrc !== sourceFullCrc) throw new Error(`full memory CRC mismatch: source ${sourceFullCrc}, destination ${v.fullCrc}`);
  // Handoff. From the rename on, this process can never write or run again (fencing).
  guest.closeDisks();
  const newEpoch = epoch + 1;
  updateOwner(cfg.ownerPath, (cur) => {
    if (!cur || cur.host !== cfg.host || cur.epoch !== epoch || cur.state !== 'active') throw new FencedError(cfg.host, epoch, cur);
    return { host: destHost!, epoch: newEpoch, state: 'handoff', from: cfg.host, migrationId: o.id };
  });
  state = 'migrated';
  persist();
  await writeAll(o.sock, [jsonFrame(FrameType.Go, { epoch: newEpoch })]);
  const r = await o.chan.expect<{ resumedAt: number }>(FrameType.Resumed, 30_000);
  const downtimeMs = Math.round(performance.now() - t0);
  o.state = 'done';
  o.sock.end();
  const result: CutoverResult = {
    pausedAt, resumedAt: r.resumedAt, downtimeMs, finalPages: finalList.length, bytesSent: o.bytesSent,
    sourceDigest: digest, destinationDigest: v.digest, sourceFullCrc, destinationFullCrc: v.fullCrc, epoch: newEpoch,
    deviceState: { vcpuTicks: guest.state.vcpuTicks, memWrites: guest.state.memWrites, diskWrites: guest.state.diskWrites },
  };
  o.result = result;
  fs.writeFileSync(path.join(runtimeDir, `cutover-${o.id}.json`), JSON.stringify(result));
  log(`cutover ${o.id} done: downtime ${downtimeMs} ms, final ${finalList.length} pages`);
  return result;
}
let destHost: string | undefined;

async function cutover(p: { migrationId: string; verify?: 'digest' | 'full'; destination: string }): Promise<CutoverResult> {
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
async function rollbackOutgoing(p: { migrationId: string }): Promise<{ runsOn: 'source' | 'destination'; state: VmState; epoch: number }> {
  if (outgoing && outgoing.id === p.migrationId) {
    const o = outgoing;
    if (o.state !== 'done' && o.state !== 'failed') { o.error = 'cancelled'; o.state = 'cancelled'; }
    o.stop = true;
    o.sock.destroy();
    await o.loop.catch(() => undefined);
    if (o.cutover) await o.cutover.catch(() => undefined);
    for (const w of o.waiters.splice(0)) w();
  }
  if (state === 'running') {
    if (migrationId === p.migrationId) { migrationId = undefined; outgoing = null; persist(); }
    return { runsOn: 'source', state, epoch };
  }
  let runsOn = 'source' as 'source' | 'destination';
  const rec = updateOwner(cfg.ownerPath, (cur) => {
    if (cur && cur.host === cfg.host && cur.state === 'active' && cur.epoch === epoch) return cur;
    if (cur && cur.state === 'handoff' && cur.from === cfg.host && cur.migrationId === p.migrationId) {
      return { host: cfg.host, epoch: cur.epoch + 1, state: 'active', migrationId: p.migrationId };
    }
    runsOn = 'destination';
    if (!cur) throw new FencedError(cfg.host, epoch, cur);
    return cur;
  });
  if (runsOn === 'destination') {
    state = 'migrated';
    persist();
    return { runsOn, state, epoch };
  }
  epoch = rec.epoch;
  await run();
  migrationId = undefined;
  outgoing = null;
  persist();
  log(`rolled back ${p.migrationId}: running again at epoch ${epoch}`);
  return { runsOn, state, epoch };
}

// ---------- incoming (destination side) ----------

interface Incoming {
  state: 'waiting' | 'receiving' | 'verified' | 'running' | 'failed' | 'aborted';
  bytes: number;
  pages: number;
  crcs: Uint32Array;
  error?: string;
  sock?: net.Socket;
}
let incoming: Incoming | null = cfg.mode === 'incoming'
  ? { state: 'waiting', bytes: 0, pages: 0, crcs: new Uint32Array(guest.pages).fill(ZERO_CRC) }
  : null;

function applyPages(inc: Incoming, body: Buffer): void {
  const n = body.readUInt32LE(0);
  let dataOff = 4 + n * 8;
  if (body.length < dataOff) throw new Error('page frame shorter than its index');
  for (let k = 0; k < n; k++) {
    const raw = body.readUInt32LE(4 + k * 8);
    const crc = body.readUInt32LE(8 + k * 8);
    const zero = (raw & ZERO_FLAG) !== 0;
    const p = (raw & ~ZERO_FLAG) >>> 0;
    if (p >= guest.pages) throw new Error(`page ${p} outside guest memory of ${guest.pages} pages`);
    const dst = guest.memory.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
    if (zero) {
      if (crc !== ZERO_CRC) throw new Error(`zero page ${p} with a non-zero checksum`);
      dst.fill(0);
    } else {
      if (dataOff + PAGE_SIZE > body.length) throw new Error('page frame truncated');
      const data = body.subarray(dataOff, dataOff + PAGE_SIZE);
      dataOff += PAGE_SIZE;
      if ((crc32(data) >>> 0) !== crc) throw new Error(`page ${p} failed its checksum`);
      data.copy(dst);
      inc.pages++;
    }
    inc.crcs[p] = crc;
  }
  if (dataOff !== body.length) throw new Error('page frame has trailing bytes');
  inc.bytes += body.length + 12;
}

async function onIncomingFrame(inc: Incoming, f: Frame): Promise<void> {
  switch (f.type) {
    case FrameType.Pages:
      applyPages(inc, f.body);
      return;
    case FrameType.Device: {
      const d = parseJson<{ device: DeviceState; digest: number; verify: 'digest' | 'full' }>(f);
      guest.state = { ...d.device };
      const digest = crc32(Buffer.from(inc.crcs.buffer)) >>> 0;
      const fullCrc = d.verify === 'full' ? crc32(guest.memory) >>> 0 : undefined;
      inc.state = 'verified';
      await writeAll(inc.sock!, [jsonFrame(FrameType.Verified, { digest, fullCrc })]);
      return;
    }
    case FrameType.Go: {
      const g = parseJson<{ epoch: number }>(f);
      if (inc.state !== 'verified') throw new Error(`GO before verification (state ${inc.state})`);
      if (inc.state !== 'verified') throw new Error(`GO in state ${inc.state}`);
      // Claim (compare-and-set): fails if the source reclaimed the VM meanwhile.
      updateOwner(cfg.ownerPath, (o) => {
        if (!o || o.state !== 'handoff' || o.host !== cfg.host || o.epoch !== g.epoch) throw new FencedError(cfg.host, g.epoch, o);
        return { host: cfg.host, epoch: g.epoch, state: 'active', migrationId };
      });
      epoch = g.epoch;
      inc.state = 'running';
      await run();
      guest.markAllClean();
      migrationId = undefined; // the migration is over for this copy: it is now the VM
      persist();
      const resumedAt = Date.now();
      await writeAll(inc.sock!, [jsonFrame(FrameType.Resumed, { resumedAt })]);
      log(`resumed at epoch ${epoch}`);
      return;
    }
    default:
      throw new Error(`unexpected ${FrameType[f.type]} frame on an incoming migration`);
  }
}

function acceptIncoming(sock: net.Socket, rest: Buffer): void {
  const inc = incoming;
  if (!inc || inc.state !== 'waiting') {
    sock.end(jsonFrame(FrameType.Error, { message: `VM ${cfg.spec.name} is not waiting for a migration` }));
    return;
  }
  inc.state = 'receiving';
  inc.sock = sock;
  const chan = new FrameChannel(sock, rest);
  let chain = Promise.resolve();
  chan.onFrame = (f) => {
    chain = chain.then(() => onIncomingFrame(inc, f)).catch((e: Error) => {
      inc.error = e.message;
      if (inc.state !== 'running') inc.state = 'failed';
      log(`incoming failed: ${e.message}`);
      sock.end(jsonFrame(FrameType.Error, { message: e.message }));
      persist();
    });
    return true;
  };
  sock.on('close', () => {
    if (inc.state === 'receiving' || inc.state === 'verified') {
      inc.state = 'failed';
      inc.error = 'data-plane connection closed before the switchover';
      persist();
    }
  });
  void writeAll(sock, [jsonFrame(FrameType.Welcome, { vm: cfg.spec.name, pages: guest.pages })]);
  persist();
}

/** Destroys an incoming VM unless it already runs (then the caller must go forward instead). */
function abortIncoming(): { aborted: boolean; state: VmState } {
  if (state === 'running') return { aborted: false, state };
  if (incoming) { incoming.state = 'aborted'; incoming.sock?.destroy(); }
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
  status: () => status(),
  pause: () => { if (state !== 'running') throw new Error(`VM is ${state}`); pause(); return status(); },
  resume: async () => { if (state === 'running') return status(); if (state !== 'paused' && state !== 'migrated') throw new Error(`VM is ${state}`); await run(); return status(); },
  verify: () => ({ state, checks: guest.verify() }),
  startOutgoing: (p) => startOutgoing(p as Parameters<typeof startOutgoing>[0]),
  progress: (p) => progress(p as Parameters<typeof progress>[0]),
  setPolicy: (p) => setPolicy(p as Parameters<typeof setPolicy>[0]),
  cutover: (p) => cutover(p as Parameters<typeof cutover>[0]),
  rollbackOutgoing: (p) => rollbackOutgoing(p as Parameters<typeof rollbackOutgoing>[0]),
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
  if (msg?.type === 'dataplane' && handle instanceof net.Socket) acceptIncoming(handle, Buffer.from(msg.rest ?? '', 'base64'));
});
// Losing the agent must not take the VM down: the IPC channel is only for hand-overs.
process.on('disconnect', () => log('agent IPC channel closed; VM keeps running'));
process.on('SIGTERM', () => shutdown());

async function main(): Promise<void> {
  if (cfg.mode === 'boot') {
    guest.format();
    await run();
    log(`booted: ${cfg.spec.memoryBytes} bytes memory, ${cfg.spec.disks.length} disk(s), epoch ${epoch}`);
  } else {
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
