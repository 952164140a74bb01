import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { ephemeralRange, freePort, freePortRange } from '../common/ports.js';

function listen(port: number): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen({ port, host: '127.0.0.1', exclusive: true }, () => resolve(s));
  });
}

describe('freePort', () => {
  // First in the file: nothing has been handed out by this process yet.
  it('skips ports some socket already listens on', async () => {
    // A block of 10 ports below the ephemeral range, all free now; hold 9 of them.
    const [lo] = freePortRange()!;
    let base = lo + 5000;
    for (;;) {
      const probe = await Promise.all(Array.from({ length: 10 }, (_, i) => listen(base + i).catch(() => null)));
      const ok = probe.every((x) => x !== null);
      await Promise.all(probe.map((x) => x && new Promise((r) => x.close(r))));
      if (ok) break;
      base += 10;
    }
    const held = await Promise.all(Array.from({ length: 9 }, (_, i) => listen(base + i)));
    try {
      // 200 random draws from 10 ports: the free one is drawn (a miss: 0.9^200, ~7e-10).
      expect(await freePort('127.0.0.1', [base, base + 9])).toBe(base + 9);
    } finally {
      await Promise.all(held.map((x) => new Promise((r) => x.close(r))));
    }
  });

  it('hands out ports outside the kernel ephemeral range, each once, each bindable', async () => {
    const [lo, hi] = ephemeralRange();
    expect(freePortRange()).not.toBeNull();
    const ports: number[] = [];
    for (let i = 0; i < 40; i++) ports.push(await freePort());
    expect(new Set(ports).size).toBe(ports.length);
    for (const p of ports) expect(p < lo || p > hi).toBe(true);
    // Every one of them can be listened on, all at once.
    const servers = await Promise.all(ports.map(listen));
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  });

  it('names the address when nothing can be bound there', async () => {
    // 192.0.2.1 (TEST-NET-1) is on no interface of this machine: EADDRNOTAVAIL at once.
    await expect(freePort('192.0.2.1')).rejects.toThrow(/no TCP port can be bound on 192\.0\.2\.1: EADDRNOTAVAIL/);
  });
});
