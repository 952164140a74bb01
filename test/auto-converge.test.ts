// Auto-converge on a real lab: a guest that dirties memory faster than a capped link is
// throttled step by step until the move converges, each step recorded with the measurements
// behind it; and the throttle ends with the migration, as QEMU lifts its CPU throttle: the
// guest runs at full speed on the destination after a move, and on the source after a rollback.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, waitUntil, type TestLab } from './helpers/lab.js';

const MiB = 2 ** 20;
let lab: TestLab;
let A: string;
let B: string;

/** The guest's throttle as its VM process last recorded it (state.json, written at resume and rollback). */
const throttleOf = (host: string, vm: string): number =>
  (JSON.parse(fs.readFileSync(path.join(lab.runDir(host), vm, 'state.json'), 'utf8')) as { device: { throttle: number } }).device.throttle;

beforeAll(async () => {
  lab = await startTestLab(['A', 'B']);
  [A, B] = lab.hosts as [string, string];
});

afterAll(async () => { await lab?.down(); });

// Dirtying at 3× the link: only throttling can make the dirty set fit the downtime limit.
const outrun = { memory: '32MiB', disk: '1MiB', dirtyRate: '48MiB', fill: 1 } as const;
const policy = { maxBandwidth: 16 * MiB, downtimeLimitMs: 40, convergenceTimeoutMsPerGiB: 60 * 60_000 };

describe('auto-converge', () => {
  it('throttles a guest that outruns the link until the move converges; the destination then runs it at full speed', async () => {
    await lab.client.createVm({ name: 'ac1', host: A, ...outrun });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'ac1', to: B, policy });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    const throttles = r.decisions.filter((d) => d.action.startsWith('throttle'));
    expect(throttles.length, JSON.stringify(r.decisions)).toBeGreaterThan(0);
    for (const d of throttles) expect(d.reason).toMatch(/dirty|MiB\/s/);
    expect(r.downtimeMs).toBeLessThanOrEqual(policy.downtimeLimitMs + 60); // the limit, with room for a busy 2-core CI box
    expect(throttleOf(B, 'ac1')).toBe(0);
    expect((await lab.client.verifyVm('ac1')).ok).toBe(true);
    await lab.client.destroyVm('ac1');
  });

  it('a move cancelled while the guest is throttled leaves it running on the source at full speed', async () => {
    await lab.client.createVm({ name: 'ac2', host: A, ...outrun });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'ac2', to: B, policy: { ...policy, maxRounds: 10_000 } });
    await waitUntil('a throttle step', async () => ((await lab.client.progress(id).catch(() => null))?.throttle ?? 0) > 0, 60_000, 200);
    await lab.client.cancelMigration(id);
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('rolled-back');
    expect(await lab.whereIs('ac2')).toEqual([{ host: A, state: 'running' }]);
    expect(throttleOf(A, 'ac2')).toBe(0);
    expect((await lab.client.verifyVm('ac2')).ok).toBe(true);
    await lab.client.destroyVm('ac2');
  });
});
