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
// Storage moves (StorageMoves; QMP block jobs, see the section "storage moves" below):
//   live storage migration on one host: blockdev-add of a new raw image + blockdev-mirror
//                    sync=full per disk; ready → synced; switchDisks = job-complete (QEMU pivots
//                    the drive to the new image), then vm.json records the new paths.
//   shared-nothing:  the destination starts the incoming QEMU at once (-incoming defer, -S) on
//                    new empty images and exports them over NBD (nbd-server-start on the
//                    data-plane address + block-export-add, writable); the source mirrors each
//                    disk into an NBD node (blockdev-add driver nbd + blockdev-mirror). The
//                    memory move reuses that incoming QEMU. At the cutover the source, paused in
//                    pre-switchover, ends the mirror with block-job-cancel (a ready mirror then
//                    finishes with the target identical), then lets QEMU send the device state;
//                    the destination, started with -S, stays paused until its agent sees the
//                    incoming migration completed, stops the NBD server and resumes it.
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
import type { HypervisorDriver, IncomingOptions, IncomingStatus, IncomingTarget, RollbackResult, StorageMoves } from '../driver.js';
import type { CutoverResult, DiskMirrorStatus, DiskTargetGrant, MigrationPolicy, ProgressSample, VerifyReport, VmInfo, VmSpec, VmState } from '../../common/types.js';
import { resolveStorageDir, vmStorageDir, type HostConfig } from '../../common/host-config.js';
import { readOwner, updateOwner, writeOwner } from '../sim/ownership.js';
import { QmpClient, QmpConnectionError, withQmp } from './qmp.js';
import { createVmFiles } from '../disk-files.js';
import { faultAt, faultPoint } from '../../common/faults.js';
import { READY_STATES, createRawImage, driveFiles, driveName, freePort, mirrorNames, namedNodes, nbdExportName, queryJobs, tolerate, waitJobsEnded } from './qemu-storage.js';

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
  /** Default: $VMFERRY_QEMU_IMG or qemu-img on PATH. */
  qemuImg?: string;
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
  /** Source side of a storage move in progress: one mirror job per disk. */
  diskMirror?: DiskMirrorState;
  /** The last storage switch (a retried switchDisks answers from it). */
  lastSwitch?: { migrationId: string; oldPaths: string[]; newPaths: string[]; epoch: number };
  /** Files this VM used before its storage moves: the only ones deleteOldDiskFiles removes. */
  formerPaths?: string[];
  /** Destination of a shared-nothing move: this incoming QEMU serves its new disks over NBD. */
  nbdTarget?: NbdTargetState;
}

interface DiskMirrorState {
  migrationId: string;
  kind: 'local' | 'remote';
  /** Disk id → new image (local) or NBD export name (remote). */
  targets: Record<string, string>;
  /** Image files this move created (local): deleted again on abort. */
  created: string[];
  /** Disk id → block job id / target node name. */
  jobs: Record<string, string>;
  nodes: Record<string, string>;
  /** Remote mirror ended consistently at the cutover (the target is the source's copy). */
  finished?: boolean;
}

interface NbdTargetState {
  migrationId: string;
  sourceHost: string;
  epoch: number;
  token: string;
  /** Directory holding the new images (with the .migration marker until adopted). */
  dir: string;
  /** Disk id → NBD export name. */
  exports: Record<string, string>;
  endpoint?: { host: string; port: number };
  resumedAt?: string;
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

export class QemuDriver implements HypervisorDriver, StorageMoves {
  readonly kind = 'qemu';
  private readonly binary: string;
  private readonly qemuImg: string;
  /** Resumes of shared-nothing destinations under way in this agent (one per VM). */
  private resuming = new Map<string, Promise<boolean>>();
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
    this.qemuImg = opts.qemuImg ?? process.env.VMFERRY_QEMU_IMG ?? 'qemu-img';
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
    return { name: st.spec.name, host: this.host.name, state, pid: isAlive(st.pid) ? st.pid : 0, epoch: this.epochOf(st), spec: st.spec, migrationId: st.outgoing?.migrationId ?? (st.diskMirror && !st.migratedTo ? st.diskMirror.migrationId : undefined) ?? (st.mode === 'incoming' && state !== 'running' ? st.migrationId : undefined) };
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
      // A disk moved by a storage move lives in the directory it was moved to (inside the root).
      const dir = d.dir ? resolveStorageDir([root], d.dir).dir : vmStorageDir(root, spec.name);
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
    // A shared-nothing destination must not run before its disks are complete: it stays paused
    // after the incoming stream until resumeNbdTarget() stopped the NBD server.
    if (incoming && st.nbdTarget) args.push('-S');
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
    if (opts.deleteStorage) {
      for (const d of this.storagePaths(st.spec).dirs) fs.rmSync(d, { recursive: true, force: true });
      // Partial copies of an unfinished local storage move, and files left by a finished one.
      for (const p of [...(st.diskMirror?.kind === 'local' ? st.diskMirror.created : []), ...(st.formerPaths ?? [])]) {
        try { resolveStorageDir(this.host.storageRoots, path.dirname(p)); } catch { continue; }
        fs.rmSync(p, { force: true });
        try { if (fs.readdirSync(path.dirname(p)).length === 0) fs.rmdirSync(path.dirname(p)); } catch { /* gone or not empty */ }
      }
    }
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

