// A representative subset of the fault-injection matrix (every fault kind, every move):
// `npm run faults` runs the whole matrix. Each case injects a real fault into real processes
// and checks the invariants of "always a way back".
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FaultLab, representative, runCase } from '../faults/harness.js';

let lab: FaultLab;
beforeAll(async () => { lab = await FaultLab.start(); });
afterAll(async () => { await lab?.stop(); });

describe('always a way back, under injected faults', () => {
  it.each(representative().map((c) => [`${c.move} / ${c.point} / ${c.fault}`, c] as const))('%s', async (_name, c) => {
    const r = await runCase(lab, c);
    expect(r.error).toBeUndefined();
    expect(r.invariants).toEqual({ exactlyOneRunning: true, terminalOutcome: true, vmWhereOutcomeSays: true, ledgerVerifies: true, noOrphans: true });
    if (c.fault === 'lost-ack' || c.fault === 'kill-worker') expect(r.outcome).toBe('completed');
    if (c.fault === 'destination-refuses') expect(r.outcome).toBe('failed');
    if (['cancel', 'cut-dataplane', 'storage-full', 'digest-mismatch'].includes(c.fault)) expect(r.outcome).toBe('rolled-back');
    if (c.fault === 'digest-mismatch') expect(r.reason).toMatch(/digest mismatch/);
  }, 240_000);
});
