// The bench's quiet gate (bench/baselines.ts waitForQuiet) against real load: it must give up
// and say so while every core spins, so that a run measured on a busy machine is flagged.
import { spawn, type ChildProcess } from 'node:child_process';
import os from 'node:os';
import { afterEach, describe, expect, it } from 'vitest';
import { waitForQuiet } from '../bench/baselines.js';

const spinners: ChildProcess[] = [];
afterEach(() => {
  for (const c of spinners.splice(0)) c.kill('SIGKILL');
});

describe('bench quiet gate', () => {
  it('gives up (quiet: false) while every core is busy, and passes once the load is gone', async () => {
    for (let i = 0; i < os.cpus().length; i++) spinners.push(spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' }));
    await new Promise((r) => setTimeout(r, 300)); // the spinners are running
    const busy = await waitForQuiet({ maxWaitMs: 800 });
    expect(busy.quiet).toBe(false);
    expect(busy.waitedMs).toBeGreaterThanOrEqual(800);
    expect(busy.busyCores).toBeGreaterThan(0.5);

    for (const c of spinners.splice(0)) c.kill('SIGKILL');
    // Lenient threshold: this checks the gate, not how idle the CI machine is.
    const idle = await waitForQuiet({ busyCores: 1, maxWaitMs: 5000 });
    expect(idle.quiet).toBe(true);
  });
});
