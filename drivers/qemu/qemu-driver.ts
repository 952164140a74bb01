// The QEMU driver: a VM is a qemu-system-x86_64 process controlled over QMP.
//
// Like the simulator, the driver keeps no VM state in memory that matters: every call reads the
// VM's runtime directory (<host.runDir>/<vm>/: vm.json state file, qmp.sock, serial.log,
// qemu.log), so an agent that restarts re-attaches to QEMU processes that kept running.
//
// Migration mapping (source host | destination host):
//   prepareIncoming: spawn the same machine with `-incoming defer`, then `migrate-incoming`
//                    on tcp:<dataPlane.host>:0; QEMU picks the port, we report it.
//   startOutgoing:   migrate-set-capabilities (pause-before-switchover, events, auto-converge,
//                    multifd when enabled on both hosts), migrate-set-parameters (downtime-limit,
//                    max-bandwidth, throttle steps), then `migrate`.
//   outgoingProgress: query-migrate → ProgressSample (round = dirty-sync-count). Once QEMU
//                    finds the rest fits the downtime limit it stops the guest and waits in
//                    `pre-switchover` (pause-before-switchover): the sample then says expected
//                    downtime 0 and returns at once, so the workflow cuts over without delay.
//   cutover:         wait for `pre-switchover` → migrate-continue → `completed`. Device state
//                    and block handover happen only on that command. The destination (started
//                    without -S) resumes by itself as soon as the incoming stream completes: the
//                    source host never needs the destination's QMP. Downtime is QEMU's figure;
//                    it includes the time the guest sat paused in pre-switchover waiting for
//                    the command. (QEMU cannot be told "keep iterating until I say so": with a
//                    zero downtime-limit it still completes whenever a pass ends with nothing
//                    dirty, so the pause is the commanded point.)
//   rollbackOutgoing: migrate_cancel, `cont` if the guest was left paused.
//
// Storage: shared disks only (both hosts open the same raw file). Shared-nothing (NBD export
// on the destination + drive-mirror) is not implemented yet and is refused clearly.
//
// Known hazard: QEMU < 9.0 under TCG loses guest memory writes during live pre-copy migration
// (Debian 12's 7.2 does); startOutgoing refuses that combination (see precopyHazard).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import type { HypervisorDriver, IncomingStatus, IncomingTarget, RollbackResult } from '../driver.js';
import type { CutoverResult, MigrationPolicy, ProgressSample, VerifyReport, VmInfo, VmSpec, VmState } from '../../common/types.js';
import { vmStorageDir, type HostConfig } from '../../common/host-config.js';
import { readOwner, updateOwner } from '../sim/ownership.js';
import { QmpClient, QmpConnectionError, withQmp } from './qmp.js';
import { createVmFiles } from '../disk-files.js';

const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const DEFAULT_GUEST_DIR = path.join(REPO_ROOT, '.cache', 'qemu-guest');

/** Per-VM QEMU settings a spec may carry (VmSpec.qemu); the driver's options are the defaults. */
export interface QemuVmExtras {
  kernel?: string;
  initrd?: string;
  /** Appended to the kernel command line (after console=ttyS0 ...). */
  append?: string;
  vcpus?: number;
}
export type QemuVmSpec = VmSpec & { qemu?: QemuVmExtras };

export interface QemuDriverOptions {
  /** Default: $VMFERRY_QEMU_BINARY or qemu-system-x86_64 on PATH. */
  qemuBinary?: string;
  /** 'auto' uses KVM when /dev/kvm works (probed once), else TCG. Default: $VMFERRY_QEMU_ACCEL or 'auto'. */
  accel?: 'auto' | 'kvm' | 'tcg';
  /** Default guest image: $VMFERRY_QEMU_GUEST_DIR or <repo>/.cache/qemu-guest (scripts/qemu/build-guest.sh). */
  guest?: { kernel: string; initrd: string; append?: string };
  /** Multifd channels (0 = off). Both hosts must agree: the destination sets it before listening. Default $VMFERRY_QEMU_MULTIFD or 0. */
  multifdChannels?: number;
  /** Only for demonstrating the hazard (scripts/qemu/tcg-hazard.ts): skip the precopyHazard refusal. */
  allowUnsafePrecopy?: boolean;
}

type Accel = 'kvm' | 'tcg';

interface QemuState {
  kind: 'qemu';
  spec: QemuVmSpec;
  host: string;
  mode: 'boot' | 'incoming';
  migrationId?: string;
  /** Epoch this process was started with (0 for an incoming VM until it takes over). */
  epoch: number;
  pid: number;
  accel: Accel;
  qemuVersion: string;
  qmpSocket: string;
  diskPaths: Record<string, string>;
  ownerPath: string;
  createdAt: string;
  incoming?: { endpoint: { host: string; port: number }; token: string };
  outgoing?: { migrationId: string; startedAt: number; target: IncomingTarget; policy: MigrationPolicy };
  /** Set on the source once the destination took over. */
  migratedTo?: { host: string; migrationId: string; at: string; downtimeMs: number };
  stopped?: boolean;
}

interface QueryMigrate {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  'setup-time'?: number;
  'cpu-throttle-percentage'?: number;
  'error-desc'?: string;
  'socket-address'?: Array<{ type: string; host?: string; port?: string }>;
  ram?: {
    transferred: number;
    remaining: number;
    total: number;
    duplicate: number;
    normal: number;
    'normal-bytes': number;
    'dirty-pages-rate': number;
    mbps: number;
    'dirty-sync-count': number;
    'page-size': number;
  };
}

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

