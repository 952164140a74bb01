// One host, two hypervisors: the host agent serves every VM through this router, which holds the
// simulator and (when qemu-system-x86_64 is installed) the QEMU driver and sends each call to the
// driver that owns the VM:
//   create / prepareIncoming      by spec.driver ('sim' | 'qemu')
//   calls naming a VM             by the kind recorded in <host.runDir>/<vm>/vm.json (both
//                                 drivers keep their runtime directories there; QEMU's says
//                                 kind 'qemu'); a VM on neither goes to the simulator, whose
//                                 answers for absent VMs (VmGone, aborted: true, ...) stand
//   list                          the union
//   storage moves                 by the VM's kind (prepareDiskTargets by spec.driver); a
//                                 QEMU VM's compensations and clean-ups are no-ops when the
//                                 QEMU driver is missing (nothing was started, and a throwing
//                                 compensation would be retried forever)
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import type { HypervisorDriver, IncomingOptions, IncomingStatus, IncomingTarget, IncomingWait, OutgoingOptions, RollbackResult, StorageMoves } from './driver.js';
import type { CutoverResult, DiskMirrorStatus, DiskTargetGrant, DriverKind, MigrationPolicy, ProgressSample, VerifyReport, VmInfo, VmSpec } from '../common/types.js';
import type { HostConfig } from '../common/host-config.js';
import type { SimDriver } from './sim/sim-driver.js';
import { QemuDriver } from './qemu/qemu-driver.js';

export type QemuAvailability = { ok: true; binary: string; version: string } | { ok: false; binary: string; reason: string };

