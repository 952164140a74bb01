// Typed client functions: what the CLI is a thin layer over, and what scripts import.
//   const c = await VmferryClient.connect();
//   const { id } = await c.startMigration({ type: 'live', vm: 'web1', to: 'hostB' });
//   const result = await c.awaitMigration(id);
import crypto from 'node:crypto';
import { z } from 'zod';
import { Client, Connection, WithStartWorkflowOperation, WorkflowNotFoundError, WorkflowUpdateFailedError, type Workflow, type WorkflowHandle } from '@temporalio/client';
import { temporalConfig } from '../common/temporal.js';
import { dataConverter } from '../common/codec.js';
import { policyInputSchema, describeIssues } from '../common/schemas.js';
import { ORCHESTRATOR_TASK_QUEUE, migrationIdFor } from '../common/names.js';
import { VmName, SourceHost, DestinationHost, MigrationType as MigrationTypeKey, MigrationPhase, MigrationOutcome } from '../common/search-attributes.js';
import { formatBytes, parseRate, parseSize } from '../common/sizes.js';
import type { HostInfo, MigrationPhaseProgress, MigrationPolicy, MigrationResult, MigrationType, Outcome, VerifyReport, VmInfo, VmSpec } from '../common/types.js';
import type { HostReply, HostRequest } from '../workflows/admin.js';
import { labDir, readLab } from '../lab/lab.js';

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** A migration its workflow's checks refused; that workflow (`id`) ended failed, having moved nothing. */
export class MigrationRefusedError extends UsageError {
  constructor(message: string, readonly id: string) {
    super(message);
  }
}

const NAME = /^[a-z][a-z0-9-]{0,62}$/i;
export const vmNameSchema = z.string().regex(NAME, 'VM names are letters, digits and dashes, starting with a letter (at most 63)');
const sizeSchema = (what: string, min: number, max: number) =>
  z.union([z.number(), z.string()]).transform((v, ctx) => {
    try {
      const n = typeof v === 'number' ? v : parseSize(v, what);
      if (n < min || n > max) { ctx.addIssue({ code: z.ZodIssueCode.custom, message: `${what} ${v} is out of range (${min}..${max} bytes)` }); return z.NEVER; }
      return n;
    } catch (e) { ctx.addIssue({ code: z.ZodIssueCode.custom, message: (e as Error).message }); return z.NEVER; }
  });

export const createVmSchema = z.object({
  name: vmNameSchema,
  host: z.string().min(1, 'a host is required'),
  memory: sizeSchema('memory size', 1 << 20, 64 * 2 ** 30),
  disk: sizeSchema('disk size', 1 << 20, 2 ** 40),
  disks: z.number().int().min(1).max(8).default(1),
  storage: z.string().default('shared'),
  dirtyRate: z.union([z.number(), z.string()]).default('4MiB').transform((v) => (typeof v === 'number' ? v : parseRate(v, 'dirty rate'))),
  writeRate: z.union([z.number(), z.string()]).default('256KiB').transform((v) => (typeof v === 'number' ? v : parseRate(v, 'write rate'))),
  fill: z.number().min(0).max(1).default(0.5),
  diskFill: z.number().min(0).max(1).default(0),
  compressible: z.number().min(0).max(1).default(0),
  /** 'qemu': a real QEMU guest (the test guest, built on the host by scripts/qemu/build-guest.sh); the workload fields are the simulator's. */
  driver: z.enum(['sim', 'qemu'], { errorMap: () => ({ message: 'driver must be "sim" or "qemu"' }) }).default('sim'),
});
export type CreateVmInput = z.input<typeof createVmSchema>;

export const policySchema = policyInputSchema;

