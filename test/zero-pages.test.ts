// Zero pages in the first pre-copy round (drivers/sim/vm-process.ts, sendOn's skipZero): they
// are skipped as the round reaches them, never sent, not even as markers; the destination's
// memory starts zeroed. A first round cut short (rounds end after 2 s) leaves every page it did
// not reach dirty, zero or not, for the next round. Two real VM processes and the data plane,
// driven as the agents drive them (bench/engine.ts); verify 'full' compares a CRC of all memory
// on both sides inside the pause.
import { describe, expect, it } from 'vitest';
import { runEngine } from '../bench/engine.js';

const MiB = 2 ** 20;

describe('zero pages', () => {
  it('a mostly-zero guest crosses in a fraction of its size, and arrives bit for bit', async () => {
    const r = await runEngine({ memoryBytes: 64 * MiB, fill: 0.1, dirtyRate: 0, policy: { verify: 'full' } });
    expect(r.outcome).toBe('completed');
    expect(r.cutover!.sourceFullCrc).toBe(r.cutover!.destinationFullCrc);
    // 10% data, plus frame headers and index entries of the data pages only.
    expect(r.bytesSent).toBeLessThan(0.12 * 64 * MiB);
    expect(r.bytesSent).toBeGreaterThan(0.1 * 64 * MiB * 0.95);
  }, 120_000);

  it('a first round cut short leaves the rest, zero pages included, to the next round', async () => {
    // Half data at 8 MiB/s: the first round ends after 2 s with most of memory not reached.
    const r = await runEngine({ memoryBytes: 64 * MiB, fill: 0.5, dirtyRate: 0, policy: { verify: 'full', maxBandwidth: 8 * MiB } });
    expect(r.outcome).toBe('completed');
    expect(r.samples[0]!.round).toBe(1);
    // Round 1 left pages dirty (what it did not reach, zero pages too): the sample says so.
    expect(r.samples[0]!.dirtyPages).toBeGreaterThan(4096);
    expect(r.rounds).toBeGreaterThanOrEqual(2);
    expect(r.cutover!.sourceFullCrc).toBe(r.cutover!.destinationFullCrc);
    // Data once (32 MiB), zero pages of later rounds as 8-byte index entries only.
    expect(r.bytesSent).toBeLessThan(0.55 * 64 * MiB);
  }, 120_000);
});
