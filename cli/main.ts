#!/usr/bin/env node
// vmferry CLI: a thin layer over client/ and lab/. Exit codes (README, "Exit codes"):
//   0 ok / migration completed   2 bad input (nothing changed)   3 migration rolled back
//   4 migration failed           1 anything else (e.g. Temporal unreachable)
import path from 'node:path';
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import cliProgress from 'cli-progress';
import { VmferryClient, UsageError, type MigrationStatus } from '../client/index.js';
import { Prober } from '../client/probe.js';
import { labDown, labStatus, labUp, labDir } from '../lab/lab.js';
import { formatBytes, parseSize } from '../common/sizes.js';
import type { CutoverResult, MigrationPolicy, MigrationResult } from '../common/types.js';

export const EXIT = { ok: 0, error: 1, usage: 2, rolledBack: 3, failed: 4 } as const;

const out = (o: unknown): void => { process.stdout.write(JSON.stringify(o, null, 2) + '\n'); };
const intArg = (name: string) => (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`${name} must be a whole number`);
  return n;
};
const durationArg = (v: string): number => {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(v);
  if (!m) throw new InvalidArgumentError(`bad duration "${v}" (e.g. 500ms, 5s, 2m)`);
  return Number(m[1]) * (m[2] === 'm' ? 60_000 : m[2] === 'ms' ? 1 : 1000);
};

async function withClient<T>(fn: (c: VmferryClient) => Promise<T>): Promise<T> {
  const c = await VmferryClient.connect({ labDir: program.opts().lab as string | undefined });
  try { return await fn(c); } finally { await c.close(); }
}

function outcomeExit(outcome: string): number {
  return outcome === 'completed' ? EXIT.ok : outcome === 'rolled-back' ? EXIT.rolledBack : outcome === 'running' ? EXIT.ok : EXIT.failed;
}

export function resultJson(r: MigrationResult | MigrationStatus): Record<string, unknown> {
  return {
    id: r.id, type: r.type, vm: r.vm, from: r.from, to: r.to, outcome: r.outcome, reason: r.reason,
    durationMs: r.durationMs, downtimeMs: r.downtimeMs,
    ...('cutover' in r && r.cutover?.downtimePhasesMs ? { downtimePhasesMs: r.cutover.downtimePhasesMs } : {}),
    rounds: r.rounds, bytesTransferred: r.bytesTransferred,
    decisions: r.decisions, ...('phase' in r ? { phase: r.phase } : {}), ...('uiUrl' in r && r.uiUrl ? { uiUrl: r.uiUrl } : {}),
  };
}

/** Where a cutover's downtime went (CutoverResult.downtimePhasesMs), in words. */
export function downtimePhases(p: NonNullable<CutoverResult['downtimePhasesMs']>): string {
  return `last dirty pages ${p.finalPages} ms, verification ${p.verify} ms, ownership handoff ${p.handoff} ms, resume ${p.resume} ms${p.resumeOnDestination !== undefined ? ` (${p.resumeOnDestination} ms of it on the destination)` : ''}`;
}

function printResult(r: MigrationResult, uiUrl?: string): void {
  console.log(`${r.outcome === 'completed' ? '✔' : '✘'} ${r.type} migration ${r.id}: ${r.outcome} — ${r.reason}`);
  if (r.type === 'storage') console.log(`  ${r.vm} on ${r.from}: total ${r.durationMs} ms, no downtime, ${formatBytes(r.bytesTransferred)} copied and mirrored`);
  else console.log(`  ${r.vm}: ${r.from} → ${r.to}; total ${r.durationMs} ms, downtime ${r.downtimeMs} ms, ${r.rounds} round${r.rounds === 1 ? '' : 's'}, ${formatBytes(r.bytesTransferred)} sent`);
  const p = r.cutover?.downtimePhasesMs;
  if (p) console.log(`  downtime: ${downtimePhases(p)}`);
  for (const d of r.decisions) console.log(`  decision at round ${d.round}: ${d.action} — ${d.reason}`);
  if (uiUrl) console.log(`  Temporal UI: ${uiUrl}`);
}

