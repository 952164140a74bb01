// Live migration end to end: real Temporal server, real agent and VM processes, real bytes.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, waitUntil, sleep, type TestLab } from './helpers/lab.js';
import { isAlive } from '../drivers/sim/sim-driver.js';
import { Prober, echoes } from '../client/probe.js';
import { ORCHESTRATOR_TASK_QUEUE } from '../common/names.js';
import type { MigrationResult } from '../common/types.js';
import type { StartMigrationInput } from '../client/index.js';
import { WithStartWorkflowOperation, type Workflow } from '@temporalio/client';

let lab: TestLab;
let A: string;
let B: string;

/** Fault points of this file's lab (common/faults.ts): agents and VM processes inherit the path. */
const faultsFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-livefaults-')), 'faults.json');

beforeAll(async () => {
  fs.writeFileSync(faultsFile, '{}');
  process.env.VMFERRY_FAULTS_FILE = faultsFile;
  lab = await startTestLab();
  [A, B] = lab.hosts as [string, string];
});
afterAll(async () => {
  await lab?.down();
});

const whereIs = (vm: string): Promise<Array<{ host: string; state: string }>> => lab.whereIs(vm);

/** Runs a move to its end with fault points armed all along (armed before the start). */
async function moveArmed(points: Record<string, string>, spec: StartMigrationInput): Promise<{ id: string; r: MigrationResult }> {
  fs.writeFileSync(faultsFile, JSON.stringify(points));
  try {
    const { id } = await lab.client.startMigration(spec);
    return { id, r: await lab.client.awaitMigration(id) };
  } finally {
    fs.writeFileSync(faultsFile, '{}');
  }
}

async function waitForPrecopy(id: string, minRound = 1): Promise<void> {
  await waitUntil(`pre-copy round ${minRound} of ${id}`, async () => {
    const p = await lab.client.progress(id);
    return p.phase === 'precopy' && p.round >= minRound;
  });
}

