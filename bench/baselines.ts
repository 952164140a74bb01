// Baselines the engine is judged against, measured on this machine in the same run:
//  - loopback TCP: a plain socket pump between two Node processes (a sink that discards, a
//    writer of 1 MiB buffers), with 1 or N parallel streams; and the same pump over the data
//    plane's mutual TLS (what encryption alone leaves of the pump on this CPU);
//  - storage: sequential write (with fsync) then read of a file of the disk's size, through the
//    page cache as a plain program does it, and the same with O_DIRECT (the device itself).
import fs from 'node:fs';
import path from 'node:path';
import net from 'node:net';
import tls from 'node:tls';
import zlib from 'node:zlib';
import { alignedBuffer } from '../drivers/sim/disk-mirror.js';
import { readInto } from '../dataplane/placing-reader.js';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const SELF = fileURLToPath(import.meta.url);

/** Both ends' TLS material for the TLS pump: mutual TLS against one CA, as the data plane runs it. */
export interface PumpTls { server: { ca: string; cert: string; key: string }; client: { ca: string; cert: string; key: string } }
const PUMP_TLS_ENV = 'VMFERRY_BENCH_PUMP_TLS';
const pumpTls = (): PumpTls | undefined => (process.env[PUMP_TLS_ENV] ? (JSON.parse(process.env[PUMP_TLS_ENV]) as PumpTls) : undefined);
const tlsFiles = (t: { ca: string; cert: string; key: string }): tls.SecureContextOptions => ({ ca: fs.readFileSync(t.ca), cert: fs.readFileSync(t.cert), key: fs.readFileSync(t.key), minVersion: 'TLSv1.2' });

/** Child mode: `node baselines.ts sink` listens, prints its port, counts bytes per connection. */
async function sinkMain(): Promise<void> {
  const serve = (s: net.Socket): void => {
    let n = 0;
    s.on('data', (c: Buffer) => { n += c.length; });
    s.on('end', () => { s.end(JSON.stringify({ bytes: n })); });
  };
  const t = pumpTls();
  const server = t ? tls.createServer({ ...tlsFiles(t.server), requestCert: true, rejectUnauthorized: true }, serve) : net.createServer(serve);
  server.listen(0, '127.0.0.1', () => process.stdout.write(`${(server.address() as net.AddressInfo).port}\n`));
}

/**
 * Child mode: `node baselines.ts sink-fresh <bytes>`: like sink, but each connection reads
 * straight into `bytes` of untouched memory (Node's onread), as the plaintext receiver does
 * into an incoming guest: the first-touch page faults are part of the receive.
 */
async function sinkFreshMain(size: number): Promise<void> {
  const server = net.createServer({ pauseOnConnect: true }, (s0) => {
    const mem = new Uint8Array(new SharedArrayBuffer(size));
    let n = 0;
    // The plaintext receiver's own handle move (nothing was read yet: pauseOnConnect).
    const s = readInto(s0, { buffer: () => mem.subarray(n % size, Math.min(size, (n % size) + (1 << 20))), callback: (k) => { n += k; return true; } })!;
    s.on('end', () => { s.end(JSON.stringify({ bytes: n })); });
  });
  server.listen(0, '127.0.0.1', () => process.stdout.write(`${(server.address() as net.AddressInfo).port}\n`));
}

/** A /proc/meminfo figure (kB, or pages for the HugePages_ lines). */
export const meminfo = (k: string): number => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
/** Huge pages nobody holds or has reserved (a private MAP_HUGETLB mapping reserves at mmap). */
export const hugePagesAvailable = (): number => meminfo('HugePages_Free') - meminfo('HugePages_Rsvd');

/**
 * Child mode: `node baselines.ts touch-hugepages` (run with glibc.malloc.hugetlb=2): takes the
 * free huge-page pool 32 MiB at a time, touching every page, until a mapping no longer comes
 * from the pool; prints the MiB touched. One big mapping would not do: larger than what is left
 * (the process's own allocations take pool pages too) it silently falls back to 4 KiB pages.
 */
function touchHugePagesMain(): void {
  const chunk = 32 << 20;
  const held: Uint8Array[] = [];
  while (hugePagesAvailable() >= chunk / (2 << 20)) {
    const before = hugePagesAvailable();
    const m = new Uint8Array(new SharedArrayBuffer(chunk));
    if (hugePagesAvailable() >= before) break; // not from the pool: fell back
    for (let i = 0; i < m.length; i += 4096) m[i] = 1;
    held.push(m);
  }
  process.stdout.write(`${held.length * (chunk >> 20)}\n`);
}

/**
 * Touches every free page of the huge-page pool once. Under a VM whose memory its hypervisor
 * backs only at first touch (this one), a page's first use costs ~3 s/GiB; on a host with real
 * RAM it would not. Returns the MiB touched.
 */
