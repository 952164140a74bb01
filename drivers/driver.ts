// The one interface every hypervisor honours. It is shaped around migration *jobs* (as QEMU's
// migrate / drive-mirror are), not around "send these pages", so the simulator and QEMU both
// fit: the destination prepares an incoming VM and says where to send; the source runs the
// job, reports progress, takes policy changes, and performs the cutover on command.
import type { CutoverResult, DiskMirrorStatus, DiskTargetGrant, MigrationPolicy, ProgressSample, VerifyReport, VmInfo, VmSpec } from '../common/types.js';

/** What the destination must know before the source connects. */
export interface IncomingOptions {
  streams?: number;
  /**
   * A grant token the orchestrator minted and gave the source at the same time (sim driver
   * only): the source connects while this host prepares, and this host registers the token.
   */
  token?: string;
}

export interface OutgoingOptions {
  /** The destination may still be preparing (parallel start): retry a refused grant this long, ms. */
  grantWaitMs?: number;
}

export interface IncomingTarget {
  endpoint: { host: string; port: number };
  /** One-time grant the source presents on the data plane. */
  token: string;
}

export interface IncomingStatus {
  exists: boolean;
  state: string;
  bytesReceived: number;
  error?: string;
  /** The driver held the call until the state differed from `unlessState` (or waitMs passed). */
  waited?: boolean;
}

/** incomingStatus may hold the call (up to waitMs) while the state still equals unlessState. */
export interface IncomingWait {
  waitMs: number;
  unlessState: string;
}

export interface RollbackResult {
  /**
   * Where the VM runs after the rollback, decided by the ownership record, never guessed.
   * 'undecided': handed off to a destination with its own storage; abort the destination, then
   * call again with allowReclaim.
   */
  runsOn: 'source' | 'destination' | 'undecided';
  state: string;
  epoch: number;
}

export interface HypervisorDriver {
  readonly kind: string;
  /**
   * `recorded`: each VM's last recorded state (what its process wrote at its last change),
   * without asking the processes: enough to count slots and memory, and it costs no round trip
   * to a VM that is busy (a source in its first round, say).
   */
  list(opts?: { recorded?: boolean }): Promise<VmInfo[]>;
  /** `recorded`: the last recorded state, without asking the VM (a driver may always ask). */
  get(name: string, opts?: { recorded?: boolean }): Promise<VmInfo | undefined>;
  create(spec: VmSpec): Promise<VmInfo>;
  /** Idempotent. deleteStorage also removes the VM's files from this host's storage roots. */
  destroy(name: string, opts: { deleteStorage: boolean; onlyMigration?: string }): Promise<{ destroyed: boolean }>;
  verify(name: string): Promise<VerifyReport>;
  /** Guest disk write through the fencing check (refused when this host is not the owner). */
  guestWrite(name: string): Promise<{ diskWrites: number }>;

  /** `streams`: parallel memory streams the source will open (policy.streams; default 1). */
  prepareIncoming(spec: VmSpec, migrationId: string, sourceHost: string, opts?: IncomingOptions): Promise<IncomingTarget>;
  incomingStatus(name: string, migrationId: string, wait?: IncomingWait): Promise<IncomingStatus>;
  /** Destroys the incoming VM of this migration unless it already runs. Idempotent. */
  abortIncoming(name: string, migrationId: string): Promise<{ aborted: boolean; running: boolean }>;

  startOutgoing(name: string, migrationId: string, target: IncomingTarget, policy: MigrationPolicy, opts?: OutgoingOptions): Promise<void>;
  outgoingProgress(name: string, migrationId: string, afterRound: number, waitMs: number): Promise<ProgressSample>;
  setOutgoingPolicy(name: string, migrationId: string, patch: { throttle?: number; maxBandwidth?: number }): Promise<void>;
  /** Pause → last dirty pages + device state → verify → handoff → destination resumes. Idempotent. */
  cutover(name: string, migrationId: string, destinationHost: string, verify: MigrationPolicy['verify']): Promise<CutoverResult>;
  rollbackOutgoing(name: string, migrationId: string, allowReclaim?: boolean): Promise<RollbackResult>;
}

/** Disk mirroring (live storage migration, shared-nothing). Drivers may not offer it yet. */
export interface StorageMoves {
  startLocalDiskMirror(name: string, migrationId: string, targets: Record<string, string>, maxBandwidth?: number): Promise<DiskMirrorStatus>;
  startDiskMirror(name: string, migrationId: string, target: { kind: 'remote'; endpoint: { host: string; port: number }; token: string; hello: { migrationId: string; vm: string; from: string } }, maxBandwidth?: number): Promise<DiskMirrorStatus>;
  diskMirrorStatus(name: string, migrationId: string): Promise<DiskMirrorStatus>;
  resumeDiskMirror(name: string, migrationId: string, token: string): Promise<DiskMirrorStatus>;
  abortDiskMirror(name: string, migrationId: string, targets?: Record<string, string>): Promise<{ aborted: boolean }>;
  switchDisks(name: string, migrationId: string, targets: Record<string, string>): Promise<{ oldPaths: string[]; newPaths: string[]; epoch: number; crcs: Record<string, number> }>;
  deleteOldDiskFiles(name: string, paths: string[]): Promise<{ deleted: string[] }>;
  prepareDiskTargets(spec: VmSpec, migrationId: string, sourceHost: string, epoch: number, dir?: string): Promise<DiskTargetGrant & { spec: VmSpec }>;
  deleteDiskTargets(name: string, migrationId: string, dir?: string): Promise<{ deleted: boolean }>;
  adoptDiskTargets(name: string, migrationId: string, dir?: string): Promise<void>;
}

export function hasStorageMoves(d: HypervisorDriver): d is HypervisorDriver & StorageMoves {
  return typeof (d as Partial<StorageMoves>).startLocalDiskMirror === 'function';
}
