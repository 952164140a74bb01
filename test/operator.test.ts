// Operator features: host evacuation (child workflows, per-VM outcomes) and the cutover
// approval gate (a workflow update with a validator, or a deadline).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, waitUntil, type TestLab } from './helpers/lab.js';
import { ORCHESTRATOR_TASK_QUEUE } from '../common/names.js';
import { probeAddressFor } from '../client/index.js';
import type { VmSpec } from '../common/types.js';

let lab: TestLab;
let A: string;
let B: string;
let C: string;

beforeAll(async () => {
  lab = await startTestLab(['A', 'B', 'C']);
  [A, B, C] = lab.hosts as [string, string, string];
});
afterAll(async () => {
  await lab?.down();
});

describe('host evacuation', () => {
  it('moves every VM off a host; one that cannot move does not stop the others', async () => {
    await lab.client.createVm({ name: 'ev1', host: A, memory: '16MiB', disk: '4MiB' });
    await lab.client.createVm({ name: 'ev2', host: A, memory: '16MiB', disk: '4MiB' });
    await lab.client.createVm({ name: 'ev3', host: A, memory: '16MiB', disk: '8MiB', storage: 'local', diskFill: 0.5 });
    await lab.client.createVm({ name: 'ev4', host: A, memory: '16MiB', disk: '4MiB' });
    // A name clash on both destinations makes ev4 impossible to place: it must fail alone.
    for (const h of [B, C]) {
      const spec: VmSpec = { name: 'ev4', driver: 'sim', memoryBytes: 16 << 20, disks: [{ id: 'disk0', sizeBytes: 4 << 20, root: 'local' }], dirtyRate: 0, writeRate: 0, fill: 0, probe: probeAddressFor('ev4') };
      await lab.client.client.workflow.execute('hostRequest', { taskQueue: ORCHESTRATOR_TASK_QUEUE, workflowId: `clash-${h}-${Date.now()}`, args: [{ op: 'createVm', host: h, spec }] });
    }
    const { id } = await lab.client.evacuate(A, { to: [B, C], concurrency: 2 });
    const r = await lab.client.awaitEvacuation(id);
    const by = Object.fromEntries(r.items.map((i) => [i.vm, i]));
    expect(by.ev1!.state).toBe('completed');
    expect(by.ev2!.state).toBe('completed');
    expect(by.ev3).toMatchObject({ state: 'completed', type: 'shared-nothing' });
    expect(by.ev1!.type).toBe('live');
    expect(by.ev4!.state).not.toBe('completed');
    expect(by.ev4!.reason).toMatch(/already exists/);
    expect(r).toMatchObject({ completed: 3, failed: 1 });
    const vms = await lab.client.listVms();
    for (const n of ['ev1', 'ev2', 'ev3']) expect(vms.filter((v) => v.name === n).map((v) => v.host)).not.toContain(A);
    expect(vms.find((v) => v.name === 'ev4' && v.host === A)?.state).toBe('running');
    // Each move is a child workflow of its own, visible and filterable.
    for (const n of ['ev1', 'ev2', 'ev3']) {
      const child = await lab.client.migrationStatus(by[n]!.id!);
      expect(child.outcome).toBe('completed');
      expect(child.vm).toBe(n);
    }
    for (const n of ['ev1', 'ev3']) expect((await lab.client.verifyVm(n)).ok).toBe(true);
  });

  it('refuses bad evacuation requests', async () => {
    await expect(lab.client.evacuate('nowhere')).rejects.toThrow(/unknown host "nowhere"/);
    await expect(lab.client.evacuate(A, { to: [A] })).rejects.toThrow(/onto itself/);
    await expect(lab.client.evacuate(A, { concurrency: 0 })).rejects.toThrow(/concurrency/);
  });
});

describe('cutover approval gate', () => {
  it('waits for an approval (refused when nothing waits), then completes', async () => {
    await lab.client.createVm({ name: 'ap1', host: A, memory: '16MiB', disk: '4MiB', dirtyRate: '2MiB' });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'ap1', to: B, policy: { approveCutover: true } });
    await expect(lab.client.approveCutover(id, 'too-early')).rejects.toThrow(/nothing to approve/);
    await waitUntil('awaiting approval', async () => (await lab.client.progress(id)).phase === 'awaiting-approval');
    await new Promise((r) => setTimeout(r, 500));
    expect((await lab.client.migrationStatus(id)).outcome).toBe('running');
    await lab.client.approveCutover(id, 'alice');
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('completed');
    expect(r.decisions.some((d) => d.action === 'approved' && d.reason.includes('alice'))).toBe(true);
  });

  it('rolls back when nobody approves before the deadline', async () => {
    await lab.client.createVm({ name: 'ap2', host: A, memory: '16MiB', disk: '4MiB', dirtyRate: '2MiB' });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'ap2', to: B, policy: { approveCutover: true, approvalTimeoutMs: 2000 } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('rolled-back');
    expect(r.reason).toMatch(/not approved within 2 s/);
    expect((await lab.client.listVms()).filter((v) => v.name === 'ap2').map((v) => v.host)).toEqual([A]);
  });
});

