// The incoming guest's prefaulter: a real worker thread faulting in real memory just ahead of
// the receiver, never changing a byte the receiver already wrote.
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { AHEAD_PAGES, Prefaulter } from '../drivers/sim/prefault.js';
import { waitUntil } from './helpers/lab.js';

const PAGE = 4096;
const rssMiB = (): number => Number(/VmRSS:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]) / 1024;

describe('prefaulter', () => {
  it('faults in a window ahead of the highest page received, keeps received data, follows the frontier, stops', async () => {
    const pages = AHEAD_PAGES * 4; // 128 MiB
    const mem = Buffer.from(new SharedArrayBuffer(pages * PAGE));
    // The receiver already wrote a page inside the first window.
    mem.fill(0xab, 100 * PAGE, 101 * PAGE);
    const base = rssMiB();
    const pf = new Prefaulter(mem);
    try {
      const window = (AHEAD_PAGES * PAGE) / 2 ** 20;
      await waitUntil('first window faulted in', async () => rssMiB() - base >= window * 0.9, 10_000, 20);
      await new Promise((r) => setTimeout(r, 200));
      // Not beyond it: memory that never arrives is not faulted in.
      expect(rssMiB() - base).toBeLessThan(window * 1.5);
      expect(mem.subarray(100 * PAGE, 101 * PAGE).equals(Buffer.alloc(PAGE, 0xab))).toBe(true);
      // The receiver moves on: the window follows.
      pf.advance(AHEAD_PAGES * 2);
      await waitUntil('window moved', async () => rssMiB() - base >= window * 1.9, 10_000, 20);
      // Nothing else was written: every other page still reads as zeroes.
      const zero = Buffer.alloc(PAGE);
      const changed: number[] = [];
      for (let p = 0; p < pages; p++) if (p !== 100 && !mem.subarray(p * PAGE, (p + 1) * PAGE).equals(zero)) changed.push(p);
      expect(changed).toEqual([]);
      expect(mem.subarray(100 * PAGE, 101 * PAGE).equals(Buffer.alloc(PAGE, 0xab))).toBe(true);
    } finally {
      pf.stop();
    }
    expect(() => new Prefaulter(Buffer.alloc(PAGE))).toThrow(/SharedArrayBuffer/);
  });
});
