// The fault-injection harness: runs one move, injects one fault at one point, heals what was
// killed (as a supervisor would), waits for the workflow to end, and checks the invariants of
// "always a way back". Used by `npm run faults` (the full matrix) and by the test suite (a
// representative subset). Everything is real: server, agents, VM processes, files, sockets.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { labDown, labStatus, labUp } from '../lab/lab.js';
import { startDevServer, type DevServer } from '../lab/temporal-server.js';
import { MigrationRefusedError, VmferryClient, type StartMigrationInput } from '../client/index.js';
import { isAlive } from '../drivers/sim/sim-driver.js';
import { echoes } from '../client/probe.js';
import type { HostConfig } from '../common/host-config.js';
import type { MigrationResult } from '../common/types.js';

export type Move = 'live' | 'storage' | 'shared-nothing';
export type Point = 'preflight' | 'precopy' | 'mirror' | 'cutover' | 'cleanup' | 'rollback';
export type Fault =
  | 'kill-source-agent'
  | 'kill-destination-agent'
  | 'kill-worker'
  | 'restart-temporal'
  | 'cut-dataplane'
  | 'stall-dataplane'
  | 'storage-full'
  | 'destination-refuses'
  | 'activity-timeout'
  | 'cancel'
  | 'lost-ack'
  | 'digest-mismatch';

export interface Case { move: Move; point: Point; fault: Fault }

export interface CaseResult extends Case {
  outcome: string;
  reason: string;
  recoveryMs: number;
  invariants: Record<string, boolean | string>;
  ok: boolean;
  error?: string;
}

const MiB = 2 ** 20;

export class FaultLab {
  private constructor(
    readonly dir: string,
    private server: DevServer,
    readonly hosts: [string, string],
    readonly client: VmferryClient,
    private readonly faultsFile: string,
    /** Hosts without data-plane TLS (the zero-copy receive path). */
    private readonly plaintext = false,
  ) {}

  /** A dedicated server (so it can be restarted with its SQLite file) and a two-host lab. */
  static async start(opts: { plaintext?: boolean } = {}): Promise<FaultLab> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-faults-'));
    const server = await startDevServer({ dbFile: path.join(dir, 'temporal.db'), logFile: path.join(dir, 'temporal.log'), headless: true });
    const faultsFile = path.join(dir, 'faults.json');
    fs.writeFileSync(faultsFile, '{}');
    process.env.TEMPORAL_ADDRESS = server.address;
    process.env.VMFERRY_FAULTS_FILE = faultsFile;
    const tag = crypto.randomBytes(2).toString('hex');
    const hosts: [string, string] = [`fa-${tag}`, `fb-${tag}`];
    await labUp({ dir: path.join(dir, 'lab'), hosts, plaintextHosts: opts.plaintext ? hosts : undefined });
    const client = await VmferryClient.connect({ labDir: path.join(dir, 'lab') });
    return new FaultLab(dir, server, hosts, client, faultsFile, opts.plaintext);
  }

  get labDir(): string { return path.join(this.dir, 'lab'); }

  arm(points: Record<string, string>): void { fs.writeFileSync(this.faultsFile, JSON.stringify(points)); }

  hostConfig(h: string): HostConfig { return JSON.parse(fs.readFileSync(path.join(this.labDir, 'hosts', h, 'host.json'), 'utf8')) as HostConfig; }

  private pidOf(what: 'worker' | string): number {
    const st = labStatus(this.labDir);
    return (what === 'worker' ? st.worker.pid : st.hosts.find((h) => h.name === what)?.pid) ?? 0;
  }

  async kill(what: 'worker' | string, sig: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const pid = this.pidOf(what);
    if (!pid) return;
    process.kill(pid, sig);
    if (sig === 'SIGKILL') while (isAlive(pid)) await sleep(20);
  }

  async heal(): Promise<void> {
    await labUp({ dir: this.labDir, hosts: this.hosts, plaintextHosts: this.plaintext ? this.hosts : undefined });
  }

  async restartTemporal(downMs = 1500): Promise<void> {
    const port = this.server.port;
    process.kill(this.server.pid, 'SIGKILL');
    while (isAlive(this.server.pid)) await sleep(20);
    await sleep(downMs);
    this.server = await startDevServer({ dbFile: path.join(this.dir, 'temporal.db'), logFile: path.join(this.dir, 'temporal.log'), headless: true, port });
  }

  vmPid(host: string, vm: string): number | null {
    try { return (JSON.parse(fs.readFileSync(path.join(this.hostConfig(host).runDir, vm, 'state.json'), 'utf8')) as { pid: number }).pid; } catch { return null; }
  }

  async stop(): Promise<void> {
    await this.client.close().catch(() => undefined);
    await labDown(this.labDir, { purge: true }).catch(() => undefined);
    try { process.kill(this.server.pid, 'SIGTERM'); } catch { /* gone */ }
    for (let i = 0; i < 50 && isAlive(this.server.pid); i++) await sleep(100);
    try { process.kill(this.server.pid, 'SIGKILL'); } catch { /* gone */ }
    for (const m of this.mounts) { try { execFileSync('umount', [m]); } catch { /* gone */ } }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  mounts: string[] = [];
}