describe('metrics and logs', () => {
  it('exports migration metrics on the Prometheus endpoint and logs phases with the migration id', async () => {
    const url = lab.status().worker.metricsUrl!;
    expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    await lab.client.createVm({ name: 'met1', host: A, memory: '16MiB', disk: '4MiB' });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'met1', to: B });
    expect((await lab.client.awaitMigration(id)).outcome).toBe('completed');
    const text = await waitUntil('metrics', async () => {
      const t = await (await fetch(url)).text();
      return /vmferry_migrations_total\{[^}]*outcome="completed"[^}]*type="live"[^}]*\} \d+/.test(t) ? t : null;
    });
    expect(text).toMatch(/vmferry_migration_downtime_bucket/);
    const fs = await import('node:fs');
    const lines = fs.readFileSync(`${lab.dir}/orchestrator.log`, 'utf8').split('\n').filter((l) => l.startsWith('{'));
    const mine = lines.map((l) => JSON.parse(l) as { migrationId?: string; msg: string; phase?: string }).filter((l) => l.migrationId === id);
    expect(mine.some((l) => l.msg === 'migration phase' && l.phase === 'cutover')).toBe(true);
    expect(mine.some((l) => l.msg === 'migration finished')).toBe(true);
  });
});

describe('plan', () => {
  it('checks and predicts without changing anything', async () => {
    await lab.client.createVm({ name: 'pl1', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '4MiB' });
    await lab.client.createVm({ name: 'pl2', host: A, memory: '16MiB', disk: '4MiB', storage: 'local' });
    const before = await lab.client.listMigrations();
    const p = await lab.client.plan({ type: 'live', vm: 'pl1', to: B });
    expect(p.ok).toBe(true);
    expect(p.checks.map((c) => c.name)).toEqual(expect.arrayContaining(['source', 'destination capacity', 'shared storage', 'convergence']));
    expect(p.measured.dirtyRateBytesPerSec).toBeGreaterThan(2 * 2 ** 20);
    expect(p.measured.dirtyRateBytesPerSec).toBeLessThan(16 * 2 ** 20);
    expect(p.predicted.totalMs).toBeGreaterThan(0);
    expect(p.predicted.downtimeMs).toBeLessThanOrEqual(300);
    const bad = await lab.client.plan({ type: 'live', vm: 'pl2', to: B });
    expect(bad.ok).toBe(false);
    expect(bad.checks.find((c) => c.name === 'shared storage')!.detail).toMatch(/use shared-nothing/);
    expect(await lab.client.listMigrations()).toEqual(before);
    expect((await lab.client.listVms()).filter((v) => v.name.startsWith('pl')).map((v) => v.host)).toEqual([A, A]);
  });
});

describe('workflow input validation', () => {
  it('a workflow started directly with bad input fails with a message naming the problem, and nothing moves', async () => {
    const bad = [
      ['liveMigration', { migrationId: 'x1', vm: '../etc', from: A, to: B }, /vm: names are letters/],
      ['liveMigration', { migrationId: 'x2', vm: 'ok1', from: A, to: A }, /same host/],
      ['liveMigration', { migrationId: 'x3', vm: 'ok1', from: A, to: B, policy: { downtimeLimitMs: -5 } }, /policy.downtimeLimitMs/],
      ['storageMigration', { migrationId: 'x4', vm: 'ok1', host: A, targets: { disk0: 'relative/dir' } }, /storage paths must be absolute/],
      ['evacuateHost', { host: A, to: [A] }, /onto itself/],
    ] as const;
    const before = await lab.client.listVms();
    for (const [wf, input, message] of bad) {
      const h = await lab.client.client.workflow.start(wf, { taskQueue: ORCHESTRATOR_TASK_QUEUE, workflowId: `bad-${wf}-${Math.random().toString(36).slice(2)}`, args: [input] });
      await expect(h.result()).rejects.toThrow();
      const err = await h.result().catch((e: { cause?: { message?: string } }) => e.cause?.message ?? '');
      expect(err).toMatch(message);
    }
    expect(await lab.client.listVms()).toEqual(before);
  });
});
