// `npm run bench`: every figure measured in one run on this machine, as ratios to baselines
// measured in the same run. Starts its own Temporal dev server and lab in a temp dir and tears
// both down at the end, even on failure.
//   tsx bench/run.ts [--scale 0.25 | --quick] [--only name,name] [--prof <dir>] [--keep]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { startDevServer } from '../lab/temporal-server.js';
import { labDown, labStatus, labUp } from '../lab/lab.js';
import { VmferryClient, startMigrationSchema } from '../client/index.js';
import { Prober, type ProbeStats } from '../client/probe.js';
import type { MigrationPolicy, MigrationResult } from '../common/types.js';
import { ORCHESTRATOR_TASK_QUEUE } from '../common/names.js';
import { eventMs } from '../common/temporal.js';
import { loopbackThroughput, meminfo, memoryWork, storageThroughput, touchHugePagePool, waitForQuiet } from './baselines.js';
import { withHugetlb } from '../drivers/sim/sim-driver.js';
import { onHugePagesOf } from '../drivers/sim/prefault.js';
import { NOT_QUIET_MARK, markdown, svg, type CaseResult, type EngineAlone, type EvacuationRun, type OtherConfiguration, type Target } from './report.js';
import { runEngine } from './engine.js';
import { ensureLabPki } from '../lab/pki.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const RESULTS = path.join(HERE, 'results');
const GiB = 2 ** 30;
const MiB = 2 ** 20;

// ---------- arguments ----------
const argv = process.argv.slice(2);
const flag = (n: string): string | undefined => { const i = argv.indexOf(`--${n}`); return i >= 0 ? argv[i + 1] : undefined; };
const scale = argv.includes('--quick') ? 0.25 : Number(flag('scale') ?? 1);
if (!(scale > 0 && scale <= 4)) throw new Error(`--scale must be in (0, 4], got ${flag('scale')}`);
const only = flag('only')?.split(',');
const profDir = flag('prof');
const keep = argv.includes('--keep');
/** Streams the engine uses by default (policy.streams = 1); one case also runs with PARALLEL_STREAMS. */
const ENGINE_STREAMS: number = 1;
const PARALLEL_STREAMS = 2;
/** The bandwidth-cap case's --max-bandwidth. */
const BANDWIDTH_CAP = 64 * 2 ** 20;
/**
 * Runs of the judged idle configurations; the throughput verdict is their median. Single runs
 * on this shared VM spread over 35-121% of the pump around them, so the median of 5 still
 * flipped between runs of the same engine (66.7% in session 20's first run, 85.4% in session
 * 19's last); 9 narrow it by about a quarter (1/sqrt(9/5)) for ~25 s more per configuration.
 */
const JUDGED_RUNS = 9;
/** Policy of every case unless a case says otherwise; recorded in the results. */
const BENCH_POLICY: Partial<MigrationPolicy> = { downtimeLimitMs: 40 };