const absDir = z.string().min(1).refine((p) => p.startsWith('/'), 'storage paths must be absolute').refine((p) => !p.split('/').includes('..'), 'storage paths may not contain ".."');
export const startMigrationSchema = z.discriminatedUnion('type', [
  // from: the source host, when the caller knows it: no lookup on the known hosts first (the workflow checks it).
  z.object({ type: z.literal('live'), vm: vmNameSchema, from: z.string().min(1).optional(), to: z.string().min(1, 'a destination host is required'), policy: policySchema.optional() }).strict(),
  z.object({
    type: z.literal('storage'),
    vm: vmNameSchema,
    /** Directory for all disks (and the VM's other files). */
    toPath: absDir.optional(),
    /** Per-disk directories: disk id → directory. */
    disks: z.record(z.string().regex(/^disk\d+$/, 'disk ids look like disk0'), absDir).optional(),
    maxBandwidth: z.number().int().min(0).optional(),
  }).strict(),
  z.object({ type: z.literal('shared-nothing'), vm: vmNameSchema, from: z.string().min(1).optional(), to: z.string().min(1, 'a destination host is required'), toPath: absDir.optional(), policy: policySchema.optional() }).strict(),
]);
export type StartMigrationInput = z.input<typeof startMigrationSchema>;

const WORKFLOW_FOR: Record<MigrationType, string> = { live: 'liveMigration', storage: 'storageMigration', 'shared-nothing': 'sharedNothingMigration' };

export interface MigrationPlan {
  type: MigrationType;
  vm: string;
  from: string;
  to: string;
  ok: boolean;
  checks: Array<{ name: string; ok: boolean; detail: string }>;
  measured: { dirtyRateBytesPerSec: number; bandwidthBytesPerSec: number; bandwidthSource: string };
  predicted: { totalMs: number; downtimeMs: number; rounds: number; converges: boolean };
}

export interface MigrationStatus extends Omit<MigrationResult, 'outcome'> {
  outcome: Outcome;
  phase: string;
  progress?: MigrationPhaseProgress;
  uiUrl?: string;
}

/** Probe address on loopback (127.77.x.y), chosen at creation and kept for the VM's life. */
export function probeAddressFor(name: string): { address: string; port: number } {
  const h = crypto.createHash('sha1').update(name).update(crypto.randomBytes(8)).digest();
  return { address: `127.77.${h[0]! % 256}.${1 + (h[1]! % 254)}`, port: 20000 + (h.readUInt16LE(2) % 20000) };
}


export function parseOrThrow<S extends z.ZodTypeAny>(schema: S, value: unknown): z.output<S> {
  const r = schema.safeParse(value);
  if (!r.success) throw new UsageError(describeIssues(r.error));
  return r.data;
}

export class VmferryClient {
  private constructor(readonly client: Client, readonly connection: Connection, readonly namespace: string, readonly knownHosts: string[], readonly uiUrl: string | null) {}

  /** Connects through envconfig; inside a lab, its address and hosts are the defaults. */
  static async connect(opts: { labDir?: string; hosts?: string[] } = {}): Promise<VmferryClient> {
    const lab = readLab(labDir(opts.labDir));
    const { connectionOptions, namespace } = temporalConfig(lab?.temporal.address);
    const connection = await Connection.connect({ ...connectionOptions, connectTimeout: 5000 }).catch((e: Error) => {
      throw new Error(`cannot reach Temporal at ${connectionOptions.address}: ${e.message} (is the lab up? \`vmferry lab up\`)`);
    });
    const hosts = opts.hosts ?? (process.env.VMFERRY_HOSTS ? process.env.VMFERRY_HOSTS.split(',') : lab?.hosts.map((h) => h.name) ?? []);
    // UI links only when we talk to the lab's own server.
    const onLabServer = !!lab && connectionOptions.address === lab.temporal.address;
    return new VmferryClient(new Client({ connection, namespace, dataConverter: dataConverter() }), connection, namespace, hosts, onLabServer ? lab!.temporal.uiUrl ?? null : null);
  }

  async close(): Promise<void> {
    await this.connection.close();
  }

  workflowUrl(id: string): string | undefined {
    return this.uiUrl ? `${this.uiUrl}/namespaces/${this.namespace}/workflows/${encodeURIComponent(id)}` : undefined;
  }

  private requireHost(host: string): void {
    if (this.knownHosts.length && !this.knownHosts.includes(host)) throw new UsageError(`unknown host "${host}" (known hosts: ${this.knownHosts.join(', ')})`);
  }

  private async hostRequest<T extends HostReply>(req: HostRequest): Promise<T> {
    this.requireHost(req.host);
    return (await this.client.workflow.execute('hostRequest', {
      taskQueue: ORCHESTRATOR_TASK_QUEUE,
      workflowId: `host-request-${req.op}-${req.host}-${crypto.randomUUID()}`,
      args: [req],
      workflowExecutionTimeout: '5 minutes',
    })) as T;
  }

