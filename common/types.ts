// Types shared by workflows, activities, drivers, client and CLI.
// Everything here crosses Temporal payloads, so it carries ids, sizes, checksums and
// progress only — never pages or blocks (see docs/ARCHITECTURE.md, "Data never rides the workflow").

export const PAGE_SIZE = 4096;
export const BLOCK_SIZE = 4096;

export type MigrationType = 'live' | 'storage' | 'shared-nothing';
export type Outcome = 'running' | 'completed' | 'rolled-back' | 'failed';

export interface DiskSpec {
  id: string;
  sizeBytes: number;
  /** Storage root name on the host ("shared", "local", ...). */
  root: string;
  /** Directory of the disk file, inside the root (default: <root>/vms/<vm>). */
  dir?: string;
}

/** Hypervisor a VM runs under: the embedded simulator, or a real QEMU process. */
export type DriverKind = 'sim' | 'qemu';

/** Per-VM QEMU settings (VmSpec.qemu); anything left out comes from the host's QEMU driver (test guest). */
export interface QemuVmExtras {
  kernel?: string;
  initrd?: string;
  /** Appended to the kernel command line (after console=ttyS0 ...). */
  append?: string;
  vcpus?: number;
}

export interface VmSpec {
  name: string;
  driver: DriverKind;
  /** Only for driver 'qemu'. */
  qemu?: QemuVmExtras;
  memoryBytes: number;
  disks: DiskSpec[];
  /** Guest workload: bytes of memory dirtied per second. */
  dirtyRate: number;
  /** Guest workload: bytes written to disk per second. */
  writeRate: number;
  /** Fraction of guest data pages written at boot (the rest stays zero). */
  fill: number;
  /** Fraction of each disk's blocks written at boot (default 0). */
  diskFill?: number;
  /** Fraction of each written page that is repetitive (compressible) rather than random (default 0). */
  compressible?: number;
  /** Stable loopback address the guest answers UDP echo probes on; it moves with the VM. */
  probe: { address: string; port: number };
}

export type VmState = 'running' | 'paused' | 'incoming' | 'migrated' | 'stopped' | 'failed';

export interface VmInfo {
  name: string;
  host: string;
  state: VmState;
  pid: number;
  epoch: number;
  spec: VmSpec;
  /** Migration this VM takes part in, if any (source or destination side). */
  migrationId?: string;
  /** Guest counters (simulator): what `plan` samples to measure the dirty rate. */
  device?: DeviceStateSummary;
  /** On a host with `hugepages` (simulator): whether the guest got huge pages (false: the pool was short). */
  hugePages?: boolean;
}

export interface StorageRoot {
  name: string;
  path: string;
  shared: boolean;
}

export interface HostInfo {
  name: string;
  taskQueue: string;
  memoryCapacityBytes: number;
  memoryUsedBytes: number;
  storageRoots: StorageRoot[];
  dataPlane: { host: string; port: number };
  vms: Array<Pick<VmInfo, 'name' | 'state' | 'epoch' | 'migrationId' | 'hugePages'> & { memoryBytes: number }>;
  /**
   * A fresh one-time data-plane grant token for this host, when asked for (a migration's
   * checks): registered only by a later prepareIncoming. Minting it here spares the workflow a
   * local activity (~10 ms of workflow task on the move's path).
   */
  grantToken?: string;
}

export interface MigrationPolicy {
  /** Maximum tolerated pause (hypervisor clock), ms. */
  downtimeLimitMs: number;
  /** Bytes/s cap on the memory stream; 0 = unlimited. */
  maxBandwidth: number;
  /** Hard stop on pre-copy rounds. */
  maxRounds: number;
  /** Pre-copy gives up after this many ms per GiB of guest memory (minimum 10 s). */
  convergenceTimeoutMsPerGiB: number;
  /** Throttle the guest progressively when the dirty rate outruns the link. */
  autoConverge: boolean;
  /** Throttle steps (fraction of guest CPU taken away), first step then increments. */
  throttleInitial: number;
  throttleIncrement: number;
  throttleMax: number;
  /**
   * 'digest': every page carries its CRC, checked on arrival, and the cutover compares both
   * ends' per-page CRC tables. 'full': that, and a CRC of all memory on both ends at cutover.
   * 'sequence': pages carry a send sequence number instead (no per-byte work); the cutover still
   * proves the last copy of every page arrived, page contents are left to the transport (TLS,
   * or TCP checksums on a plaintext network). Simulator only; QEMU has its own checks.
   */
  verify: 'digest' | 'full' | 'sequence';
  /**
   * Memory stream compression: 'deflate' (level 1, per 1 MiB frame, kept only where it is
   * smaller) trades source CPU for bytes on the wire; 'none' by default.
   */
  compression?: 'none' | 'deflate';
  /**
   * Parallel TCP streams for the memory transfer (1 to 16, default 1). Guest memory is dealt to
   * them in 1 MiB regions; worth raising when one flow cannot fill the link (per-flow limits,
   * long fat links, NICs spreading flows over cores). QEMU guests: multifd channels.
   */
  streams?: number;
  /** Wait for an operator's approval (workflow update `approveCutover`) before the cutover. */
  approveCutover?: boolean;
  /** How long to wait for that approval before rolling back, ms. */
  approvalTimeoutMs?: number;
}