/** Is the QEMU binary there and runnable? ($VMFERRY_QEMU_BINARY or qemu-system-x86_64 on PATH.) */
export function detectQemu(binary = process.env.VMFERRY_QEMU_BINARY ?? 'qemu-system-x86_64'): QemuAvailability {
  const r = spawnSync(binary, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (r.status === 0) return { ok: true, binary, version: r.stdout.split('\n')[0] ?? '' };
  const why = r.error ? ((r.error as NodeJS.ErrnoException).code === 'ENOENT' ? 'not found' : r.error.message) : `exited with ${r.status ?? r.signal}`;
  return { ok: false, binary, reason: `${binary} ${why}` };
}

/** The QEMU driver when the binary works, else why not (the router then refuses QEMU VMs). */
export function createQemuDriver(host: HostConfig, log: (m: string) => void): { driver: QemuDriver | null; availability: QemuAvailability } {
  const availability = detectQemu();
  return { driver: availability.ok ? new QemuDriver(host, log, { qemuBinary: availability.binary }) : null, availability };
}

const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

export class DriverRouter implements HypervisorDriver, StorageMoves {
  readonly kind = 'router';

  constructor(
    private readonly host: HostConfig,
    readonly sim: SimDriver,
    readonly qemu: QemuDriver | null,
    private readonly qemuMissing = 'qemu-system-x86_64 not found',
  ) {}

  // ---------------------------------------------------------------- routing

  /** Kind recorded in the VM's runtime directory on this host, or null when it has none. */
  private recordedKind(name: string): DriverKind | null {
    if (!VM_NAME.test(name)) return null;
    let raw: string;
    try { raw = fs.readFileSync(path.join(this.host.runDir, name, 'vm.json'), 'utf8'); } catch { return null; }
    try { return (JSON.parse(raw) as { kind?: string }).kind === 'qemu' ? 'qemu' : 'sim'; } catch { return 'sim'; }
  }

  private qemuOrThrow(what: string): QemuDriver {
    if (this.qemu) return this.qemu;
    throw new Error(`${what}: the QEMU driver is not available on host ${this.host.name} (${this.qemuMissing}); install QEMU with scripts/qemu/install-qemu.sh and restart the agent`);
  }

  private bySpec(spec: VmSpec): HypervisorDriver {
    const kind = (spec.driver ?? 'sim') as string;
    if (kind === 'sim') return this.sim;
    if (kind === 'qemu') return this.qemuOrThrow(`VM ${spec.name} needs QEMU`);
    throw new Error(`VM ${spec.name}: unknown driver "${kind}" (this host has: sim, qemu)`);
  }

  private byName(name: string): HypervisorDriver {
    return this.recordedKind(name) === 'qemu' ? this.qemuOrThrow(`VM ${name} is a QEMU VM`) : this.sim;
  }

  /** Storage moves go to the driver that owns the VM (QEMU: block jobs over QMP, NBD). */
  private storage(name: string): HypervisorDriver & StorageMoves {
    return this.recordedKind(name) === 'qemu' ? this.qemuOrThrow(`storage move of QEMU VM ${name}`) : this.sim;
  }

  /**
   * Before a new VM (created or incoming) gets a runtime directory: a VM of the other kind with
   * that name is a conflict the drivers cannot see (each reads only its own state files), and
   * capacity counts the VMs of both drivers.
   */
  private async admit(spec: VmSpec, target: HypervisorDriver): Promise<void> {
    const existing = this.recordedKind(spec.name);
    if (existing !== null) {
      if (existing !== target.kind) throw new Error(`VM ${spec.name} already exists on ${this.host.name} (a ${existing} VM)`);
      return; // same driver: it decides (idempotent retry of the same migration, or a refusal)
    }
    const used = (await this.list({ recorded: true })).filter((v) => v.state !== 'stopped' && v.state !== 'failed' && v.state !== 'migrated').reduce((a, v) => a + v.spec.memoryBytes, 0);
    if (used + spec.memoryBytes > this.host.memoryCapacityBytes) {
      throw new Error(`host ${this.host.name} lacks capacity: ${spec.memoryBytes} bytes needed, ${this.host.memoryCapacityBytes - used} free of ${this.host.memoryCapacityBytes}`);
    }
  }

  // ---------------------------------------------------------------- HypervisorDriver

  async list(opts?: { recorded?: boolean }): Promise<VmInfo[]> {
    const out = [...(await this.sim.list(opts)), ...(this.qemu ? await this.qemu.list() : [])];
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }

  async get(name: string, opts?: { recorded?: boolean }): Promise<VmInfo | undefined> {
    return this.byName(name).get(name, opts);
  }

  async create(spec: VmSpec): Promise<VmInfo> {
    const d = this.bySpec(spec);
    await this.admit(spec, d);
    return d.create(spec);
  }

  async destroy(name: string, opts: { deleteStorage: boolean; onlyMigration?: string }): Promise<{ destroyed: boolean }> {
    return this.byName(name).destroy(name, opts);
  }

  async verify(name: string): Promise<VerifyReport> {
    return this.byName(name).verify(name);
  }

  async guestWrite(name: string): Promise<{ diskWrites: number }> {
    return this.byName(name).guestWrite(name);
  }

  async prepareIncoming(spec: VmSpec, migrationId: string, sourceHost: string, opts?: IncomingOptions): Promise<IncomingTarget> {
    const d = this.bySpec(spec);
    await this.admit(spec, d);
    return d.prepareIncoming(spec, migrationId, sourceHost, opts);
  }

  async incomingStatus(name: string, migrationId: string, wait?: IncomingWait): Promise<IncomingStatus> {
    return this.byName(name).incomingStatus(name, migrationId, wait);
  }

  async abortIncoming(name: string, migrationId: string): Promise<{ aborted: boolean; running: boolean }> {
    return this.byName(name).abortIncoming(name, migrationId);
  }

  async startOutgoing(name: string, migrationId: string, target: IncomingTarget, policy: MigrationPolicy, opts?: OutgoingOptions): Promise<void> {
    return this.byName(name).startOutgoing(name, migrationId, target, policy, opts);
  }

  async outgoingProgress(name: string, migrationId: string, afterRound: number, waitMs: number): Promise<ProgressSample> {
    return this.byName(name).outgoingProgress(name, migrationId, afterRound, waitMs);
  }

  async setOutgoingPolicy(name: string, migrationId: string, patch: { throttle?: number; maxBandwidth?: number }): Promise<void> {
    return this.byName(name).setOutgoingPolicy(name, migrationId, patch);
  }

  async cutover(name: string, migrationId: string, destinationHost: string, verify: MigrationPolicy['verify']): Promise<CutoverResult> {
    return this.byName(name).cutover(name, migrationId, destinationHost, verify);
  }

  async rollbackOutgoing(name: string, migrationId: string, allowReclaim?: boolean): Promise<RollbackResult> {
    return this.byName(name).rollbackOutgoing(name, migrationId, allowReclaim);
  }

  // ---------------------------------------------------------------- StorageMoves

  async startLocalDiskMirror(name: string, migrationId: string, targets: Record<string, string>, maxBandwidth?: number): Promise<DiskMirrorStatus> {
    return this.storage(name).startLocalDiskMirror(name, migrationId, targets, maxBandwidth);
  }

  async startDiskMirror(name: string, migrationId: string, target: Parameters<StorageMoves['startDiskMirror']>[2], maxBandwidth?: number): Promise<DiskMirrorStatus> {
    return this.storage(name).startDiskMirror(name, migrationId, target, maxBandwidth);
  }

  async diskMirrorStatus(name: string, migrationId: string): Promise<DiskMirrorStatus> {
    return this.storage(name).diskMirrorStatus(name, migrationId);
  }

  async resumeDiskMirror(name: string, migrationId: string, token: string): Promise<DiskMirrorStatus> {
    return this.storage(name).resumeDiskMirror(name, migrationId, token);
  }

  // Compensations and clean-ups of QEMU VMs are no-ops when the QEMU driver is missing (nothing
  // could have been started, and a throwing compensation would be retried forever).

  async abortDiskMirror(name: string, migrationId: string, targets?: Record<string, string>): Promise<{ aborted: boolean }> {
    if (this.recordedKind(name) === 'qemu') return this.qemu ? this.qemu.abortDiskMirror(name, migrationId, targets) : { aborted: false };
    return this.sim.abortDiskMirror(name, migrationId, targets);
  }

  async switchDisks(name: string, migrationId: string, targets: Record<string, string>): Promise<{ oldPaths: string[]; newPaths: string[]; epoch: number; crcs: Record<string, number> }> {
    return this.storage(name).switchDisks(name, migrationId, targets);
  }

  async deleteOldDiskFiles(name: string, paths: string[]): Promise<{ deleted: string[] }> {
    if (this.recordedKind(name) === 'qemu') return this.qemu ? this.qemu.deleteOldDiskFiles(name, paths) : { deleted: [] };
    return this.sim.deleteOldDiskFiles(name, paths);
  }

  async prepareDiskTargets(spec: VmSpec, migrationId: string, sourceHost: string, epoch: number, dir?: string): Promise<DiskTargetGrant & { spec: VmSpec }> {
    if (spec.driver === 'qemu') {
      // The QEMU destination starts its incoming process here already: admitted like one.
      const q = this.qemuOrThrow(`VM ${spec.name} needs QEMU`);
      await this.admit(spec, q);
      return q.prepareDiskTargets(spec, migrationId, sourceHost, epoch, dir);
    }
    return this.sim.prepareDiskTargets(spec, migrationId, sourceHost, epoch, dir);
  }

  async deleteDiskTargets(name: string, migrationId: string, dir?: string): Promise<{ deleted: boolean }> {
    const kind = this.recordedKind(name);
    if (kind === 'qemu') return this.qemu ? this.qemu.deleteDiskTargets(name, migrationId, dir) : { deleted: false };
    const r = await this.sim.deleteDiskTargets(name, migrationId, dir);
    // No runtime dir (a QEMU destination whose process abortIncoming already removed): its
    // images are found by the migration's marker, as the simulator's are.
    if (!r.deleted && kind === null && this.qemu) return this.qemu.deleteDiskTargets(name, migrationId, dir);
    return r;
  }

  async adoptDiskTargets(name: string, migrationId: string, dir?: string): Promise<void> {
    if (this.recordedKind(name) === 'qemu') return this.qemu?.adoptDiskTargets(name, migrationId, dir);
    return this.sim.adoptDiskTargets(name, migrationId, dir);
  }
}