/** Follows a migration: a progress bar on a terminal, a line a second otherwise. */
export async function follow(c: VmferryClient, id: string, memoryBytes: number, quiet: boolean): Promise<MigrationResult> {
  const done = c.awaitMigration(id);
  if (quiet) return done;
  const tty = process.stderr.isTTY;
  const bar = tty ? new cliProgress.SingleBar({ format: ' {phase} |{bar}| round {round} · {sent} · {dirty} dirty pages · {rate}/s', stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic) : null;
  bar?.start(memoryBytes, 0, { phase: 'starting', round: 0, sent: '0 B', dirty: 0, rate: '0 B' });
  let finished = false;
  void done.finally(() => { finished = true; });
  let lastLine = '';
  while (!finished) {
    await Promise.race([done.catch(() => undefined), new Promise((r) => setTimeout(r, tty ? 200 : 1000))]);
    if (finished) break;
    const p = await c.progress(id).catch(() => null);
    if (!p) continue;
    // Storage moves report bytes copied and mirrored; memory moves bytes sent.
    const moved = p.bytesTransferred + (p.bytesCopied ?? 0) + (p.bytesMirrored ?? 0);
    const fields = { phase: p.phase.padEnd(20), round: p.round, sent: formatBytes(moved), dirty: p.dirtyPages, rate: formatBytes(p.rateBytesPerSec) };
    if (bar) bar.update(Math.min(memoryBytes, moved), fields);
    else {
      const copy = p.bytesCopied ? ` copied ${formatBytes(p.bytesCopied)} mirrored ${formatBytes(p.bytesMirrored ?? 0)}` : '';
      const line = `${p.phase} round ${p.round} sent ${formatBytes(p.bytesTransferred)}${copy} dirty ${p.dirtyPages} pages rate ${fields.rate}/s${p.throttle ? ` throttle ${p.throttle}` : ''}`;
      if (line !== lastLine) process.stderr.write(line + '\n');
      lastLine = line;
    }
  }
  bar?.stop();
  return done;
}

export const program = new Command();
program.name('vmferry').description('Move running VMs between hosts without stopping them, with always a way back.')
  .option('--lab <dir>', 'lab folder (default: .lab, or $VMFERRY_LAB)')
  .exitOverride()
  .configureOutput({ writeErr: (s) => process.stderr.write(s) });

// ---- lab ----
const lab = program.command('lab').description('the local lab: Temporal dev server, orchestrator worker, host agents');
lab.command('up').description('start whatever is missing (idempotent)')
  .option('--hosts <names>', 'comma-separated host names', (v) => v.split(',').map((s) => s.trim()).filter(Boolean))
  .option('--plaintext-hosts <names>', 'hosts (of --hosts) whose data plane is plaintext: a trusted migration network, no TLS (faster); set when a host is first created', (v) => v.split(',').map((s) => s.trim()).filter(Boolean))
  .option('--hugepage-hosts <names>', 'hosts (of --hosts) whose guests use the reserved huge pages (sysctl vm.nr_hugepages); set when a host is first created', (v) => v.split(',').map((s) => s.trim()).filter(Boolean))
  .option('--detach', 'return once everything is up (default: stay in the foreground; Ctrl-C stops the lab)')
  .option('--json', 'print the status as JSON')
  .action(async (o: { hosts?: string[]; plaintextHosts?: string[]; hugepageHosts?: string[]; detach?: boolean; json?: boolean }) => {
    const dir = program.opts().lab as string | undefined;
    const st = await labUp({ dir, hosts: o.hosts, plaintextHosts: o.plaintextHosts, hugepageHosts: o.hugepageHosts, log: o.json ? undefined : (m) => console.error(m) });
    if (o.json) out(st);
    else {
      console.log(`lab up in ${st.dir}`);
      console.log(`  temporal  ${st.temporal.address}${st.temporal.uiUrl ? `  UI ${st.temporal.uiUrl}` : ''}${st.temporal.pid ? `  pid ${st.temporal.pid}` : ''}`);
      console.log(`  worker    pid ${st.worker.pid}`);
      for (const h of st.hosts) console.log(`  ${h.name.padEnd(9)} pid ${h.pid}  queue ${h.taskQueue}  data plane ${h.dataPlane.host}:${h.dataPlane.port}`);
    }
    if (o.detach) return;
    console.error('lab running; Ctrl-C stops it');
    await new Promise<void>((resolve) => {
      for (const s of ['SIGINT', 'SIGTERM'] as const) process.once(s, () => resolve());
    });
    console.error('stopping lab…');
    await labDown(dir);
  });
lab.command('down').description('stop everything the lab started')
  .option('--purge', 'also delete the lab folder (Temporal history included)')
  .action(async (o: { purge?: boolean }) => {
    await labDown(program.opts().lab as string | undefined, { purge: o.purge });
    console.log(`lab down (${labDir(program.opts().lab as string | undefined)})`);
  });
lab.command('status').description('what runs, with pids').option('--json', 'JSON output')
  .action((o: { json?: boolean }) => {
    const st = labStatus(program.opts().lab as string | undefined);
    const view = {
      dir: st.dir,
      temporal: { address: st.temporal.address, uiUrl: st.temporal.uiUrl, pid: st.temporal.pid, managed: st.temporal.managed, up: st.temporal.up },
      worker: st.worker,
      hosts: st.hosts.map((h) => ({ name: h.name, pid: h.pid, up: h.up, taskQueue: h.taskQueue, dataPlane: h.dataPlane, vms: h.vms })),
    };
    if (o.json) return out(view);
    console.log(`lab ${st.dir}`);
    console.log(`  temporal  ${view.temporal.address} ${view.temporal.up ? 'up' : 'DOWN'}${view.temporal.pid ? ` pid ${view.temporal.pid}` : ''}${view.temporal.uiUrl ? ` UI ${view.temporal.uiUrl}` : ''}`);
    console.log(`  worker    ${view.worker.up ? 'up' : 'DOWN'} pid ${view.worker.pid ?? '-'}${view.worker.metricsUrl ? ` metrics ${view.worker.metricsUrl}` : ''}`);
    for (const h of view.hosts) console.log(`  ${h.name.padEnd(9)} ${h.up ? 'up' : 'DOWN'} pid ${h.pid ?? '-'} ${h.taskQueue} data plane ${h.dataPlane.host}:${h.dataPlane.port} VMs ${h.vms}`);
  });

// ---- host ----
const host = program.command('host').description('hosts');
host.command('info <host>').description('capacity, storage roots, VMs').option('--json', 'JSON output')
  .action(async (name: string, o: { json?: boolean }) => withClient(async (c) => {
    const i = await c.hostInfo(name);
    if (o.json) return out(i);
    console.log(`${i.name}: ${formatBytes(i.memoryUsedBytes)} of ${formatBytes(i.memoryCapacityBytes)} memory in use; queue ${i.taskQueue}; data plane ${i.dataPlane.host}:${i.dataPlane.port}`);
    for (const r of i.storageRoots) console.log(`  storage ${r.name.padEnd(8)} ${r.shared ? 'shared' : 'local '} ${r.path}`);
    for (const v of i.vms) console.log(`  vm ${v.name} ${v.state} epoch ${v.epoch}`);
  }));

// ---- vm ----
const vm = program.command('vm').description('virtual machines');
vm.command('create <name>').description('create and boot a VM (simulator, or QEMU with --driver qemu) with a guest workload')
  .requiredOption('--host <host>', 'host to create it on')
  .requiredOption('--memory <size>', 'guest memory, e.g. 256MiB')
  .option('--disk <size>', 'size of each virtual disk', '64MiB')
  .option('--disks <n>', 'number of disks', intArg('--disks'), 1)
  .option('--storage <root>', 'storage root for its files', 'shared')
  .option('--dirty-rate <size/s>', 'guest memory dirtying rate', '4MiB/s')
  .option('--write-rate <size/s>', 'guest disk write rate', '256KiB/s')
  .option('--fill <fraction>', 'fraction of memory written at boot (rest stays zero)', (v) => { const n = Number(v); if (!(n >= 0 && n <= 1)) throw new InvalidArgumentError('--fill must be between 0 and 1'); return n; }, 0.5)
  .option('--disk-fill <fraction>', 'fraction of each disk written at boot', (v) => { const n = Number(v); if (!(n >= 0 && n <= 1)) throw new InvalidArgumentError('--disk-fill must be between 0 and 1'); return n; }, 0)
  .option('--compressible <fraction>', 'fraction of each memory page that is repetitive rather than random (default 0)', (v) => { const n = Number(v); if (!(n >= 0 && n <= 1)) throw new InvalidArgumentError('--compressible must be between 0 and 1'); return n; }, 0)
  .option('--driver <sim|qemu>', 'hypervisor: the simulator, or a real QEMU guest (the test guest; workload options apply to sim only)', (v) => { if (v !== 'sim' && v !== 'qemu') throw new InvalidArgumentError('--driver must be sim or qemu'); return v; }, 'sim')
  .option('--json', 'JSON output')
  .action(async (name: string, o: { host: string; memory: string; disk: string; disks: number; storage: string; dirtyRate: string; writeRate: string; fill: number; diskFill: number; compressible: number; driver: 'sim' | 'qemu'; json?: boolean }) => withClient(async (c) => {
    const v = await c.createVm({ name, host: o.host, memory: o.memory, disk: o.disk, disks: o.disks, storage: o.storage, dirtyRate: o.dirtyRate, writeRate: o.writeRate, fill: o.fill, diskFill: o.diskFill, compressible: o.compressible, driver: o.driver });
    if (o.json) return out({ name: v.name, host: v.host, state: v.state, pid: v.pid, memoryBytes: v.spec.memoryBytes, probe: v.spec.probe });
    console.log(`VM ${v.name} ${v.state} on ${v.host} (pid ${v.pid}); probe ${v.spec.probe.address}:${v.spec.probe.port}`);
  }));
vm.command('list').description('VMs on all known hosts').option('--json', 'JSON output')
  .action(async (o: { json?: boolean }) => withClient(async (c) => {
    const vms = await c.listVms();
    if (o.json) return out(vms.map((v) => ({ name: v.name, host: v.host, state: v.state, epoch: v.epoch, memoryBytes: v.memoryBytes, migrationId: v.migrationId, hugePages: v.hugePages })));
    if (!vms.length) console.log('no VMs');
    for (const v of vms) console.log(`${v.name.padEnd(16)} ${v.host.padEnd(10)} ${v.state.padEnd(9)} ${formatBytes(v.memoryBytes)}${v.hugePages === undefined ? '' : v.hugePages ? '  huge pages' : '  4 KiB pages (huge-page pool short)'}${v.migrationId ? `  migrating (${v.migrationId})` : ''}`);
  }));
vm.command('verify <name>').description("check the guest's memory and disks against its own ledger").option('--json', 'JSON output')
  .action(async (name: string, o: { json?: boolean }) => withClient(async (c) => {
    const r = await c.verifyVm(name);
    if (o.json) out(r);
    else {
      console.log(`${r.ok ? '✔' : '✘'} VM ${r.vm} on ${r.host} (${r.state})`);
      for (const ch of r.checks) console.log(`  ${ch.ok ? 'ok ' : 'BAD'} ${ch.name}: ${ch.detail}`);
    }
    if (!r.ok) process.exitCode = EXIT.failed;
  }));
vm.command('probe <name>').description('UDP echo probe of the VM, like a ping that follows it')
  .option('--duration <d>', 'how long', durationArg, 3000)
  .option('--interval <d>', 'probe interval', durationArg, 10)
  .option('--json', 'JSON output')
  .action(async (name: string, o: { duration: number; interval: number; json?: boolean }) => withClient(async (c) => {
    const v = await c.vmSpec(name);
    if (!v) throw new UsageError(`no VM named ${name}`);
    const p = new Prober(v.spec.probe, o.interval).start();
    await new Promise((r) => setTimeout(r, o.duration));
    const s = await p.stop();
    if (o.json) return out({ vm: name, host: v.host, ...s });
    console.log(`${name} on ${v.host}: ${s.received}/${s.sent} replies, ${s.lost} lost, ${s.late} late, longest gap ${s.maxGapMs} ms`);
    if (s.received === 0) process.exitCode = EXIT.failed;
  }));
vm.command('destroy <name>').description('stop a VM and delete its files')
  .action(async (name: string) => withClient(async (c) => {
    const r = await c.destroyVm(name);
    console.log(`VM ${name} destroyed on ${r.host}`);
  }));

// ---- migrate ----
function throttleSteps(v: string): Pick<MigrationPolicy, 'throttleInitial' | 'throttleIncrement'> & { throttleMax?: number } {
  const parts = v.split(',').map((x) => Number(x.trim()));
  if (parts.length < 2 || parts.length > 3 || parts.some((x) => !Number.isFinite(x) || x < 0 || x > 0.99)) {
    throw new InvalidArgumentError('--throttle-steps is initial,increment[,max], fractions between 0 and 0.99 (e.g. 0.2,0.1,0.99)');
  }
  if (parts[1]! < 0.01) throw new InvalidArgumentError('--throttle-steps: the increment must be at least 0.01');
  return { throttleInitial: parts[0]!, throttleIncrement: parts[1]!, ...(parts[2] !== undefined ? { throttleMax: parts[2] } : {}) };
}

function policyFrom(o: Record<string, unknown>): Partial<MigrationPolicy> {
  const p: Partial<MigrationPolicy> = {};
  if (o.downtimeLimit !== undefined) p.downtimeLimitMs = o.downtimeLimit as number;
  if (o.maxBandwidth !== undefined) p.maxBandwidth = parseSize(String(o.maxBandwidth).replace(/\/s$/i, ''), 'bandwidth');
  if (o.maxRounds !== undefined) p.maxRounds = o.maxRounds as number;
  if (o.autoConverge === false) p.autoConverge = false;
  if (o.convergenceTimeout !== undefined) p.convergenceTimeoutMsPerGiB = o.convergenceTimeout as number;
  if (o.verify !== undefined) p.verify = o.verify as MigrationPolicy['verify'];
  if (o.compress) p.compression = 'deflate';
  if (o.streams !== undefined) p.streams = o.streams as number;
  if (o.throttleSteps !== undefined) Object.assign(p, o.throttleSteps);
  if (o.approveCutover) p.approveCutover = true;
  if (o.approvalTimeout !== undefined) p.approvalTimeoutMs = o.approvalTimeout as number;
  return p;
}

/** Policy flags shared by the moves that carry memory (live, shared-nothing). */
function withPolicyOptions(c: Command): Command {
  return c
    .option('--downtime-limit <ms>', 'maximum pause, ms (default 300)', intArg('--downtime-limit'))
    .option('--max-bandwidth <size/s>', 'cap on the memory stream (default: none)')
    .option('--max-rounds <n>', 'pre-copy round limit (default 30)', intArg('--max-rounds'))
    .option('--no-auto-converge', 'never throttle the guest; roll back instead when pre-copy cannot converge')
    .option('--throttle-steps <initial,increment[,max]>', 'auto-converge throttle steps as fractions of guest CPU (default 0.2,0.1,0.99)', throttleSteps)
    .option('--compress', 'deflate the memory stream (fewer bytes for compressible memory, more source CPU)')
    .option('--streams <n>', 'parallel TCP streams for memory, 1 to 16 (default 1; QEMU: multifd channels)', intArg('--streams'))
    .option('--approve-cutover', 'wait for `vmferry migration approve <id>` before the cutover')
    .option('--approval-timeout <ms>', 'roll back if not approved within this time (default 15 min)', intArg('--approval-timeout'))
    .option('--verify <mode>', 'page checks: digest (per-page CRCs, checked on arrival and compared at cutover), full (also a CRC of all memory) or sequence (per-page sequence numbers: proves every page\'s last copy arrived, contents left to the transport; fastest)', (v) => { if (v !== 'digest' && v !== 'full' && v !== 'sequence') throw new InvalidArgumentError('--verify is digest, full or sequence'); return v; });
}

const migrate = program.command('migrate').description('start a migration');
withPolicyOptions(migrate.command('live <vm>')).description('live migration: memory and state move, storage shared by both hosts')
  .requiredOption('--to <host>', 'destination host')
  .option('--from <host>', 'source host: skips looking the VM up on the known hosts (the migration\'s first step checks it; a wrong one is refused)')
  .option('--wait', 'wait for the outcome, showing progress')
  .option('--json', 'JSON output')
  .option('--convergence-timeout <ms>', 'pre-copy time limit per GiB of memory, ms (default 120000)', intArg('--convergence-timeout'))
  .action(async (vmName: string, o: Record<string, unknown>) => withClient(async (c) => {
    const policy = policyFrom(o);
    const m = await c.startMigration({ type: 'live', vm: vmName, from: o.from as string | undefined, to: o.to as string, policy });
    await report(c, m, vmName, o as { wait?: boolean; json?: boolean });
  }));

migrate.command('storage <vm>').description('live storage migration: the VM stays on its host, its disk files move')
  .option('--to-path <dir>', 'directory (inside a storage root of the host) for all disks')
  .option('--disk <id=dir>', 'directory for one disk (repeatable)', (v: string, prev: string[]) => [...prev, v], [] as string[])
  .option('--max-bandwidth <size/s>', 'cap on the bulk copy (default: none)')
  .option('--wait', 'wait for the outcome, showing progress')
  .option('--json', 'JSON output')
  .action(async (vmName: string, o: { toPath?: string; disk: string[]; maxBandwidth?: string; wait?: boolean; json?: boolean }) => withClient(async (c) => {
    const disks: Record<string, string> = {};
    for (const d of o.disk) {
      const m = /^([^=]+)=(.+)$/.exec(d);
      if (!m) throw new UsageError(`bad --disk "${d}": use <id>=<dir>, e.g. disk0=/srv/fast`);
      disks[m[1]!] = path.resolve(m[2]!);
    }
    const maxBandwidth = o.maxBandwidth ? parseSize(o.maxBandwidth.replace(/\/s$/i, ''), 'bandwidth') : undefined;
    const m = await c.startMigration({ type: 'storage', vm: vmName, toPath: o.toPath ? path.resolve(o.toPath) : undefined, disks: o.disk.length ? disks : undefined, maxBandwidth });
    await report(c, m, vmName, o);
  }));
withPolicyOptions(migrate.command('shared-nothing <vm>')).description('shared-nothing live migration: storage mirrored to the destination, then memory and state')
  .requiredOption('--to <host>', 'destination host')
  .option('--from <host>', 'source host: skips looking the VM up on the known hosts (the migration\'s first step checks it; a wrong one is refused)')
  .option('--to-path <dir>', 'directory on the destination (inside one of its storage roots)')
  .option('--wait', 'wait for the outcome, showing progress')
  .option('--json', 'JSON output')
  .action(async (vmName: string, o: Record<string, unknown>) => withClient(async (c) => {
    const m = await c.startMigration({ type: 'shared-nothing', vm: vmName, from: o.from as string | undefined, to: o.to as string, toPath: o.toPath ? path.resolve(o.toPath as string) : undefined, policy: policyFrom(o) });
    await report(c, m, vmName, o as { wait?: boolean; json?: boolean });
  }));

async function report(c: VmferryClient, m: { id: string; from: string; to: string }, vmName: string, o: { wait?: boolean; json?: boolean }): Promise<void> {
  if (!o.wait) {
    if (o.json) return out({ id: m.id, vm: vmName, from: m.from, to: m.to, outcome: 'running', uiUrl: c.workflowUrl(m.id) });
    console.log(`started ${m.id}: ${vmName} ${m.from} → ${m.to}${c.workflowUrl(m.id) ? `\n  Temporal UI: ${c.workflowUrl(m.id)}` : ''}`);
    return;
  }
  const spec = await c.vmSpec(vmName).catch(() => null);
  const r = await follow(c, m.id, spec?.spec.memoryBytes ?? 1, !!o.json);
  if (o.json) out({ ...resultJson(r), uiUrl: c.workflowUrl(r.id) });
  else printResult(r, c.workflowUrl(r.id));
  process.exitCode = outcomeExit(r.outcome);
}

// ---- plan ----
program.command('plan <move> <vm>').description('pre-flight only: checks and a predicted time and downtime; changes nothing')
  .option('--to <host>', 'destination host (live, shared-nothing)')
  .option('--to-path <dir>', 'destination directory (storage, shared-nothing)')
  .option('--downtime-limit <ms>', 'maximum pause, ms (default 300)', intArg('--downtime-limit'))
  .option('--json', 'JSON output')
  .action(async (move: string, vmName: string, o: { to?: string; toPath?: string; downtimeLimit?: number; json?: boolean }) => withClient(async (c) => {
    if (!['live', 'storage', 'shared-nothing'].includes(move)) throw new UsageError(`unknown move "${move}": live, storage or shared-nothing`);
    const policy = o.downtimeLimit ? { downtimeLimitMs: o.downtimeLimit } : undefined;
    const input = move === 'storage'
      ? { type: 'storage' as const, vm: vmName, toPath: o.toPath ? path.resolve(o.toPath) : undefined }
      : { type: move as 'live' | 'shared-nothing', vm: vmName, to: o.to ?? '', ...(move === 'shared-nothing' && o.toPath ? { toPath: path.resolve(o.toPath) } : {}), policy };
    const p = await c.plan(input);
    if (o.json) out(p);
    else {
      console.log(`${p.ok ? '✔' : '✘'} ${p.type} migration of ${p.vm}: ${p.from} → ${p.to}`);
      for (const ch of p.checks) console.log(`  ${ch.ok ? 'ok ' : 'NO '} ${ch.name}: ${ch.detail}`);
      console.log(`  measured dirty rate ${formatBytes(p.measured.dirtyRateBytesPerSec)}/s, link ${formatBytes(p.measured.bandwidthBytesPerSec)}/s (${p.measured.bandwidthSource})`);
      console.log(`  predicted: total ${p.predicted.totalMs} ms, downtime ${p.predicted.downtimeMs} ms, ${p.predicted.rounds} round(s)${p.predicted.converges ? '' : ', does not converge without throttling'}`);
    }
    process.exitCode = p.ok ? EXIT.ok : EXIT.failed;
  }));

// ---- migration ----
const migration = program.command('migration').description('inspect and control migrations');
migration.command('status <id>').option('--json', 'JSON output').option('--wait', 'wait for the outcome')
  .action(async (id: string, o: { json?: boolean; wait?: boolean }) => withClient(async (c) => {
    let s = await c.migrationStatus(id);
    if (o.wait && s.outcome === 'running') { await c.awaitMigration(id).catch(() => undefined); s = await c.migrationStatus(id); }
    if (o.json) out(resultJson(s));
    else {
      console.log(`${s.id}: ${s.type} ${s.vm} ${s.from} → ${s.to}: ${s.outcome} (phase ${s.phase})${s.reason ? ` — ${s.reason}` : ''}`);
      if (s.outcome === 'running') console.log(`  round ${s.rounds}, ${formatBytes(s.bytesTransferred)} sent`);
      else console.log(`  total ${s.durationMs} ms, downtime ${s.downtimeMs} ms, ${s.rounds} round${s.rounds === 1 ? '' : 's'}, ${formatBytes(s.bytesTransferred)} sent`);
      if (s.uiUrl) console.log(`  Temporal UI: ${s.uiUrl}`);
    }
    process.exitCode = outcomeExit(s.outcome);
  }));
migration.command('cancel <id>').description('cancel: rolls back unless the destination already runs the VM')
  .action(async (id: string) => withClient(async (c) => {
    await c.cancelMigration(id);
    console.log(`cancel requested for ${id}`);
  }));
migration.command('approve <id>').description('approve a cutover that waits for it (--approve-cutover)')
  .action(async (id: string) => withClient(async (c) => {
    await c.approveCutover(id);
    console.log(`cutover of ${id} approved`);
  }));
host.command('evacuate <host>').description('move every VM off a host (maintenance mode); one failed VM does not stop the others')
  .option('--to <hosts>', 'comma-separated destinations (default: every other host)', (v) => v.split(',').map((x) => x.trim()).filter(Boolean))
  .option('--concurrency <n>', 'migrations at a time (default 2)', intArg('--concurrency'))
  .option('--per-host-limit <n>', 'migrations at a time touching any one host (default 2)', intArg('--per-host-limit'))
  .option('--wait', 'wait and report each VM\'s outcome')
  .option('--json', 'JSON output')
  .action(async (name: string, o: { to?: string[]; concurrency?: number; perHostLimit?: number; wait?: boolean; json?: boolean }) => withClient(async (c) => {
    const { id } = await c.evacuate(name, { to: o.to, concurrency: o.concurrency, perHostLimit: o.perHostLimit });
    if (!o.wait) { if (o.json) out({ id }); else console.log(`started ${id}`); return; }
    const done = c.awaitEvacuation(id);
    const tty = process.stderr.isTTY && !o.json;
    const bar = tty ? new cliProgress.SingleBar({ format: ' evacuating {host} |{bar}| {value}/{total} VMs done', stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic) : null;
    let finished = false;
    void done.finally(() => { finished = true; }).catch(() => undefined);
    while (!finished) {
      const st = await c.evacuationStatus(id).catch(() => null);
      if (st && bar) { if (!bar.getTotal()) bar.start(st.items.length, 0, { host: name }); bar.update(st.items.filter((i) => i.state !== 'waiting' && i.state !== 'moving').length, { host: name }); }
      await Promise.race([done.catch(() => undefined), new Promise((r) => setTimeout(r, 500))]);
    }
    bar?.stop();
    const r = await done;
    if (o.json) out({ id, ...r });
    else for (const i of r.items) console.log(`${i.state === 'completed' ? '✔' : '✘'} ${i.vm} → ${i.to ?? '-'} (${i.type ?? '-'}): ${i.state}${i.reason ? ` — ${i.reason}` : ''}`);
    process.exitCode = r.failed ? EXIT.failed : EXIT.ok;
  }));
migration.command('list').option('--json', 'JSON output')
  .action(async (o: { json?: boolean }) => withClient(async (c) => {
    const l = await c.listMigrations();
    if (o.json) return out(l);
    if (!l.length) console.log('no migrations');
    for (const m of l) console.log(`${m.id.padEnd(36)} ${m.type.padEnd(6)} ${m.vm.padEnd(12)} ${m.from} → ${m.to}  ${m.outcome.padEnd(11)} ${m.phase}`);
  }));

export async function main(argv: string[]): Promise<number> {
  try {
    await program.parseAsync(argv, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : EXIT.ok;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return EXIT.ok;
      return EXIT.usage; // commander already printed the message
    }
    const err = e as Error;
    process.stderr.write(`error: ${err.message}\n`);
    if (e instanceof UsageError || err.name === 'UsageError') return EXIT.usage;
    return EXIT.error;
  }
}

if (process.argv[1]?.endsWith('cli/main.ts')) {
  main(process.argv.slice(2)).then((code) => process.exit(code));
}
