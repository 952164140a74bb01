// Engine-only harness: two real VM processes (source booted, destination incoming) and a
// data-plane endpoint in this process, driven through their control sockets exactly as the
// host agents drive them, but without Temporal. For profiling and quick iteration:
//   tsx bench/engine.ts --memory 256MiB --fill 1 --dirty 0 [--prof dir] [--limit 50]
// Prints one JSON line with the figures.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { callControl } from '../drivers/sim/control.js';
import { writeOwner } from '../drivers/sim/ownership.js';
import { DataPlaneServer, sendSocket, type Hello } from '../dataplane/endpoint.js';
import { DEFAULT_POLICY, type CutoverResult, type MigrationPolicy, type ProgressSample, type VmSpec } from '../common/types.js';
import { parseSize } from '../common/sizes.js';
import { TSX_LOADER } from '../common/tsx.js';
import { decide } from '../workflows/decide.js';

// BENCH_VM_PROCESS: an alternative (e.g. instrumented) copy of the VM process script. Read at
// each spawn, not at import: a script that alternates copies sets it between runs.
const vmProcess = (): string => (process.env.BENCH_VM_PROCESS ? path.resolve(process.env.BENCH_VM_PROCESS) : fileURLToPath(new URL('../drivers/sim/vm-process.ts', import.meta.url)));

export interface EngineRunOptions {
  memoryBytes: number;
  fill: number;
  dirtyRate: number;
  /** Fraction of each page that is repetitive (compressible). */
  compressible?: number;
  policy?: Partial<MigrationPolicy>;
  /** Directory for --cpu-prof output of both VM processes. */
  profDir?: string;
  /** Cut over after this round whatever the policy decides (tests of the cutover's tail). */
  cutoverAtRound?: number;
  log?: (m: string) => void;
  /** Environment of both VM processes (default: this process's), e.g. huge-page tunables. */
  env?: NodeJS.ProcessEnv;
}

export interface EngineRunResult {
  outcome: 'completed' | 'aborted';
  reason: string;
  totalMs: number;
  precopyMs: number;
  cutoverCallMs: number;
  rounds: number;
  downtimeMs: number;
  bytesSent: number;
  finalPages: number;
  /** See CutoverResult.tailThrottle, downtimePhasesMs. */
  tailThrottle?: number;
  downtimePhasesMs?: CutoverResult['downtimePhasesMs'];
  samples: ProgressSample[];
  vmHwmKiB: { source: number; destination: number };
  /** The source's cutover result, when it cut over. */
  cutover?: CutoverResult;
}

function hwmKiB(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch { return 0; }
}

async function spawnVm(dir: string, cfg: object, profDir?: string, env?: NodeJS.ProcessEnv): Promise<ChildProcess> {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'vm.json'), JSON.stringify(cfg, null, 2));
  const logFd = fs.openSync(path.join(dir, 'vm.log'), 'a');
  const args = ['--expose-gc', '--import', TSX_LOADER, ...(process.env.BENCH_VM_FLAGS ? process.env.BENCH_VM_FLAGS.split(' ') : [])];
  if (profDir) args.push('--cpu-prof', `--cpu-prof-dir=${profDir}`);
  const child = spawn(process.execPath, [...args, vmProcess(), dir], { stdio: ['ignore', logFd, logFd, 'ipc'], env: env ?? process.env });
  fs.closeSync(logFd);
  await new Promise<void>((resolve, reject) => {
    child.once('message', () => resolve());
    child.once('exit', (c) => reject(new Error(`VM process exited with ${c}: ${fs.readFileSync(path.join(dir, 'vm.log'), 'utf8').slice(-2000)}`)));
  });
  child.removeAllListeners('exit');
  return child;
}