export function isAlive(pid: number): boolean {
  if (!pid) return false;
  try { process.kill(pid, 0); } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
  // A zombie answers kill(0); it is not running.
  try { return !/^\S+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8')); } catch { return true; }
}

/**
 * QEMU versions whose live pre-copy is known to lose guest memory writes under TCG. Debian 12's
 * QEMU 7.2 does (fixed in QEMU 9.0). Returns why, or null when the combination is safe.
 */
export function precopyHazard(version: { major: number; minor: number; micro: number }, accel: Accel): string | null {
  if (accel !== 'tcg') return null;
  if (version.major < 9) {
    return `QEMU ${version.major}.${version.minor}.${version.micro} under TCG loses guest memory writes during live pre-copy migration (fixed in QEMU 9.0); install QEMU >= 9 (scripts/qemu/install-qemu.sh) or run with KVM`;
  }
  return null;
}

/** Ticks the test guest printed on its serial console (see scripts/qemu/build-guest.sh). */
export interface SerialTicks {
  ticks: number[];
  /** Lines whose mem= or disk= status is not ok. */
  bad: string[];
  boots: number;
  lastLine?: string;
}

export function readSerialTicks(file: string): SerialTicks {
  let text = '';
  try { text = fs.readFileSync(file, 'latin1'); } catch { /* not yet */ }
  const out: SerialTicks = { ticks: [], bad: [], boots: 0 };
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (line.startsWith('ferry-guest boot=')) out.boots++;
    const m = /^tick (\d+) mem=(\S+) disk=(\S+)/.exec(line);
    if (!m) continue;
    out.ticks.push(Number(m[1]));
    out.lastLine = line;
    if (m[2] !== 'ok' || (m[3] !== 'ok' && m[3] !== 'none')) out.bad.push(line);
  }
  return out;
}

let kvmProbe: Promise<boolean> | undefined;

/** /dev/kvm can exist and still not run a vCPU (nested setups): start a paused VM and see. */
function probeKvm(binary: string): Promise<boolean> {
  kvmProbe ??= (async () => {
    try { fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK); } catch { return false; }
    const child = spawn(binary, ['-machine', 'pc,accel=kvm', '-cpu', 'host', '-nodefaults', '-no-user-config', '-display', 'none', '-m', '16', '-S', '-monitor', 'none', '-serial', 'none'], { stdio: 'ignore' });
    const exited = new Promise<boolean>((resolve) => { child.once('exit', () => resolve(false)); child.once('error', () => resolve(false)); });
    const ok = await Promise.race([exited, sleep(1500).then(() => true)]);
    if (ok) { child.kill('SIGKILL'); }
    return ok;
  })();
  return kvmProbe;
}

export class QemuDriver implements HypervisorDriver {
  readonly kind = 'qemu';
  private readonly binary: string;
  private readonly accelOpt: 'auto' | 'kvm' | 'tcg';
  private readonly guest: { kernel: string; initrd: string; append?: string };
  private readonly multifd: number;
  private readonly allowUnsafePrecopy: boolean;
  /** One QMP session per VM at a time (QEMU's monitor serves one client; we queue here). */
  private locks = new Map<string, Promise<unknown>>();
  /** Directory of the default test guest, built on demand (null when opts.guest names the image). */
  private readonly guestDir: string | null;
  private guestBuild?: Promise<void>;

  constructor(private readonly host: HostConfig, private readonly log: (m: string) => void = () => undefined, opts: QemuDriverOptions = {}) {
    fs.mkdirSync(host.runDir, { recursive: true });
    this.binary = opts.qemuBinary ?? process.env.VMFERRY_QEMU_BINARY ?? 'qemu-system-x86_64';
    const envAccel = process.env.VMFERRY_QEMU_ACCEL;
    this.accelOpt = opts.accel ?? (envAccel === 'kvm' || envAccel === 'tcg' ? envAccel : 'auto');
    const gdir = process.env.VMFERRY_QEMU_GUEST_DIR ?? DEFAULT_GUEST_DIR;
    this.guest = opts.guest ?? { kernel: path.join(gdir, 'vmlinuz'), initrd: path.join(gdir, 'initramfs.gz') };
    this.guestDir = opts.guest ? null : gdir;
    this.multifd = opts.multifdChannels ?? Number(process.env.VMFERRY_QEMU_MULTIFD ?? 0);
    this.allowUnsafePrecopy = opts.allowUnsafePrecopy ?? false;
  }

  // ---------------------------------------------------------------- runtime files