export async function touchHugePagePool(env: NodeJS.ProcessEnv): Promise<number> {
  return Number((await runNode(['touch-hugepages'], env).done).trim());
}

/** Child mode: `node baselines.ts pump <port> <streams> <bytesPerStream>`: prints {ms, bytes}. */
async function pumpMain(port: number, streams: number, perStream: number): Promise<void> {
  const buf = Buffer.alloc(1 << 20, 0xa5);
  const t0 = performance.now();
  await Promise.all(Array.from({ length: streams }, () => new Promise<void>((resolve, reject) => {
    const t = pumpTls();
    // The peer's certificate is checked against the CA; the data plane checks its CN against the grant, not a host name.
    const s = t ? tls.connect({ port, host: '127.0.0.1', ...tlsFiles(t.client), checkServerIdentity: () => undefined }) : net.connect(port, '127.0.0.1');
    s.on('error', reject);
    let sent = 0;
    const pump = (): void => {
      while (sent < perStream) {
        sent += buf.length;
        if (!s.write(buf)) { s.once('drain', pump); return; }
      }
      s.end();
    };
    s.on(t ? 'secureConnect' : 'connect', pump);
    s.on('data', () => undefined);
    s.on('close', () => resolve());
  })));
  const ms = performance.now() - t0;
  process.stdout.write(JSON.stringify({ ms, bytes: streams * perStream }) + '\n');
}

function runNode(args: string[], env?: NodeJS.ProcessEnv): { child: ReturnType<typeof spawn>; firstLine: Promise<string>; done: Promise<string> } {
  const child = spawn(process.execPath, ['--import', 'tsx', SELF, ...args], { stdio: ['ignore', 'pipe', 'inherit'], env: env ?? process.env });
  let out = '';
  let firstResolve: (s: string) => void;
  const firstLine = new Promise<string>((r) => { firstResolve = r; });
  child.stdout!.on('data', (c: Buffer) => { out += c.toString(); const nl = out.indexOf('\n'); if (nl >= 0) firstResolve(out.slice(0, nl)); });
  const done = new Promise<string>((resolve, reject) => child.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`baseline child ${args[0]} exited ${code}`)))));
  done.catch(() => undefined);
  return { child, firstLine, done };
}

/** Busy and total jiffies of all CPUs (/proc/stat), and how many CPUs. */
function cpuJiffies(): { busy: number; total: number; cpus: number } {
  const lines = fs.readFileSync('/proc/stat', 'utf8').split('\n');
  const f = lines[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  return { busy: total - f[3]! - (f[4] ?? 0), total, cpus: lines.filter((l) => /^cpu\d/.test(l)).length };
}

/**
 * Waits until the machine is quiet: less than `busyCores` of CPU in use over `windowMs`, or
 * `maxWaitMs` passed. A measurement that starts while the lab's processes work (a spare VM
 * booting after a move, a source being cleaned up) measures them too. Returns the wait.
 */
export async function waitForQuiet(o: { busyCores?: number; windowMs?: number; maxWaitMs?: number } = {}): Promise<{ waitedMs: number; quiet: boolean; busyCores: number }> {
  const { busyCores = 0.2, windowMs = 200, maxWaitMs = 10_000 } = o;
  const t0 = performance.now();
  let busy = Infinity;
  for (;;) {
    const a = cpuJiffies();
    await new Promise((r) => setTimeout(r, windowMs));
    const b = cpuJiffies();
    busy = b.total > a.total ? ((b.busy - a.busy) / (b.total - a.total)) * a.cpus : 0;
    const waitedMs = Math.round(performance.now() - t0);
    if (busy < busyCores) return { waitedMs, quiet: true, busyCores: busy };
    if (waitedMs >= maxWaitMs) return { waitedMs, quiet: false, busyCores: busy };
  }
}

/** Loopback TCP throughput (bytes/s) of a plain pump with `streams` parallel connections (over mutual TLS with `overTls`). */
export async function loopbackThroughput(streams: number, totalBytes: number, into: 'discard' | 'untouched-memory' = 'discard', sinkEnv?: NodeJS.ProcessEnv, overTls?: PumpTls): Promise<number> {
  if (overTls && into !== 'discard') throw new Error('the TLS pump only discards');
  const tlsEnv = overTls ? { ...process.env, [PUMP_TLS_ENV]: JSON.stringify(overTls) } : undefined;
  const sink = runNode(into === 'discard' ? ['sink'] : ['sink-fresh', String(Math.max(1 << 20, totalBytes))], sinkEnv ?? tlsEnv);
  try {
    const port = Number(await sink.firstLine);
    const perStream = Math.max(1 << 20, Math.floor(totalBytes / streams / (1 << 20)) * (1 << 20));
    // Warm-up, then the measured run (a TLS run includes its handshakes, as a migration's does).
    await runNode(['pump', String(port), String(streams), String(64 << 20)], tlsEnv).done;
    const r = JSON.parse(await runNode(['pump', String(port), String(streams), String(perStream)], tlsEnv).done) as { ms: number; bytes: number };
    return (r.bytes / r.ms) * 1000;
  } finally {
    sink.child.kill('SIGTERM');
  }
}

/**
 * Sequential write (1 MiB blocks, fsync) then read of a `size`-byte file in `dir`, buffered (the
 * read finds the file in the page cache: it was just written); then the same with O_DIRECT, 4 MiB
 * blocks, into a fresh sparse file as the disk mirror writes its target (0 where the file system
 * refuses O_DIRECT). Bytes/s each.
 */
export function storageThroughput(dir: string, size: number): { writeBps: number; readBps: number; directWriteBps: number; directReadBps: number } {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `baseline-${process.pid}.img`);
  const direct = path.join(dir, `baseline-direct-${process.pid}.img`);
  const buf = Buffer.alloc(1 << 20);
  for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE((i * 2654435761) >>> 0, i);
  try {
    let fd = fs.openSync(file, 'w');
    let t0 = performance.now();
    for (let off = 0; off < size; off += buf.length) fs.writeSync(fd, buf, 0, Math.min(buf.length, size - off), off);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const writeBps = (size / (performance.now() - t0)) * 1000;
    fd = fs.openSync(file, 'r');
    t0 = performance.now();
    for (let off = 0; off < size; off += buf.length) fs.readSync(fd, buf, 0, Math.min(buf.length, size - off), off);
    fs.closeSync(fd);
    const readBps = (size / (performance.now() - t0)) * 1000;
    fs.rmSync(file, { force: true });
    return { writeBps, readBps, ...directThroughput(direct, size) };
  } finally {
    fs.rmSync(file, { force: true });
    fs.rmSync(direct, { force: true });
  }
}