const say = (m: string): void => { process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${m}\n`); };
const roundTo = (n: number, step: number): number => Math.max(step, Math.round(n / step) * step);

function procKiB(pid: number | null | undefined, field: 'VmHWM' | 'VmRSS'): number {
  if (!pid) return 0;
  try {
    const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch { return 0; }
}

// ---------- teardown that always runs ----------
const cleanups: Array<() => Promise<void> | void> = [];
let cleaning: Promise<void> | null = null;
function cleanup(): Promise<void> {
  // Pending client calls fail as the lab goes away: that must not cut the teardown short.
  if (!cleaning) process.on('uncaughtException', (e) => say(`during teardown: ${e.message}`));
  cleaning ??= (async () => {
    for (const c of cleanups.splice(0).reverse()) { try { await c(); } catch (e) { say(`cleanup: ${(e as Error).message}`); } }
  })();
  return cleaning;
}
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => { say(`${sig}: tearing down…`); void cleanup().finally(() => process.exit(130)); });

interface CaseDef {
  name: string;
  memoryBytes: number;
  fill: number;
  dirtyFraction: number;
  policy?: Partial<MigrationPolicy>;
  expect: 'completed' | 'rolled-back';
  /** Fraction of each page that is repetitive (the compression cases). */
  compressible?: number;
  /** Between the two plaintext hosts (trusted migration network, no data-plane TLS). */
  plaintext?: boolean;
  /** Between the two plaintext hosts whose guests use reserved huge pages (host.json `hugepages`). */
  hugepages?: boolean;
  /** Runs of the case; the fastest completed one is reported (as the pumps: best of 3). */
  repeat?: number;
  /**
   * Each run between two measurements of the plain pump (as many streams as the case), taken
   * with the lab up: the run is judged against the pump of the same minute, not of the start.
   */
  paired?: boolean;
}

async function main(): Promise<void> {
  const startedAt = new Date().toISOString();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-bench-'));
  cleanups.push(() => { if (!keep) fs.rmSync(tmp, { recursive: true, force: true }); });
  say(`scale ${scale}; work dir ${tmp}`);
  // Another lab (or a forgotten one) on these cores is measured along with ours: say so, and
  // keep it in the results.
  const others = otherVmferryProcesses();
  if (others.length) say(`WARNING: ${others.length} other vmferry/Temporal process(es) run on this machine and will disturb the figures:\n  ${others.join('\n  ')}`);

  // ---------- baselines ----------
  const memBig = roundTo(GiB * scale, MiB);
  const memSmall = roundTo(256 * MiB * scale, MiB);
  const diskBytes = roundTo(2 * GiB * scale, MiB);
  say('baseline: loopback TCP pump…');
  // Best of 3 runs of max(1 GiB, VM size): the machine's capability, not its worst moment
  // (the cores are shared), so the ratios below are conservative for the engine.
  const lb1: number[] = [];
  const lbN: number[] = [];
  const pumpBytes = Math.max(GiB, memBig);
  for (let i = 0; i < 3; i++) {
    lb1.push(await loopbackThroughput(1, pumpBytes));
    lbN.push(await loopbackThroughput(2, pumpBytes));
  }
  // The same pump read straight into untouched memory (the plaintext receiver's situation):
  // shows what the first-touch faults of a fresh guest cost before the engine does anything.
  const lbFresh: number[] = [];
  for (let i = 0; i < 2; i++) lbFresh.push(await loopbackThroughput(1, pumpBytes, 'untouched-memory'));
  // The same pump over the data plane's mutual TLS (the lab's CA and two of its host
  // certificates, made here; the lab keeps them): what encryption alone leaves of the pump.
  const labDir = path.join(tmp, 'lab');
  const pki = ensureLabPki(labDir, ['benchA', 'benchB']);
  const pumpTls = { server: pki.benchB!, client: pki.benchA! };
  const tls1: number[] = [];
  const tlsN: number[] = [];
  for (let i = 0; i < 2; i++) {
    tls1.push(await loopbackThroughput(1, pumpBytes, 'discard', undefined, pumpTls));
    tlsN.push(await loopbackThroughput(PARALLEL_STREAMS, pumpBytes, 'discard', undefined, pumpTls));
  }
  const baselines: Record<string, number> = {
    'loopback TCP, 1 stream': Math.max(...lb1),
    'loopback TCP, 2 streams': Math.max(...lbN),
    'loopback TCP, 1 stream, read into untouched memory': Math.max(...lbFresh),
    'loopback TCP over the data plane\'s mutual TLS, 1 stream': Math.max(...tls1),
    'loopback TCP over the data plane\'s mutual TLS, 2 streams': Math.max(...tlsN),
  };
  const engineBaseline = ENGINE_STREAMS === 1 ? baselines['loopback TCP, 1 stream']! : baselines['loopback TCP, 2 streams']!;
  // A case is judged against the pump with as many streams as its policy opens.
  const baselineFor = (streams: number | undefined): number => ((streams ?? 1) > 1 ? baselines['loopback TCP, 2 streams']! : baselines['loopback TCP, 1 stream']!);
  // What the engine must do per byte beyond the pump, measured here: the ceiling it can reach.
  const work = memoryWork(Math.min(memBig, 256 * MiB));
  baselines['page CRC-32 (4 KiB pages)'] = work.crcBps;
  baselines['copy into untouched memory (first-touch faults)'] = work.firstTouchCopyBps;
  baselines['copy into touched memory'] = work.warmCopyBps;
  say(`loopback: 1 stream ${(baselines['loopback TCP, 1 stream']! / MiB).toFixed(0)} MiB/s, 2 streams ${(baselines['loopback TCP, 2 streams']! / MiB).toFixed(0)} MiB/s; over TLS ${(Math.max(...tls1) / MiB).toFixed(0)} / ${(Math.max(...tlsN) / MiB).toFixed(0)} MiB/s`);
  fs.mkdirSync(path.join(labDir, 'shared'), { recursive: true });
  say(`baseline: sequential write+read of ${(diskBytes / MiB).toFixed(0)} MiB on the lab's storage…`);
  const st = storageThroughput(path.join(labDir, 'shared'), diskBytes);
  baselines['storage sequential write (fsync)'] = st.writeBps;
  baselines['storage sequential read'] = st.readBps;
  if (st.directWriteBps > 0) {
    baselines['storage sequential write (O_DIRECT)'] = st.directWriteBps;
    baselines['storage sequential read (O_DIRECT)'] = st.directReadBps;
  }

  // ---------- Temporal + lab ----------
  say('starting Temporal dev server (headless)…');
  const server = await startDevServer({ logFile: path.join(tmp, 'temporal.log'), headless: true });
  cleanups.push(async () => {
    try { process.kill(server.pid, 'SIGTERM'); } catch { return; }
    for (let i = 0; i < 100; i++) { try { process.kill(server.pid, 0); } catch { return; } await sleep(100); }
    try { process.kill(server.pid, 'SIGKILL'); } catch { /* gone */ }
  });
  process.env.TEMPORAL_ADDRESS = server.address;
  if (profDir) process.env.VMFERRY_CPU_PROF_DIR = path.resolve(profDir); // the lab's processes and their VMs
  // benchA/benchB: data-plane TLS (the lab's default); benchC/benchD: plaintext (a trusted
  // migration network), where pages are read straight into guest memory.
  // benchE/benchF: plaintext, guests on reserved huge pages (as KVM hosts back guests).
  const hosts = ['benchA', 'benchB', 'benchC', 'benchD', 'benchE', 'benchF'];
  const [A, B, C, D, E, F] = hosts as [string, string, string, string, string, string];
  say('starting lab (orchestrator, agents)…');
  cleanups.push(() => labDown(labDir, { purge: false }));
  // Host limit 4: the evacuation case runs 4 migrations at a time.
  await labUp({ dir: labDir, hosts, maxConcurrentMigrations: 4, plaintextHosts: [C, D, E, F], hugepageHosts: [E, F] });
  if (profDir) delete process.env.VMFERRY_CPU_PROF_DIR;
  const client = await VmferryClient.connect({ labDir });
  cleanups.push(() => client.close());
  const agentPid = (h: string): number | null => labStatus(labDir).hosts.find((x) => x.name === h)?.pid ?? null;
  const step = await temporalStep(client, A);
  say(`Temporal step on this server (workflow task + activity round trip, median of 7): ${step.toFixed(0)} ms`);
  // Warm-up, as for the pump: one small unmeasured migration per host pair first, so the cases
  // measure steady state, not the first run of each code path (workflow sandbox, activities,
  // VM process paths). Its overhead is reported (warmUp in latest.json), not judged.
  const warmUp: Array<{ from: string; to: string; orchestrationOverheadMs: number }> = [];
  for (const [from, to] of [[A, B], [C, D], [E, F]] as const) {
    const vm = `benchwarm-${from}`;
    await client.createVm({ name: vm, host: from, memory: 16 * MiB, disk: MiB, dirtyRate: 0, writeRate: 0, fill: 1 });
    try {
      const { id } = await client.startMigration({ type: 'live', vm, from, to });
      const r = await client.awaitMigration(id);
      if (r.outcome !== 'completed') throw new Error(`warm-up migration ${from} → ${to}: ${r.outcome}: ${r.reason}`);
      const h = await historyTimes(client, id, r);
      warmUp.push({ from, to, orchestrationOverheadMs: Math.round(h.workflowMs - h.dataMovementMs) });
    } finally {
      await client.destroyVm(vm).catch(() => undefined);
    }
  }
  say(`warm-up migrations: ${warmUp.map((w) => `${w.from} → ${w.to} overhead ${w.orchestrationOverheadMs} ms`).join(', ')}`);
  const agentStart: Record<string, number> = Object.fromEntries(hosts.map((h) => [h, procKiB(agentPid(h), 'VmRSS')]));
  const runDir = (h: string): string => path.join(labDir, 'hosts', h, 'run');

  // ---------- cases ----------
  const cases: CaseDef[] = [];
  for (const [label, mem] of [['1GiB', memBig], ['256MiB', memSmall]] as const) {
    const tag = scale === 1 ? label : `${label}×${scale}`;
    // Idle 1 GiB cases (the throughput target): 3 runs, each between two pumps (paired); the
    // judged configuration JUDGED_RUNS runs, as its verdict is their median.
    const idleRuns = mem === memBig ? 3 : 1;
    const idle = { memoryBytes: mem, fill: 1, dirtyFraction: 0, expect: 'completed', repeat: idleRuns, paired: mem === memBig } as const;
    cases.push({ name: `${tag} idle`, ...idle });
    if (mem === memBig) {
      cases.push({ name: `${tag} idle, ${PARALLEL_STREAMS} streams`, ...idle, policy: { streams: PARALLEL_STREAMS } });
      cases.push({ name: `${tag} idle, plaintext data plane`, ...idle, plaintext: true });
      cases.push({ name: `${tag} idle, ${PARALLEL_STREAMS} streams, plaintext data plane`, ...idle, policy: { streams: PARALLEL_STREAMS }, plaintext: true });
      // The fastest configuration offered: trusted network, guests on huge pages, pages checked
      // by sequence number (the cutover still proves every page's last copy arrived).
      cases.push({ name: `${tag} idle, plaintext data plane, huge pages, verify sequence`, ...idle, repeat: JUDGED_RUNS, hugepages: true, policy: { verify: 'sequence' } });
      cases.push({ name: `${tag} idle, ${PARALLEL_STREAMS} streams, plaintext data plane, huge pages, verify sequence`, ...idle, repeat: JUDGED_RUNS, policy: { streams: PARALLEL_STREAMS, verify: 'sequence' }, hugepages: true });
    }
    cases.push({ name: `${tag} dirty 5%`, memoryBytes: mem, fill: 1, dirtyFraction: 0.05, expect: 'completed' });
    cases.push({ name: `${tag} dirty 25%`, memoryBytes: mem, fill: 1, dirtyFraction: 0.25, expect: 'completed' });
    cases.push({ name: `${tag} dirty 100% auto-converge`, memoryBytes: mem, fill: 1, dirtyFraction: 1, expect: 'completed' });
    if (mem === memBig) {
      cases.push({
        name: `${tag} dirty 100% no auto-converge`, memoryBytes: mem, fill: 1, dirtyFraction: 1, expect: 'rolled-back',
        policy: { autoConverge: false, maxRounds: 10_000, convergenceTimeoutMsPerGiB: 1000 },
      });
    }
  }
  cases.push({ name: `${scale === 1 ? '1GiB' : `1GiB×${scale}`} zero-heavy (90% zero pages)`, memoryBytes: memBig, fill: 0.1, dirtyFraction: 0, expect: 'completed' });
  const small = scale === 1 ? '256MiB' : `256MiB×${scale}`;
  cases.push({ name: `${small} bandwidth cap ${BANDWIDTH_CAP / MiB} MiB/s`, memoryBytes: memSmall, fill: 1, dirtyFraction: 0, expect: 'completed', policy: { maxBandwidth: BANDWIDTH_CAP } });
  for (const compression of ['none', 'deflate'] as const) {
    cases.push({ name: `${small} 70% compressible, compression ${compression}`, memoryBytes: memSmall, fill: 1, dirtyFraction: 0, expect: 'completed', compressible: 0.7, policy: { compression } });
  }
  const selected = cases.filter((c) => !only || only.some((o) => c.name.includes(o)));
  const notMeasured: Array<{ name: string; why: string }> = [];

  const results: CaseResult[] = [];
  const engineAlone: EngineAlone[] = [];
  let n = 0;
  // Huge-page cases last, with the pool reserved just for them: a reserved pool takes the
  // host's free (already backed) memory, which the other cases' fresh guests would miss.
  selected.sort((x, y) => Number(!!x.hugepages) - Number(!!y.hugepages));
  let pool: HugePool | null = null;
  for (const c of selected) {
    if (c.hugepages && !pool) {
      pool = reserveHugePages(2 * memBig + 256 * MiB);
      cleanups.push(() => pool?.release());
      if (pool.error) { notMeasured.push({ name: 'huge-page cases', why: pool.error }); say(`huge pages: ${pool.error}`); }
      else {
        say(`huge pages: ${pool.pages} × 2 MiB reserved for these cases${pool.previous !== pool.pages ? ` (vm.nr_hugepages was ${pool.previous}; restored after)` : ''}`);
        // First every free pool page touched once, unmeasured, as on a host whose reserved memory
        // is real (under this VM the hypervisor backs a page only at its first touch, ~3 s/GiB,
        // which would land in the first case otherwise). Then the measured runs.
        const hugeEnv = { ...process.env, GLIBC_TUNABLES: withHugetlb(process.env.GLIBC_TUNABLES) };
        const touched = await touchHugePagePool(hugeEnv);
        say(`huge pages: ${touched} MiB of the pool touched once (unmeasured)`);
        const fresh: number[] = [];
        for (let i = 0; i < 2; i++) fresh.push(await loopbackThroughput(1, pumpBytes, 'untouched-memory', hugeEnv));
        baselines['loopback TCP, 1 stream, read into untouched huge-page memory'] = Math.max(...fresh);
        // The engine alone (bench/engine.ts: the same two VM processes and data plane, driven
        // through their control sockets; no Temporal, no agents, no client): what the data
        // movement of the fastest configuration reaches when the control plane does not share
        // these cores. Each run against the faster of the pumps (as many streams) just before
        // and just after it, each once the machine is quiet, as the judged cases; best of 2.
        for (const streams of [1, PARALLEL_STREAMS]) {
          const runs: Array<{ bytesPerSec: number; pumpBytesPerSec: number }> = [];
          const pump = async (): Promise<number> => { await waitForQuiet(); return loopbackThroughput(streams, pumpBytes); };
          for (let i = 0; i < 2; i++) {
            const before = await pump();
            await waitForQuiet();
            const r = await runEngine({ memoryBytes: memBig, fill: 1, dirtyRate: 0, policy: { ...BENCH_POLICY, verify: 'sequence', streams }, env: hugeEnv });
            const around = Math.max(before, await pump());
            if (r.outcome === 'completed') runs.push({ bytesPerSec: (memBig / r.totalMs) * 1000, pumpBytesPerSec: around });
          }
          const best = runs.reduce<(typeof runs)[number] | null>((a, b) => (!a || b.bytesPerSec / b.pumpBytesPerSec > a.bytesPerSec / a.pumpBytesPerSec ? b : a), null);
          if (best) engineAlone.push({ streams, ...best, ratio: best.bytesPerSec / best.pumpBytesPerSec });
          say(`engine alone, ${streams} stream(s), huge pages, verify sequence: ${runs.map((x) => `${(x.bytesPerSec / MiB).toFixed(0)} MiB/s against a pump of ${(x.pumpBytesPerSec / MiB).toFixed(0)}`).join(', ')}`);
        }
      }
    }
    if (c.hugepages && pool?.error) continue;
    say(`case ${c.name}…`);
    const base = baselineFor(c.policy?.streams);
    const [from, to] = c.hugepages ? [E, F] : c.plaintext ? [C, D] : [A, B];
    const runs: CaseResult[] = [];
    for (let k = 0; k < (c.repeat ?? 1); k++) {
      runs.push(await runCase(client, c, `bench${n++}`, { A: from, B: to, engineBaseline, streamBaseline: base, agentPid, runDir, pumpBytes }).catch((e: Error) => failedCase(c, base, e)));
    }
    const completedRuns = runs.filter((x) => x.outcome === 'completed');
    const r = completedRuns.length ? completedRuns.reduce((a, b) => (b.totalMs < a.totalMs ? b : a)) : runs[0]!;
    if (runs.length > 1) r.runsTotalMs = runs.map((x) => Math.round(x.totalMs));
    if (c.paired) {
      // A run that did not complete counts as 0: the median never hides it.
      r.pairedRuns = runs.map((x) => ({ totalMs: Math.round(x.totalMs), pumpBytesPerSec: x.pairedPumpBytesPerSec ?? 0, ratio: x.outcome === 'completed' ? (x.pairedRatio ?? 0) : 0, quietWaitsMs: x.quietWaitsMs ?? [], ...(x.notQuiet ? { notQuiet: x.notQuiet } : {}) }));
      r.pairedMedianRatio = median(r.pairedRuns.map((p) => p.ratio));
    }
    const others = runs.filter((x) => x !== r && x.outcome !== 'completed').map((x) => `${x.outcome}${x.error ? ` (${x.error})` : ''}`);
    if (others.length) r.runsNotCompleted = others; // never hidden behind the best run
    results.push(r);
    say(`  ${r.outcome}: total ${r.totalMs.toFixed(0)} ms, ${(r.throughputBytesPerSec / MiB).toFixed(0)} MiB/s (${(r.throughputRatio * 100).toFixed(0)}% of baseline), downtime ${r.downtimeMs} ms${r.downtimePhasesMs ? ` (${Object.entries(r.downtimePhasesMs).map(([k, v]) => `${k} ${v}`).join(', ')}; ${r.finalPages} final pages)` : ''}, probe ${r.probe ? `lost ${r.probe.lost}, max gap ${r.probe.maxGapMs} ms` : '—'}, rounds ${r.rounds}, wire ${r.wireRatio.toFixed(3)}×, orchestration ${r.orchestrationOverheadMs.toFixed(0)} ms${r.hugePages ? `, huge pages ${r.hugePages.source ? 'yes' : 'NO'} / ${r.hugePages.destination ? 'yes' : 'NO'}` : ''}${r.error ? `, error: ${r.error}` : ''}${r.runsTotalMs ? ` [runs: ${r.runsTotalMs.join(', ')} ms]` : ''}`);
    if (r.pairedRuns) say(`  paired with the pump around each run: ${r.pairedRuns.map((p) => `${p.totalMs} ms / ${(p.pumpBytesPerSec / MiB).toFixed(0)} MiB/s = ${pct(p.ratio)} (quiet after ${p.quietWaitsMs.join('/')} ms${p.notQuiet ? `; NOT QUIET: ${p.notQuiet} of 3 waits gave up, the machine stayed busy` : ''})`).join(', ')}; median ${pct(r.pairedMedianRatio!)}`);
  }

  pool?.release();

  // ---------- storage migration / evacuation ----------
  const storageSupported = startMigrationSchema.safeParse({ type: 'storage', vm: 'x', toPath: '/tmp/x' }).success;
  let storage: Record<string, unknown> | null = null;
  if (!storageSupported) notMeasured.push({ name: `storage migration of a ${(diskBytes / GiB).toFixed(2)} GiB disk`, why: 'storage migration not implemented yet' });
  else if (!only || only.some((o) => 'storage'.includes(o))) {
    say('case storage migration…');
    storage = await storageCase(client, A, diskBytes, labDir, baselines).catch((e: Error) => ({ outcome: 'error', error: e.message }));
    say(`  storage: ${JSON.stringify(storage)}`);
  }
  const evacuations: EvacuationRun[] = [];
  if (!only || only.some((o) => 'evacuation'.includes(o))) {
    // 20 VMs off one host and back: 2 at a time there, 4 at a time on the way back.
    const evacMem = roundTo(128 * MiB * scale, MiB);
    const names = Array.from({ length: 20 }, (_, i) => `evac${i}`);
    say(`case evacuation: creating ${names.length} VMs of ${mibStr(evacMem)} on ${A}…`);
    try {
      for (const n of names) await client.createVm({ name: n, host: A, memory: evacMem, disk: MiB, dirtyRate: 4 * MiB, writeRate: 0, fill: 1 });
      for (const [from, to, concurrency] of [[A, B, 2], [B, A, 4]] as const) {
        say(`case evacuation: ${from} → ${to}, ${concurrency} at a time…`);
        evacuations.push(await evacuationRun(client, from, to, concurrency, names.length, evacMem));
        say(`  ${JSON.stringify(evacuations.at(-1))}`);
      }
    } catch (e) {
      evacuations.push({ from: A, to: B, concurrency: 0, vms: names.length, memoryBytes: evacMem, totalMs: 0, completed: 0, failed: names.length, maxDowntimeMs: 0, meanDowntimeMs: 0, vmsPerMinute: 0, error: (e as Error).message });
    } finally {
      for (const n of names) await client.destroyVm(n).catch(() => undefined);
    }
  }

  const agentEnd: Record<string, number> = Object.fromEntries(hosts.map((h) => [h, procKiB(agentPid(h), 'VmHWM')]));

  // ---------- targets ----------
  type Variant = 'tls' | 'plaintext' | 'huge';
  const variantOf = (name: string): Variant => (name.includes('huge pages') ? 'huge' : name.includes('plaintext') ? 'plaintext' : 'tls');
  const find = (frag: string, variant: Variant = 'tls'): CaseResult | undefined => results.find((r) => r.name.includes(frag) && variantOf(r.name) === variant && r.memoryBytes === memBig && r.fill === 1);
  const targets: Target[] = [];
  // The throughput target is judged on the engine's fastest configuration, the one closest to a
  // KVM host: guests on reserved huge pages, a trusted migration network, pages checked by
  // sequence number (QEMU's own migration stream is plaintext without page checksums). The
  // other configurations are reported beside the bound their data plane sets on this machine.
  const FASTEST = 'plaintext data plane, huge pages, verify sequence';
  const missing = notMeasured.find((m) => m.name === 'huge-page cases');
  for (const streams of [ENGINE_STREAMS, PARALLEL_STREAMS]) {
    const c = find(streams > 1 ? `idle, ${streams} streams` : 'idle', 'huge');
    const name = `idle ${mibStr(memBig)}${streams > 1 ? `, ${streams} streams` : ''}: memory ÷ total time vs loopback (${streams} stream${streams > 1 ? 's' : ''}), fastest configuration (${FASTEST})`;
    // Judged on the median of its runs, each against the pump measured just before and after it:
    // this machine's speed swings up to 2× within a minute, so the best run against the pumps
    // measured before the lab started compared two moments (reported beside it).
    const runs = c?.pairedRuns;
    targets.push(c && runs
      ? {
        name: `${name}, median of ${runs.length} runs against the pump around each`,
        value: `${pct(c.pairedMedianRatio!)} (runs ${runs.map((p) => `${pct(p.ratio)}${p.notQuiet ? NOT_QUIET_MARK : ''}`).join(', ')}; the best run against the pump measured before the lab: ${pct(c.throughputRatio)})`,
        target: '≥ 70%',
        pass: c.outcome === 'completed' && c.pairedMedianRatio! >= 0.7,
      }
      : c ? { name, value: pct(c.throughputRatio), target: '≥ 70%', pass: c.outcome === 'completed' && c.throughputRatio >= 0.7 }
      : { name, value: `not measured${missing ? `: ${missing.why}` : ''}`, target: '≥ 70%', pass: false });
  }
  const tlsPump = (streams: number): number => baselines[`loopback TCP over the data plane's mutual TLS, ${streams > 1 ? `${streams} streams` : '1 stream'}`]!;
  const freshPump = baselines['loopback TCP, 1 stream, read into untouched memory']!;
  const otherConfigurations: OtherConfiguration[] = [];
  for (const variant of ['tls', 'plaintext'] as const) {
    for (const streams of [ENGINE_STREAMS, PARALLEL_STREAMS]) {
      const c = find(streams > 1 ? `idle, ${streams} streams` : 'idle', variant);
      if (!c) continue;
      const bound = variant === 'tls'
        ? { what: `the pump over the data plane's TLS alone, ${streams} stream${streams > 1 ? 's' : ''}`, ratio: tlsPump(streams) / baselineFor(streams) }
        : { what: 'the pump reading into untouched memory (4 KiB first-touch faults) alone, 1 stream', ratio: freshPump / baselineFor(streams) };
      otherConfigurations.push({ name: c.name, streams, ratio: c.throughputRatio, bound: bound.what, boundRatio: bound.ratio });
    }
  }
  for (const [frag, lim] of [['dirty 5%', 50], ['dirty 25%', 150]] as const) {
    const c = find(frag);
    if (!c) continue;
    targets.push({ name: `downtime (hypervisor) at ${frag.slice(6)}, ${mibStr(memBig)}`, value: `${c.downtimeMs} ms`, target: `≤ ${lim} ms`, pass: c.outcome === 'completed' && c.downtimeMs <= lim });
    targets.push({ name: `guest probe at ${frag.slice(6)}: probes missed (10 ms interval)`, value: c.probe ? `${c.probe.lost} lost (max gap ${c.probe.maxGapMs} ms)` : null, target: '≤ 1', pass: !!c.probe && c.probe.lost <= 1 });
  }
  const ac = find('100% auto-converge');
  if (ac) targets.push({ name: 'dirty ≥ 100%: completes within the downtime limit by auto-converge', value: `${ac.outcome}, downtime ${ac.downtimeMs} ms, throttle ${ac.finalThrottle}`, target: `completed, ≤ ${String(ac.policy.downtimeLimitMs)} ms`, pass: ac.outcome === 'completed' && ac.downtimeMs <= Number(ac.policy.downtimeLimitMs) });
  const noac = find('no auto-converge');
  if (noac) targets.push({ name: 'dirty ≥ 100%, autoConverge off: clean rollback at the convergence timeout', value: `${noac.outcome}${noac.cleanRollback ? ', clean' : ', NOT clean'}: ${noac.reason}`, target: 'rolled-back, VM intact on source, nothing on destination', pass: noac.outcome === 'rolled-back' && !!noac.cleanRollback });
  const zero = results.find((r) => r.fill < 1);
  if (zero) targets.push({ name: 'zero-heavy VM: bytes on the wire ÷ memory', value: pct(zero.wireRatio), target: '≤ 12%', pass: zero.outcome === 'completed' && zero.wireRatio <= 0.12 });
  const completed = results.filter((r) => r.outcome === 'completed');
  if (completed.length) {
    const worst = Math.max(...completed.map((r) => r.orchestrationOverheadMs));
    const med = median(completed.map((r) => r.orchestrationOverheadMs));
    targets.push({ name: 'orchestration overhead per migration (worst case)', value: `${worst.toFixed(0)} ms (median ${med.toFixed(0)} ms = ${(med / step).toFixed(1)} Temporal steps of ${step.toFixed(0)} ms on this server)`, target: '≤ 250 ms', pass: worst <= 250 });
  }
  const cap = results.find((r) => r.name.includes('bandwidth cap'));
  if (cap) {
    const ratio = (cap.linkBytesPerSec ?? 0) / BANDWIDTH_CAP;
    targets.push({ name: `bandwidth cap ${BANDWIDTH_CAP / MiB} MiB/s honoured (bytes on the wire ÷ pre-copy time)`, value: `${((cap.linkBytesPerSec ?? 0) / MiB).toFixed(1)} MiB/s (${pct(ratio)} of the cap)`, target: 'within ±10%', pass: cap.outcome === 'completed' && Math.abs(ratio - 1) <= 0.1 });
  }
  const plain = results.find((r) => r.name.includes('compression none'));
  const packed = results.find((r) => r.name.includes('compression deflate'));
  if (plain && packed) {
    targets.push({
      name: 'compression: fewer bytes for compressible memory (70% repetitive pages), with its CPU cost',
      value: `wire ${pct(packed.wireRatio)} vs ${pct(plain.wireRatio)} of memory; ${packed.compression?.cpuMs ?? '?'} ms source CPU; total ${packed.totalMs.toFixed(0)} vs ${plain.totalMs.toFixed(0)} ms`,
      target: 'measurably fewer bytes (≤ 80% of uncompressed)',
      pass: packed.outcome === 'completed' && plain.outcome === 'completed' && packed.wireRatio <= 0.8 * plain.wireRatio,
    });
  }
  for (const e of evacuations) {
    targets.push({ name: `evacuation: ${e.vms} × ${mibStr(e.memoryBytes)}, ${e.concurrency} at a time`, value: e.error ? `error: ${e.error}` : `${e.completed}/${e.vms} completed in ${(e.totalMs / 1000).toFixed(1)} s (${e.vmsPerMinute} VMs/min), downtime max ${e.maxDowntimeMs} ms`, target: 'every VM moved', pass: !e.error && e.completed === e.vms });
  }
  const bigRuns = results.filter((r) => r.memoryBytes === memBig);
  // Storage migration: the copy against the file baseline (the slower of sequential read and
  // write with fsync), in one pass: the disk crosses once, plus the guest's mirrored writes.
  if (storage) {
    const st = storage as { outcome?: string; reason?: string; error?: string; ratioToStorageBaseline?: number; bytesTransferred?: number; diskBytes?: number };
    const ratio = st.ratioToStorageBaseline ?? 0;
    const passes = st.bytesTransferred && st.diskBytes ? st.bytesTransferred / st.diskBytes : 0;
    targets.push({
      name: `storage migration of a ${mibStr(diskBytes)} disk, guest writing: copy throughput vs the file baseline, one pass with writes mirrored`,
      value: st.outcome === 'completed' ? `${pct(ratio)} of min(sequential read, write with fsync); ${passes.toFixed(3)}× the disk copied (mirrored writes included)` : `${st.outcome}: ${st.reason ?? st.error ?? ''}`,
      target: '≥ 70%, one pass',
      pass: st.outcome === 'completed' && ratio >= 0.7 && passes > 0 && passes < 1.1,
    });
  }
  if (bigRuns.length) {
    const growth = Math.max(...bigRuns.flatMap((r) => Object.values(r.agentRssKiB).map((a) => a.growth)));
    targets.push({ name: `host-agent peak RSS growth while moving ${mibStr(memBig)}`, value: `${(growth / 1024).toFixed(1)} MiB`, target: '< 128 MiB', pass: growth < 128 * 1024 });
  }

  const out = {
    startedAt, scale,
    machine: { cpus: os.cpus().length, cpu: os.cpus()[0]?.model ?? '?', memGiB: +(os.totalmem() / GiB).toFixed(1), node: process.version, load: os.loadavg().map((x) => +x.toFixed(2)).join(' '), otherVmferryProcessesAtStart: others.length },
    benchPolicy: BENCH_POLICY, engineStreams: ENGINE_STREAMS, temporalStepMs: step, warmUp,
    baselines, engineAlone, cases: results, storage, evacuations, notMeasured, otherConfigurations,
    agents: Object.fromEntries(hosts.map((h) => [h, { rssAtStartKiB: agentStart[h], hwmAtEndKiB: agentEnd[h], growthKiB: (agentEnd[h] ?? 0) - (agentStart[h] ?? 0) }])),
    targets,
  };
  fs.mkdirSync(RESULTS, { recursive: true });
  fs.writeFileSync(path.join(RESULTS, 'latest.json'), JSON.stringify(out, null, 2));
  fs.writeFileSync(path.join(RESULTS, 'latest.md'), markdown(out));
  fs.writeFileSync(path.join(RESULTS, 'latest.svg'), svg(results));
  process.stdout.write(markdown(out) + '\n');
  say(`results in ${RESULTS}/latest.{json,md,svg}`);
}