/** Polls until `fn` returns a truthy value (errors count as not yet: the server may be down). */
async function until<T>(what: string, fn: () => Promise<T | null | undefined | false>, timeoutMs = 60_000): Promise<T> {
  return untilOr(what, fn, () => false, timeoutMs) as Promise<T>;
}

async function untilOr<T>(what: string, fn: () => Promise<T | null | undefined | false>, stop: () => boolean, timeoutMs = 60_000): Promise<T | null> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  while (Date.now() < deadline) {
    if (stop()) return null;
    try { const v = await fn(); if (v) return v; } catch (e) { last = (e as Error).message; }
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}${last ? ` (${last})` : ''}`);
}

function vmSize(c: Case): { memory: string; disk: string; writeRate: string; dirtyRate: string; diskFill: number; storage: string } {
  const local = c.move !== 'live';
  return { memory: '32MiB', disk: local ? '32MiB' : '8MiB', writeRate: '1MiB', dirtyRate: '2MiB', diskFill: local ? 0.8 : 0.3, storage: local ? 'local' : 'shared' };
}

/** Runs one case end to end and checks the invariants. */
export async function runCase(lab: FaultLab, c: Case): Promise<CaseResult> {
  const [A, B] = lab.hosts;
  const vm = `f${crypto.randomBytes(3).toString('hex')}`;
  const invariants: Record<string, boolean | string> = {};
  let outcome = 'unknown';
  let reason = '';
  let recoveryMs = 0;
  lab.arm({});
  try {
    const size = vmSize(c);
    await lab.client.createVm({ name: vm, host: A, fill: 0.6, ...size });
    // The move, slowed down so the fault lands where it is meant to.
    const slow = c.point === 'precopy' || c.point === 'mirror' || c.point === 'rollback';
    const bw = slow ? 6 * MiB : 0;
    let spec: StartMigrationInput;
    const target = c.fault === 'storage-full' ? await fullTarget(lab, c.move === 'storage' ? A : B, vm) : undefined;
    // Pre-copy may take a while under a fault (heartbeat timeouts, restarts): give it a minute.
    const patience = { convergenceTimeoutMsPerGiB: 2_000_000 };
    if (c.move === 'live') spec = { type: 'live', vm, to: B, policy: { maxBandwidth: bw, ...patience } };
    else if (c.move === 'storage') spec = { type: 'storage', vm, toPath: target ?? path.join(lab.hostConfig(A).storageRoots.find((r) => r.name === 'local2')!.path, vm), maxBandwidth: bw };
    else spec = { type: 'shared-nothing', vm, to: B, toPath: target, policy: { maxBandwidth: bw, ...patience } };

    if (c.fault === 'destination-refuses') {
      // The destination's capacity is too small: it must refuse, and nothing may change.
      const cfgPath = path.join(lab.labDir, 'hosts', B, 'host.json');
      const cfg = lab.hostConfig(B);
      fs.writeFileSync(cfgPath, JSON.stringify({ ...cfg, memoryCapacityBytes: MiB }, null, 2));
      await lab.kill(B);
      await lab.heal();
      try { await runAndHeal(); } finally {
        fs.writeFileSync(cfgPath, JSON.stringify(cfg, null, 2));
        await lab.kill(B);
        await lab.heal();
      }
    } else {
      await runAndHeal();
    }

    async function runAndHeal(): Promise<void> {
      const armedAtStart = c.fault === 'lost-ack' || c.fault === 'digest-mismatch';
      if (c.point === 'cutover' && !armedAtStart) lab.arm({ 'cutover-after-pause': 'delay:1500' });
      if (c.point === 'cleanup') lab.arm({ 'before-release-source': 'delay:1500' });
      if (c.fault === 'lost-ack') lab.arm({ 'destination-after-resume': 'drop-ack' });
      // The destination finds the memory digest wrong after the source handed over and sent GO.
      if (c.fault === 'digest-mismatch') lab.arm({ 'destination-digest': 'mismatch' });
      if (c.point === 'rollback') lab.arm({ 'rollback-step': 'delay:1500' });
      const probe = c.point === 'cutover' ? (await lab.client.vmSpec(vm))!.spec.probe : undefined;
      // A refusal is synchronous (the admission update): its workflow ended failed, and is read below.
      const { id } = await lab.client.startMigration(spec).catch((e: unknown) => {
        if (c.fault === 'destination-refuses' && e instanceof MigrationRefusedError) return { id: e.id };
        throw e;
      });
      // Wait for the injection point (or the end: a fault armed at the start may end it first).
      let ended = false;
      const watching = lab.client.awaitMigration(id).then(() => { ended = true; }, () => undefined);
      const reach = <T>(what: string, fn: () => Promise<T | null | undefined | false>) => untilOr(what, fn, () => ended);
      if (c.point === 'precopy') await reach('pre-copy under way', async () => { const p = await lab.client.progress(id); return p.phase === 'precopy' && p.bytesTransferred > 2 * MiB; });
      if (c.point === 'mirror') await reach('mirror under way', async () => ((await lab.client.progress(id)).bytesCopied ?? 0) > 4 * MiB);
      // The round that converges cuts over inside the source's awaitProgress (patch
      // 'cutover-in-round'): the workflow learns of it only after. The guest held paused (the
      // fault above) stops answering its probe: two misses in a row mark the cutover.
      if (probe) await reach('cutover', async () => (await lab.client.progress(id)).phase === 'cutover' || (!(await echoes(probe)) && !(await echoes(probe))));
      // A live move releases its source inside the cutover activity (patch 'release-in-cutover'):
      // its cleanup begins once the destination runs the VM, while the release is held back.
      if (c.point === 'cleanup') {
        await reach('cleanup', async () => (await lab.client.progress(id)).phase === 'cleanup'
          || (c.move === 'live' && (await lab.client.listVms()).some((v) => v.name === spec.vm && v.host === B && v.state === 'running')));
      }
      if (c.point === 'rollback') {
        // Crash during the rollback itself: cancel mid-copy, then strike while compensations run.
        await reach('copy under way', async () => { const p = await lab.client.progress(id); return p.bytesTransferred + (p.bytesCopied ?? 0) > 2 * MiB; });
        await lab.client.cancelMigration(id);
        await reach('rollback', async () => (await lab.client.progress(id)).phase === 'rollback');
      }
      const injectedAt = Date.now();
      const srcHost = A;
      const dstHost = c.move === 'storage' ? A : B;
      switch (c.fault) {
        case 'kill-source-agent': await lab.kill(srcHost); await sleep(300); await lab.heal(); break;
        case 'kill-destination-agent': await lab.kill(dstHost); await sleep(300); await lab.heal(); break;
        case 'kill-worker': await lab.kill('worker'); await sleep(300); await lab.heal(); break;
        case 'restart-temporal': await lab.restartTemporal(); break;
        case 'cut-dataplane': {
          // A real connection cut: the kernel aborts every TCP connection to the destination's
          // data-plane port (ss -K), as a failing link or middlebox reset would; both ends see it.
          const dp = lab.hostConfig(B).dataPlane;
          execFileSync('ss', ['-K', 'dst', dp.host, 'dport', '=', `:${dp.port}`], { stdio: 'ignore' });
          break;
        }
        case 'stall-dataplane': {
          const pid = lab.vmPid(B, vm) ?? 0;
          if (pid) { process.kill(pid, 'SIGSTOP'); await sleep(8000); process.kill(pid, 'SIGCONT'); }
          break;
        }
        case 'activity-timeout': await lab.kill(srcHost, 'SIGSTOP'); await sleep(7000); await lab.kill(srcHost, 'SIGCONT'); break;
        case 'cancel': await lab.client.cancelMigration(id); break;
        default: break; // storage-full, destination-refuses, lost-ack, digest-mismatch: armed before the start
      }
      const r: MigrationResult = await until('workflow end', () => lab.client.awaitMigration(id), 180_000);
      recoveryMs = Date.now() - injectedAt;
      // Settled too before the case ends: a call of it retrying across a server restart would
      // otherwise fire its retry after the client closed (the SDK's retry then throws in a timer).
      await Promise.race([watching, sleep(30_000)]);
      outcome = r.outcome;
      reason = r.reason;
    }
    lab.arm({});
    await checkInvariants(lab, c, vm, outcome, reason, invariants);
  } catch (e) {
    lab.arm({});
    return { ...c, outcome, reason, recoveryMs, invariants, ok: false, error: (e as Error).message };
  } finally {
    await lab.client.destroyVm(vm).catch(() => undefined);
  }
  const ok = Object.values(invariants).every((v) => v === true);
  return { ...c, outcome, reason, recoveryMs, invariants, ok };
}

async function fullTarget(lab: FaultLab, host: string, vm: string): Promise<string> {
  const root = lab.hostConfig(host).storageRoots.find((r) => r.name === 'local2')!.path;
  const dir = path.join(root, `full-${vm}`);
  fs.mkdirSync(dir, { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', dir]);
  lab.mounts.push(dir);
  return path.join(dir, vm);
}

async function checkInvariants(lab: FaultLab, c: Case, vm: string, outcome: string, reason: string, inv: Record<string, boolean | string>): Promise<void> {
  const [A, B] = lab.hosts;
  const copies = (await lab.client.listVms()).filter((v) => v.name === vm);
  const running = copies.filter((v) => v.state === 'running');
  // 1. exactly one running copy
  inv.exactlyOneRunning = running.length === 1 || `running on ${running.map((v) => v.host).join(', ') || 'no host'}`;
  const home = running[0]?.host;
  // 5. a terminal outcome that says what happened
  inv.terminalOutcome = ['completed', 'rolled-back', 'failed'].includes(outcome) && reason.length > 0 || `outcome ${outcome}`;
  const expectedHome = outcome === 'completed' ? (c.move === 'storage' ? A : B) : A;
  inv.vmWhereOutcomeSays = home === expectedHome || `outcome ${outcome} but VM on ${home}`;
  // 2 + 3. guest ledger: memory consistent, every acknowledged write on the disk it uses
  if (home) {
    const v = await lab.client.verifyVm(vm);
    inv.ledgerVerifies = v.ok || v.checks.filter((x) => !x.ok).map((x) => x.detail).join('; ');
  } else inv.ledgerVerifies = 'no running copy';
  // 4. no orphans on the host it does not run on (process, runtime, disk copies, markers)
  const other = c.move === 'storage' ? null : home === A ? B : A;
  const orphans: string[] = [];
  if (other) {
    const cfg = lab.hostConfig(other);
    if (fs.existsSync(path.join(cfg.runDir, vm))) orphans.push(`${other}: runtime dir`);
    for (const r of cfg.storageRoots.filter((x) => !x.shared)) {
      if (fs.existsSync(path.join(r.path, 'vms', vm))) orphans.push(`${other}: ${r.name}/vms/${vm}`);
    }
  }
  // Storage moves: the files the VM does not use are gone.
  const cfgA = lab.hostConfig(A);
  for (const r of cfgA.storageRoots.filter((x) => !x.shared)) {
    for (const d of fs.existsSync(r.path) ? fs.readdirSync(r.path) : []) {
      const candidate = d === 'vms' ? path.join(r.path, 'vms', vm) : path.join(r.path, d, vm);
      if (!fs.existsSync(candidate)) continue;
      const inUse = home === A && (() => {
        try { return Object.values((JSON.parse(fs.readFileSync(path.join(cfgA.runDir, vm, 'vm.json'), 'utf8')) as { diskPaths: Record<string, string> }).diskPaths).some((p) => p.startsWith(candidate + path.sep)); } catch { return false; }
      })();
      if (!inUse && fs.readdirSync(candidate).length > 0) orphans.push(`${A}: ${candidate}`);
    }
  }
  inv.noOrphans = orphans.length === 0 || orphans.join(', ');
}

/** The full matrix: every move × point × fault that applies. */
export function matrix(): Case[] {
  const cases: Case[] = [];
  const add = (move: Move, point: Point, faults: Fault[]): void => { for (const fault of faults) cases.push({ move, point, fault }); };
  add('live', 'preflight', ['destination-refuses']);
  add('live', 'precopy', ['kill-source-agent', 'kill-destination-agent', 'kill-worker', 'restart-temporal', 'cut-dataplane', 'stall-dataplane', 'activity-timeout', 'cancel']);
  // restart-temporal at the cutover: the round cuts over with the server away (its answer and
  // the destination's supervision may be lost), settled through the ownership records.
  add('live', 'cutover', ['kill-source-agent', 'kill-destination-agent', 'kill-worker', 'restart-temporal', 'cancel', 'lost-ack', 'digest-mismatch']);
  add('live', 'cleanup', ['kill-source-agent', 'kill-worker', 'cancel']);
  add('storage', 'mirror', ['kill-source-agent', 'kill-worker', 'restart-temporal', 'activity-timeout', 'cancel', 'storage-full']);
  add('storage', 'cleanup', ['kill-source-agent']);
  add('shared-nothing', 'preflight', ['destination-refuses']);
  add('shared-nothing', 'mirror', ['kill-source-agent', 'kill-destination-agent', 'kill-worker', 'restart-temporal', 'cut-dataplane', 'cancel', 'storage-full']);
  add('shared-nothing', 'precopy', ['kill-destination-agent', 'cut-dataplane', 'cancel']);
  add('shared-nothing', 'cutover', ['kill-source-agent', 'restart-temporal', 'lost-ack', 'digest-mismatch']);
  add('shared-nothing', 'cleanup', ['kill-source-agent']);
  // Rollback must itself survive crashes (and is idempotent when retried).
  add('live', 'rollback', ['kill-source-agent', 'kill-destination-agent', 'kill-worker']);
  add('shared-nothing', 'rollback', ['kill-source-agent', 'kill-destination-agent']);
  return cases;
}

/** At least one case of every fault kind and every move, for `npm test`. */
export function representative(): Case[] {
  return [
    { move: 'live', point: 'precopy', fault: 'kill-source-agent' },
    { move: 'live', point: 'precopy', fault: 'cut-dataplane' },
    { move: 'live', point: 'precopy', fault: 'stall-dataplane' },
    { move: 'live', point: 'precopy', fault: 'activity-timeout' },
    { move: 'live', point: 'cutover', fault: 'lost-ack' },
    { move: 'live', point: 'cutover', fault: 'kill-worker' },
    { move: 'live', point: 'cutover', fault: 'restart-temporal' },
    { move: 'live', point: 'preflight', fault: 'destination-refuses' },
    { move: 'storage', point: 'mirror', fault: 'restart-temporal' },
    { move: 'storage', point: 'mirror', fault: 'storage-full' },
    { move: 'shared-nothing', point: 'mirror', fault: 'kill-destination-agent' },
    { move: 'shared-nothing', point: 'precopy', fault: 'cancel' },
    { move: 'shared-nothing', point: 'rollback', fault: 'kill-source-agent' },
    { move: 'shared-nothing', point: 'cutover', fault: 'digest-mismatch' },
  ];
}