  async prepareIncoming(spec: VmSpec, migrationId: string, sourceHost: string, opts: IncomingOptions = {}): Promise<IncomingTarget> {
    // QEMU picks its incoming port only now: a source cannot be sent ahead with a minted grant.
    if (opts.token !== undefined) throw new Error('the QEMU driver issues its own incoming endpoint; a pre-minted grant cannot be used');
    const qspec = spec as QemuVmSpec;
    const existing = this.readState(spec.name);
    if (existing) {
      if (existing.mode === 'incoming' && existing.migrationId === migrationId && isAlive(existing.pid)) {
        if (existing.incoming) return { endpoint: existing.incoming.endpoint, token: existing.incoming.token };
        // Shared-nothing: the incoming QEMU of this migration already runs (prepareDiskTargets
        // started it to serve the disk mirror); it now also listens for memory and state.
        if (existing.nbdTarget?.migrationId === migrationId) return this.listenIncoming(existing, existing.nbdTarget.token, opts.streams);
      }
      throw new Error(`VM ${spec.name} already exists on ${this.host.name}${existing.migrationId ? ` (migration ${existing.migrationId})` : ''}`);
    }
    if (sourceHost === this.host.name) throw new Error(`source and destination are the same host (${sourceHost})`);
    await this.ensureGuest(spec);
    for (const d of spec.disks) {
      const root = this.host.storageRoots.find((r) => r.name === d.root);
      if (root && !root.shared) throw new Error(`disk ${d.id} of VM ${spec.name} is on local root "${root.name}": live migration needs storage both hosts share (use shared-nothing migration)`);
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
      return await this.listenIncoming(await this.spawnQemu(st, true), token, opts.streams);
    } catch (e) {
      await this.destroy(spec.name, { deleteStorage: false }).catch(() => undefined);
      throw e;
    }
  }