describe('live migration', () => {
  it('moves a VM under a dirtying workload: memory bit for bit, workload continues, every acknowledged write present', async () => {
    await lab.client.createVm({ name: 'web1', host: A, memory: '64MiB', disk: '16MiB', dirtyRate: '16MiB', writeRate: '1MiB', fill: 0.6 });
    const vm = (await lab.client.vmSpec('web1'))!;
    const probe = new Prober(vm.spec.probe, 10).start();
    await sleep(300);
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'web1', to: B, policy: { verify: 'full' } });
    const r = await lab.client.awaitMigration(id);
    await sleep(300);
    const stats = await probe.stop();

    expect(r.outcome, r.reason).toBe('completed');
    expect(r.rounds).toBeGreaterThanOrEqual(1);
    expect(r.bytesTransferred).toBeGreaterThan(0.5 * 64 * 2 ** 20 * 0.6);
    const cut = r.cutover!;
    // The whole guest memory, CRC'd on the paused source and on the destination before it ran.
    expect(cut.destinationFullCrc).toBe(cut.sourceFullCrc);
    expect(cut.destinationDigest).toBe(cut.sourceDigest);
    expect(r.downtimeMs).toBeGreaterThan(0);
    expect(r.downtimeMs).toBeLessThan(2000);

    expect(await whereIs('web1')).toEqual([{ host: B, state: 'running' }]);
    expect(fs.readdirSync(lab.runDir(A))).toEqual([]);
    // Memory and disks agree with the guest's own ledger, which migrated inside its memory.
    const v = await lab.client.verifyVm('web1');
    expect(v.checks.filter((c) => !c.ok)).toEqual([]);
    expect(v.ok).toBe(true);
    // The workload continues where it stopped: its counters moved on from the cutover values.
    const info = await lab.client.hostInfo(B);
    expect(info).not.toHaveProperty('grantToken'); // an inventory mints no grant
    const after = info.vms.find((x) => x.name === 'web1')!;
    expect(after.epoch).toBe(cut.epoch);
    // The data-plane grant came from the destination's checks, not a local activity: the token
    // its hostInfo returned is the one the destination was prepared with.
    const events = (await lab.client.client.workflow.getHandle(id).fetchHistory()).events ?? [];
    expect(events.filter((e) => e.markerRecordedEventAttributes?.markerName === 'core_local_activity')).toEqual([]);
    const json = (p?: { data?: Uint8Array | null } | null): Record<string, unknown> => JSON.parse(Buffer.from(p?.data ?? []).toString('utf8')) as Record<string, unknown>;
    const scheduled = new Map(events.filter((e) => e.activityTaskScheduledEventAttributes).map((e) => [String(e.eventId), e.activityTaskScheduledEventAttributes!]));
    const hostInfoDone = events.find((e) => scheduled.get(String(e.activityTaskCompletedEventAttributes?.scheduledEventId))?.activityType?.name === 'hostInfo')!;
    const minted = json(hostInfoDone.activityTaskCompletedEventAttributes!.result!.payloads![0]).grantToken;
    expect(minted).toMatch(new RegExp(`^v1\\.${B}\\.`));
    const prepared = [...scheduled.values()].find((a) => a.activityType?.name === 'prepareIncoming')!;
    expect(json(prepared.input!.payloads![0]).token).toBe(minted);
    const device = async (): Promise<{ memWrites: number; diskWrites: number }> => {
      const vms = (await lab.client.client.workflow.execute('hostRequest', { taskQueue: ORCHESTRATOR_TASK_QUEUE, workflowId: `dev-${Date.now()}-${Math.random()}`, args: [{ op: 'listVms', host: B }] })) as Array<{ name: string; device: { memWrites: number; diskWrites: number } }>;
      return vms.find((x) => x.name === 'web1')!.device;
    };
    const now = await device();
    await sleep(300);
    const later = await device();
    expect(now.memWrites).toBeGreaterThanOrEqual(cut.deviceState.memWrites);
    expect(now.diskWrites).toBeGreaterThanOrEqual(cut.deviceState.diskWrites);
    expect(later.memWrites).toBeGreaterThan(now.memWrites);
    // The probe address moved with the VM: it answers on the destination.
    expect(stats.received).toBeGreaterThan(stats.sent * 0.8);
    const p2 = new Prober(vm.spec.probe, 10).start();
    await sleep(200);
    expect((await p2.stop()).received).toBeGreaterThan(5);
  });

  it('compression: compressible memory crosses in fewer bytes, the CPU it cost is reported, memory arrives bit for bit', async () => {
    await lab.client.createVm({ name: 'zip1', host: A, memory: '48MiB', disk: '4MiB', dirtyRate: '8MiB', fill: 1, compressible: 0.7 });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'zip1', to: B, policy: { compression: 'deflate', verify: 'full' } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('completed');
    // 70% of every page is one repeated byte: deflate leaves well under half.
    expect(r.bytesTransferred).toBeLessThan(0.5 * 48 * 2 ** 20);
    expect(r.cutover!.rawBytes!).toBeGreaterThan(48 * 2 ** 20 * 0.9);
    expect(r.cutover!.compressCpuMs!).toBeGreaterThan(0);
    expect(r.cutover!.sourceFullCrc).toBe(r.cutover!.destinationFullCrc);
    expect((await lab.client.verifyVm('zip1')).ok).toBe(true);
  });

  it('parallel streams: memory dealt over 3 TLS streams arrives bit for bit under a dirtying workload; bad counts are refused', async () => {
    await expect(lab.client.startMigration({ type: 'live', vm: 'web1', to: A, policy: { streams: 17 } })).rejects.toThrow(/streams: at most 16/);
    await expect(lab.client.startMigration({ type: 'live', vm: 'web1', to: A, policy: { streams: 0 } })).rejects.toThrow(/streams: at least 1/);
    await lab.client.createVm({ name: 'multi1', host: A, memory: '96MiB', disk: '4MiB', dirtyRate: '24MiB', fill: 1 });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'multi1', to: B, policy: { streams: 3, verify: 'full' } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    // Pages re-sent in later rounds travel on the stream of their region, so no stale copy can
    // overtake a newer one: the full-memory CRCs would differ.
    expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
    expect(r.bytesTransferred).toBeGreaterThan(96 * 2 ** 20);
    expect((await lab.client.verifyVm('multi1')).ok).toBe(true);
    const vmLog = fs.readFileSync(`${lab.runDir(B)}/multi1/vm.log`, 'utf8');
    for (const k of [0, 1, 2]) expect(vmLog).toContain(`incoming data plane (stream ${k} of 3)`);
  });

  it("verify 'sequence' over TLS: pages carry sequence numbers, not CRCs; a dirtying guest arrives intact", async () => {
    await lab.client.createVm({ name: 'seq1', host: A, memory: '64MiB', disk: '8MiB', dirtyRate: '48MiB', writeRate: '1MiB', fill: 0.9 });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'seq1', to: B, policy: { verify: 'sequence', streams: 2 } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.cutover!.destinationDigest).toBe(r.cutover!.sourceDigest);
    expect(await whereIs('seq1')).toEqual([{ host: B, state: 'running' }]);
    const v = await lab.client.verifyVm('seq1');
    expect(v.checks.filter((c) => !c.ok)).toEqual([]);
  });

  it('cancel during pre-copy rolls back: VM running on the source, nothing left on the destination', async () => {
    await lab.client.createVm({ name: 'db1', host: A, memory: '64MiB', disk: '8MiB', dirtyRate: '8MiB', fill: 0.9 });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'db1', to: B, policy: { maxBandwidth: 8 * 2 ** 20 } });
    await waitUntil('pre-copy', async () => (await lab.client.progress(id)).phase === 'precopy');
    await lab.client.cancelMigration(id);
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('rolled-back');
    expect(r.reason).toMatch(/cancelled/);
    expect(await whereIs('db1')).toEqual([{ host: A, state: 'running' }]);
    expect(fs.readdirSync(lab.runDir(B))).not.toContain('db1');
    expect((await lab.client.verifyVm('db1')).ok).toBe(true);
    const st = await lab.client.migrationStatus(id);
    expect(st.outcome).toBe('rolled-back');
  });

  it('a destination that refuses while the source is already connecting (parallel start): clean rollback, no activity left behind, the VM can move again', async () => {
    await lab.client.createVm({ name: 'late1', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '2MiB', fill: 0.5 });
    // The source connects at once and is held, waiting for a grant that never comes.
    const { id, r } = await moveArmed({ 'prepare-incoming': 'refuse' }, { type: 'live', vm: 'late1', to: B });
    expect(r.outcome).toBe('rolled-back');
    expect(r.reason).toMatch(/refused the incoming VM/);
    expect(await whereIs('late1')).toEqual([{ host: A, state: 'running' }]);
    expect(fs.readdirSync(lab.runDir(B))).not.toContain('late1');
    // Both halves of the parallel start ended before the workflow did: startOutgoing was
    // stopped (its connection attempt cancelled by the rollback), not left running.
    const events = (await lab.client.client.workflow.getHandle(id).fetchHistory()).events ?? [];
    const startId = events.find((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'startOutgoing')?.eventId?.toString();
    expect(startId).toBeDefined();
    const ended = events.find((e) => [e.activityTaskCompletedEventAttributes, e.activityTaskFailedEventAttributes].some((a) => a?.scheduledEventId?.toString() === startId));
    expect(ended?.activityTaskFailedEventAttributes?.failure?.message).toMatch(/rolled back (while connecting|before it started)/);
    // The VM is free to move: nothing of the cancelled attempt is left in its process.
    expect((await lab.client.vmSpec('late1'))?.migrationId).toBeUndefined();
    const again = await lab.client.startMigration({ type: 'live', vm: 'late1', to: B });
    expect((await lab.client.awaitMigration(again.id)).outcome).toBe('completed');
    expect((await lab.client.verifyVm('late1')).ok).toBe(true);
  });

  it('a memory digest mismatch found by the destination after the handoff: it never runs the VM; the rollback takes it back on the source, every page and write intact', async () => {
    // The source hands the VM over and sends GO without waiting for the destination's check
    // (one round trip less in the pause): the destination's own check is what stops it.
    await lab.client.createVm({ name: 'dig1', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '2MiB', writeRate: '256KiB', fill: 0.5 });
    const agentB = lab.status().hosts.find((h) => h.name === B)!.pid!;
    const { r } = await moveArmed({ 'destination-digest': 'mismatch' }, { type: 'live', vm: 'dig1', to: B });
    expect(r.outcome).toBe('rolled-back');
    expect(r.reason).toMatch(/digest mismatch at cutover.*fault injection/);
    expect(await whereIs('dig1')).toEqual([{ host: A, state: 'running' }]);
    // Taken back at a new epoch: past the handoff's (2), which the destination never claimed.
    expect((await lab.client.hostInfo(A)).vms.find((x) => x.name === 'dig1')?.epoch).toBe(3);
    expect(fs.readdirSync(lab.runDir(B))).not.toContain('dig1');
    expect(isAlive(agentB)).toBe(true);
    expect((await lab.client.verifyVm('dig1')).ok).toBe(true);
    // And it moves once the fault is gone.
    const again = await lab.client.startMigration({ type: 'live', vm: 'dig1', to: B });
    expect((await lab.client.awaitMigration(again.id)).outcome).toBe('completed');
    expect((await lab.client.verifyVm('dig1')).ok).toBe(true);
  });

  it('a receiver that does not say it checks the digest (an older VM process) is waited for: the mismatch stops the move before the handoff', async () => {
    await lab.client.createVm({ name: 'dig2', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '2MiB', fill: 0.5 });
    const { r } = await moveArmed({ 'destination-digest': 'legacy-mismatch' }, { type: 'live', vm: 'dig2', to: B });
    expect(r.outcome).toBe('rolled-back');
    expect(r.reason).toMatch(/digest mismatch at cutover: source \d+, destination \d+/);
    expect(await whereIs('dig2')).toEqual([{ host: A, state: 'running' }]);
    // Never handed over: still the epoch it booted with.
    expect((await lab.client.hostInfo(A)).vms.find((x) => x.name === 'dig2')?.epoch).toBe(1);
    expect(fs.readdirSync(lab.runDir(B))).not.toContain('dig2');
    expect((await lab.client.verifyVm('dig2')).ok).toBe(true);
  });

  it('the source agent killed while the cutover activity releases the source: the retry answers from its journal and finishes the release', async () => {
    await lab.client.createVm({ name: 'rel1', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '2MiB', fill: 0.5 });
    const agentA = lab.status().hosts.find((h) => h.name === A)!.pid!;
    fs.writeFileSync(faultsFile, JSON.stringify({ 'before-release-source': 'crash' }));
    let id = '';
    try {
      ({ id } = await lab.client.startMigration({ type: 'live', vm: 'rel1', to: B }));
      await waitUntil('source agent killed at the release', async () => !isAlive(agentA), 60_000, 20);
    } finally {
      fs.writeFileSync(faultsFile, '{}');
    }
    await lab.up(); // the supervisor brings it back
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(await whereIs('rel1')).toEqual([{ host: B, state: 'running' }]);
    expect(fs.readdirSync(lab.runDir(A))).not.toContain('rel1');
    expect((await lab.client.verifyVm('rel1')).ok).toBe(true);
    // One cutover (in the pre-copy round that converged), retried once; the retry found the VM
    // gone and answered from the journal with the first attempt's figures. No separate release
    // step was needed.
    const events = (await lab.client.client.workflow.getHandle(id).fetchHistory()).events ?? [];
    const scheduled = new Map(events.filter((e) => e.activityTaskScheduledEventAttributes).map((e) => [String(e.eventId), e.activityTaskScheduledEventAttributes!.activityType?.name]));
    const rounds = events.filter((e) => e.activityTaskStartedEventAttributes && scheduled.get(String(e.activityTaskStartedEventAttributes.scheduledEventId)) === 'awaitProgress');
    expect(rounds.at(-1)!.activityTaskStartedEventAttributes!.attempt).toBe(2);
    expect([...scheduled.values()]).not.toContain('cutover');
    expect([...scheduled.values()]).not.toContain('releaseSource');
    expect(r.cutover!.destinationDigest).toBe(r.cutover!.sourceDigest);
  });

  it('a cancel while the converged round cuts over (source paused): settled through the ownership records, the VM runs on the source alone, intact, and can move again', async () => {
    await lab.client.createVm({ name: 'cx1', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '2MiB', fill: 0.5 });
    const vm = (await lab.client.vmSpec('cx1'))!;
    fs.writeFileSync(faultsFile, JSON.stringify({ 'cutover-after-pause': 'delay:3000' }));
    let id = '';
    try {
      ({ id } = await lab.client.startMigration({ type: 'live', vm: 'cx1', to: B }));
      // Paused: the guest stops answering its probe (the cutover holds there for 3 s).
      await waitUntil('the round\'s cutover to pause the source', async () => !(await echoes(vm.spec.probe)), 30_000, 10);
      await lab.client.cancelMigration(id);
    } finally {
      fs.writeFileSync(faultsFile, '{}');
    }
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('rolled-back');
    expect(r.reason).toMatch(/cancelled/);
    expect(await whereIs('cx1')).toEqual([{ host: A, state: 'running' }]);
    expect((await lab.client.hostInfo(A)).vms.find((x) => x.name === 'cx1')?.epoch).toBe(1);
    expect(fs.readdirSync(lab.runDir(B))).not.toContain('cx1');
    expect((await lab.client.verifyVm('cx1')).ok).toBe(true);
    expect(await echoes(vm.spec.probe)).toBe(true);
    const again = await lab.client.startMigration({ type: 'live', vm: 'cx1', to: B });
    expect((await lab.client.awaitMigration(again.id)).outcome).toBe('completed');
    expect(await whereIs('cx1')).toEqual([{ host: B, state: 'running' }]);
  });

  it('the converged round fails after the destination took the VM (the release failed): the workflow goes forward on the ownership records and releases the source in its cleanup', async () => {
    await lab.client.createVm({ name: 'fw1', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '2MiB', fill: 0.5 });
    fs.writeFileSync(faultsFile, JSON.stringify({ 'before-release-source': 'fail' }));
    let id = '';
    try {
      ({ id } = await lab.client.startMigration({ type: 'live', vm: 'fw1', to: B }));
      await waitUntil('the forward decision', async () => (await lab.client.progress(id)).decisions.some((d) => d.action === 'forward'), 30_000, 10);
    } finally {
      fs.writeFileSync(faultsFile, '{}'); // the cleanup's retry then succeeds
    }
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.decisions.find((d) => d.action === 'forward')?.reason).toMatch(/release of fw1 failed \(fault injection\).*owns and runs the VM/);
    expect(await whereIs('fw1')).toEqual([{ host: B, state: 'running' }]);
    expect(fs.readdirSync(lab.runDir(A))).not.toContain('fw1');
    expect((await lab.client.verifyVm('fw1')).ok).toBe(true);
    const events = (await lab.client.client.workflow.getHandle(id).fetchHistory()).events ?? [];
    expect(events.flatMap((e) => e.activityTaskScheduledEventAttributes?.activityType?.name ?? [])).toContain('releaseSource');
  });

  it('losing the destination agent during pre-copy rolls back; the source guest never stops', async () => {
    await lab.client.createVm({ name: 'app1', host: A, memory: '64MiB', disk: '8MiB', dirtyRate: '8MiB', fill: 0.9 });
    const vm = (await lab.client.vmSpec('app1'))!;
    const probe = new Prober(vm.spec.probe, 10).start();
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'app1', to: B, policy: { maxBandwidth: 6 * 2 ** 20 } });
    await waitUntil('pages flowing', async () => (await lab.client.progress(id)).bytesTransferred > 0);
    await lab.killAgent(B);
    await sleep(500);
    await lab.up(); // the supervisor brings it back
    const r = await lab.client.awaitMigration(id);
    const stats = await probe.stop();
    expect(r.outcome).toBe('rolled-back');
    expect(r.reason).toMatch(/heartbeat|destination/i);
    expect(await whereIs('app1')).toEqual([{ host: A, state: 'running' }]);
    await waitUntil('destination cleaned', async () => !fs.readdirSync(lab.runDir(B)).includes('app1'));
    expect((await lab.client.verifyVm('app1')).ok).toBe(true);
    // The source kept answering throughout: at most a couple of probes lost to scheduling noise.
    expect(stats.maxConsecutiveLost).toBeLessThanOrEqual(3);
    expect(stats.received).toBeGreaterThan(stats.sent * 0.9);
  });

  it('refuses a second migration of the same VM, in the client and in the workflow', async () => {
    await lab.client.createVm({ name: 'solo', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '4MiB', fill: 0.9 });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'solo', to: B, policy: { maxBandwidth: 4 * 2 ** 20 } });
    await waitForPrecopy(id, 0);
    await expect(lab.client.startMigration({ type: 'live', vm: 'solo', to: B })).rejects.toThrow(/already migrating/);
    // Bypassing the client's check, the workflow's preflight refuses it.
    const second = (await lab.client.client.workflow.execute('liveMigration', {
      taskQueue: ORCHESTRATOR_TASK_QUEUE,
      workflowId: `live-solo-second-${Date.now()}`,
      args: [{ migrationId: `live-solo-second`, vm: 'solo', from: A, to: B }],
    })) as MigrationResult;
    expect(second.outcome).toBe('failed');
    expect(second.reason).toMatch(/already migrating|already exists/);
    await lab.client.cancelMigration(id);
    expect((await lab.client.awaitMigration(id)).outcome).toBe('rolled-back');
    expect(await whereIs('solo')).toEqual([{ host: A, state: 'running' }]);
  });

  it('rejects a live migration whose storage the destination does not share', async () => {
    await lab.client.createVm({ name: 'local1', host: A, memory: '16MiB', disk: '4MiB', storage: 'local' });
    // Refused synchronously (the admission update answers after the workflow's checks); the
    // attempt stays on record as a failed migration, and nothing moved.
    await expect(lab.client.startMigration({ type: 'live', vm: 'local1', to: B })).rejects.toThrow(/does not share; use a shared-nothing migration/);
    const attempt = (await lab.client.listMigrations()).find((m) => m.vm === 'local1')!;
    const r = await lab.client.awaitMigration(attempt.id);
    expect(r.outcome).toBe('failed');
    expect(r.reason).toMatch(/does not share; use a shared-nothing migration/);
    expect(await whereIs('local1')).toEqual([{ host: A, state: 'running' }]);
  });

  it('takes the source from the caller (no lookup) and checks it in the workflow; a workflow started with candidates finds the VM itself', async () => {
    await lab.client.createVm({ name: 'where1', host: A, memory: '16MiB', disk: '4MiB' });
    // Given by the caller: no lookup before the start; the workflow's checks refuse a wrong one.
    await expect(lab.client.startMigration({ type: 'live', vm: 'where1', from: A, to: A })).rejects.toThrow(/same host/);
    await expect(lab.client.startMigration({ type: 'live', vm: 'where1', from: B, to: A })).rejects.toThrow(/VM where1 is not on host/);
    const given = await lab.client.startMigration({ type: 'live', vm: 'where1', from: A, to: B });
    expect(given.from).toBe(A);
    expect((await lab.client.awaitMigration(given.id)).outcome).toBe('completed');
    // Started directly with candidates (no from): found in the workflow's first step, the
    // admission update answers with it, and SourceHost is set by the workflow.
    const direct = async (vm: string, to: string): Promise<{ id: string; admitted: Promise<{ from: string }> }> => {
      const id = `live-${vm}-direct-${Date.now()}`;
      const start = new WithStartWorkflowOperation('liveMigration', { taskQueue: ORCHESTRATOR_TASK_QUEUE, workflowId: id, workflowIdConflictPolicy: 'FAIL', args: [{ migrationId: id, vm, candidates: [A, B], to }] });
      const admitted = lab.client.client.workflow.executeUpdateWithStart<Workflow, { from: string }, []>('admission', { startWorkflowOperation: start });
      admitted.catch(() => undefined);
      return { id, admitted };
    };
    const back = await direct('where1', A);
    expect(await back.admitted).toMatchObject({ from: B });
    expect((await lab.client.awaitMigration(back.id)).outcome).toBe('completed');
    expect((await lab.client.migrationStatus(back.id)).from).toBe(B);
    const same = await direct('where1', A);
    await expect(same.admitted).rejects.toThrow();
    expect((await lab.client.awaitMigration(same.id)).reason).toBe(`VM where1 already runs on ${A}: source and destination are the same host`);
    const none = await direct('nowhere1', B);
    await expect(none.admitted).rejects.toThrow();
    expect((await lab.client.awaitMigration(none.id)).reason).toMatch(/^no VM named nowhere1 on hosts /);
    expect(await whereIs('where1')).toEqual([{ host: A, state: 'running' }]);
  });
});