  hostInfo(host: string): Promise<HostInfo> {
    return this.hostRequest<HostInfo>({ op: 'hostInfo', host });
  }

  async inventory(hosts = this.knownHosts): Promise<Array<{ host: string; ok: boolean; info?: HostInfo; error?: string }>> {
    return (await this.client.workflow.execute('inventory', {
      taskQueue: ORCHESTRATOR_TASK_QUEUE,
      workflowId: `inventory-${crypto.randomUUID()}`,
      args: [hosts],
      workflowExecutionTimeout: '2 minutes',
    })) as Array<{ host: string; ok: boolean; info?: HostInfo; error?: string }>;
  }

  async listVms(): Promise<Array<{ name: string; host: string; state: string; epoch: number; memoryBytes: number; migrationId?: string; hugePages?: boolean }>> {
    const inv = await this.inventory();
    const out = [];
    for (const h of inv) for (const v of h.info?.vms ?? []) out.push({ ...v, host: h.host });
    return out;
  }

  /** Where a VM runs now (the host where it is running, else wherever it is found). */
  async locateVm(name: string): Promise<{ host: string; state: string } | null> {
    const vms = (await this.listVms()).filter((v) => v.name === name);
    const running = vms.find((v) => v.state === 'running');
    return running ?? vms[0] ?? null;
  }

  async createVm(input: CreateVmInput): Promise<VmInfo> {
    const c = parseOrThrow(createVmSchema, input);
    this.requireHost(c.host);
    const info = await this.hostInfo(c.host);
    if (!info.storageRoots.some((r) => r.name === c.storage)) throw new UsageError(`host ${c.host} has no storage root "${c.storage}" (it has: ${info.storageRoots.map((r) => r.name).join(', ')})`);
    if (await this.locateVm(c.name)) throw new UsageError(`a VM named ${c.name} already exists`);
    const spec: VmSpec = {
      name: c.name,
      driver: c.driver,
      memoryBytes: c.memory,
      disks: Array.from({ length: c.disks }, (_, i) => ({ id: `disk${i}`, sizeBytes: c.disk, root: c.storage })),
      dirtyRate: c.dirtyRate,
      writeRate: c.writeRate,
      fill: c.fill,
      diskFill: c.diskFill,
      ...(c.compressible > 0 ? { compressible: c.compressible } : {}),
      probe: probeAddressFor(c.name),
    };
    return this.hostRequest<VmInfo>({ op: 'createVm', host: c.host, spec });
  }

  async destroyVm(name: string): Promise<{ destroyed: boolean; host?: string }> {
    const at = await this.locateVm(name);
    if (!at) throw new UsageError(`no VM named ${name}`);
    return { ...(await this.hostRequest<{ destroyed: boolean }>({ op: 'destroyVm', host: at.host, vm: name, deleteStorage: true })), host: at.host };
  }

  async verifyVm(name: string): Promise<VerifyReport> {
    const at = await this.locateVm(name);
    if (!at) throw new UsageError(`no VM named ${name}`);
    return this.hostRequest<VerifyReport>({ op: 'verifyVm', host: at.host, vm: name });
  }

  async vmSpec(name: string): Promise<VmInfo | null> {
    const at = await this.locateVm(name);
    if (!at) return null;
    const vms = await this.hostRequest<VmInfo[]>({ op: 'listVms', host: at.host });
    return vms.find((v) => v.name === name) ?? null;
  }

