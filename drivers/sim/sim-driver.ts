// The embedded simulator behind the driver interface. The agent keeps no VM state in memory:
// every call reads the VM's runtime directory (state file + control socket), so an agent that
// restarts re-attaches to VM processes that kept running without it.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import type { HypervisorDriver, IncomingOptions, IncomingStatus, IncomingTarget, IncomingWait, OutgoingOptions, RollbackResult } from '../driver.js';
import type { CutoverResult, DiskMirrorStatus, DiskTargetGrant, MigrationPolicy, ProgressSample, VerifyReport, VmInfo, VmSpec, VmState } from '../../common/types.js';
import { vmStorageDir, resolveStorageDir, type HostConfig } from '../../common/host-config.js';
import { callControl, ControlError } from './control.js';
import { writeOwner } from './ownership.js';
import { createVmFiles } from '../disk-files.js';
import type { VmRuntimeConfig, VmStatus } from './vm-process.js';
import { DATAPLANE_TLS_ENV, sendSocket, type DataPlaneServer, type Hello, type HandOverAuth, type GrantCheck } from '../../dataplane/endpoint.js';
import crypto from 'node:crypto';
import type { DiskReceiver } from '../../dataplane/disk-receiver.js';
import type { MirrorTarget } from './disk-mirror.js';
import { FrameType, jsonFrame } from '../../dataplane/frames.js';

import { profilingFlags } from '../../common/tsx.js';
import { vmProcessArgs } from './vm-bundle.js';

/** Only root may raise a process's priority back (adoption), so only root lowers it first. */
const RENICE = process.getuid?.() === 0;
/** A spare is not loaded while a migration runs through the host, for up to this long. */
const SPARE_MAX_DEFER_MS = 30_000;
const SPARE_RECHECK_MS = 200;

/**
 * Linux niceness is per thread: every thread of the process (V8's GC and compiler helpers, the
 * libuv pool) must move, or a VM's main thread ends up waiting on helpers left at low priority.
 */
function renice(pid: number, nice: number): void {
  let tids: number[] = [pid];
  try { tids = fs.readdirSync(`/proc/${pid}/task`).map(Number); } catch { /* not Linux: the process */ }
  for (const t of tids) { try { os.setPriority(t, nice); } catch { /* thread gone, or not allowed */ } }
  // With autogroup scheduling (most distributions), a thread's nice only ranks it inside its
  // session's group, and groups share the CPU as equals. A VM process runs detached, in a session
  // of its own: the group's nice is what ranks it against the migrations running meanwhile.
  try { fs.writeFileSync(`/proc/${pid}/autogroup`, String(nice)); } catch { /* no autogroup, or not allowed */ }
}

/** GLIBC_TUNABLES with glibc.malloc.hugetlb=2 (large allocations from the huge-page pool), other tunables kept. */
export function withHugetlb(tunables: string | undefined): string {
  const kept = (tunables ?? '').split(':').filter((t) => t && !t.startsWith('glibc.malloc.hugetlb='));
  return [...kept, 'glibc.malloc.hugetlb=2'].join(':');
}

export function isAlive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
}

export class SimDriver implements HypervisorDriver {
  readonly kind = 'sim';
  /** Incoming VM processes this agent started: the only ones it can hand a socket to. */
  private children = new Map<string, { child: ChildProcess; migrationId: string }>();
  dataPlane?: DataPlaneServer;

  constructor(private readonly host: HostConfig, private readonly log: (m: string) => void = () => undefined) {
    fs.mkdirSync(host.runDir, { recursive: true });
  }

  private vmArgs?: string[];
  /** How this agent starts VM processes (see vm-bundle.ts): bundled once, on first use. */
  private vmProcess(): string[] {
    if (!this.vmArgs) {
      const r = vmProcessArgs(path.join(path.dirname(this.host.runDir), `.vm-bundle-${path.basename(this.host.runDir)}`));
      if (r.why) this.log(`VM processes start through tsx: bundling vm-process.ts failed: ${r.why}`);
      this.vmArgs = r.args;
    }
    return this.vmArgs;
  }

  private runtimeDir(vm: string): string {
    return path.join(this.host.runDir, vm);
  }