function directThroughput(file: string, size: number): { directWriteBps: number; directReadBps: number } {
  const chunk = 4 << 20;
  const buf = alignedBuffer(chunk); // O_DIRECT wants page-aligned memory
  for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE((i * 2654435761) >>> 0, i);
  let fd: number;
  try { fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_DIRECT); } catch { return { directWriteBps: 0, directReadBps: 0 }; }
  try {
    fs.ftruncateSync(fd, size);
    let t0 = performance.now();
    for (let off = 0; off < size; off += chunk) fs.writeSync(fd, buf, 0, Math.min(chunk, size - off), off);
    fs.fdatasyncSync(fd);
    const directWriteBps = (size / (performance.now() - t0)) * 1000;
    t0 = performance.now();
    for (let off = 0; off < size; off += chunk) fs.readSync(fd, buf, 0, Math.min(chunk, size - off), off);
    const directReadBps = (size / (performance.now() - t0)) * 1000;
    return { directWriteBps, directReadBps };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * The per-byte work a migration adds to the pump, on one core: CRC-32 of 4 KiB pages (both ends
 * checksum every page), and copying into guest memory the destination never touched (every 4 KiB
 * page a first-touch fault; THP is off unless the host enables it) or already touched. Bytes/s.
 */
/** Results land here so the CRC loop has an observable effect. */
export let crcSink = 0;
export function memoryWork(size: number): { crcBps: number; firstTouchCopyBps: number; warmCopyBps: number } {
  const src = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i += 4) src.writeUInt32LE((i * 2654435761) >>> 0, i);
  const rate = (fn: () => void): number => { const t0 = performance.now(); fn(); return (size / (performance.now() - t0)) * 1000; };
  const crcBps = rate(() => { for (let o = 0; o < size; o += 4096) crcSink ^= zlib.crc32(src.subarray(o, o + 4096)); });
  const dst = Buffer.alloc(size); // calloc: untouched zero pages until written
  const copy = (): void => { for (let o = 0; o < size; o += 1 << 16) dst.set(src.subarray(o, o + (1 << 16)), o); };
  const firstTouchCopyBps = rate(copy);
  const warmCopyBps = rate(copy);
  return { crcBps, firstTouchCopyBps, warmCopyBps };
}

if (process.argv[1] && path.resolve(process.argv[1]) === SELF) {
  const [mode, ...rest] = process.argv.slice(2);
  if (mode === 'sink') await sinkMain();
  else if (mode === 'sink-fresh') await sinkFreshMain(Number(rest[0]));
  else if (mode === 'touch-hugepages') touchHugePagesMain();
  else if (mode === 'pump') await pumpMain(Number(rest[0]), Number(rest[1]), Number(rest[2]));
  else {
    const bps = await loopbackThroughput(Number(mode ?? 1), 2 ** 30);
    console.log(`loopback ${mode ?? 1} stream(s): ${(bps / 2 ** 20).toFixed(0)} MiB/s`);
  }
}