  /**
   * Validates and starts a migration; returns once the workflow's checks admitted it, or throws
   * a UsageError naming why. Live and shared-nothing moves ask for the admission with the start
   * (update-with-start), so every refusal is synchronous. Without `from`, the client first finds
   * the VM on the known hosts (an `inventory` workflow, ~100 ms) and refuses a VM that is not
   * there, not running or already migrating before anything starts; with `from` (a caller that
   * knows the source, as `virsh migrate` is run against it) that lookup is skipped and the
   * workflow's checks do it all, a refusal then leaving a failed migration on record.
   */
  async startMigration(input: StartMigrationInput): Promise<{ id: string; from: string; to: string }> {
    const m = parseOrThrow(startMigrationSchema, input);
    if (m.type === 'storage') return this.startStorageMigration(m);
    this.requireHost(m.to);
    let from = m.from;
    if (from) this.requireHost(from);
    else {
      // Both checks at once (each is a round trip to the cluster); reported in this order.
      const [at, running] = await Promise.all([this.locateVm(m.vm), this.findRunningMigration(m.vm)]);
      if (!at) throw new UsageError(`no VM named ${m.vm}${this.knownHosts.length ? ` on hosts ${this.knownHosts.join(', ')}` : ''}`);
      if (at.host === m.to) throw new UsageError(`VM ${m.vm} already runs on ${m.to}: source and destination are the same host`);
      if (at.state !== 'running') throw new UsageError(`VM ${m.vm} is ${at.state} on ${at.host}, not running`);
      if (running) throw new UsageError(`VM ${m.vm} is already migrating (${running}); only one migration per VM at a time`);
      from = at.host;
    }
    if (from === m.to) throw new UsageError(`source and destination are the same host (${m.to})`);
    if (m.type === 'shared-nothing' && m.toPath) await this.requireInsideRoots(m.to, [m.toPath]);
    const id = migrationIdFor(m.type, m.vm, `${Date.now().toString(36)}${crypto.randomBytes(2).toString('hex')}`);
    const arg = m.type === 'shared-nothing'
      ? { migrationId: id, vm: m.vm, from, to: m.to, toPath: m.toPath, policy: m.policy }
      : { migrationId: id, vm: m.vm, from, to: m.to, policy: m.policy as Partial<MigrationPolicy> | undefined };
    const start = new WithStartWorkflowOperation(WORKFLOW_FOR[m.type], {
      taskQueue: ORCHESTRATOR_TASK_QUEUE,
      workflowId: id,
      workflowIdConflictPolicy: 'FAIL',
      args: [arg],
      typedSearchAttributes: [
        { key: VmName, value: m.vm },
        { key: SourceHost, value: from },
        { key: DestinationHost, value: m.to },
        { key: MigrationTypeKey, value: m.type },
        { key: MigrationPhase, value: 'starting' },
        { key: MigrationOutcome, value: 'running' },
      ],
      staticSummary: `${m.type} migration of ${m.vm}: ${from} → ${m.to}`,
    });
    try {
      const admitted = await this.client.workflow.executeUpdateWithStart<Workflow, { from: string; to: string }, []>('admission', { startWorkflowOperation: start });
      return { id, from: admitted.from, to: admitted.to };
    } catch (e) {
      if (e instanceof WorkflowUpdateFailedError) {
        let c = e as { message?: string; cause?: unknown };
        while (c.cause) c = c.cause as typeof c;
        throw new MigrationRefusedError(c.message ?? e.message, id);
      }
      throw e;
    }
  }

  /** Storage moves stay on their host: found, and their targets checked, before the start. */
  private async startStorageMigration(m: Extract<z.output<typeof startMigrationSchema>, { type: 'storage' }>): Promise<{ id: string; from: string; to: string }> {
    // Both checks at once (each is a round trip to the cluster); reported in this order.
    const [at, running] = await Promise.all([this.locateVm(m.vm), this.findRunningMigration(m.vm)]);
    if (!at) throw new UsageError(`no VM named ${m.vm}${this.knownHosts.length ? ` on hosts ${this.knownHosts.join(', ')}` : ''}`);
    if (at.state !== 'running') throw new UsageError(`VM ${m.vm} is ${at.state} on ${at.host}, not running`);
    if (running) throw new UsageError(`VM ${m.vm} is already migrating (${running}); only one migration per VM at a time`);
    const id = migrationIdFor(m.type, m.vm, `${Date.now().toString(36)}${crypto.randomBytes(2).toString('hex')}`);
    const vm = await this.vmSpec(m.vm);
    const targets: Record<string, string> = {};
    for (const d of vm!.spec.disks) {
      const dir = m.disks?.[d.id] ?? m.toPath;
      if (!dir) throw new UsageError(`no destination for disk ${d.id}: give --to-path or --disk ${d.id}=<dir>`);
      targets[d.id] = dir;
    }
    for (const id2 of Object.keys(m.disks ?? {})) if (!vm!.spec.disks.some((d) => d.id === id2)) throw new UsageError(`VM ${m.vm} has no disk ${id2} (it has: ${vm!.spec.disks.map((d) => d.id).join(', ')})`);
    await this.requireInsideRoots(at.host, Object.values(targets));
    await this.client.workflow.start(WORKFLOW_FOR.storage, {
      taskQueue: ORCHESTRATOR_TASK_QUEUE,
      workflowId: id,
      args: [{ migrationId: id, vm: m.vm, host: at.host, targets, maxBandwidth: m.maxBandwidth }],
      typedSearchAttributes: [
        { key: VmName, value: m.vm },
        { key: SourceHost, value: at.host },
        { key: DestinationHost, value: at.host },
        { key: MigrationTypeKey, value: m.type },
        { key: MigrationPhase, value: 'starting' },
        { key: MigrationOutcome, value: 'running' },
      ],
      staticSummary: `storage migration of ${m.vm} on ${at.host}`,
    });
    return { id, from: at.host, to: at.host };
  }