  private readRuntime(vm: string): { cfg: VmRuntimeConfig; status: VmStatus | null } | null {
    const dir = this.runtimeDir(vm);
    let cfg: VmRuntimeConfig;
    try { cfg = JSON.parse(fs.readFileSync(path.join(dir, 'vm.json'), 'utf8')) as VmRuntimeConfig; } catch { return null; }
    // host.runDir is shared with the QEMU driver, whose vm.json says kind 'qemu': not ours.
    if ((cfg as { kind?: string }).kind === 'qemu') return null;
    let status: VmStatus | null = null;
    try { status = JSON.parse(fs.readFileSync(path.join(dir, 'state.json'), 'utf8')) as VmStatus; } catch { /* still starting */ }
    return { cfg, status };
  }

  private control<T>(vm: string, method: string, params: Record<string, unknown> = {}, timeoutMs = 30_000): Promise<T> {
    return callControl<T>(path.join(this.runtimeDir(vm), 'control.sock'), method, params, timeoutMs);
  }

  private toInfo(cfg: VmRuntimeConfig, st: VmStatus | null): VmInfo {
    const alive = st ? isAlive(st.pid) : false;
    const state: VmState = !st ? 'stopped' : alive ? st.state : st.state === 'stopped' ? 'stopped' : 'failed';
    const device = st ? { vcpuTicks: st.device.vcpuTicks, memWrites: st.device.memWrites, diskWrites: st.device.diskWrites } : undefined;
    return { name: cfg.spec.name, host: this.host.name, state, pid: st?.pid ?? 0, epoch: st?.epoch ?? cfg.epoch, spec: cfg.spec, migrationId: st?.migrationId, device, ...(st?.hugePages !== undefined ? { hugePages: st.hugePages } : {}) };
  }

  async list(opts: { recorded?: boolean } = {}): Promise<VmInfo[]> {
    const names = fs.readdirSync(this.host.runDir).sort();
    const infos = await Promise.all(names.map((n) => this.get(n, { ...opts, timeoutMs: 1000 })));
    return infos.filter((v): v is VmInfo => !!v);
  }

  /** `recorded`: as the VM process last wrote it (its state file, written at every change). */
  async get(name: string, opts: { recorded?: boolean; timeoutMs?: number } = {}): Promise<VmInfo | undefined> {
    const rt = this.readRuntime(name);
    if (!rt) return undefined;
    if (opts.recorded) return this.toInfo(rt.cfg, rt.status);
    // Ask the process itself when it answers: the state file may be a moment behind.
    try {
      const st = await this.control<VmStatus>(name, 'status', {}, opts.timeoutMs ?? 5000);
      return this.toInfo(rt.cfg, st);
    } catch {
      return this.toInfo(rt.cfg, rt.status);
    }
  }

  private storagePaths(spec: VmSpec): { diskPaths: Record<string, string>; ownerPath: string; dirs: string[]; sharedOwner: boolean } {
    const diskPaths: Record<string, string> = {};
    const dirs: string[] = [];
    let sharedOwner = false;
    for (const d of spec.disks) {
      const root = this.host.storageRoots.find((r) => r.name === d.root);
      if (!root) throw new Error(`host ${this.host.name} has no storage root "${d.root}" (it has: ${this.host.storageRoots.map((r) => r.name).join(', ')})`);
      const dir = d.dir ? resolveStorageDir([root], d.dir).dir : vmStorageDir(root, spec.name);
      if (dirs.length === 0) sharedOwner = root.shared;
      dirs.push(dir);
      diskPaths[d.id] = path.join(dir, `${d.id}.img`);
    }
    if (dirs.length === 0) throw new Error(`VM ${spec.name} needs at least one disk`);
    return { diskPaths, ownerPath: path.join(dirs[0]!, 'owner.json'), dirs: [...new Set(dirs)], sharedOwner };
  }

  /** Where each disk of `spec` goes when moved to `targets` (disk id → directory on this host). */
  planDiskMove(spec: VmSpec, targets: Record<string, string>): { disks: VmSpec['disks']; diskPaths: Record<string, string> } {
    const disks = spec.disks.map((d) => {
      const t = targets[d.id];
      if (!t) return d;
      const { root, dir } = resolveStorageDir(this.host.storageRoots, t);
      return { ...d, root: root.name, dir };
    });
    for (const id of Object.keys(targets)) if (!spec.disks.some((d) => d.id === id)) throw new Error(`VM ${spec.name} has no disk "${id}" (it has: ${spec.disks.map((d) => d.id).join(', ')})`);
    const { diskPaths } = this.storagePaths({ ...spec, disks });
    const current = this.storagePaths(spec).diskPaths;
    for (const [id, p] of Object.entries(diskPaths)) {
      if (targets[id] && p === current[id]) throw new Error(`disk ${id} of ${spec.name} is already at ${p}`);
      if (targets[id] && fs.existsSync(p)) throw new Error(`a file already exists at ${p}`);
    }
    return { disks, diskPaths };
  }