export const DEFAULT_POLICY: MigrationPolicy = {
  downtimeLimitMs: 300,
  maxBandwidth: 0,
  maxRounds: 30,
  convergenceTimeoutMsPerGiB: 120_000,
  autoConverge: true,
  throttleInitial: 0.2,
  throttleIncrement: 0.1,
  throttleMax: 0.99,
  verify: 'digest',
};

/** One sample of an outgoing memory job, taken at the end of a pre-copy round. */
export interface ProgressSample {
  round: number;
  /** ms since the job started (source clock). */
  elapsedMs: number;
  bytesSent: number;
  pagesSent: number;
  /** Pages dirty right now (what cutover would still have to send). */
  dirtyPages: number;
  /** Guest dirtying rate measured over the last round, bytes/s. */
  dirtyRate: number;
  /** Link rate measured over the last round, bytes/s. */
  bandwidth: number;
  throttle: number;
  /** Estimated downtime if we cut over now, ms. */
  expectedDowntimeMs: number;
  /** 'cutover': the job went past pre-copy (its cutover began), seen by a retried awaitProgress. */
  state: 'precopy' | 'failed' | 'cutover';
  error?: string;
  /** With compression: what the frames would have weighed uncompressed, and the CPU it cost. */
  rawBytes?: number;
  compressCpuMs?: number;
}

export interface CutoverResult {
  pausedAt: number;
  resumedAt: number;
  downtimeMs: number;
  finalPages: number;
  bytesSent: number;
  /** With compression (see ProgressSample). */
  rawBytes?: number;
  compressCpuMs?: number;
  /**
   * Set when the dirty set still did not fit the downtime limit after the cutover decision and
   * the source raised the guest's throttle before pausing (auto-converge in the cutover's tail).
   */
  tailThrottle?: number;
  /**
   * Where the downtime went, ms on the source's clock: the last dirty pages out (and, with
   * several streams, their barrier), what the source waits for before the handoff (a 'full'
   * verification, a disk mirror's drain), the ownership handoff, GO → destination running. Sums
   * to downtimeMs (rounding aside). Of the resume, `resumeOnDestination` was the destination's
   * own work after GO (claim, start, answer); the rest is its digest check and the messages'
   * travel.
   */
  downtimePhasesMs?: { finalPages: number; verify: number; handoff: number; resume: number; resumeOnDestination?: number };
  /**
   * The rounds before the pause (simulator): "presettle/ms" when a barrier was taken while the
   * cutover decision travelled; then, after the decision, tail rounds and settle (barrier)
   * rounds, "pages/ms" each; "settle pre" when the pre-settle barrier still held (nothing sent
   * since) and stood in for the first settle round.
   */
  beforePause?: string[];
  sourceDigest: number;
  destinationDigest: number;
  sourceFullCrc?: number;
  destinationFullCrc?: number;
  epoch: number;
  deviceState: DeviceStateSummary;
}

export interface DeviceStateSummary {
  vcpuTicks: number;
  memWrites: number;
  diskWrites: number;
}

export interface VerifyReport {
  ok: boolean;
  vm: string;
  host: string;
  state: VmState;
  checks: Array<{ name: string; ok: boolean; detail: string }>;
}

/**
 * Where a move finds its VM: `from`, or else the workflow asks every host of `candidates` (but
 * the destination) at once, in the step that checks the request (no lookup before the start).
 */
export interface SourceOfMove {
  from?: string;
  candidates?: string[];
}

export interface LiveMigrationInput extends SourceOfMove {
  migrationId: string;
  vm: string;
  to: string;
  policy?: Partial<MigrationPolicy>;
}

export interface MigrationPhaseProgress {
  phase: string;
  /** Storage moves: bytes bulk-copied and guest writes mirrored so far. */
  bytesCopied?: number;
  bytesMirrored?: number;
  round: number;
  bytesTransferred: number;
  dirtyPages: number;
  rateBytesPerSec: number;
  throttle: number;
  decisions: DecisionRecord[];
}

export interface DecisionRecord {
  round: number;
  action: string;
  reason: string;
}

export interface MigrationResult {
  id: string;
  type: MigrationType;
  vm: string;
  from: string;
  to: string;
  outcome: Exclude<Outcome, 'running'>;
  reason: string;
  durationMs: number;
  downtimeMs: number;
  rounds: number;
  bytesTransferred: number;
  decisions: DecisionRecord[];
  cutover?: CutoverResult;
}

export interface StorageMigrationInput {
  migrationId: string;
  vm: string;
  host: string;
  /** Destination directory per disk id (absolute, inside one of the host's storage roots). */
  targets: Record<string, string>;
  /** Bytes/s cap on the bulk copy; 0 = unlimited. */
  maxBandwidth?: number;
}

export interface SharedNothingInput extends SourceOfMove {
  migrationId: string;
  vm: string;
  to: string;
  /** Destination directory (inside a destination root); default: <local root>/vms/<vm>. */
  toPath?: string;
  policy?: Partial<MigrationPolicy>;
}

export interface DiskMirrorStatus {
  state: 'copying' | 'synced' | 'disconnected' | 'failed' | 'switched' | 'aborted';
  bytesCopied: number;
  bytesMirrored: number;
  /** Bulk-copy position confirmed by the target, per disk (blocks): where a resumed copy restarts. */
  checkpoint: Record<string, number>;
  totalBytes: number;
  error?: string;
}

export interface DiskTargetGrant {
  endpoint: { host: string; port: number };
  token: string;
  /** Absolute path of each disk's copy on the target host. */
  paths: Record<string, string>;
}