export async function runEngine(o: EngineRunOptions): Promise<EngineRunResult> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-engine-'));
  const say = o.log ?? (() => undefined);
  const policy: MigrationPolicy = { ...DEFAULT_POLICY, ...o.policy };
  const spec: VmSpec = {
    name: 'eng1', driver: 'sim', memoryBytes: o.memoryBytes, disks: [], dirtyRate: o.dirtyRate, writeRate: 0, fill: o.fill, compressible: o.compressible,
    probe: { address: '127.0.0.1', port: 0 },
  };
  const ownerPath = path.join(tmp, 'owner.json');
  writeOwner(ownerPath, { host: 'A', epoch: 1, state: 'active' });
  const children: ChildProcess[] = [];
  const server = new DataPlaneServer({
    memory: (hello: Hello, sock: net.Socket, rest: Buffer) => { sendSocket(children[1]!, { type: 'dataplane', rest: rest.toString('base64'), stream: hello.stream, streams: hello.streams }, sock); },
  });
  try {
    const ep = await server.listen('127.0.0.1', 0);
    say('booting source…');
    children.push(await spawnVm(path.join(tmp, 'A'), { spec, host: 'A', mode: 'boot', epoch: 1, diskPaths: {}, ownerPath }, o.profDir, o.env));
    children.push(await spawnVm(path.join(tmp, 'B'), { spec, host: 'B', mode: 'incoming', epoch: 0, diskPaths: {}, ownerPath, migrationId: 'm1' }, o.profDir, o.env));
    const ctlA = path.join(tmp, 'A', 'control.sock');
    const token = server.grant({ migrationId: 'm1', vm: 'eng1', kind: 'memory' });
    await sleep(200);
    say('migrating…');
    const t0 = performance.now();
    await callControl(ctlA, 'startOutgoing', { migrationId: 'm1', endpoint: ep, token, policy });
    const samples: ProgressSample[] = [];
    let round = 0;
    let outcome: EngineRunResult['outcome'] = 'completed';
    let reason = '';
    for (;;) {
      const s = await callControl<ProgressSample>(ctlA, 'progress', { migrationId: 'm1', afterRound: round, waitMs: 5000 });
      if (s.round <= round && s.state !== 'failed') continue;
      round = s.round;
      samples.push(s);
      if (o.cutoverAtRound !== undefined && round >= o.cutoverAtRound) { reason = `forced cutover after round ${round}`; break; }
      const d = decide(samples.slice(-8), policy, o.memoryBytes);
      if (d.action === 'continue') continue;
      if (d.action === 'throttle') { await callControl(ctlA, 'setPolicy', { migrationId: 'm1', throttle: d.throttle }); continue; }
      if (d.action === 'abort') { outcome = 'aborted'; reason = d.reason; break; }
      reason = d.reason;
      break;
    }
    const tPre = performance.now();
    let cut: CutoverResult | undefined;
    if (outcome === 'completed') cut = await callControl<CutoverResult>(ctlA, 'cutover', { migrationId: 'm1', destination: 'B', verify: policy.verify });
    else await callControl(ctlA, 'rollbackOutgoing', { migrationId: 'm1', allowReclaim: true });
    const t1 = performance.now();
    const vmHwmKiB = { source: hwmKiB(children[0]!.pid!), destination: hwmKiB(children[1]!.pid!) };
    return {
      outcome, reason, totalMs: t1 - t0, precopyMs: tPre - t0, cutoverCallMs: t1 - tPre, rounds: round,
      downtimeMs: cut?.downtimeMs ?? 0, bytesSent: cut?.bytesSent ?? samples.at(-1)?.bytesSent ?? 0, finalPages: cut?.finalPages ?? 0, tailThrottle: cut?.tailThrottle, downtimePhasesMs: cut?.downtimePhasesMs, samples, vmHwmKiB, cutover: cut,
    };
  } finally {
    server.close();
    // SIGTERM runs the VM's own shutdown (so --cpu-prof writes its profile).
    for (const c of children) { try { c.kill('SIGTERM'); } catch { /* gone */ } }
    await Promise.all(children.map((c) => (c.exitCode !== null ? undefined : new Promise((r) => { c.once('exit', r); setTimeout(r, 5000); }))));
    for (const c of children) { try { c.kill('SIGKILL'); } catch { /* gone */ } }
    if (process.env.BENCH_VM_PROCESS) {
      for (const h of ['A', 'B']) {
        try { for (const l of fs.readFileSync(path.join(tmp, h, 'vm.log'), 'utf8').split('\n')) if (l.includes('MARKS')) say(`${h}: ${l.slice(l.indexOf('MARKS'))}`); } catch { /* none */ }
      }
    }
    if (process.env.BENCH_KEEP) say('kept ' + tmp); else fs.rmSync(tmp, { recursive: true, force: true });
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const arg = (n: string, d: string): string => { const i = process.argv.indexOf(`--${n}`); return i > 0 ? process.argv[i + 1]! : d; };
  const r = await runEngine({
    memoryBytes: parseSize(arg('memory', '256MiB'), 'memory'),
    fill: Number(arg('fill', '1')),
    dirtyRate: parseSize(arg('dirty', '0'), 'dirty rate'),
    compressible: Number(arg('compressible', '0')),
    policy: { downtimeLimitMs: Number(arg('limit', '300')), verify: arg('verify', 'digest') as 'digest' | 'full', autoConverge: arg('autoconverge', 'true') === 'true', compression: arg('compression', 'none') as 'none' | 'deflate', streams: Number(arg('streams', '1')) },
    profDir: process.argv.includes('--prof') ? path.resolve(arg('prof', 'bench/prof')) : undefined,
    log: (m) => process.stderr.write(m + '\n'),
  });
  const mem = parseSize(arg('memory', '256MiB'), 'memory');
  console.log(JSON.stringify({ ...r, samples: r.samples.map((s) => ({ r: s.round, ms: s.elapsedMs, dirty: s.dirtyPages, bwMiB: Math.round(s.bandwidth / 2 ** 20), dirtyMiB: Math.round(s.dirtyRate / 2 ** 20), thr: s.throttle })), MiBps: Math.round((mem / 2 ** 20) / (r.totalMs / 1000)), wireRatio: +(r.bytesSent / mem).toFixed(3) }));
}