  /** Whether a VM process of this host is sending or receiving a migration (its state file). */
  private migrating(): boolean {
    for (const name of fs.readdirSync(this.host.runDir)) {
      const st = this.readRuntime(name)?.status;
      if (!st || !isAlive(st.pid)) continue;
      if (st.state === 'incoming') return true;
      if (st.outgoing && ['precopy', 'stopping', 'cutover'].includes(st.outgoing.state)) return true;
      if (st.mirror && ['copying', 'synced'].includes(st.mirror.state)) return true;
    }
    return false;
  }

  private memoryInUse(): number {
    let used = 0;
    for (const name of fs.readdirSync(this.host.runDir)) {
      const rt = this.readRuntime(name);
      if (rt && rt.status && isAlive(rt.status.pid) && rt.status.state !== 'migrated') used += rt.cfg.spec.memoryBytes;
    }
    return used;
  }

  checkCapacity(spec: VmSpec): void {
    const used = this.memoryInUse();
    if (used + spec.memoryBytes > this.host.memoryCapacityBytes) {
      throw new Error(`host ${this.host.name} lacks capacity: ${spec.memoryBytes} bytes needed, ${this.host.memoryCapacityBytes - used} free of ${this.host.memoryCapacityBytes}`);
    }
  }

  /** Environment of a VM process: its data-plane streams use this host's certificate. */
  private vmEnv(): NodeJS.ProcessEnv {
    const env = { ...process.env };
    delete env[DATAPLANE_TLS_ENV];
    if (this.host.tls) env[DATAPLANE_TLS_ENV] = JSON.stringify(this.host.tls);
    if (this.host.hugepages) env.GLIBC_TUNABLES = withHugetlb(env.GLIBC_TUNABLES);
    return env;
  }

  /**
   * Starts a VM process that loads its code and waits to be given a VM (see vm-process.ts):
   * prepareIncoming adopts it instead of paying the process start inside the migration.
   * VMFERRY_SPARE_VM=0 turns this off.
   */
  warmSpare(delayMs = 0, deferUntil = 0): void {
    if (this.spare || this.spareTimer || process.env.VMFERRY_SPARE_VM === '0') return;
    this.spareTimer = setTimeout(() => {
      this.spareTimer = null;
      // Loading a spare takes about a second of CPU: not while this host moves a VM (even at the
      // lowest priority it takes the moments the transfer leaves idle, and delays its wake-ups),
      // unless the host stays busy for long (an evacuation: spares still help there).
      if (performance.now() < deferUntil && this.migrating()) { this.warmSpare(SPARE_RECHECK_MS, deferUntil); return; }
      // Next to the run directory (same file system: the log is renamed into the VM's directory),
      // not in it: the run directory lists VMs only.
      const dir = path.join(path.dirname(this.host.runDir), `.spare-vm-${path.basename(this.host.runDir)}`);
      fs.mkdirSync(dir, { recursive: true });
      const log = path.join(dir, `${Date.now()}-${process.pid}.log`);
      const logFd = fs.openSync(log, 'a');
      const child = spawn(process.execPath, [...profilingFlags(), '--expose-gc', ...this.vmProcess(), '--spare'], { detached: true, stdio: ['ignore', logFd, logFd, 'ipc'], env: this.vmEnv() });
      fs.closeSync(logFd);
      child.unref();
      child.channel?.unref();
      // Loading at low CPU priority: a spare must not slow the migrations running meanwhile.
      if (RENICE && child.pid) renice(child.pid, 19);
      const spare = { child, log, ready: false };
      this.spare = spare;
      child.once('message', () => { spare.ready = true; });
      child.once('exit', () => {
        if (this.spare === spare) this.spare = null;
        fs.rmSync(log, { force: true });
      });
    }, delayMs);
    this.spareTimer.unref();
  }

  private spare: { child: ChildProcess; log: string; ready: boolean } | null = null;
  private spareTimer: NodeJS.Timeout | null = null;

