import fs from 'node:fs';
import net from 'node:net';

/** The kernel's range for ephemeral ports (`listen(0)` and every outgoing connection's local port). */
export function ephemeralRange(): [number, number] {
  try {
    const [lo, hi] = fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (Number.isInteger(lo) && Number.isInteger(hi) && lo > 0 && hi >= lo) return [lo, hi];
  } catch {
    // Not Linux: use Linux's default.
  }
  return [32768, 60999];
}

/**
 * Where freePort looks: ports the kernel never hands out on its own. A port from `listen(0)`
 * is ephemeral, so between our check and the server's own listen any process's outgoing
 * connection could take it as its local port (CI saw a host agent die with EADDRINUSE on
 * one). Outside the ephemeral range only an explicit bind can take it.
 */
export function freePortRange(): [number, number] | null {
  const [lo, hi] = ephemeralRange();
  // At least 1000 ports on either side, else nothing.
  if (lo > 11000) return [10000, lo - 1];
  if (hi < 64535) return [hi + 1, 65535];
  return null;
}

// Ports handed out by this process, so two calls in a row never return the same one before the
// first caller has bound it.
const handedOut = new Set<number>();

/** The port bound (then released), or the bind's error code. */
function tryBind(port: number, host: string): Promise<number | string> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
    s.listen({ port, host, exclusive: true }, () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

/**
 * A TCP port free on `host` right now (for servers that cannot report the port they picked),
 * drawn from `range` (default: below the ephemeral range; tests pass a small one).
 */
export async function freePort(host = '127.0.0.1', range = freePortRange()): Promise<number> {
  if (range) {
    for (let i = 0; i < 200; i++) {
      const port = range[0] + Math.floor(Math.random() * (range[1] - range[0] + 1));
      if (handedOut.has(port)) continue;
      const r = await tryBind(port, host);
      if (typeof r === 'number') {
        handedOut.add(r);
        return r;
      }
      if (r !== 'EADDRINUSE' && r !== 'EACCES') throw new Error(`no TCP port can be bound on ${host}: ${r}`);
    }
  }
  // No room outside the ephemeral range (or all of it taken): let the kernel choose.
  for (;;) {
    const r = await tryBind(0, host);
    if (typeof r !== 'number') throw new Error(`no TCP port can be bound on ${host}: ${r}`);
    if (!handedOut.has(r)) {
      handedOut.add(r);
      return r;
    }
  }
}