  /** Client-side check (the host re-checks with symlinks resolved): paths inside a storage root. */
  private async requireInsideRoots(host: string, dirs: string[]): Promise<void> {
    const roots = (await this.hostInfo(host)).storageRoots;
    for (const d of dirs) {
      if (!roots.some((r) => d.startsWith(r.path.replace(/\/$/, '') + '/'))) {
        throw new UsageError(`storage path ${d} is not inside any storage root of ${host} (${roots.map((r) => `${r.name}: ${r.path}`).join(', ')})`);
      }
    }
  }

  async findRunningMigration(vm: string): Promise<string | null> {
    for await (const w of this.client.workflow.list({ query: `VmName = '${vm}' AND ExecutionStatus = 'Running'` })) return w.workflowId;
    return null;
  }

  private handle(id: string): WorkflowHandle {
    return this.client.workflow.getHandle(id);
  }

  async awaitMigration(id: string): Promise<MigrationResult> {
    return (await this.handle(id).result()) as MigrationResult;
  }

  async progress(id: string): Promise<MigrationPhaseProgress> {
    return this.handle(id).query<MigrationPhaseProgress>('progress');
  }

  async migrationStatus(id: string): Promise<MigrationStatus> {
    let d;
    try { d = await this.handle(id).describe(); } catch (e) {
      if (e instanceof WorkflowNotFoundError) throw new UsageError(`no migration with id ${id}`);
      throw e;
    }
    const sa = d.typedSearchAttributes;
    const base = {
      id,
      type: (sa.get(MigrationTypeKey) ?? 'live') as MigrationType,
      vm: sa.get(VmName) ?? '',
      from: sa.get(SourceHost) ?? '',
      to: sa.get(DestinationHost) ?? '',
      uiUrl: this.workflowUrl(id),
    };
    if (d.status.name === 'RUNNING') {
      const p = await this.progress(id).catch(() => undefined);
      return { ...base, outcome: 'running', phase: p?.phase ?? sa.get(MigrationPhase) ?? 'starting', reason: '', durationMs: Date.now() - d.startTime.getTime(), downtimeMs: 0, rounds: p?.round ?? 0, bytesTransferred: p?.bytesTransferred ?? 0, decisions: p?.decisions ?? [], progress: p };
    }
    if (d.status.name === 'COMPLETED') {
      const r = await this.awaitMigration(id);
      return { ...r, phase: sa.get(MigrationPhase) ?? 'done', uiUrl: base.uiUrl };
    }
    let why = `workflow ${d.status.name.toLowerCase()}`;
    if (d.status.name === 'FAILED') {
      try { await this.handle(id).result(); } catch (e) { let c = e as { message?: string; cause?: unknown }; while (c.cause) c = c.cause as typeof c; why = c.message ?? why; }
    }
    return { ...base, outcome: 'failed', phase: sa.get(MigrationPhase) ?? 'unknown', reason: why, durationMs: (d.closeTime?.getTime() ?? Date.now()) - d.startTime.getTime(), downtimeMs: 0, rounds: 0, bytesTransferred: 0, decisions: [] };
  }

  async cancelMigration(id: string): Promise<void> {
    await this.migrationStatus(id);
    await this.handle(id).cancel();
  }

