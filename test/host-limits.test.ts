// The per-host limit on simultaneous migrations (host.json maxConcurrentMigrations): a move
// beyond it waits for a slot, visibly, and goes ahead when one frees up.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, sleep, type TestLab } from './helpers/lab.js';
import { eventMs } from '../common/temporal.js';

let lab: TestLab;
let A: string;
let B: string;

beforeAll(async () => {
  lab = await startTestLab(['A', 'B'], { maxConcurrentMigrations: 1 });
  [A, B] = lab.hosts as [string, string];
});
afterAll(async () => {
  await lab?.down();
});

async function closeMs(id: string): Promise<number> {
  return (await lab.client.client.workflow.getHandle(id).describe()).closeTime!.getTime();
}

/**
 * When both hosts had admitted the move: the later start of the successful attempts of
 * prepareIncoming (destination) and startOutgoing (source), how many attempts that took, and
 * when they were scheduled.
 */
async function admittedAtMs(id: string): Promise<{ at: number; attempts: number; scheduledAt: number }> {
  const events = (await lab.client.client.workflow.getHandle(id).fetchHistory()).events ?? [];
  let at = 0;
  let attempts = 0;
  let scheduledAt = Infinity;
  for (const name of ['prepareIncoming', 'startOutgoing']) {
    const scheduled = events.find((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === name)!;
    const started = events.find((e) => Number(e.activityTaskStartedEventAttributes?.scheduledEventId) === Number(scheduled.eventId))!;
    scheduledAt = Math.min(scheduledAt, eventMs(scheduled.eventTime));
    at = Math.max(at, eventMs(started.eventTime));
    attempts = Math.max(attempts, started.activityTaskStartedEventAttributes!.attempt ?? 1);
  }
  return { at, attempts, scheduledAt };
}

describe('per-host migration limit', () => {
  it('runs one migration at a time on a host with limit 1; the second waits (HostBusy) and then completes', async () => {
    for (const n of ['lim1', 'lim2']) await lab.client.createVm({ name: n, host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '1MiB', fill: 1 });
    // Capped streams: each pre-copy takes ~8 s, so the two would overlap without the limit.
    const policy = { maxBandwidth: 4 * 2 ** 20 };
    const m1 = await lab.client.startMigration({ type: 'live', vm: 'lim1', to: B, policy });
    const m2 = await lab.client.startMigration({ type: 'live', vm: 'lim2', to: B, policy });
    let maxMoving = 0;
    let sawWaiting = '';
    const moving = (p: string): boolean => p === 'precopy' || p === 'cutover';
    const done = Promise.all([lab.client.awaitMigration(m1.id), lab.client.awaitMigration(m2.id)]);
    let finished = false;
    void done.finally(() => { finished = true; });
    while (!finished) {
      const ps = await Promise.all([m1.id, m2.id].map((id) => lab.client.progress(id).catch(() => null)));
      maxMoving = Math.max(maxMoving, ps.filter((p) => p && moving(p.phase)).length);
      const waiting = ps.findIndex((p) => p?.phase === 'prepare-destination');
      if (waiting >= 0 && ps.some((p) => p && moving(p.phase)) && !/busy/.test(sawWaiting)) {
        // The operator sees why: a pending activity's last failure names the busy host (once
        // its first attempt has failed).
        const d = await lab.client.client.workflow.getHandle([m1.id, m2.id][waiting]!).describe();
        sawWaiting = d.raw.pendingActivities?.map((a) => a.lastFailure?.message ?? '').join(' ') ?? '';
      }
      await sleep(100);
    }
    const [r1, r2] = await done;
    expect([r1.outcome, r2.outcome]).toEqual(['completed', 'completed']);
    expect(maxMoving).toBe(1);
    expect(sawWaiting).toMatch(/busy: 1 migration\(s\) in flight .*limit 1/);
    for (const n of ['lim1', 'lim2']) expect((await lab.client.verifyVm(n)).ok).toBe(true);

    // The waiting move asks again every ~0.5 s (HostBusy's own retry delay), so it takes the
    // freed slot at once. The proxy's backoff alone (for a host that does not answer) would have
    // asked at 0.3, 0.9, 2.1, 4.5, 9.5 s...: fewer than one attempt a second over an ~8 s wait.
    const second = (await closeMs(m1.id)) <= (await closeMs(m2.id)) ? m2.id : m1.id;
    const admitted = await admittedAtMs(second);
    const waitedMs = admitted.at - admitted.scheduledAt;
    expect(waitedMs).toBeGreaterThan(3000); // it did wait
    expect(admitted.attempts).toBeGreaterThanOrEqual(waitedMs / 1000);
  });
});