  private async spawnVm(cfg: VmRuntimeConfig, withIpc: boolean): Promise<ChildProcess> {
    if (this.host.hugepages) cfg = { ...cfg, hugepages: true }; // with vmEnv's GLIBC_TUNABLES
    const dir = this.runtimeDir(cfg.spec.name);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'vm.json'), JSON.stringify(cfg, null, 2));
    let child: ChildProcess;
    const spare = this.spare;
    if (spare?.ready && spare.child.connected && spare.child.exitCode === null) {
      this.spare = null;
      child = spare.child;
      child.removeAllListeners('exit');
      child.channel?.ref();
      fs.renameSync(spare.log, path.join(dir, 'vm.log')); // its output file becomes the VM's log
      if (RENICE && child.pid) renice(child.pid, 0);
      child.send({ type: 'adopt', dir });
      // The next spare: at low priority when we can restore a VM's priority after (root, as
      // hypervisor agents run), otherwise once this VM has settled; either way not while the
      // host migrates (a moment first: the adopted VM's state file, which says so, follows).
      this.warmSpare(RENICE ? SPARE_RECHECK_MS * 5 : 5_000, performance.now() + SPARE_MAX_DEFER_MS);
    } else {
      const logFd = fs.openSync(path.join(dir, 'vm.log'), 'a');
      // Detached, own process group: killing the agent never kills its VMs.
      child = spawn(process.execPath, [...profilingFlags(), '--expose-gc', ...this.vmProcess(), dir], {
        detached: true,
        stdio: ['ignore', logFd, logFd, 'ipc'],
        env: this.vmEnv(),
      });
      fs.closeSync(logFd);
      child.unref();
    }
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`VM ${cfg.spec.name} did not start within 30 s (see ${dir}/vm.log)`)), 30_000);
      child.once('message', () => { clearTimeout(timer); resolve(); });
      child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`VM ${cfg.spec.name} exited with code ${code} while starting: ${tail(path.join(dir, 'vm.log'))}`)); });
    });
    child.removeAllListeners('exit');
    if (!withIpc) child.disconnect();
    else child.channel?.unref();
    return child;
  }

  async create(spec: VmSpec): Promise<VmInfo> {
    if (this.readRuntime(spec.name)) throw new Error(`VM ${spec.name} already exists on ${this.host.name}`);
    this.checkCapacity(spec);
    const { diskPaths, ownerPath, dirs, sharedOwner } = this.storagePaths(spec);
    for (const d of dirs) if (fs.existsSync(d) && fs.readdirSync(d).length > 0) throw new Error(`VM files already exist at ${d}`);
    try {
      createVmFiles(this.host.name, spec, { dirs, diskPaths, ownerPath });
      await this.spawnVm({ spec, host: this.host.name, mode: 'boot', epoch: 1, diskPaths, ownerPath, sharedOwner }, false);
    } catch (e) {
      // Nothing half-made stays behind.
      await this.destroy(spec.name, { deleteStorage: true }).catch(() => undefined);
      for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
      throw e;
    }
    this.log(`created VM ${spec.name}`);
    return (await this.get(spec.name))!;
  }

  async destroy(name: string, opts: { deleteStorage: boolean; onlyMigration?: string }): Promise<{ destroyed: boolean }> {
    const rt = this.readRuntime(name);
    if (!rt) return { destroyed: false };
    if (opts.onlyMigration && rt.cfg.migrationId !== opts.onlyMigration) return { destroyed: false };
    const pid = rt.status?.pid;
    if (pid && isAlive(pid) && rt.status?.state === 'migrated') {
      // A handed-off source is paused, fenced and has closed its disks: nothing to shut down.
      try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
    } else if (pid && isAlive(pid)) {
      try { await this.control(name, 'shutdown', {}, 5000); } catch { /* fall through to kill */ }
      for (let i = 0; i < 100 && isAlive(pid); i++) await sleep(20);
      if (isAlive(pid)) { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }
      for (let i = 0; i < 100 && isAlive(pid); i++) await sleep(20);
    }
    this.children.delete(name);
    if (opts.deleteStorage) for (const d of this.storagePaths(rt.cfg.spec).dirs) fs.rmSync(d, { recursive: true, force: true });
    fs.rmSync(this.runtimeDir(name), { recursive: true, force: true });
    this.log(`destroyed VM ${name}${opts.deleteStorage ? ' and its files' : ''}`);
    return { destroyed: true };
  }

  async verify(name: string): Promise<VerifyReport> {
    const info = await this.get(name);
    if (!info) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    const r = await this.control<{ state: VmState; checks: VerifyReport['checks'] }>(name, 'verify', {}, 120_000);
    const checks = [{ name: 'process', ok: info.state === 'running', detail: `VM process ${info.pid} is ${info.state}` }, ...r.checks];
    return { ok: checks.every((c) => c.ok), vm: name, host: this.host.name, state: info.state, checks };
  }

  guestWrite(name: string): Promise<{ diskWrites: number }> {
    return this.control(name, 'guestWrite');
  }

  async prepareIncoming(spec: VmSpec, migrationId: string, sourceHost: string, opts: IncomingOptions = {}): Promise<IncomingTarget> {
    if (!this.dataPlane) throw new Error('data plane not started');
    const rt = this.readRuntime(spec.name);
    if (rt && rt.cfg.mode === 'incoming' && rt.cfg.migrationId === migrationId && !this.children.has(spec.name) && rt.status?.state !== 'running') {
      // Ours, from before an agent restart: no socket can be handed to it any more. Start afresh.
      await this.destroy(spec.name, { deleteStorage: false, onlyMigration: migrationId });
      return this.prepareIncoming(spec, migrationId, sourceHost, opts);
    }
    // A minted grant that cannot be ours is refused before anything is prepared.
    const refusal = opts.token === undefined ? null : this.dataPlane.preMintedRefusal(opts.token, { migrationId, vm: spec.name, kind: 'memory' });
    if (refusal) throw new Error(refusal);
    if (rt) {
      const sameJob = rt.cfg.mode === 'incoming' && rt.cfg.migrationId === migrationId && rt.status && isAlive(rt.status.pid) && this.children.has(spec.name);
      if (!sameJob) throw new Error(`VM ${spec.name} already exists on ${this.host.name}${rt.cfg.migrationId ? ` (migration ${rt.cfg.migrationId})` : ''}`);
    } else {
      if (sourceHost === this.host.name) throw new Error(`source and destination are the same host (${sourceHost})`);
      this.checkCapacity(spec);
      const { diskPaths, ownerPath, sharedOwner } = this.storagePaths(spec);
      for (const [id, p] of Object.entries(diskPaths)) if (!fs.existsSync(p)) throw new Error(`disk ${id} of VM ${spec.name} is not reachable from ${this.host.name} at ${p}`);
      const child = await this.spawnVm({ spec, host: this.host.name, mode: 'incoming', epoch: 0, diskPaths, ownerPath, migrationId, sharedOwner }, true);
      this.children.set(spec.name, { child, migrationId });
      child.once('exit', () => this.children.delete(spec.name));
    }
    // The grant opens exactly that many connections (stream 0 must claim the same count).
    const token = this.dataPlane.grant({ migrationId, vm: spec.name, kind: 'memory', source: sourceHost, expectStreams: opts.streams ?? 1 }, undefined, opts.token);
    return { endpoint: this.host.dataPlane, token };
  }

  /** Data-plane handler: gives the authenticated socket to the incoming VM process. */
  handOver(hello: Hello, sock: net.Socket, rest: Buffer, auth?: HandOverAuth): void {
    const c = this.children.get(hello.vm);
    if (!c || c.migrationId !== hello.migrationId || !c.child.connected) {
      const why = `no incoming VM ${hello.vm} for migration ${hello.migrationId} on ${this.host.name}`;
      sock.end(jsonFrame(FrameType.Error, { message: why }));
      auth?.settle(false, why);
      return;
    }
    if (!auth) {
      sendSocket(c.child, { type: 'dataplane', rest: rest.toString('base64'), stream: hello.stream ?? 0, streams: hello.streams ?? 1 }, sock);
      return;
    }
    // TLS mode: the VM process authenticates the sender (TLS, certificate, token) and reports
    // back; only then is the grant consumed. The key paths go along, never the token itself.
    const nonce = crypto.randomBytes(8).toString('hex');
    const child = c.child;
    const done = (): void => { clearTimeout(timer); child.off('message', onMessage); child.off('exit', onExit); };
    const onMessage = (m: { type?: string; nonce?: string; ok?: boolean; why?: string }): void => {
      if (m?.type !== 'dataplane-auth' || m.nonce !== nonce) return;
      done();
      auth.settle(m.ok === true, m.why);
    };
    const onExit = (): void => { done(); auth.settle(false, `incoming VM ${hello.vm} exited during authentication`); };
    const timer = setTimeout(() => { done(); auth.settle(false, `incoming VM ${hello.vm} did not report on the connection`); }, 30_000);
    child.on('message', onMessage);
    child.once('exit', onExit);
    const check: GrantCheck = { grantId: auth.grantId, secretHash: auth.secretHash, migrationId: auth.migrationId, vm: auth.vm, kind: auth.kind, source: auth.source, destination: auth.destination, expiresAt: auth.expiresAt, tls: auth.tls, stream: auth.stream, streams: auth.streams };
    sendSocket(child, { type: 'dataplane', rest: rest.toString('base64'), auth: check, nonce }, sock);
  }

  async incomingStatus(name: string, migrationId: string, wait?: IncomingWait): Promise<IncomingStatus> {
    const rt = this.readRuntime(name);
    if (!rt || rt.cfg.migrationId !== migrationId) return { exists: false, state: 'absent', bytesReceived: 0 };
    // With `wait`, the VM process answers once its incoming state leaves unlessState (a resume
    // is seen within a ms, not at the next poll), or after waitMs.
    const st = await this.control<VmStatus>(name, 'status', wait ? { waitMs: wait.waitMs, unlessIncoming: wait.unlessState } : {}, 5000 + (wait?.waitMs ?? 0)).catch(() => null);
    if (!st) return { exists: true, state: 'unreachable', bytesReceived: 0, error: 'incoming VM process does not answer' };
    const waited = st.waitHonoured ? { waited: true } : {};
    if (st.state === 'running') return { exists: true, state: 'running', bytesReceived: st.incoming?.bytesReceived ?? 0, ...waited };
    return { exists: true, state: st.incoming?.state ?? st.state, bytesReceived: st.incoming?.bytesReceived ?? 0, error: st.incoming?.error, ...waited };
  }

  async abortIncoming(name: string, migrationId: string): Promise<{ aborted: boolean; running: boolean }> {
    const rt = this.readRuntime(name);
    if (!rt || rt.cfg.migrationId !== migrationId || rt.cfg.mode !== 'incoming') return { aborted: true, running: false };
    const pid = rt.status?.pid;
    if (pid && isAlive(pid)) {
      try {
        const r = await this.control<{ aborted: boolean; state: VmState }>(name, 'abortIncoming', {}, 10_000);
        if (!r.aborted) return { aborted: false, running: true };
      } catch (e) {
        if (!(e instanceof ControlError)) throw e;
      }
    }
    await this.destroy(name, { deleteStorage: false, onlyMigration: migrationId });
    return { aborted: true, running: false };
  }

  async startOutgoing(name: string, migrationId: string, target: IncomingTarget, policy: MigrationPolicy, opts: OutgoingOptions = {}): Promise<void> {
    await this.control(name, 'startOutgoing', { migrationId, endpoint: target.endpoint, token: target.token, policy, grantWaitMs: opts.grantWaitMs }, 30_000 + (opts.grantWaitMs ?? 0));
  }

  outgoingProgress(name: string, migrationId: string, afterRound: number, waitMs: number): Promise<ProgressSample> {
    return this.control<ProgressSample>(name, 'progress', { migrationId, afterRound, waitMs }, waitMs + 10_000);
  }

  async setOutgoingPolicy(name: string, migrationId: string, patch: { throttle?: number; maxBandwidth?: number }): Promise<void> {
    await this.control(name, 'setPolicy', { migrationId, ...patch });
  }

  cutover(name: string, migrationId: string, destinationHost: string, verify: MigrationPolicy['verify']): Promise<CutoverResult> {
    return this.control<CutoverResult>(name, 'cutover', { migrationId, destination: destinationHost, verify }, 120_000);
  }

  async rollbackOutgoing(name: string, migrationId: string, allowReclaim = false): Promise<RollbackResult> {
    // A VM that is not here at all cannot be rolled back; say so instead of retrying forever.
    if (!this.readRuntime(name)) throw Object.assign(new Error(`VM ${name} is no longer on host ${this.host.name}`), { name: 'VmGone' });
    return this.control<RollbackResult>(name, 'rollbackOutgoing', { migrationId, allowReclaim }, 60_000);
  }

  // ---- disk mirroring ----

  diskReceiver?: DiskReceiver;

  async startDiskMirror(name: string, migrationId: string, target: MirrorTarget, maxBandwidth = 0): Promise<DiskMirrorStatus> {
    return this.control<DiskMirrorStatus>(name, 'startDiskMirror', { migrationId, target, maxBandwidth }, 60_000);
  }

  async startLocalDiskMirror(name: string, migrationId: string, targets: Record<string, string>, maxBandwidth = 0): Promise<DiskMirrorStatus> {
    const rt = this.readRuntime(name);
    if (!rt) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    const plan = this.planDiskMove(rt.cfg.spec, targets);
    const paths: Record<string, string> = {};
    for (const id of Object.keys(targets)) paths[id] = plan.diskPaths[id]!;
    // Disks not named keep their place: mirror them onto themselves is pointless, so every disk
    // must be named (or all go to one directory, which the caller expands).
    for (const d of rt.cfg.spec.disks) if (!paths[d.id]) throw new Error(`no destination for disk ${d.id}`);
    for (const p of Object.values(paths)) fs.mkdirSync(path.dirname(p), { recursive: true });
    return this.startDiskMirror(name, migrationId, { kind: 'local', paths }, maxBandwidth);
  }

  diskMirrorStatus(name: string, migrationId: string): Promise<DiskMirrorStatus> {
    return this.control<DiskMirrorStatus>(name, 'diskMirrorStatus', { migrationId });
  }

  resumeDiskMirror(name: string, migrationId: string, token: string): Promise<DiskMirrorStatus> {
    return this.control<DiskMirrorStatus>(name, 'resumeDiskMirror', { migrationId, token }, 60_000);
  }

  async abortDiskMirror(name: string, migrationId: string, targets?: Record<string, string>): Promise<{ aborted: boolean }> {
    const rt = this.readRuntime(name);
    let r = { aborted: false };
    if (rt?.status && isAlive(rt.status.pid)) r = await this.control<{ aborted: boolean }>(name, 'abortDiskMirror', { migrationId }, 60_000);
    // Partial copies of a local move go, even if the VM process is gone (it deleted what it knew).
    if (rt && targets) {
      const current = Object.values(this.storagePaths(rt.cfg.spec).diskPaths);
      for (const p of Object.values(this.targetDiskPaths(targets))) if (!current.includes(p)) fs.rmSync(p, { force: true });
    }
    return r;
  }

  /** Where a storage move to `targets` puts each disk (targets outside the roots: nothing of ours). */
  private targetDiskPaths(targets: Record<string, string>): Record<string, string> {
    const out: Record<string, string> = {};
    for (const [id, dir] of Object.entries(targets)) {
      try { out[id] = path.join(resolveStorageDir(this.host.storageRoots, dir).dir, `${id}.img`); } catch { /* outside roots */ }
    }
    return out;
  }

  async switchDisks(name: string, migrationId: string, targets: Record<string, string>): Promise<{ oldPaths: string[]; newPaths: string[]; epoch: number; crcs: Record<string, number> }> {
    const rt = this.readRuntime(name);
    if (!rt) throw new Error(`VM ${name} is not on host ${this.host.name}`);
    if (!rt.cfg.migrationId && !rt.status?.mirror) {
      // Already switched (a retried activity): report from the config, which the VM rewrote.
      const cur = this.storagePaths(rt.cfg.spec);
      return { oldPaths: [], newPaths: Object.values(cur.diskPaths), epoch: rt.status?.epoch ?? 0, crcs: {} };
    }
    const old = this.storagePaths(rt.cfg.spec);
    const plan = this.planDiskMoveAllowExisting(rt.cfg.spec, targets);
    const r = await this.control<{ epoch: number; crcs: Record<string, number> }>(name, 'switchDisks', { migrationId, disks: plan.disks, diskPaths: plan.diskPaths }, 300_000);
    const oldPaths = [...Object.values(old.diskPaths), old.ownerPath].filter((p) => !Object.values(plan.diskPaths).includes(p));
    return { oldPaths, newPaths: Object.values(plan.diskPaths), epoch: r.epoch, crcs: r.crcs };
  }

  private planDiskMoveAllowExisting(spec: VmSpec, targets: Record<string, string>): { disks: VmSpec['disks']; diskPaths: Record<string, string> } {
    const disks = spec.disks.map((d) => {
      const t = targets[d.id];
      if (!t) return d;
      const { root, dir } = resolveStorageDir(this.host.storageRoots, t);
      return { ...d, root: root.name, dir };
    });
    return { disks, diskPaths: this.storagePaths({ ...spec, disks }).diskPaths };
  }

  /** Deletes the old files after a recorded switch; refuses any file the VM still uses. */
  async deleteOldDiskFiles(name: string, paths: string[]): Promise<{ deleted: string[] }> {
    const rt = this.readRuntime(name);
    const inUse = rt ? [...Object.values(this.storagePaths(rt.cfg.spec).diskPaths), this.storagePaths(rt.cfg.spec).ownerPath] : [];
    const deleted: string[] = [];
    for (const p of paths) {
      if (inUse.includes(p)) throw new Error(`refusing to delete ${p}: VM ${name} still uses it`);
      resolveStorageDir(this.host.storageRoots, path.dirname(p));
      if (fs.existsSync(p)) { fs.rmSync(p, { force: true }); deleted.push(p); }
      const dir = path.dirname(p);
      try { if (fs.readdirSync(dir).length === 0) fs.rmdirSync(dir); } catch { /* gone or not empty */ }
    }
    return { deleted };
  }

  /**
   * Shared-nothing destination: sparse files for every disk under `dir` (a local root), an
   * ownership record pre-authorising the handoff at `epoch`, and a one-time data-plane grant.
   * Idempotent for the same migration: the files (and what they already hold) are kept.
   */
  async prepareDiskTargets(spec: VmSpec, migrationId: string, sourceHost: string, epoch: number, dir?: string): Promise<DiskTargetGrant & { spec: VmSpec }> {
    if (!this.dataPlane || !this.diskReceiver) throw new Error('data plane not started');
    if (sourceHost === this.host.name) throw new Error(`source and destination are the same host (${sourceHost})`);
    const local = this.host.storageRoots.find((r) => r.name === 'local') ?? this.host.storageRoots.find((r) => !r.shared);
    const target = dir ? resolveStorageDir(this.host.storageRoots, dir) : local ? { root: local, dir: vmStorageDir(local, spec.name) } : null;
    if (!target) throw new Error(`host ${this.host.name} has no local storage root`);
    const destSpec: VmSpec = { ...spec, disks: spec.disks.map((d) => ({ ...d, root: target.root.name, dir: target.dir })) };
    const { diskPaths, ownerPath } = this.storagePaths(destSpec);
    const marker = path.join(target.dir, '.migration');
    const rt = this.readRuntime(spec.name);
    if (rt && rt.cfg.migrationId !== migrationId) throw new Error(`VM ${spec.name} already exists on ${this.host.name}`);
    if (fs.existsSync(marker) ? fs.readFileSync(marker, 'utf8') !== migrationId : fs.existsSync(target.dir) && fs.readdirSync(target.dir).length > 0) {
      throw new Error(`VM files already exist at ${target.dir}`);
    }
    if (!fs.existsSync(marker)) {
      this.checkCapacity(spec);
      fs.mkdirSync(target.dir, { recursive: true });
      fs.writeFileSync(marker, migrationId);
      for (const d of destSpec.disks) {
        const fd = fs.openSync(diskPaths[d.id]!, 'w');
        fs.ftruncateSync(fd, d.sizeBytes);
        fs.closeSync(fd);
      }
      writeOwner(ownerPath, { host: this.host.name, epoch, state: 'handoff', from: sourceHost, migrationId });
    }
    this.diskReceiver.register({ migrationId, vm: spec.name, disks: destSpec.disks.map((d) => ({ id: d.id, path: diskPaths[d.id]!, blocks: Math.floor(d.sizeBytes / 4096) })) });
    const token = this.dataPlane.grant({ migrationId, vm: spec.name, kind: 'disk', source: sourceHost });
    return { endpoint: this.host.dataPlane, token, paths: diskPaths, spec: destSpec };
  }

  /** Rollback of a shared-nothing destination: its partial copies go, unless a VM runs on them. */
  async deleteDiskTargets(name: string, migrationId: string, dir?: string): Promise<{ deleted: boolean }> {
    this.diskReceiver?.unregister(migrationId);
    const rt = this.readRuntime(name);
    if (rt && rt.status && isAlive(rt.status.pid) && rt.status.state === 'running') return { deleted: false };
    const local = this.host.storageRoots.find((r) => r.name === 'local') ?? this.host.storageRoots.find((r) => !r.shared);
    const target = dir ? resolveStorageDir(this.host.storageRoots, dir).dir : local ? vmStorageDir(local, name) : null;
    if (!target) return { deleted: false };
    const marker = path.join(target, '.migration');
    if (!fs.existsSync(marker) || fs.readFileSync(marker, 'utf8') !== migrationId) return { deleted: false };
    fs.rmSync(target, { recursive: true, force: true });
    return { deleted: true };
  }

  /** After a completed shared-nothing move, the marker goes: the files are the VM's now. */
  async adoptDiskTargets(name: string, migrationId: string, dir?: string): Promise<void> {
    this.diskReceiver?.unregister(migrationId);
    const local = this.host.storageRoots.find((r) => r.name === 'local') ?? this.host.storageRoots.find((r) => !r.shared);
    const target = dir ? resolveStorageDir(this.host.storageRoots, dir).dir : local ? vmStorageDir(local, name) : null;
    if (target) fs.rmSync(path.join(target, '.migration'), { force: true });
  }
}

function tail(file: string): string {
  try { return fs.readFileSync(file, 'utf8').split('\n').slice(-5).join('\n'); } catch { return ''; }
}