/** Processes of another lab on this machine (agents, orchestrator, VMs, a Temporal dev server): pid and command line. */
function otherVmferryProcesses(): string[] {
  const out: string[] = [];
  for (const pid of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    if (Number(pid) === process.pid) continue;
    let cmd: string;
    try { cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').trim(); } catch { continue; }
    if (/worker\/(host-agent|orchestrator)\.ts|vm-process\.(ts|mjs)|temporal server start-dev/.test(cmd)) out.push(`${pid} ${cmd.slice(0, 160)}`);
  }
  return out;
}

const mibStr = (b: number): string => (b >= GiB ? `${(b / GiB).toFixed(2).replace(/\.00$/, '')} GiB` : `${(b / MiB).toFixed(0)} MiB`);
const pct = (x: number): string => `${(x * 100).toFixed(1)}%`;
/** The middle value (the upper middle of an even count). */
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

function failedCase(c: CaseDef, baseline: number, e: Error): CaseResult {
  return {
    name: c.name, memoryBytes: c.memoryBytes, fill: c.fill, dirtyFraction: c.dirtyFraction, dirtyRateBytesPerSec: Math.round(c.dirtyFraction * baseline),
    policy: { ...BENCH_POLICY, ...c.policy }, outcome: 'error', reason: e.message, error: e.message, totalMs: 0, workflowMs: 0, dataMovementMs: 0, orchestrationOverheadMs: 0,
    overheadBreakdownMs: {}, downtimeMs: 0, probe: null, rounds: 0, bytesTransferred: 0, wireRatio: 0, throughputBytesPerSec: 0, throughputRatio: 0, finalThrottle: 0, decisions: 0,
    agentRssKiB: {}, vmHwmKiB: { source: 0, destination: 0 }, verified: null,
  };
}

interface Ctx { A: string; B: string; engineBaseline: number; streamBaseline: number; agentPid: (h: string) => number | null; runDir: (h: string) => string; pumpBytes: number }

async function runCase(client: VmferryClient, c: CaseDef, vmName: string, x: Ctx): Promise<CaseResult> {
  const policy: Partial<MigrationPolicy> = { ...BENCH_POLICY, ...c.policy };
  const dirtyRate = Math.round(c.dirtyFraction * x.engineBaseline);
  await client.createVm({ name: vmName, host: x.A, memory: c.memoryBytes, disk: MiB, dirtyRate, writeRate: 0, fill: c.fill, compressible: c.compressible ?? 0 });
  try {
    const vm = (await client.vmSpec(vmName))!;
    // Paired: the plain pump just before and just after this run, with the lab as it is now;
    // each of the three measured once the machine is quiet (see waitForQuiet).
    const quietWaits: number[] = [];
    let notQuiet = 0; // gates that gave up waiting (the machine stayed busy): the run is flagged
    const quiet = async (): Promise<void> => {
      if (!c.paired) return;
      const q = await waitForQuiet();
      quietWaits.push(q.waitedMs);
      if (!q.quiet) notQuiet++;
    };
    const pump = async (): Promise<number> => { await quiet(); return loopbackThroughput(c.policy?.streams ?? 1, x.pumpBytes); };
    const pumpBefore = c.paired ? await pump() : 0;
    const agentsBefore = { [x.A]: procKiB(x.agentPid(x.A), 'VmRSS'), [x.B]: procKiB(x.agentPid(x.B), 'VmRSS') };
    // VM processes: the source's pid is known; the destination's appears once it is prepared.
    const vmHwm = { source: 0, destination: 0 };
    const destState = path.join(x.runDir(x.B), vmName, 'state.json');
    let destPid = 0;
    const sampler = setInterval(() => {
      vmHwm.source = Math.max(vmHwm.source, procKiB(vm.pid, 'VmHWM'));
      if (!destPid) { try { destPid = (JSON.parse(fs.readFileSync(destState, 'utf8')) as { pid: number }).pid; } catch { /* not yet */ } }
      vmHwm.destination = Math.max(vmHwm.destination, procKiB(destPid, 'VmHWM'));
    }, 100);
    const sourceHuge = c.hugepages ? onHugePagesOf(vm.pid, c.memoryBytes) : undefined;
    const probe = new Prober(vm.spec.probe, 10).start();
    let stats: ProbeStats | null = null;
    let r: MigrationResult;
    let totalMs: number;
    let id: string;
    try {
      await sleep(300); // the probe's first answers, before the move
      await quiet();
      // The clock starts here: the waits above are not the move's.
      const t0 = performance.now();
      // The source named, as a script that created the VM would: no lookup before the start.
      ({ id } = await client.startMigration({ type: 'live', vm: vmName, from: x.A, to: x.B, policy }));
      r = await client.awaitMigration(id);
      totalMs = performance.now() - t0;
      await sleep(200);
    } finally {
      stats = await probe.stop();
      clearInterval(sampler);
    }
    vmHwm.source = Math.max(vmHwm.source, procKiB(vm.pid, 'VmHWM'));
    vmHwm.destination = Math.max(vmHwm.destination, procKiB(destPid, 'VmHWM'));
    const agentRssKiB: CaseResult['agentRssKiB'] = {};
    for (const h of [x.A, x.B]) {
      const hwm = procKiB(x.agentPid(h), 'VmHWM');
      agentRssKiB[h] = { before: agentsBefore[h]!, hwmAfter: hwm, growth: Math.max(0, hwm - agentsBefore[h]!) };
    }
    // A pool too small for both guests makes glibc fall back to 4 KiB pages, silently: the
    // case would then measure something else than it says.
    const hugePages = sourceHuge !== undefined && r.outcome === 'completed' ? { source: sourceHuge, destination: onHugePagesOf(destPid, c.memoryBytes) } : undefined;
    // The faster of the two pumps: a pump slowed by something else never flatters the run.
    const pairedPump = c.paired ? Math.max(pumpBefore, await pump()) : 0;
    const h = await historyTimes(client, id, r);
    let verified: boolean | null = null;
    let cleanRollback: boolean | undefined;
    if (r.outcome === 'completed') verified = (await client.verifyVm(vmName)).ok;
    else if (r.outcome === 'rolled-back') {
      const where = (await client.listVms()).filter((v) => v.name === vmName);
      verified = (await client.verifyVm(vmName)).ok;
      cleanRollback = where.length === 1 && where[0]!.host === x.A && where[0]!.state === 'running' && verified && !fs.existsSync(path.join(x.runDir(x.B), vmName));
    }
    const throttles = r.decisions.map((d) => /^throttle ([\d.]+)/.exec(d.action)?.[1]).filter(Boolean).map(Number);
    const dataMs = h.dataMovementMs > 0 ? h.dataMovementMs : totalMs;
    return {
      name: c.name, memoryBytes: c.memoryBytes, fill: c.fill, dirtyFraction: c.dirtyFraction, dirtyRateBytesPerSec: dirtyRate, policy,
      outcome: r.outcome, reason: r.reason, totalMs, workflowMs: h.workflowMs, dataMovementMs: dataMs,
      orchestrationOverheadMs: Math.max(0, h.workflowMs - dataMs), overheadBreakdownMs: h.breakdown,
      downtimeMs: r.downtimeMs, probe: stats, rounds: r.rounds, bytesTransferred: r.bytesTransferred, wireRatio: r.bytesTransferred / c.memoryBytes,
      throughputBytesPerSec: (c.memoryBytes / totalMs) * 1000, throughputRatio: ((c.memoryBytes / totalMs) * 1000) / x.streamBaseline,
      ...(c.paired ? { pairedPumpBytesPerSec: pairedPump, pairedRatio: ((c.memoryBytes / totalMs) * 1000) / pairedPump, quietWaitsMs: quietWaits, ...(notQuiet ? { notQuiet } : {}) } : {}),
      finalThrottle: throttles.at(-1) ?? 0, decisions: r.decisions.length, agentRssKiB, vmHwmKiB: vmHwm, ...(hugePages ? { hugePages } : {}), verified, cleanRollback,
      linkBytesPerSec: (r.bytesTransferred / (h.precopyMs > 0 ? h.precopyMs : dataMs)) * 1000,
      downtimePhasesMs: r.cutover?.downtimePhasesMs, finalPages: r.cutover?.finalPages,
      compression: r.cutover?.rawBytes !== undefined ? { rawBytes: r.cutover.rawBytes, cpuMs: r.cutover.compressCpuMs ?? 0 } : undefined,
      error: c.expect !== r.outcome ? `expected ${c.expect}` : verified === false ? 'verify failed' : hugePages && !(hugePages.source && hugePages.destination) ? `guest memory not on huge pages (source ${hugePages.source}, destination ${hugePages.destination})` : undefined,
    };
  } finally {
    await client.destroyVm(vmName).catch(() => undefined);
  }
}

async function evacuationRun(client: VmferryClient, from: string, to: string, concurrency: number, vms: number, memoryBytes: number): Promise<EvacuationRun> {
  const t0 = performance.now();
  const { id } = await client.evacuate(from, { to: [to], concurrency, perHostLimit: concurrency, policy: BENCH_POLICY });
  const r = await client.awaitEvacuation(id);
  const totalMs = performance.now() - t0;
  const downs = r.items.filter((i) => i.state === 'completed').map((i) => i.downtimeMs ?? 0);
  return {
    from, to, concurrency, vms, memoryBytes, totalMs, completed: r.completed, failed: r.failed,
    maxDowntimeMs: downs.length ? Math.max(...downs) : 0, meanDowntimeMs: downs.length ? Math.round(downs.reduce((a, b) => a + b, 0) / downs.length) : 0,
    vmsPerMinute: +((r.completed / totalMs) * 60_000).toFixed(1),
  };
}

/** Times from the workflow history: the data-movement window and what surrounds it. */
/**
 * The floor under orchestration on this server: one workflow task plus one activity round trip
 * to a host agent (the `hostRequest` workflow listing a host's VMs), from the history's own
 * timestamps, median of 7 runs.
 */
async function temporalStep(client: VmferryClient, host: string): Promise<number> {
  const runs: number[] = [];
  for (let i = 0; i < 7; i++) {
    const h = await client.client.workflow.start('hostRequest', { taskQueue: ORCHESTRATOR_TASK_QUEUE, workflowId: `bench-step-${Date.now()}-${i}`, args: [{ op: 'listVms', host }] });
    await h.result();
    const ev = (await h.fetchHistory()).events ?? [];
    // Activity scheduled (end of the first workflow task) → the next workflow task completed.
    const scheduled = ev.find((e) => e.activityTaskScheduledEventAttributes);
    const wftDone = ev.filter((e) => e.workflowTaskCompletedEventAttributes);
    if (scheduled && wftDone.length >= 2) runs.push(eventMs(wftDone[1]!.eventTime) - eventMs(scheduled.eventTime));
  }
  runs.sort((a, b) => a - b);
  return runs[Math.floor(runs.length / 2)] ?? 0;
}

type Times = { scheduled?: number; started?: number; completed?: number };


/** Per activity type: its first and last attempt's times, and how often it was scheduled. */
async function activityTimes(client: VmferryClient, id: string): Promise<{ wfStart: number; wfEnd: number; first: Record<string, Times>; last: Record<string, Times>; count: Record<string, number> }> {
  const hist = await client.client.workflow.getHandle(id).fetchHistory();
  const sched = new Map<string, string>(); // scheduled event id → activity type
  const first: Record<string, Times> = {};
  const last: Record<string, Times> = {};
  const count: Record<string, number> = {};
  let wfStart = 0, wfEnd = 0;
  for (const e of hist.events ?? []) {
    const t = eventMs(e.eventTime);
    if (e.workflowExecutionStartedEventAttributes) wfStart = t;
    if (e.workflowExecutionCompletedEventAttributes || e.workflowExecutionFailedEventAttributes) wfEnd = t;
    const s = e.activityTaskScheduledEventAttributes;
    if (s) {
      const name = s.activityType?.name ?? '?';
      sched.set(String(e.eventId), name);
      first[name] ??= { scheduled: t };
      last[name] = { scheduled: t };
      count[name] = (count[name] ?? 0) + 1;
    }
    const st = e.activityTaskStartedEventAttributes;
    if (st) { const name = sched.get(String(st.scheduledEventId)) ?? '?'; first[name]!.started ??= t; last[name]!.started = t; }
    const co = e.activityTaskCompletedEventAttributes;
    if (co) { const name = sched.get(String(co.scheduledEventId)) ?? '?'; first[name]!.completed ??= t; last[name]!.completed = t; }
  }
  return { wfStart, wfEnd, first, last, count };
}

async function historyTimes(client: VmferryClient, id: string, r?: MigrationResult): Promise<{ workflowMs: number; dataMovementMs: number; precopyMs: number; breakdown: Record<string, number> }> {
  const { wfStart, wfEnd, first, last } = await activityTimes(client, id);
  const startData = first.startOutgoing?.started ?? 0;
  // A cutover made in the round that converged (patch 'cutover-in-round') ends with that round's
  // awaitProgress; it began at the pause (source clock, this machine's).
  const inRound = !!r?.cutover && !last.cutover;
  const endData = last.cutover?.completed ?? (inRound ? last.awaitProgress?.completed : undefined) ?? last.rollbackOutgoing?.completed ?? 0;
  const cutoverBegan = inRound ? r!.cutover!.pausedAt : last.cutover?.started;
  const workflowMs = wfEnd - wfStart;
  const breakdown: Record<string, number> = {};
  if (startData) {
    breakdown['start → startOutgoing (preflight, prepare destination)'] = startData - wfStart;
    if (first.prepareIncoming?.completed && first.prepareIncoming.started) breakdown['prepareIncoming activity'] = first.prepareIncoming.completed - first.prepareIncoming.started;
  }
  if (last.cutover?.started && last.awaitProgress?.completed) breakdown['last progress → cutover started (decision)'] = last.cutover.started - last.awaitProgress.completed;
  if (endData) breakdown['data end → workflow end (cleanup)'] = wfEnd - endData;
  // Pre-copy alone (the capped stream): startOutgoing returned → cutover began.
  const precopyMs = first.startOutgoing?.completed && cutoverBegan ? cutoverBegan - first.startOutgoing.completed : 0;
  return { workflowMs, dataMovementMs: startData && endData ? endData - startData : 0, precopyMs, breakdown };
}

async function storageCase(client: VmferryClient, host: string, diskBytes: number, labDir: string, baselines: Record<string, number>): Promise<Record<string, unknown>> {
  const name = 'benchdisk';
  // A disk full of data (an empty one would only measure holes), the guest writing meanwhile.
  await client.createVm({ name, host, memory: 64 * MiB, disk: diskBytes, dirtyRate: 0, writeRate: 1 * MiB, fill: 0.5, diskFill: 1 });
  try {
    const toPath = path.join(labDir, 'hosts', host, 'local', 'vms', name);
    const t0 = performance.now();
    const { id } = await client.startMigration({ type: 'storage', vm: name, toPath } as Parameters<VmferryClient['startMigration']>[0]);
    // Generous, but bounded: a stuck move is reported, not waited for.
    const limitMs = Math.max(60_000, (diskBytes / (20 * MiB)) * 1000);
    const r = await Promise.race([client.awaitMigration(id), sleep(limitMs).then(() => null)]);
    if (!r) {
      const p = await client.progress(id).catch(() => null);
      await client.client.workflow.getHandle(id).terminate('bench: storage migration did not finish in time').catch(() => undefined);
      return { outcome: 'timeout', reason: `did not finish within ${Math.round(limitMs / 1000)} s (phase ${p?.phase ?? '?'}); workflow terminated`, diskBytes };
    }
    const totalMs = performance.now() - t0;
    // Judged against the slower of plain sequential read and write (fsync) of a file this size:
    // the stricter reading of "the file baseline" (a plain read+write copy would be slower still).
    const base = Math.min(baselines['storage sequential read']!, baselines['storage sequential write (fsync)']!);
    // The same against the device itself (O_DIRECT, what the mirror uses): how far from the ceiling.
    const direct = Math.min(baselines['storage sequential read (O_DIRECT)'] ?? 0, baselines['storage sequential write (O_DIRECT)'] ?? 0);
    const bytesPerSec = (diskBytes / totalMs) * 1000;
    return {
      outcome: r.outcome, reason: r.reason, totalMs, diskBytes, bytesPerSec, ratioToStorageBaseline: bytesPerSec / base, bytesTransferred: r.bytesTransferred,
      ratioToDirectIoBaseline: direct > 0 ? bytesPerSec / direct : undefined,
      breakdownMs: await storageBreakdown(client, id, totalMs, path.join(labDir, 'hosts', host, 'run', name, 'vm.log')),
    };
  } finally {
    await client.destroyVm(name).catch(() => undefined);
  }
}

/**
 * Where a storage migration's time goes: the workflow's steps from its history, and inside the
 * mirror step, the bulk copy and the verification as the VM process logged them.
 */
async function storageBreakdown(client: VmferryClient, id: string, totalMs: number, vmLog: string): Promise<Record<string, number>> {
  const { wfStart, wfEnd, last, count } = await activityTimes(client, id);
  const act = (n: string): (Times & { count: number }) | undefined => (last[n] ? { ...last[n], count: count[n] ?? 0 } : undefined);
  const out: Record<string, number> = {};
  const put = (k: string, a?: number, b?: number): void => { if (a && b) out[k] = Math.round(b - a); };
  const start = act('startLocalDiskMirror'), follow = act('awaitDiskMirror'), sw = act('switchDisks'), del = act('deleteOldDiskFiles');
  put('workflow start → copy started (preflight, startLocalDiskMirror)', wfStart, start?.completed);
  put('copy started → synced seen by the workflow (awaitDiskMirror)', start?.completed, follow?.completed);
  put('synced seen → switchDisks started', follow?.completed, sw?.started);
  put('switchDisks (verify byte for byte, switch)', sw?.started, sw?.completed);
  put('switch → deleteOldDiskFiles started', sw?.completed, del?.started);
  put('deleteOldDiskFiles', del?.started, del?.completed);
  put('old files deleted → workflow end', del?.completed, wfEnd);
  if (wfStart && wfEnd) out['client: outside the workflow (start call, result)'] = Math.round(totalMs - (wfEnd - wfStart));
  if (follow) out['awaitDiskMirror calls (count, not ms)'] = follow.count;
  // The VM's own account (drivers/sim/disk-mirror.ts logs it): copy, flush, verification.
  try {
    const text = fs.readFileSync(vmLog, 'utf8');
    const copy = /\[disk mirror\] bulk copy of \d+ MiB in (\d+) ms, flush (\d+) ms/.exec(text);
    const verify = /\[disk mirror\] verified \d+ MiB byte for byte in (\d+) ms/.exec(text);
    const syncedAt = /(\S+) \[disk mirror\] bulk copy of/.exec(text);
    if (copy) { out['of which: bulk copy (VM log)'] = Number(copy[1]); out['of which: flush of the copy, fdatasync (VM log)'] = Number(copy[2]); }
    if (syncedAt && follow?.completed) out['of which: synced → seen by the workflow (awaitDiskMirror polls every 250 ms)'] = Math.round(follow.completed - Date.parse(syncedAt[1]!));
    if (verify) out['of which: verification (VM log)'] = Number(verify[1]);
  } catch { /* no log: history only */ }
  return out;
}

main().then(() => cleanup(), async (e: Error) => { say(`FAILED: ${e.stack ?? e.message}`); await cleanup(); process.exit(1); }).then(() => process.exit(0));

interface HugePool { pages: number; previous: number; error?: string; release(): void }

/**
 * Makes sure the host's huge-page pool holds `bytes` (root raises vm.nr_hugepages for the run
 * and puts it back after); without root or memory for it, says why instead.
 */
function reserveHugePages(bytes: number): HugePool {
  const file = '/proc/sys/vm/nr_hugepages';
  const need = Math.ceil(bytes / (2 * MiB));
  let previous = 0;
  try { previous = Number(fs.readFileSync(file, 'utf8')); } catch { return { pages: 0, previous: 0, error: 'no huge-page support on this host (/proc/sys/vm/nr_hugepages)', release: () => undefined }; }
  if (meminfo('Hugepagesize') !== 2048) return { pages: 0, previous, error: `huge pages of ${meminfo('Hugepagesize')} kB, not 2 MiB`, release: () => undefined };
  let changed = false;
  if (meminfo('HugePages_Free') < need) {
    if (process.getuid?.() !== 0) return { pages: previous, previous, error: `the huge-page pool has ${meminfo('HugePages_Free')} free pages, these cases need ${need}: sysctl vm.nr_hugepages=${previous + need} (root)`, release: () => undefined };
    const grow = (): void => fs.writeFileSync(file, String(meminfo('HugePages_Total') + need - meminfo('HugePages_Free')));
    grow();
    changed = true;
    // A host up for a while has its free memory in pieces: the kernel finds 2 MiB blocks only
    // after compacting it, and then after dropping clean page cache (re-read on demand).
    for (const [knob, value, what] of [['compact_memory', '1', 'memory compacted'], ['drop_caches', '1', 'clean page cache dropped, memory compacted']] as const) {
      if (meminfo('HugePages_Free') >= need) break;
      try {
        fs.writeFileSync(`/proc/sys/vm/${knob}`, value);
        if (knob === 'drop_caches') fs.writeFileSync('/proc/sys/vm/compact_memory', '1');
        grow();
        say(`huge pages: ${what} to reserve the pool (${meminfo('HugePages_Free')} of ${need} free)`);
      } catch (e) { say(`huge pages: ${knob}: ${(e as Error).message}`); }
    }
  }
  const release = (): void => { if (changed) { changed = false; try { fs.writeFileSync(file, String(previous)); } catch { /* leave it */ } } };
  const free = meminfo('HugePages_Free');
  if (free < need) { release(); return { pages: free, previous, error: `only ${free} of ${need} huge pages could be reserved (memory fragmented, even after compaction)`, release }; }
  return { pages: meminfo('HugePages_Total'), previous, release };
}