  private runtimeDir(vm: string): string {
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(vm)) throw new Error(`invalid VM name ${JSON.stringify(vm)}`);
    return path.join(this.host.runDir, vm);
  }

  /** Only QEMU state files: the simulator may share host.runDir and writes its own vm.json. */
  private readState(vm: string): QemuState | null {
    try {
      const st = JSON.parse(fs.readFileSync(path.join(this.runtimeDir(vm), 'vm.json'), 'utf8')) as QemuState;
      return st.kind === 'qemu' ? st : null;
    } catch { return null; }
  }

  private writeState(st: QemuState): void {
    const dir = this.runtimeDir(st.spec.name);
    const tmp = path.join(dir, `.vm.json.${process.pid}.tmp`);
    fs.writeFileSync(tmp, JSON.stringify(st, null, 2));
    fs.renameSync(tmp, path.join(dir, 'vm.json'));
  }

  private patchState(vm: string, patch: Partial<QemuState>): QemuState {
    const st = this.readState(vm);
    if (!st) throw new Error(`VM ${vm} is not on host ${this.host.name}`);
    const next = { ...st, ...patch };
    this.writeState(next);
    return next;
  }

  serialLog(vm: string): string {
    return path.join(this.runtimeDir(vm), 'serial.log');
  }

  /** Unix socket paths are limited to 107 bytes; long run dirs get a socket under the tmp dir. */
  private qmpSocketPath(vm: string): string {
    const p = path.join(this.runtimeDir(vm), 'qmp.sock');
    if (Buffer.byteLength(p) < 100) return p;
    const h = crypto.createHash('sha1').update(p).digest('hex').slice(0, 16);
    return path.join(os.tmpdir(), `vmferry-qmp-${h}.sock`);
  }

  private async qmp<T>(vm: string, fn: (q: QmpClient) => Promise<T>, connectTimeoutMs = 5000): Promise<T> {
    const st = this.readState(vm);
    if (!st) throw new Error(`VM ${vm} is not on host ${this.host.name}`);
    const prev = this.locks.get(vm) ?? Promise.resolve();
    const run = prev.catch(() => undefined).then(() => withQmp(st.qmpSocket, fn, connectTimeoutMs));
    this.locks.set(vm, run);
    try {
      return await run;
    } finally {
      if (this.locks.get(vm) === run) this.locks.delete(vm);
    }
  }

  private async queryMigrate(vm: string): Promise<QueryMigrate> {
    return this.qmp(vm, (q) => q.execute<QueryMigrate>('query-migrate'));
  }

  // ---------------------------------------------------------------- info

  private async liveStatus(st: QemuState): Promise<string | null> {
    if (!isAlive(st.pid)) return null;
    try {
      const r = await this.qmp(st.spec.name, (q) => q.execute<{ status: string }>('query-status', undefined, 5000), 3000);
      return r.status;
    } catch {
      return 'unreachable';
    }
  }

  private epochOf(st: QemuState): number {
    const o = readOwner(st.ownerPath);
    if (o && o.host === this.host.name && (st.mode === 'boot' || st.migrationId === o.migrationId)) return o.epoch;
    return st.epoch;
  }

  private toInfo(st: QemuState, status: string | null): VmInfo {
    let state: VmState;
    if (status === null) state = st.stopped ? 'stopped' : st.migratedTo ? 'migrated' : 'failed';
    else if (st.migratedTo) state = 'migrated';
    else state = mapRunState(status, st.mode);
    return { name: st.spec.name, host: this.host.name, state, pid: isAlive(st.pid) ? st.pid : 0, epoch: this.epochOf(st), spec: st.spec, migrationId: st.outgoing?.migrationId ?? (st.mode === 'incoming' && state !== 'running' ? st.migrationId : undefined) };
  }

  async list(): Promise<VmInfo[]> {
    const out: VmInfo[] = [];
    for (const name of fs.readdirSync(this.host.runDir).sort()) {
      const st = this.readState(name);
      if (st) out.push(this.toInfo(st, isAlive(st.pid) ? await this.liveStatus(st) : null));
    }
    return out;
  }

  async get(name: string): Promise<VmInfo | undefined> {
    const st = this.readState(name);
    if (!st) return undefined;
    return this.toInfo(st, await this.liveStatus(st));
  }

  // ---------------------------------------------------------------- storage

  private storagePaths(spec: VmSpec): { diskPaths: Record<string, string>; ownerPath: string; dirs: string[] } {
    const diskPaths: Record<string, string> = {};
    const dirs: string[] = [];
    for (const d of spec.disks) {
      const root = this.host.storageRoots.find((r) => r.name === d.root);
      if (!root) throw new Error(`host ${this.host.name} has no storage root "${d.root}" (it has: ${this.host.storageRoots.map((r) => r.name).join(', ')})`);
      const dir = vmStorageDir(root, spec.name);
      dirs.push(dir);
      diskPaths[d.id] = path.join(dir, `${d.id}.img`);
    }
    if (dirs.length === 0) throw new Error(`VM ${spec.name} needs at least one disk`);
    return { diskPaths, ownerPath: path.join(dirs[0]!, 'owner.json'), dirs: [...new Set(dirs)] };
  }

  private memoryInUse(): number {
    let used = 0;
    for (const name of fs.readdirSync(this.host.runDir)) {
      const st = this.readState(name);
      if (st && isAlive(st.pid) && !st.migratedTo) used += st.spec.memoryBytes;
    }
    return used;
  }

  private checkCapacity(spec: VmSpec): void {
    const used = this.memoryInUse();
    if (used + spec.memoryBytes > this.host.memoryCapacityBytes) {
      throw new Error(`host ${this.host.name} lacks capacity: ${spec.memoryBytes} bytes needed, ${this.host.memoryCapacityBytes - used} free of ${this.host.memoryCapacityBytes}`);
    }
  }

  // ---------------------------------------------------------------- processes

  private async accel(): Promise<Accel> {
    if (this.accelOpt !== 'auto') return this.accelOpt;
    return (await probeKvm(this.binary)) ? 'kvm' : 'tcg';
  }

  private qemuArgs(st: QemuState, incoming: boolean): string[] {
    const spec = st.spec;
    const dir = this.runtimeDir(spec.name);
    const kernel = spec.qemu?.kernel ?? this.guest.kernel;
    const initrd = spec.qemu?.initrd ?? this.guest.initrd;
    const append = ['console=ttyS0', 'panic=-1', 'quiet', this.guest.append, spec.qemu?.append].filter(Boolean).join(' ');
    const memMiB = Math.max(16, Math.ceil(spec.memoryBytes / 2 ** 20));
    const args = [
      '-name', `${spec.name},debug-threads=on`,
      '-machine', `pc,accel=${st.accel}`,
      ...(st.accel === 'kvm' ? ['-cpu', 'host'] : []),
      '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
      '-m', String(memMiB),
      '-smp', String(spec.qemu?.vcpus ?? 1),
      '-kernel', kernel, '-initrd', initrd, '-append', append,
      '-chardev', `socket,id=qmp,path=${st.qmpSocket},server=on,wait=off`,
      '-mon', 'chardev=qmp,mode=control',
      '-chardev', `file,id=ser0,path=${path.join(dir, 'serial.log')},append=on`,
      '-serial', 'chardev:ser0',
      '-pidfile', path.join(dir, 'qemu.pid'),
    ];
    for (const d of spec.disks) {
      args.push('-drive', `file=${st.diskPaths[d.id]},format=raw,if=none,id=drive-${d.id},cache=writeback`);
      args.push('-device', `virtio-blk-pci,drive=drive-${d.id},id=disk-${d.id}`);
    }
    if (incoming) args.push('-incoming', 'defer');
    return args;
  }

  private async spawnQemu(st: QemuState, incoming: boolean): Promise<QemuState> {
    const dir = this.runtimeDir(st.spec.name);
    fs.mkdirSync(dir, { recursive: true });
    for (const f of [st.spec.qemu?.kernel ?? this.guest.kernel, st.spec.qemu?.initrd ?? this.guest.initrd]) {
      if (!fs.existsSync(f)) throw new Error(`guest image ${f} is missing (build it with scripts/qemu/build-guest.sh)`);
    }
    fs.rmSync(st.qmpSocket, { force: true });
    const args = this.qemuArgs(st, incoming);
    fs.writeFileSync(path.join(dir, 'qemu.args'), [this.binary, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ') + '\n');
    const logFile = path.join(dir, 'qemu.log');
    const logFd = fs.openSync(logFile, 'a');
    // Detached, own process group: killing the agent never kills its VMs.
    const child = spawn(this.binary, args, { detached: true, stdio: ['ignore', logFd, logFd] });
    fs.closeSync(logFd);
    child.unref();
    let exited: string | null = null;
    child.once('exit', (code, sig) => { exited = `exited with ${sig ?? `code ${code}`}`; });
    child.once('error', (e) => { exited = e.message; });
    if (!child.pid) await sleep(50);
    const next = { ...st, pid: child.pid ?? 0 };
    this.writeState(next);
    const deadline = Date.now() + 15_000;
    for (;;) {
      if (exited) throw new Error(`QEMU for ${st.spec.name} ${exited} while starting: ${tail(logFile)}`);
      try {
        const v = await this.qmp(st.spec.name, (q) => Promise.resolve(q.greeting!.QMP.version.qemu), 1000);
        return this.patchState(st.spec.name, { qemuVersion: `${v.major}.${v.minor}.${v.micro}` });
      } catch (e) {
        if (!(e instanceof QmpConnectionError)) throw e;
      }
      if (Date.now() > deadline) throw new Error(`QEMU for ${st.spec.name} did not open its QMP socket within 15 s: ${tail(logFile)}`);
      await sleep(50);
    }
  }

  private async stopProcess(st: QemuState): Promise<void> {
    if (!isAlive(st.pid)) return;
    try { await this.qmp(st.spec.name, (q) => q.execute('quit', undefined, 3000), 2000); } catch { /* kill below */ }
    for (let i = 0; i < 100 && isAlive(st.pid); i++) await sleep(20);
    if (isAlive(st.pid)) { try { process.kill(st.pid, 'SIGKILL'); } catch { /* gone */ } }
    for (let i = 0; i < 100 && isAlive(st.pid); i++) await sleep(20);
  }

  // ---------------------------------------------------------------- lifecycle

  /**
   * The default test guest is built where it boots, on demand: scripts/qemu/build-guest.sh
   * (cached; one build at a time per agent). A VM naming its own kernel/initrd is left alone:
   * spawnQemu says what is missing.
   */
  async ensureGuest(spec: VmSpec): Promise<void> {
    const q = (spec as QemuVmSpec).qemu;
    if ([q?.kernel ?? this.guest.kernel, q?.initrd ?? this.guest.initrd].every((f) => fs.existsSync(f))) return;
    if (!this.guestDir || q?.kernel || q?.initrd) return;
    const dir = this.guestDir;
    this.guestBuild ??= buildGuest(dir, this.log).finally(() => { this.guestBuild = undefined; });
    await this.guestBuild;
  }

  async create(spec: VmSpec): Promise<VmInfo> {
    const qspec = spec as QemuVmSpec;
    if (this.readState(spec.name)) throw new Error(`VM ${spec.name} already exists on ${this.host.name}`);
    this.checkCapacity(spec);
    await this.ensureGuest(spec);
    const { diskPaths, ownerPath, dirs } = this.storagePaths(spec);
    for (const d of dirs) if (fs.existsSync(d) && fs.readdirSync(d).length > 0) throw new Error(`VM files already exist at ${d}`);
    try {
      createVmFiles(this.host.name, spec, { dirs, diskPaths, ownerPath });
      fs.mkdirSync(this.runtimeDir(spec.name), { recursive: true });
      const st: QemuState = {
        kind: 'qemu', spec: qspec, host: this.host.name, mode: 'boot', epoch: 1, pid: 0, accel: await this.accel(), qemuVersion: '',
        qmpSocket: this.qmpSocketPath(spec.name), diskPaths, ownerPath, createdAt: new Date().toISOString(),
      };
      this.writeState(st);
      await this.spawnQemu(st, false);
    } catch (e) {
      await this.destroy(spec.name, { deleteStorage: false }).catch(() => undefined);
      for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
      throw e;
    }
    this.log(`created QEMU VM ${spec.name}`);
    return (await this.get(spec.name))!;
  }

  async destroy(name: string, opts: { deleteStorage: boolean; onlyMigration?: string }): Promise<{ destroyed: boolean }> {
    const st = this.readState(name);
    if (!st) return { destroyed: false };
    if (opts.onlyMigration && st.migrationId !== opts.onlyMigration) return { destroyed: false };
    await this.stopProcess(st);
    if (opts.deleteStorage) for (const d of this.storagePaths(st.spec).dirs) fs.rmSync(d, { recursive: true, force: true });
    fs.rmSync(st.qmpSocket, { force: true });
    fs.rmSync(this.runtimeDir(name), { recursive: true, force: true });
    this.log(`destroyed QEMU VM ${name}${opts.deleteStorage ? ' and its files' : ''}`);
    return { destroyed: true };
  }

  /** The guest is alive and its workload healthy: ticks advance and every check says ok. */
  async verify(name: string): Promise<VerifyReport> {
    const info = await this.get(name);
    if (!info) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    const checks: VerifyReport['checks'] = [{ name: 'process', ok: info.state === 'running', detail: `QEMU process ${info.pid} is ${info.state}` }];
    const log = this.serialLog(name);
    const before = readSerialTicks(log);
    const last = before.ticks.at(-1) ?? 0;
    let after = before;
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline && (after.ticks.at(-1) ?? 0) <= last) {
      await sleep(200);
      after = readSerialTicks(log);
    }
    const now = after.ticks.at(-1) ?? 0;
    checks.push({ name: 'guest-ticks', ok: now > last, detail: now > last ? `tick counter advanced ${last} → ${now}` : `tick counter stuck at ${last} for 10 s` });
    checks.push({ name: 'guest-memory-disk', ok: after.bad.length === 0 && after.ticks.length > 0, detail: after.bad.length ? `${after.bad.length} bad tick(s), first: ${after.bad[0]}` : after.ticks.length ? `all ${after.ticks.length} ticks in this host's log say mem=ok disk=ok` : 'no ticks yet' });
    const jumps = countGaps(after.ticks);
    checks.push({ name: 'guest-continuity', ok: jumps === 0 && after.boots <= 1, detail: `${jumps} gap(s) in the tick sequence, ${after.boots} boot(s) in this host's log` });
    return { ok: checks.every((c) => c.ok), vm: name, host: this.host.name, state: info.state, checks };
  }

  guestWrite(name: string): Promise<{ diskWrites: number }> {
    return Promise.reject(new Error(`guestWrite on ${name}: not supported by the QEMU driver yet (the guest writes its own disk; fencing of a QEMU guest is the ownership record plus QEMU's image locking)`));
  }

  // ---------------------------------------------------------------- incoming side

  async prepareIncoming(spec: VmSpec, migrationId: string, sourceHost: string): Promise<IncomingTarget> {
    const qspec = spec as QemuVmSpec;
    const existing = this.readState(spec.name);
    if (existing) {
      if (existing.mode === 'incoming' && existing.migrationId === migrationId && isAlive(existing.pid) && existing.incoming) return { endpoint: existing.incoming.endpoint, token: existing.incoming.token };
      throw new Error(`VM ${spec.name} already exists on ${this.host.name}${existing.migrationId ? ` (migration ${existing.migrationId})` : ''}`);
    }
    if (sourceHost === this.host.name) throw new Error(`source and destination are the same host (${sourceHost})`);
    await this.ensureGuest(spec);
    for (const d of spec.disks) {
      const root = this.host.storageRoots.find((r) => r.name === d.root);
      if (root && !root.shared) throw new Error(`disk ${d.id} of VM ${spec.name} is on local root "${root.name}": shared-nothing migration (NBD + drive-mirror) is not supported by the QEMU driver yet`);
    }
    this.checkCapacity(spec);
    const { diskPaths, ownerPath } = this.storagePaths(spec);
    for (const [id, p] of Object.entries(diskPaths)) if (!fs.existsSync(p)) throw new Error(`disk ${id} of VM ${spec.name} is not reachable from ${this.host.name} at ${p}`);
    // The token is issued for the interface's sake and recorded, but QEMU's migration stream
    // is plain TCP from the source QEMU straight to this listener: it cannot present a data
    // plane HELLO. Isolation rests on the listener being bound to the data-plane address for
    // one migration only (and on TLS via tls-creds, not configured yet).
    const token = crypto.randomBytes(24).toString('base64url');
    fs.mkdirSync(this.runtimeDir(spec.name), { recursive: true });
    const st: QemuState = {
      kind: 'qemu', spec: qspec, host: this.host.name, mode: 'incoming', migrationId, epoch: 0, pid: 0, accel: await this.accel(), qemuVersion: '',
      qmpSocket: this.qmpSocketPath(spec.name), diskPaths, ownerPath, createdAt: new Date().toISOString(),
    };
    this.writeState(st);
    try {
      await this.spawnQemu(st, true);
      const listenHost = this.host.dataPlane.host || '127.0.0.1';
      const endpoint = await this.qmp(spec.name, async (q) => {
        await q.execute('migrate-set-capabilities', { capabilities: this.capabilities(false, false) });
        if (this.multifd > 0) await q.execute('migrate-set-parameters', { 'multifd-channels': this.multifd });
        await q.execute('migrate-incoming', { uri: `tcp:${listenHost}:0` });
        const m = await q.execute<QueryMigrate>('query-migrate');
        const a = m['socket-address']?.find((s) => s.type === 'inet' && s.port);
        if (!a) throw new Error(`QEMU did not report its incoming listener: ${JSON.stringify(m)}`);
        return { host: listenHost, port: Number(a.port) };
      });
      this.patchState(spec.name, { incoming: { endpoint, token } });
      this.log(`QEMU VM ${spec.name} waits for migration ${migrationId} on ${endpoint.host}:${endpoint.port}`);
      return { endpoint, token };
    } catch (e) {
      await this.destroy(spec.name, { deleteStorage: false }).catch(() => undefined);
      throw e;
    }
  }

  async incomingStatus(name: string, migrationId: string): Promise<IncomingStatus> {
    const st = this.readState(name);
    if (!st || st.migrationId !== migrationId) return { exists: false, state: 'absent', bytesReceived: 0 };
    if (!isAlive(st.pid)) {
      const why = tail(path.join(this.runtimeDir(name), 'qemu.log'));
      return { exists: true, state: 'failed', bytesReceived: 0, error: `incoming QEMU (pid ${st.pid}) exited${why ? `: ${why}` : ' without a message (killed?)'}` };
    }
    try {
      const [run, mig] = await this.qmp(name, async (q) => [await q.execute<{ status: string }>('query-status'), await q.execute<QueryMigrate>('query-migrate')] as const);
      if (run.status === 'running') return { exists: true, state: 'running', bytesReceived: 0 };
      // QEMU does not count received bytes on the incoming side.
      return { exists: true, state: mig.status ?? run.status, bytesReceived: 0, error: mig['error-desc'] };
    } catch (e) {
      return { exists: true, state: 'unreachable', bytesReceived: 0, error: (e as Error).message };
    }
  }

  async abortIncoming(name: string, migrationId: string): Promise<{ aborted: boolean; running: boolean }> {
    const st = this.readState(name);
    if (!st || st.migrationId !== migrationId || st.mode !== 'incoming') return { aborted: true, running: false };
    if (isAlive(st.pid)) {
      const status = await this.liveStatus(st);
      if (status === 'running') return { aborted: false, running: true };
    }
    await this.destroy(name, { deleteStorage: false, onlyMigration: migrationId });
    return { aborted: true, running: false };
  }

  // ---------------------------------------------------------------- outgoing side

  private capabilities(source: boolean, autoConverge: boolean): Array<{ capability: string; state: boolean }> {
    const caps = [{ capability: 'events', state: true }, { capability: 'multifd', state: this.multifd > 0 }];
    if (source) caps.push({ capability: 'pause-before-switchover', state: true }, { capability: 'auto-converge', state: autoConverge });
    return caps;
  }

  async startOutgoing(name: string, migrationId: string, target: IncomingTarget, policy: MigrationPolicy): Promise<void> {
    const st = this.readState(name);
    if (!st) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    if (!isAlive(st.pid)) throw new Error(`VM ${name} is not running on ${this.host.name}`);
    // With pause-before-switchover QEMU stops the guest as soon as it converges; waiting for an
    // operator there would freeze the guest for as long as the approval takes.
    if (policy.approveCutover) {
      throw new Error(`refusing live migration of ${name}: cutover approval is not supported by the QEMU driver yet (QEMU pauses the guest once it converges, so the guest would stay paused until approved)`);
    }
    if (st.outgoing?.migrationId === migrationId) {
      const m = await this.queryMigrate(name);
      if (m.status && m.status !== 'none' && m.status !== 'failed' && m.status !== 'cancelled') return; // already under way
    }
    const [ver, kvm] = await this.qmp(name, async (q) => [
      await q.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version'),
      await q.execute<{ enabled: boolean }>('query-kvm'),
    ] as const);
    const hazard = precopyHazard(ver.qemu, kvm.enabled ? 'kvm' : 'tcg');
    if (hazard && !this.allowUnsafePrecopy) throw new Error(`refusing live migration of ${name}: ${hazard}`);
    if (hazard) this.log(`WARNING: migrating ${name} despite: ${hazard}`);
    const pct = (f: number, lo: number, hi: number): number => Math.min(hi, Math.max(lo, Math.round(f * 100)));
    await this.qmp(name, async (q) => {
      await q.execute('migrate-set-capabilities', { capabilities: this.capabilities(true, policy.autoConverge) });
      await q.execute('migrate-set-parameters', {
        'downtime-limit': Math.max(1, Math.round(policy.downtimeLimitMs)),
        'max-bandwidth': policy.maxBandwidth > 0 ? Math.round(policy.maxBandwidth) : UNLIMITED_BANDWIDTH,
        'cpu-throttle-initial': pct(policy.throttleInitial, 1, 99),
        'cpu-throttle-increment': pct(policy.throttleIncrement, 1, 100),
        'max-cpu-throttle': pct(policy.throttleMax, 1, 99),
        ...(this.multifd > 0 ? { 'multifd-channels': this.multifd } : {}),
      });
      this.patchState(name, { outgoing: { migrationId, startedAt: Date.now(), target, policy } });
      await q.execute('migrate', { uri: `tcp:${target.endpoint.host}:${target.endpoint.port}` });
    });
    this.log(`QEMU VM ${name}: migration ${migrationId} to ${target.endpoint.host}:${target.endpoint.port} started`);
  }

  private sample(m: QueryMigrate, st: QemuState): ProgressSample {
    const ram = m.ram;
    const page = ram?.['page-size'] || 4096;
    const bandwidth = ram ? (ram.mbps * 1e6) / 8 : 0;
    const remaining = ram?.remaining ?? st.spec.memoryBytes;
    const failed = m.status === 'failed' || m.status === 'cancelled' || m.status === 'none' || m.status === undefined;
    // Our own estimate: QEMU's expected-downtime starts at the limit itself before it measures.
    const expected = m.status === 'pre-switchover' || m.status === 'completed' ? 0 : bandwidth > 0 ? Math.round(remaining / (bandwidth / 1000)) : 3_600_000;
    return {
      round: ram?.['dirty-sync-count'] ?? 0,
      elapsedMs: m['total-time'] ?? Date.now() - (st.outgoing?.startedAt ?? Date.now()),
      bytesSent: ram?.transferred ?? 0,
      pagesSent: ram ? ram.normal + ram.duplicate : 0,
      dirtyPages: Math.ceil(remaining / page),
      dirtyRate: ram ? ram['dirty-pages-rate'] * page : 0,
      bandwidth,
      throttle: (m['cpu-throttle-percentage'] ?? 0) / 100,
      expectedDowntimeMs: expected,
      state: failed ? 'failed' : 'precopy',
      ...(failed ? { error: m['error-desc'] ?? `migration ${m.status ?? 'not started'}` } : {}),
    };
  }

  async outgoingProgress(name: string, migrationId: string, afterRound: number, waitMs: number): Promise<ProgressSample> {
    const st = this.readState(name);
    if (!st) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    if (st.outgoing?.migrationId !== migrationId) {
      return { round: 0, elapsedMs: 0, bytesSent: 0, pagesSent: 0, dirtyPages: 0, dirtyRate: 0, bandwidth: 0, throttle: 0, expectedDowntimeMs: 0, state: 'failed', error: `no outgoing migration ${migrationId} for ${name} on ${this.host.name}` };
    }
    const deadline = Date.now() + waitMs;
    for (;;) {
      if (!isAlive(st.pid)) return { ...this.sample({ status: 'failed' }, st), error: `source QEMU exited: ${tail(path.join(this.runtimeDir(name), 'qemu.log'))}` };
      const m = await this.queryMigrate(name);
      const s = this.sample(m, st);
      const done = s.state === 'failed' || m.status === 'pre-switchover' || m.status === 'completed' || m.status === 'device';
      // QEMU's last bitmap sync (the one that found the rest fits) may be the round the caller
      // already saw; the pause that follows ends the pass, so it is reported as a new round:
      // callers that wait for "a round after N" (the workflow) must see it, or the guest would
      // sit paused in pre-switchover while they wait for a round that never comes.
      if (done && s.state !== 'failed' && s.round <= afterRound) return { ...s, round: afterRound + 1 };
      if (done || s.round > afterRound || Date.now() >= deadline) return s;
      await sleep(Math.min(50, Math.max(10, deadline - Date.now())));
    }
  }

  async setOutgoingPolicy(name: string, migrationId: string, patch: { throttle?: number; maxBandwidth?: number }): Promise<void> {
    const st = this.readState(name);
    if (st?.outgoing?.migrationId !== migrationId) throw new Error(`no outgoing migration ${migrationId} for ${name} on ${this.host.name}`);
    const params: Record<string, number> = {};
    if (patch.maxBandwidth !== undefined) params['max-bandwidth'] = patch.maxBandwidth > 0 ? Math.round(patch.maxBandwidth) : UNLIMITED_BANDWIDTH;
    // QEMU has no "throttle the guest to X now" command: auto-converge throttles by itself. The
    // request becomes the level QEMU starts from (and may not exceed) when it next throttles;
    // progress reports QEMU's actual cpu-throttle-percentage.
    if (patch.throttle !== undefined && patch.throttle > 0) {
      const p = Math.min(99, Math.max(1, Math.round(patch.throttle * 100)));
      params['cpu-throttle-initial'] = p;
      params['max-cpu-throttle'] = Math.max(p, Math.round(st.outgoing.policy.throttleMax * 100));
    }
    if (Object.keys(params).length) await this.qmp(name, (q) => q.execute('migrate-set-parameters', params));
  }

  async cutover(name: string, migrationId: string, destinationHost: string, _verify: MigrationPolicy['verify']): Promise<CutoverResult> {
    // _verify: QEMU offers no page digests; the guest's own mem/disk checks (verify()) stand in.
    const st = this.readState(name);
    if (!st) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    if (st.outgoing?.migrationId !== migrationId) throw new Error(`no outgoing migration ${migrationId} for ${name} on ${this.host.name}`);
    const lastTick = readSerialTicks(this.serialLog(name)).ticks.at(-1) ?? 0;
    let m = await this.queryMigrate(name);
    let finalPages = 0;
    if (m.status !== 'completed') {
      if (m.status !== 'active' && m.status !== 'pre-switchover' && m.status !== 'device' && m.status !== 'setup') {
        throw new Error(`cutover of ${name}: migration is ${m.status}${m['error-desc'] ? `: ${m['error-desc']}` : ''}`);
      }
      // QEMU stops the guest once the rest fits the limit, then waits in pre-switchover for us.
      m = await this.waitMigrate(name, (s) => s === 'pre-switchover' || TERMINAL.has(s), 120_000);
      if (m.status === 'pre-switchover') {
        finalPages = Math.ceil((m.ram?.remaining ?? 0) / (m.ram?.['page-size'] || 4096));
        await this.qmp(name, (q) => q.execute('migrate-continue', { state: 'pre-switchover' }));
        m = await this.waitMigrate(name, (s) => TERMINAL.has(s), 120_000);
      }
      if (m.status !== 'completed') throw new Error(`cutover of ${name} failed: migration ${m.status}${m['error-desc'] ? `: ${m['error-desc']}` : ''}`);
    }
    const resumedAt = Date.now();
    const downtimeMs = m.downtime ?? 0;
    const owner = updateOwner(st.ownerPath, (cur) => {
      if (cur && cur.host === destinationHost && cur.migrationId === migrationId) return { host: cur.host, epoch: cur.epoch, state: cur.state, from: cur.from, migrationId };
      return { host: destinationHost, epoch: (cur?.epoch ?? st.epoch) + 1, state: 'active', from: this.host.name, migrationId };
    });
    this.patchState(name, { migratedTo: { host: destinationHost, migrationId, at: new Date(resumedAt).toISOString(), downtimeMs } });
    this.log(`QEMU VM ${name}: migration ${migrationId} completed, downtime ${downtimeMs} ms`);
    return {
      pausedAt: resumedAt - downtimeMs,
      resumedAt,
      downtimeMs,
      finalPages,
      bytesSent: m.ram?.transferred ?? 0,
      sourceDigest: 0,
      destinationDigest: 0,
      epoch: owner.epoch,
      deviceState: { vcpuTicks: lastTick, memWrites: lastTick, diskWrites: lastTick },
    };
  }

  private async waitMigrate(name: string, until: (status: string) => boolean, timeoutMs: number): Promise<QueryMigrate> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = await this.queryMigrate(name);
      if (until(m.status ?? 'none')) return m;
      if (Date.now() > deadline) throw new Error(`migration of ${name} still ${m.status} after ${timeoutMs} ms`);
      await sleep(20);
    }
  }

  async rollbackOutgoing(name: string, migrationId: string): Promise<RollbackResult> {
    const st = this.readState(name);
    if (!st) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    const owner = readOwner(st.ownerPath);
    if (owner && owner.host !== this.host.name) return { runsOn: 'destination', state: 'migrated', epoch: owner.epoch };
    if (!isAlive(st.pid)) throw new Error(`cannot roll back ${name}: its QEMU process on ${this.host.name} is gone`);
    let m = await this.queryMigrate(name);
    if (m.status === 'completed') {
      // Too late: the destination got everything and resumed by itself. The ownership record
      // is moved by cutover() (which knows the destination's name) when it is retried.
      return { runsOn: 'destination', state: 'migrated', epoch: (owner?.epoch ?? st.epoch) + 1 };
    }
    if (m.status && !TERMINAL.has(m.status) && m.status !== 'none') {
      await this.qmp(name, (q) => q.execute('migrate_cancel'));
      m = await this.waitMigrate(name, (s) => TERMINAL.has(s) || s === 'none', 30_000);
      if (m.status === 'completed') return this.rollbackOutgoing(name, migrationId);
    }
    const run = await this.qmp(name, (q) => q.execute<{ status: string; running: boolean }>('query-status'));
    if (!run.running && run.status !== 'shutdown') await this.qmp(name, (q) => q.execute('cont'));
    const after = await this.qmp(name, (q) => q.execute<{ status: string }>('query-status'));
    this.patchState(name, { outgoing: undefined });
    this.log(`QEMU VM ${name}: migration ${migrationId} rolled back, guest ${after.status}`);
    return { runsOn: 'source', state: mapRunState(after.status, 'boot'), epoch: this.epochOf(st) };
  }
}