  async listMigrations(limit = 50): Promise<Array<{ id: string; vm: string; type: string; from: string; to: string; phase: string; outcome: string; startTime: Date }>> {
    const out = [];
    for await (const w of this.client.workflow.list({ query: `MigrationType IS NOT NULL` })) {
      const sa = w.typedSearchAttributes;
      out.push({ id: w.workflowId, vm: sa.get(VmName) ?? '', type: sa.get(MigrationTypeKey) ?? '', from: sa.get(SourceHost) ?? '', to: sa.get(DestinationHost) ?? '', phase: sa.get(MigrationPhase) ?? '', outcome: sa.get(MigrationOutcome) ?? '', startTime: w.startTime });
      if (out.length >= limit) break;
    }
    return out;
  }

  /**
   * Pre-flight only: the checks a migration would make and a prediction of its time and
   * downtime from the VM's measured dirty rate and the link rate of recent migrations. Changes
   * nothing.
   */
  async plan(input: StartMigrationInput, sampleMs = 1000): Promise<MigrationPlan> {
    const m = parseOrThrow(startMigrationSchema, input);
    const checks: MigrationPlan['checks'] = [];
    const check = (name: string, ok: boolean, detail: string): void => { checks.push({ name, ok, detail }); };
    if (m.type !== 'storage') this.requireHost(m.to);
    const at = await this.locateVm(m.vm);
    if (!at) throw new UsageError(`no VM named ${m.vm}`);
    const to = m.type === 'storage' ? at.host : m.to;
    check('source', at.state === 'running', `VM ${m.vm} is ${at.state} on ${at.host}`);
    check('distinct hosts', m.type === 'storage' || at.host !== to, m.type === 'storage' ? 'same host (storage move)' : `${at.host} → ${to}`);
    const running = await this.findRunningMigration(m.vm);
    check('no other migration', !running, running ? `already migrating (${running})` : 'none running');
    const first = (await this.hostRequest<VmInfo[]>({ op: 'listVms', host: at.host })).find((v) => v.name === m.vm)!;
    const dest = await this.hostInfo(to);
    const free = dest.memoryCapacityBytes - dest.memoryUsedBytes;
    if (m.type !== 'storage') check('destination capacity', free >= first.spec.memoryBytes, `${formatBytes(first.spec.memoryBytes)} needed, ${formatBytes(free)} free on ${to}`);
    if (m.type === 'live') {
      const shared = first.spec.disks.every((d) => dest.storageRoots.some((r) => r.name === d.root && r.shared));
      check('shared storage', shared, shared ? `${to} shares the VM's storage` : `${to} does not share it: use shared-nothing`);
    }
    // Measured dirty rate: the guest's page writes over a short window (an upper bound).
    await new Promise((r) => setTimeout(r, sampleMs));
    const second = (await this.hostRequest<VmInfo[]>({ op: 'listVms', host: at.host })).find((v) => v.name === m.vm);
    const dirtyRate = first.device && second?.device ? Math.max(0, ((second.device.memWrites - first.device.memWrites) * 4096 * 1000) / sampleMs) : 0;
    // Link rate: what recent completed migrations achieved, else a conservative default.
    const recent: number[] = [];
    for await (const w of this.client.workflow.list({ query: `MigrationOutcome = 'completed' AND MigrationType IN ('live', 'shared-nothing')` })) {
      const r = (await this.handle(w.workflowId).result().catch(() => null)) as MigrationResult | null;
      if (r && r.durationMs > 0 && r.cutover) recent.push((r.cutover.bytesSent * 1000) / r.durationMs);
      if (recent.length >= 5) break;
    }
    const bandwidth = recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : 200 * 2 ** 20;
    const memory = first.spec.memoryBytes;
    const diskBytes = first.spec.disks.reduce((a, d) => a + d.sizeBytes, 0);
    const limitMs = m.type !== 'storage' ? (m.policy?.downtimeLimitMs ?? 300) : 0;
    let predictedTotalMs: number; let predictedDowntimeMs = 0; let rounds = 0; let converges = true;
    if (m.type === 'storage') {
      predictedTotalMs = (diskBytes / (m.maxBandwidth || 400 * 2 ** 20)) * 1000;
    } else {
      // Geometric pre-copy: each round re-sends what was dirtied during the previous one.
      const q = dirtyRate / bandwidth;
      let remaining = memory;
      let t = 0;
      while (rounds < 30) {
        const roundMs = (remaining / bandwidth) * 1000;
        t += roundMs;
        rounds++;
        remaining = Math.min(memory, dirtyRate * (roundMs / 1000));
        if ((remaining / bandwidth) * 1000 <= limitMs) break;
      }
      converges = (remaining / bandwidth) * 1000 <= limitMs;
      predictedDowntimeMs = Math.round((remaining / bandwidth) * 1000);
      predictedTotalMs = t + predictedDowntimeMs + (m.type === 'shared-nothing' ? (diskBytes / bandwidth) * 1000 : 0);
      check('convergence', converges || q < 1, converges ? `converges in ${rounds} round(s)` : `dirty rate ${formatBytes(dirtyRate)}/s vs link ${formatBytes(bandwidth)}/s: needs auto-converge throttling`);
    }
    return {
      type: m.type, vm: m.vm, from: at.host, to, ok: checks.every((c) => c.ok), checks,
      measured: { dirtyRateBytesPerSec: Math.round(dirtyRate), bandwidthBytesPerSec: Math.round(bandwidth), bandwidthSource: recent.length ? `mean of ${recent.length} recent migration(s)` : 'default (no completed migration yet)' },
      predicted: { totalMs: Math.round(predictedTotalMs), downtimeMs: predictedDowntimeMs, rounds, converges },
    };
  }

