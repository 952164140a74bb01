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

  it('never returns a port some socket is already listening on', async () => {
    const [lo] = freePortRange()!;
    // Occupy a block at the bottom of the range; the ports handed out must avoid all of them.
    const held = await Promise.all(Array.from({ length: 50 }, (_, i) => listen(lo + i).catch(() => null)));
    const heldPorts = new Set(held.filter((s): s is net.Server => s !== null).map((s) => (s.address() as net.AddressInfo).port));
    try {
      for (let i = 0; i < 100; i++) expect(heldPorts.has(await freePort())).toBe(false);
    } finally {
      await Promise.all(held.map((s) => s && new Promise((r) => s.close(r))));
    }
  });
});