/** max-bandwidth has no "unlimited" value in every QEMU version: 1 TiB/s is unlimited enough. */
const UNLIMITED_BANDWIDTH = 2 ** 40;

function mapRunState(status: string, mode: 'boot' | 'incoming'): VmState {
  switch (status) {
    case 'running': return 'running';
    case 'inmigrate': return 'incoming';
    case 'postmigrate': return 'migrated';
    case 'paused': case 'finish-migrate': case 'prelaunch': case 'suspended': case 'save-vm': case 'restore-vm': case 'debug':
      return mode === 'incoming' ? 'incoming' : 'paused';
    case 'shutdown': return 'stopped';
    default: return 'failed';
  }
}

function countGaps(ticks: number[]): number {
  let gaps = 0;
  for (let i = 1; i < ticks.length; i++) if (ticks[i] !== ticks[i - 1]! + 1) gaps++;
  return gaps;
}

const BUILD_GUEST = path.join(REPO_ROOT, 'scripts', 'qemu', 'build-guest.sh');

/** Runs scripts/qemu/build-guest.sh <dir> without blocking the agent (it may download a kernel). */
function buildGuest(dir: string, log: (m: string) => void): Promise<void> {
  log(`building the QEMU test guest into ${dir} (scripts/qemu/build-guest.sh)`);
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [BUILD_GUEST, dir], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (b: Buffer) => { err = (err + b.toString()).slice(-4000); });
    const timer = setTimeout(() => child.kill('SIGKILL'), 600_000);
    child.once('error', (e) => { clearTimeout(timer); reject(new Error(`cannot run ${BUILD_GUEST}: ${e.message}`)); });
    child.once('exit', (code, sig) => {
      clearTimeout(timer);
      if (code === 0) resolve();
      else reject(new Error(`building the QEMU test guest failed (${BUILD_GUEST} ${sig ?? `exit ${code}`}): ${err.trim().split('\n').slice(-5).join('\n')}`));
    });
  });
}

function tail(file: string): string {
  try { return fs.readFileSync(file, 'utf8').trim().split('\n').slice(-5).join('\n'); } catch { return ''; }
}