  /** Approves a cutover waiting for it (policy.approveCutover); refused when none is waiting. */
  async approveCutover(id: string, by = process.env.USER ?? 'operator'): Promise<void> {
    await this.migrationStatus(id);
    try {
      await this.handle(id).executeUpdate('approveCutover', { args: [{ by }] });
    } catch (e) {
      const cause = (e as { cause?: { message?: string } }).cause?.message;
      throw new UsageError(cause ?? (e as Error).message);
    }
  }

  /** Moves every running VM off `host` (a workflow with one child workflow per VM). */
  async evacuate(host: string, opts: { to?: string[]; concurrency?: number; perHostLimit?: number; policy?: z.input<typeof policySchema> } = {}): Promise<{ id: string }> {
    this.requireHost(host);
    for (const t of opts.to ?? []) this.requireHost(t);
    if (opts.concurrency !== undefined && (!Number.isInteger(opts.concurrency) || opts.concurrency < 1)) throw new UsageError('concurrency must be a whole number ≥ 1');
    if (opts.perHostLimit !== undefined && (!Number.isInteger(opts.perHostLimit) || opts.perHostLimit < 1 || opts.perHostLimit > 64)) throw new UsageError('per-host limit must be a whole number from 1 to 64');
    const policy = opts.policy ? parseOrThrow(policySchema, opts.policy) : undefined;
    const to = opts.to ?? this.knownHosts.filter((h) => h !== host);
    if (to.length === 0) throw new UsageError(`no destination hosts for evacuating ${host}: pass --to`);
    if (to.includes(host)) throw new UsageError(`cannot evacuate ${host} onto itself`);
    const id = `evacuate-${host}-${Date.now().toString(36)}`;
    await this.client.workflow.start('evacuateHost', {
      taskQueue: ORCHESTRATOR_TASK_QUEUE,
      workflowId: id,
      args: [{ host, to, concurrency: opts.concurrency, ...(opts.perHostLimit !== undefined ? { perHostLimit: opts.perHostLimit } : {}), policy }],
      staticSummary: `evacuate ${host} → ${to.join(', ')}`,
    });
    return { id };
  }

  async evacuationStatus(id: string): Promise<{ host: string; items: Array<{ vm: string; to?: string; type?: string; id?: string; state: string; reason?: string; downtimeMs?: number }>; completed: number; failed: number }> {
    return this.handle(id).query('evacuation');
  }

  async awaitEvacuation(id: string): Promise<{ host: string; items: Array<{ vm: string; to?: string; type?: string; id?: string; state: string; reason?: string; downtimeMs?: number }>; completed: number; failed: number }> {
    return (await this.handle(id).result()) as Awaited<ReturnType<VmferryClient['evacuationStatus']>>;
  }

  /** Test hook: one guest disk write through the fencing check on a given host. */
  guestWrite(host: string, vm: string): Promise<{ diskWrites: number }> {
    return this.hostRequest<{ diskWrites: number }>({ op: 'guestWrite', host, vm });
  }
}