  /** `migrate-incoming` on the data-plane address; QEMU picks the port, we report it. */
  private async listenIncoming(st: QemuState, token: string, streams?: number): Promise<IncomingTarget> {
    // Both ends must agree on multifd and its channel count: policy.streams > 1 asks for it,
    // else the host's own setting (multifdChannels) applies.
    const channels = this.multifdFor(streams);
    const name = st.spec.name;
    const listenHost = this.host.dataPlane.host || '127.0.0.1';
    const endpoint = await this.qmp(name, async (q) => {
      const cur = await q.execute<QueryMigrate>('query-migrate');
      const have = cur['socket-address']?.find((s) => s.type === 'inet' && s.port);
      if (have) return { host: listenHost, port: Number(have.port) }; // a retry after migrate-incoming
      await q.execute('migrate-set-capabilities', { capabilities: this.capabilities(false, false, channels) });
      if (channels > 0) await q.execute('migrate-set-parameters', { 'multifd-channels': channels });
      await q.execute('migrate-incoming', { uri: `tcp:${listenHost}:0` });
      const m = await q.execute<QueryMigrate>('query-migrate');
      const a = m['socket-address']?.find((s) => s.type === 'inet' && s.port);
      if (!a) throw new Error(`QEMU did not report its incoming listener: ${JSON.stringify(m)}`);
      return { host: listenHost, port: Number(a.port) };
    });
    this.patchState(name, { incoming: { endpoint, token } });
    this.log(`QEMU VM ${name} waits for migration ${st.migrationId} on ${endpoint.host}:${endpoint.port}`);
    return { endpoint, token };
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
      // Shared-nothing: memory, state and disks are all here (the source ended its mirror before
      // it sent the device state); this agent resumes the guest, which -S kept paused.
      if (st.nbdTarget && mig.status === 'completed' && (await this.resumeNbdTarget(name, migrationId))) return { exists: true, state: 'running', bytesReceived: 0 };
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

  /** multifd channels for a migration: its policy's streams when above 1, else this host's setting (0 = off). */
  private multifdFor(streams: number | undefined): number {
    return streams && streams > 1 ? streams : this.multifd;
  }

  private capabilities(source: boolean, autoConverge: boolean, multifd: number): Array<{ capability: string; state: boolean }> {
    const caps = [{ capability: 'events', state: true }, { capability: 'multifd', state: multifd > 0 }];
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
    // A disk mirror of another move (a storage move) must end first; shared-nothing's own
    // mirror (same migration) keeps running through the memory move.
    if (st.diskMirror && st.diskMirror.migrationId !== migrationId) throw new Error(`VM ${name} is already migrating (${st.diskMirror.migrationId})`);
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
      const channels = this.multifdFor(policy.streams);
      await q.execute('migrate-set-capabilities', { capabilities: this.capabilities(true, policy.autoConverge, channels) });
      await q.execute('migrate-set-parameters', {
        'downtime-limit': Math.max(1, Math.round(policy.downtimeLimitMs)),
        'max-bandwidth': policy.maxBandwidth > 0 ? Math.round(policy.maxBandwidth) : UNLIMITED_BANDWIDTH,
        'cpu-throttle-initial': pct(policy.throttleInitial, 1, 99),
        'cpu-throttle-increment': pct(policy.throttleIncrement, 1, 100),
        'max-cpu-throttle': pct(policy.throttleMax, 1, 99),
        ...(channels > 0 ? { 'multifd-channels': channels } : {}),
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
        // Shared-nothing: the guest is paused; the disk mirror ends now, the target identical,
        // before QEMU sends the device state the destination resumes from.
        if (st.diskMirror?.kind === 'remote' && st.diskMirror.migrationId === migrationId) await this.finishRemoteMirror(name, migrationId);
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
  // ---------------------------------------------------------------- storage moves
  //
  // Every block job runs with auto-dismiss off: a job that ended stays listed (query-jobs) with
  // its error until we dismiss it, so a retried activity or a restarted agent can tell a clean
  // end from a failure. Names of nodes and jobs derive from the migration id (mirrorNames).

  private requireState(name: string): QemuState {
    const st = this.readState(name);
    if (!st) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    return st;
  }

  /** A running VM that can start a disk mirror for `migrationId` (or already has it). */
  private mirrorSource(name: string, migrationId: string): QemuState {
    const st = this.requireState(name);
    if (!isAlive(st.pid) || st.migratedTo || st.mode === 'incoming' && st.nbdTarget) throw new Error(`VM ${name} is not running on ${this.host.name}`);
    if (st.outgoing) throw new Error(`VM ${name} is already migrating (${st.outgoing.migrationId})`);
    if (st.diskMirror && st.diskMirror.migrationId !== migrationId) throw new Error(`VM ${name} is already migrating (${st.diskMirror.migrationId})`);
    return st;
  }

  /** blockdev-add of each target node and blockdev-mirror sync=full into it; skips what runs. */
  private async startMirrorJobs(st: QemuState, m: DiskMirrorState, nodeOptions: (diskId: string, node: string) => Record<string, unknown>, maxBandwidth: number): Promise<void> {
    const speed = maxBandwidth > 0 ? Math.max(1, Math.floor(maxBandwidth / st.spec.disks.length)) : 0;
    // With a rate limit, a small in-flight window (QEMU's default is 16 MiB) keeps the rate even
    // and lets the job see a failed target within a second instead of after one long sleep.
    const bufSize = speed ? Math.min(16 * 2 ** 20, Math.max(256 * 1024, Math.floor(speed / 2 / 65536) * 65536)) : 0;
    await this.qmp(st.spec.name, async (q) => {
      const jobs = await queryJobs(q);
      const nodes = await namedNodes(q);
      for (const d of st.spec.disks) {
        const job = m.jobs[d.id]!;
        const node = m.nodes[d.id]!;
        if (jobs.some((j) => j.id === job)) continue; // started by an earlier attempt
        if (!nodes.has(node)) await q.execute('blockdev-add', nodeOptions(d.id, node));
        await q.execute('blockdev-mirror', { 'job-id': job, device: driveName(d.id), target: node, sync: 'full', 'auto-dismiss': false, ...(speed ? { speed, 'buf-size': bufSize } : {}) });
      }
    });
  }

  private newMirror(st: QemuState, migrationId: string, kind: DiskMirrorState['kind'], target: (diskId: string) => string): DiskMirrorState {
    const m: DiskMirrorState = { migrationId, kind, targets: {}, created: [], jobs: {}, nodes: {} };
    st.spec.disks.forEach((d, i) => {
      const n = mirrorNames(migrationId, i);
      m.jobs[d.id] = n.job;
      m.nodes[d.id] = n.node;
      m.targets[d.id] = target(d.id);
    });
    return m;
  }

  /** Live storage migration on this host: targets are disk id → directory (inside a storage root). */
  async startLocalDiskMirror(name: string, migrationId: string, targets: Record<string, string>, maxBandwidth = 0): Promise<DiskMirrorStatus> {
    const st = this.mirrorSource(name, migrationId);
    let m = st.diskMirror;
    if (!m) {
      for (const id of Object.keys(targets)) if (!st.spec.disks.some((d) => d.id === id)) throw new Error(`VM ${name} has no disk "${id}" (it has: ${st.spec.disks.map((d) => d.id).join(', ')})`);
      const files: Record<string, string> = {};
      for (const d of st.spec.disks) {
        const dir = targets[d.id];
        if (!dir) throw new Error(`no destination for disk ${d.id}`);
        const p = path.join(resolveStorageDir(this.host.storageRoots, dir).dir, `${d.id}.img`);
        if (p === st.diskPaths[d.id]) throw new Error(`disk ${d.id} of ${name} is already at ${p}`);
        if (fs.existsSync(p)) throw new Error(`a file already exists at ${p}`);
        files[d.id] = p;
      }
      if (new Set(Object.values(files)).size !== st.spec.disks.length) throw new Error(`two disks of ${name} would share one file`);
      // Recorded before any file exists: an abort, even after an agent crash, knows what to delete.
      m = this.newMirror(st, migrationId, 'local', (id) => files[id]!);
      m.created = Object.values(files);
      this.patchState(name, { diskMirror: m });
    }
    const mirror = m;
    for (const d of st.spec.disks) {
      const p = mirror.targets[d.id]!;
      if (fs.existsSync(p)) continue; // an earlier attempt created it (and may mirror into it)
      fs.mkdirSync(path.dirname(p), { recursive: true });
      await createRawImage(this.qemuImg, p, fs.statSync(st.diskPaths[d.id]!).size);
    }
    await this.startMirrorJobs(st, mirror, (id, node) => ({ driver: 'raw', 'node-name': node, file: { driver: 'file', filename: mirror.targets[id] } }), maxBandwidth);
    this.log(`QEMU VM ${name}: storage move ${migrationId} mirrors to ${Object.values(mirror.targets).join(', ')}`);
    return this.diskMirrorStatus(name, migrationId);
  }

  /** Shared-nothing source: mirror every disk into the destination's NBD export (see prepareDiskTargets). */
  async startDiskMirror(name: string, migrationId: string, target: Parameters<StorageMoves['startDiskMirror']>[2], maxBandwidth = 0): Promise<DiskMirrorStatus> {
    const st = this.mirrorSource(name, migrationId);
    let m = st.diskMirror;
    if (!m) {
      m = this.newMirror(st, migrationId, 'remote', (id) => nbdExportName(target.token, id));
      this.patchState(name, { diskMirror: m });
    }
    const mirror = m;
    if (mirror.kind !== 'remote') throw new Error(`VM ${name}: migration ${migrationId} is a local storage move`);
    const server = { type: 'inet', host: target.endpoint.host, port: String(target.endpoint.port) };
    await this.startMirrorJobs(st, mirror, (id, node) => ({ driver: 'nbd', 'node-name': node, server, export: mirror.targets[id] }), maxBandwidth);
    this.log(`QEMU VM ${name}: disk mirror ${migrationId} to nbd://${server.host}:${server.port}`);
    return this.diskMirrorStatus(name, migrationId);
  }

  async diskMirrorStatus(name: string, migrationId: string): Promise<DiskMirrorStatus> {
    const st = this.readState(name);
    const none = { bytesCopied: 0, bytesMirrored: 0, checkpoint: {}, totalBytes: 0 };
    if (st?.lastSwitch?.migrationId === migrationId) return { ...none, state: 'switched' };
    const m = st?.diskMirror;
    if (!st || !m || m.migrationId !== migrationId) return { ...none, state: 'failed', error: `no disk mirror ${migrationId} for ${name} on ${this.host.name}` };
    const totalBytes = st.spec.disks.reduce((a, d) => a + d.sizeBytes, 0);
    if (!isAlive(st.pid)) return { ...none, totalBytes, state: 'failed', error: `QEMU of ${name} exited: ${tail(path.join(this.runtimeDir(name), 'qemu.log'))}` };
    if (m.finished) return { ...none, totalBytes, bytesCopied: totalBytes, state: 'synced' };
    const jobs = await this.qmp(name, (q) => queryJobs(q));
    let bytesCopied = 0;
    let bytesMirrored = 0;
    let ready = 0;
    const checkpoint: Record<string, number> = {};
    const errors: string[] = [];
    for (const d of st.spec.disks) {
      const j = jobs.find((x) => x.id === m.jobs[d.id]);
      if (!j) { errors.push(`disk ${d.id}: mirror job ${m.jobs[d.id]} is gone`); continue; }
      if (!READY_STATES.has(j.status) && (j.status === 'concluded' || j.status === 'aborting' || j.status === 'null' || j.error)) {
        errors.push(`disk ${d.id}: mirror ${j.error ? `failed: ${j.error}` : `ended (${j.status})`}`);
        continue;
      }
      // Progress counts every byte written to the target: past the disk size it is guest writes
      // mirrored after the bulk pass.
      const copied = Math.min(j['current-progress'], d.sizeBytes);
      bytesCopied += copied;
      bytesMirrored += Math.max(0, j['current-progress'] - d.sizeBytes);
      checkpoint[d.id] = Math.floor(copied / 4096);
      if (READY_STATES.has(j.status)) ready++;
    }
    if (errors.length) return { bytesCopied, bytesMirrored, checkpoint, totalBytes, state: 'failed', error: errors.join('; ') };
    return { bytesCopied, bytesMirrored, checkpoint, totalBytes, state: ready === st.spec.disks.length ? 'synced' : 'copying' };
  }

  resumeDiskMirror(name: string, migrationId: string, _token: string): Promise<DiskMirrorStatus> {
    // Never asked: diskMirrorStatus reports a broken NBD connection as 'failed', not
    // 'disconnected' (QEMU's mirror cannot continue into a new export), so the move rolls back.
    return Promise.reject(new Error(`disk mirror ${migrationId} of ${name}: the QEMU driver does not resume a broken mirror`));
  }

  /** Cancels (forced) and dismisses the jobs, drops their target nodes; idempotent. */
  private async dropMirrorJobs(name: string, m: DiskMirrorState): Promise<void> {
    const ids = Object.values(m.jobs);
    await this.qmp(name, async (q) => {
      const jobs = await queryJobs(q);
      for (const id of ids) {
        const j = jobs.find((x) => x.id === id);
        if (j && j.status !== 'concluded' && j.status !== 'null') await tolerate(q, 'block-job-cancel', { device: id, force: true }, /./);
      }
    });
    await waitJobsEnded(() => this.qmp(name, queryJobs), ids, 60_000, `cancelling the disk mirror of ${name}`);
    await this.qmp(name, async (q) => {
      for (const id of ids) await tolerate(q, 'job-dismiss', { id }, /./);
      const nodes = await namedNodes(q);
      for (const n of Object.values(m.nodes)) if (nodes.has(n)) await tolerate(q, 'blockdev-del', { 'node-name': n }, /not found|Cannot find/i);
    });
  }

  /** Compensation on the source: stop the mirror, delete the partial copies (local moves). */
  async abortDiskMirror(name: string, migrationId: string, _targets?: Record<string, string>): Promise<{ aborted: boolean }> {
    const st = this.readState(name);
    const m = st?.diskMirror;
    // Nothing of this migration here: never started, already aborted, or switched (then the
    // files are the VM's own and stay).
    if (!st || !m || m.migrationId !== migrationId) return { aborted: true };
    let live: Record<string, { file: string }> = {};
    if (isAlive(st.pid)) {
      await this.dropMirrorJobs(name, m);
      live = await this.qmp(name, driveFiles);
    }
    // A local move whose pivot QEMU already made (switchDisks failed after job-complete) is
    // kept as QEMU runs it: the files in use are never deleted, vm.json follows QEMU.
    const moved = st.spec.disks.filter((d) => m.kind === 'local' && live[driveName(d.id)]?.file === m.targets[d.id]).map((d) => d.id);
    if (moved.length) {
      this.log(`QEMU VM ${name}: disk(s) ${moved.join(', ')} already switched by QEMU; keeping them`);
      this.recordSwitch(st, m, new Set(moved));
    }
    const inUse = new Set([...Object.values(this.readState(name)?.diskPaths ?? st.diskPaths), ...Object.values(live).map((l) => l.file)]);
    for (const p of m.created) {
      if (inUse.has(p)) continue;
      fs.rmSync(p, { force: true });
      try { if (fs.readdirSync(path.dirname(p)).length === 0) fs.rmdirSync(path.dirname(p)); } catch { /* gone or not empty */ }
    }
    const cur = this.readState(name);
    if (cur?.diskMirror?.migrationId === migrationId) this.patchState(name, { diskMirror: undefined });
    this.log(`QEMU VM ${name}: disk mirror ${migrationId} aborted`);
    return { aborted: true };
  }

  /** vm.json follows a pivot QEMU made: new paths (of `only` disks, default all), epoch, owner record. */
  private recordSwitch(st: QemuState, m: DiskMirrorState, only?: Set<string>): { oldPaths: string[]; newPaths: string[]; epoch: number } {
    const disks = st.spec.disks.map((d) => {
      if (only && !only.has(d.id)) return d;
      const { root, dir } = resolveStorageDir(this.host.storageRoots, path.dirname(m.targets[d.id]!));
      return { ...d, root: root.name, dir };
    });
    const spec: QemuVmSpec = { ...st.spec, disks };
    const { diskPaths, ownerPath } = this.storagePaths(spec);
    const newPaths = Object.values(diskPaths);
    const oldPaths = [...Object.values(st.diskPaths), st.ownerPath].filter((p) => !newPaths.includes(p) && p !== ownerPath);
    const epoch = this.epochOf(st) + 1;
    writeOwner(ownerPath, { host: this.host.name, epoch, state: 'active', migrationId: m.migrationId });
    this.patchState(st.spec.name, {
      spec, diskPaths, ownerPath, epoch, diskMirror: undefined,
      lastSwitch: { migrationId: m.migrationId, oldPaths, newPaths, epoch },
      formerPaths: [...new Set([...(st.formerPaths ?? []), ...oldPaths])],
    });
    return { oldPaths, newPaths, epoch };
  }

  /**
   * job-complete per disk: QEMU pivots each drive to its copy (identical by then: the mirror
   * was ready, and job-complete drains the last writes). vm.json then records the new paths.
   * crcs is {}: the guest keeps writing the new files, so a checksum of them proves nothing
   * cheap; the guest's own disk check (tick lines: disk=ok) covers the content.
   */
  async switchDisks(name: string, migrationId: string, _targets: Record<string, string>): Promise<{ oldPaths: string[]; newPaths: string[]; epoch: number; crcs: Record<string, number> }> {
    const st = this.requireState(name);
    if (st.lastSwitch?.migrationId === migrationId) {
      const l = st.lastSwitch;
      return { oldPaths: l.oldPaths, newPaths: l.newPaths, epoch: l.epoch, crcs: {} };
    }
    const m = st.diskMirror;
    if (!m || m.migrationId !== migrationId || m.kind !== 'local') throw new Error(`no storage move ${migrationId} of ${name} on ${this.host.name}`);
    if (!isAlive(st.pid)) throw new Error(`VM ${name} is not running on ${this.host.name}`);
    const ids = Object.values(m.jobs);
    await this.qmp(name, async (q) => {
      const jobs = await queryJobs(q);
      const files = await driveFiles(q);
      for (const d of st.spec.disks) {
        const j = jobs.find((x) => x.id === m.jobs[d.id]);
        if (j && READY_STATES.has(j.status)) { await q.execute('job-complete', { id: j.id }); continue; }
        if (files[driveName(d.id)]?.file === m.targets[d.id]) continue; // pivoted by an earlier attempt
        if (j && !j.error && j.status !== 'concluded' && j.status !== 'null') continue; // completing
        throw new Error(`disk ${d.id} of ${name}: the mirror is ${j ? `${j.status}${j.error ? `: ${j.error}` : ''}` : 'gone'}, not synced`);
      }
    });
    const ended = await waitJobsEnded(() => this.qmp(name, queryJobs), ids, 120_000, `switching the disks of ${name}`);
    const files = await this.qmp(name, driveFiles);
    for (const d of st.spec.disks) {
      const now = files[driveName(d.id)]?.file;
      if (now !== m.targets[d.id]) {
        const j = ended[m.jobs[d.id]!];
        throw new Error(`disk ${d.id} of ${name} did not switch to ${m.targets[d.id]} (QEMU uses ${now ?? 'nothing'})${j?.error ? `: ${j.error}` : ''}`);
      }
    }
    // The switch is QEMU's fact now; vm.json follows (destroy, verify and later moves read it).
    const r = this.recordSwitch(st, m);
    await this.qmp(name, async (q) => { for (const id of ids) await tolerate(q, 'job-dismiss', { id }, /./); });
    this.log(`QEMU VM ${name}: switched disks to ${r.newPaths.join(', ')} at epoch ${r.epoch}`);
    return { ...r, crcs: {} };
  }

  /** Deletes files the VM used before a storage move, and nothing else (idempotent). */
  async deleteOldDiskFiles(name: string, paths: string[]): Promise<{ deleted: string[] }> {
    const st = this.readState(name);
    if (!st) return { deleted: [] };
    const inUse = new Set([...Object.values(st.diskPaths), st.ownerPath]);
    const former = new Set(st.formerPaths ?? []);
    const deleted: string[] = [];
    for (const p of paths) {
      if (inUse.has(p) || !former.has(p)) { this.log(`QEMU VM ${name}: not deleting ${p} (${inUse.has(p) ? 'in use' : 'not a former file of this VM'})`); continue; }
      try { resolveStorageDir(this.host.storageRoots, path.dirname(p)); } catch (e) { this.log(`QEMU VM ${name}: not deleting ${p}: ${(e as Error).message}`); continue; }
      if (fs.existsSync(p)) { fs.rmSync(p, { force: true }); deleted.push(p); }
      try { if (fs.readdirSync(path.dirname(p)).length === 0) fs.rmdirSync(path.dirname(p)); } catch { /* gone or not empty */ }
    }
    const left = [...former].filter((p) => fs.existsSync(p));
    if (left.length !== former.size) this.patchState(name, { formerPaths: left });
    return { deleted };
  }

  /**
   * At the cutover (source paused in pre-switchover): a ready mirror cancelled without force
   * drains what the guest wrote before the pause and ends with the target an exact copy — the
   * usual end of a mirror into NBD. Then the NBD nodes go. Any other end refuses the cutover.
   */
  private async finishRemoteMirror(name: string, migrationId: string): Promise<void> {
    const st = this.requireState(name);
    const m = st.diskMirror;
    if (!m || m.migrationId !== migrationId) throw new Error(`no disk mirror ${migrationId} for ${name}`);
    const ids = Object.values(m.jobs);
    if (!m.finished) {
      await this.qmp(name, async (q) => {
        const jobs = await queryJobs(q);
        for (const d of st.spec.disks) {
          const j = jobs.find((x) => x.id === m.jobs[d.id]);
          if (j && READY_STATES.has(j.status)) continue;
          if (j && j.status === 'concluded' && !j.error) continue; // ended cleanly by an earlier attempt
          throw new Error(`disk mirror of ${name} (${d.id}) is ${j ? `${j.status}${j.error ? `: ${j.error}` : ''}` : 'gone'}, not synchronised: no cutover`);
        }
        for (const id of ids) {
          const j = jobs.find((x) => x.id === id);
          if (j && READY_STATES.has(j.status)) await q.execute('block-job-cancel', { device: id, force: false });
        }
      });
      const ended = await waitJobsEnded(() => this.qmp(name, queryJobs), ids, 60_000, `ending the disk mirror of ${name}`);
      for (const id of ids) {
        const j = ended[id];
        if (!j || j.error) throw new Error(`disk mirror of ${name} ended ${j ? `with an error: ${j.error}` : 'unseen'}: no cutover`);
      }
      this.patchState(name, { diskMirror: { ...m, finished: true } });
      this.log(`QEMU VM ${name}: disk mirror ${migrationId} ended, the destination's disks are identical`);
    }
    await this.qmp(name, async (q) => {
      for (const id of ids) await tolerate(q, 'job-dismiss', { id }, /./);
      const nodes = await namedNodes(q);
      for (const n of Object.values(m.nodes)) if (nodes.has(n)) await q.execute('blockdev-del', { 'node-name': n });
    });
  }

  /** Where a shared-nothing destination puts the VM's disks: `dir`, else the host's local root. */
  private nbdTargetDir(name: string, dir?: string): { root: HostConfig['storageRoots'][number]; dir: string } | null {
    if (dir) return resolveStorageDir(this.host.storageRoots, dir);
    const local = this.host.storageRoots.find((r) => r.name === 'local') ?? this.host.storageRoots.find((r) => !r.shared);
    return local ? { root: local, dir: vmStorageDir(local, name) } : null;
  }

  /**
   * Shared-nothing destination: empty images of the same sizes, the incoming QEMU of this
   * migration on them (paused: -incoming defer -S), and an NBD server on the data-plane address
   * exporting each disk writable. The memory move reuses this process (prepareIncoming).
   * Idempotent for the same migration.
   */
  async prepareDiskTargets(spec: VmSpec, migrationId: string, sourceHost: string, epoch: number, dir?: string): Promise<DiskTargetGrant & { spec: VmSpec }> {
    const existing = this.readState(spec.name);
    if (existing) {
      const t = existing.nbdTarget;
      if (t?.migrationId === migrationId && t.endpoint && isAlive(existing.pid)) return { endpoint: t.endpoint, token: t.token, paths: existing.diskPaths, spec: existing.spec };
      throw new Error(`VM ${spec.name} already exists on ${this.host.name}${existing.migrationId ? ` (migration ${existing.migrationId})` : ''}`);
    }
    if (sourceHost === this.host.name) throw new Error(`source and destination are the same host (${sourceHost})`);
    const target = this.nbdTargetDir(spec.name, dir);
    if (!target) throw new Error(`host ${this.host.name} has no local storage root`);
    const destSpec: QemuVmSpec = { ...(spec as QemuVmSpec), disks: spec.disks.map((d) => ({ ...d, root: target.root.name, dir: target.dir })) };
    const { diskPaths, ownerPath } = this.storagePaths(destSpec);
    const marker = path.join(target.dir, '.migration');
    if (fs.existsSync(marker) ? fs.readFileSync(marker, 'utf8') !== migrationId : fs.existsSync(target.dir) && fs.readdirSync(target.dir).length > 0) {
      throw new Error(`VM files already exist at ${target.dir}`);
    }
    this.checkCapacity(spec);
    await this.ensureGuest(spec);
    fs.mkdirSync(target.dir, { recursive: true });
    fs.writeFileSync(marker, migrationId);
    const token = crypto.randomBytes(24).toString('base64url');
    const exports: Record<string, string> = {};
    const st: QemuState = {
      kind: 'qemu', spec: destSpec, host: this.host.name, mode: 'incoming', migrationId, epoch: 0, pid: 0, accel: await this.accel(), qemuVersion: '',
      qmpSocket: this.qmpSocketPath(spec.name), diskPaths, ownerPath, createdAt: new Date().toISOString(),
      nbdTarget: { migrationId, sourceHost, epoch, token, dir: target.dir, exports },
    };
    try {
      for (const d of destSpec.disks) {
        await createRawImage(this.qemuImg, diskPaths[d.id]!, d.sizeBytes);
        exports[d.id] = nbdExportName(token, d.id);
      }
      // The handoff is pre-authorised at the migration's epoch; resumeNbdTarget claims it.
      writeOwner(ownerPath, { host: this.host.name, epoch, state: 'handoff', from: sourceHost, migrationId });
      fs.mkdirSync(this.runtimeDir(spec.name), { recursive: true });
      this.writeState(st);
      await this.spawnQemu(st, true);
      const listen = this.host.dataPlane.host || '127.0.0.1';
      const endpoint = await this.qmp(spec.name, async (q) => {
        const files = await driveFiles(q);
        let port = 0;
        for (let attempt = 0; ; attempt++) {
          port = await freePort(listen);
          try {
            await q.execute('nbd-server-start', { addr: { type: 'inet', data: { host: listen, port: String(port) } }, 'max-connections': 2 * destSpec.disks.length });
            break;
          } catch (e) {
            if (attempt >= 4) throw e; // the port was taken between the probe and QEMU's bind
          }
        }
        const srv = await q.execute<Array<{ id: string }>>('query-block-exports');
        for (const d of destSpec.disks) {
          const node = files[driveName(d.id)]?.node;
          if (!node) throw new Error(`QEMU has no drive ${driveName(d.id)}`);
          if (srv.some((x) => x.id === `vmf-${d.id}`)) continue;
          await q.execute('block-export-add', { type: 'nbd', id: `vmf-${d.id}`, 'node-name': node, name: exports[d.id], writable: true });
        }
        return { host: listen, port };
      });
      this.patchState(spec.name, { nbdTarget: { ...st.nbdTarget!, endpoint } });
      this.log(`QEMU VM ${spec.name}: disk targets for migration ${migrationId} exported on nbd://${endpoint.host}:${endpoint.port}`);
      return { endpoint, token, paths: diskPaths, spec: destSpec };
    } catch (e) {
      await this.destroy(spec.name, { deleteStorage: false }).catch(() => undefined);
      fs.rmSync(target.dir, { recursive: true, force: true });
      throw e;
    }
  }

  /** One resume at a time per VM in this agent (supervision and adoption may both ask). */
  private resumeNbdTarget(name: string, migrationId: string): Promise<boolean> {
    let p = this.resuming.get(name);
    if (!p) {
      p = this.resumeNbdTargetOnce(name, migrationId).finally(() => this.resuming.delete(name));
      this.resuming.set(name, p);
    }
    return p;
  }

  /**
   * The shared-nothing destination's switch-over: once its incoming migration completed (the
   * source ended the disk mirror before it sent the device state), stop the NBD server so
   * nothing else can write the disks, claim the ownership record at the migration's epoch, and
   * resume the guest. True once the guest runs; false while the migration has not completed.
   */
  private async resumeNbdTargetOnce(name: string, migrationId: string): Promise<boolean> {
    const st = this.readState(name);
    const t = st?.nbdTarget;
    if (!st || !t || t.migrationId !== migrationId || !isAlive(st.pid)) return false;
    const [run, mig] = await this.qmp(name, async (q) => [await q.execute<{ status: string }>('query-status'), await q.execute<QueryMigrate>('query-migrate')] as const);
    if (run.status === 'running') return true;
    if (mig.status !== 'completed') return false;
    // Test hook: 'hold' keeps both sides paused here (source done, destination not resumed),
    // e.g. to compare the disks at the switch-over; 'delay:<ms>' and 'crash' act as elsewhere.
    const fault = await faultPoint('destination-before-resume');
    if (fault === 'hold') {
      this.log(`QEMU VM ${name}: fault point destination-before-resume: holding before the resume`);
      const until = Date.now() + 300_000;
      while (faultAt('destination-before-resume') === 'hold' && Date.now() < until) await sleep(100);
    }
    await this.qmp(name, (q) => tolerate(q, 'nbd-server-stop', {}, /not running/i));
    updateOwner(st.ownerPath, (cur) => {
      if (!cur || cur.host !== this.host.name || cur.epoch !== t.epoch || cur.migrationId !== migrationId) {
        throw new Error(`fenced: the ownership record of ${name} (${cur ? `${cur.host} epoch ${cur.epoch} ${cur.state}` : 'missing'}) does not hand it to ${this.host.name} at epoch ${t.epoch}`);
      }
      return { host: cur.host, epoch: cur.epoch, state: 'active', from: cur.from, migrationId };
    });
    await this.qmp(name, (q) => q.execute('cont'));
    this.patchState(name, { nbdTarget: { ...t, resumedAt: new Date().toISOString() } });
    this.log(`QEMU VM ${name}: migration ${migrationId} complete with its disks; NBD server stopped, guest resumed`);
    return true;
  }

  /** After a completed shared-nothing move: the images are the VM's own (marker gone, NBD stopped). */
  async adoptDiskTargets(name: string, migrationId: string, dir?: string): Promise<void> {
    const st = this.readState(name);
    const t = st?.nbdTarget;
    if (st && t && t.migrationId === migrationId) {
      // Normally supervision resumed the guest already; if that agent call was lost, here.
      const deadline = Date.now() + 20_000;
      while (!t.resumedAt && !(await this.resumeNbdTarget(name, migrationId))) {
        if (Date.now() > deadline) throw new Error(`VM ${name} on ${this.host.name}: incoming migration ${migrationId} has not completed`);
        await sleep(200);
      }
      if (isAlive(st.pid)) await this.qmp(name, (q) => tolerate(q, 'nbd-server-stop', {}, /not running/i));
      fs.rmSync(path.join(t.dir, '.migration'), { force: true });
      this.patchState(name, { nbdTarget: undefined });
      this.log(`QEMU VM ${name}: adopted its disks in ${t.dir}`);
      return;
    }
    let target: string | null = null;
    try { target = this.nbdTargetDir(name, dir)?.dir ?? null; } catch { /* outside the roots: nothing of ours */ }
    const marker = target ? path.join(target, '.migration') : null;
    if (marker && fs.existsSync(marker) && fs.readFileSync(marker, 'utf8') === migrationId && st) fs.rmSync(marker, { force: true });
  }

  /** Rollback of a shared-nothing destination: its QEMU stops and its images go, unless it runs the VM. */
  async deleteDiskTargets(name: string, migrationId: string, dir?: string): Promise<{ deleted: boolean }> {
    const st = this.readState(name);
    let target = st?.nbdTarget?.migrationId === migrationId ? st.nbdTarget.dir : null;
    if (st && st.mode === 'incoming' && st.migrationId === migrationId) {
      if (isAlive(st.pid) && (await this.liveStatus(st)) === 'running') return { deleted: false };
      await this.destroy(name, { deleteStorage: false, onlyMigration: migrationId });
    }
    if (!target) { try { target = this.nbdTargetDir(name, dir)?.dir ?? null; } catch { target = null; } }
    if (!target) return { deleted: false };
    const marker = path.join(target, '.migration');
    if (!fs.existsSync(marker) || fs.readFileSync(marker, 'utf8') !== migrationId) return { deleted: false };
    fs.rmSync(target, { recursive: true, force: true });
    this.log(`QEMU VM ${name}: deleted the disk targets of migration ${migrationId} in ${target}`);
    return { deleted: true };
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
