// Two "machines" on one: network namespaces joined by veth pairs, for running host agents as if
// on separate hosts. Nothing here touches the real network:
//   root ns ── veth ── ns A         203.0.113.(8k+1)/30  ↔  203.0.113.(8k+2)/30   (control: Temporal)
//   root ns ── veth ── ns B         203.0.113.(8k+5)/30  ↔  203.0.113.(8k+6)/30   (control: Temporal)
//   ns A ───── veth ── ns B         198.51.100.(4k+1)/30 ↔  198.51.100.(4k+2)/30  (data plane)
// 203.0.113.0/24 and 198.51.100.0/24 are documentation ranges (TEST-NET-3, TEST-NET-2): the /30
// connected routes keep every packet on our own veths. The data-plane link exists only between
// the two namespaces. The root ns forwards nothing (ip_forward untouched): A and B see each other
// only over their own veth pair.
import fs from 'node:fs';
import net from 'node:net';
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';

function ip(args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function errText(e: unknown): string {
  const x = e as { stderr?: string | Buffer; message?: string };
  const s = x.stderr ? String(x.stderr).trim() : '';
  return s || x.message || String(e);
}

/** Why namespaces cannot be used here, or null when they can (probes: ip, root, netns, veth). */
export function netnsUnavailableReason(): string | null {
  if (process.platform !== 'linux') return `network namespaces need Linux (this is ${process.platform})`;
  try { ip(['-V']); } catch { return '`ip` (iproute2) is not installed: apt-get install -y iproute2'; }
  if (process.getuid && process.getuid() !== 0) return `\`ip netns add\` needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN); running as uid ${process.getuid()}`;
  const probe = `vmf-probe-${crypto.randomBytes(3).toString('hex')}`;
  try { ip(['netns', 'add', probe]); } catch (e) { return `\`ip netns add\` failed: ${errText(e)}`; }
  try {
    ip(['-n', probe, 'link', 'add', 'p0', 'type', 'veth', 'peer', 'name', 'p1']);
    ip(['-n', probe, 'link', 'set', 'lo', 'up']);
  } catch (e) {
    return `veth pairs cannot be created inside a network namespace: ${errText(e)}`;
  } finally {
    try { ip(['netns', 'del', probe]); } catch { /* best effort */ }
  }
  return null;
}

export interface NsHost {
  /** Namespace name (for `ip netns exec`). */
  ns: string;
  /** This namespace's end of the control link to the root namespace. */
  uplinkAddress: string;
  /** The root namespace's end of that link: where this "machine" reaches Temporal. */
  gatewayAddress: string;
  /** This namespace's end of the data-plane link to the other namespace. */
  dataAddress: string;
  /** Interface names inside the namespace. */
  uplinkDev: string;
  dataDev: string;
}

export interface NsPair {
  a: NsHost;
  b: NsHost;
  /** TX/RX byte counters of a device inside a namespace. */
  counters(host: NsHost, dev: string): { tx: number; rx: number };
  /** Which namespace a process lives in (per `ip netns identify`), '' for the root one. */
  identify(pid: number): string;
  destroy(): void;
}

function usedRootAddresses(): string {
  try { return ip(['-o', 'addr']) + ip(['route', 'show', 'table', 'all']); } catch { return ''; }
}

export function createNsPair(): NsPair {
  const tag = crypto.randomBytes(3).toString('hex');
  const used = usedRootAddresses();
  // A /30 pair of subnets in 203.0.113.0/24 that nothing on this machine uses yet (runs in
  // parallel pick different ones).
  const free = Array.from({ length: 32 }, (_, k) => k).filter((k) => ![1, 2, 5, 6].some((o) => used.includes(`203.0.113.${8 * k + o}`)) && !used.includes(`203.0.113.${8 * k}/`));
  if (free.length === 0) throw new Error('no free /30 left in 203.0.113.0/24 on this machine');
  const k = free[crypto.randomInt(free.length)]!;
  const d = crypto.randomInt(64);
  const nsA = `vmf-${tag}-a`;
  const nsB = `vmf-${tag}-b`;
  const rootA = `vmf${tag}a`;
  const rootB = `vmf${tag}b`;
  const a: NsHost = { ns: nsA, uplinkAddress: `203.0.113.${8 * k + 2}`, gatewayAddress: `203.0.113.${8 * k + 1}`, dataAddress: `198.51.100.${4 * d + 1}`, uplinkDev: 'up0', dataDev: 'dp0' };
  const b: NsHost = { ns: nsB, uplinkAddress: `203.0.113.${8 * k + 6}`, gatewayAddress: `203.0.113.${8 * k + 5}`, dataAddress: `198.51.100.${4 * d + 2}`, uplinkDev: 'up0', dataDev: 'dp0' };

  const destroy = (): void => {
    for (const n of [nsA, nsB]) { try { ip(['netns', 'del', n]); } catch { /* not there */ } }
    // Deleting a namespace deletes its veth ends and so their peers; if a process still holds
    // the namespace, remove the root-side ends by hand.
    for (const r of [rootA, rootB]) { try { ip(['link', 'del', r]); } catch { /* gone */ } }
  };
  try {
    ip(['netns', 'add', nsA]);
    ip(['netns', 'add', nsB]);
    for (const [h, root] of [[a, rootA], [b, rootB]] as const) {
      ip(['-n', h.ns, 'link', 'set', 'lo', 'up']);
      ip(['link', 'add', root, 'type', 'veth', 'peer', 'name', h.uplinkDev, 'netns', h.ns]);
      ip(['addr', 'add', `${h.gatewayAddress}/30`, 'dev', root]);
      ip(['link', 'set', root, 'up']);
      ip(['-n', h.ns, 'addr', 'add', `${h.uplinkAddress}/30`, 'dev', h.uplinkDev]);
      ip(['-n', h.ns, 'link', 'set', h.uplinkDev, 'up']);
    }
    // The data-plane link: created in A, its peer directly in B (same name in both: no clash,
    // each namespace has its own device names).
    ip(['-n', nsA, 'link', 'add', 'dptmp', 'type', 'veth', 'peer', 'name', b.dataDev, 'netns', nsB]);
    ip(['-n', nsA, 'link', 'set', 'dptmp', 'name', a.dataDev]);
    ip(['-n', nsA, 'addr', 'add', `${a.dataAddress}/30`, 'dev', a.dataDev]);
    ip(['-n', nsB, 'addr', 'add', `${b.dataAddress}/30`, 'dev', b.dataDev]);
    ip(['-n', nsA, 'link', 'set', a.dataDev, 'up']);
    ip(['-n', nsB, 'link', 'set', b.dataDev, 'up']);
  } catch (e) {
    destroy();
    throw new Error(`setting up network namespaces failed: ${errText(e)}`);
  }
  return {
    a,
    b,
    counters(h, dev) {
      const j = JSON.parse(ip(['-n', h.ns, '-j', '-s', 'link', 'show', 'dev', dev])) as Array<{ stats64: { tx: { bytes: number }; rx: { bytes: number } } }>;
      return { tx: j[0]!.stats64.tx.bytes, rx: j[0]!.stats64.rx.bytes };
    },
    identify(pid) {
      try { return ip(['netns', 'identify', String(pid)]).trim(); } catch { return ''; }
    },
    destroy,
  };
}

/**
 * A TCP relay: listens on `listen` (host, port 0 = any) and forwards each connection to
 * `target` ("host:port"). Lets agents in a namespace reach a server that listens on the root
 * namespace's loopback only, as a load balancer or NAT in front of Temporal would.
 */
export async function startTcpRelay(listenHosts: string[], target: string): Promise<{ addressOn(host: string): string; close(): Promise<void> }> {
  const i = target.lastIndexOf(':');
  const tHost = target.slice(0, i).replace(/^\[|\]$/g, '');
  const tPort = Number(target.slice(i + 1));
  const sockets = new Set<net.Socket>();
  const servers: net.Server[] = [];
  const ports = new Map<string, number>();
  for (const host of listenHosts) {
    const server = net.createServer((inbound) => {
      const outbound = net.connect(tPort, tHost);
      sockets.add(inbound).add(outbound);
      inbound.setNoDelay(true);
      outbound.setNoDelay(true);
      inbound.pipe(outbound).pipe(inbound);
      const done = (): void => { inbound.destroy(); outbound.destroy(); sockets.delete(inbound); sockets.delete(outbound); };
      inbound.on('error', done).on('close', done);
      outbound.on('error', done).on('close', done);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, host, () => { ports.set(host, (server.address() as net.AddressInfo).port); resolve(); });
    });
    servers.push(server);
  }
  return {
    addressOn(host) {
      const p = ports.get(host);
      if (!p) throw new Error(`the relay does not listen on ${host}`);
      return `${host}:${p}`;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    },
  };
}

/** Lines of a log file, or '' when absent. */
export function readLog(file: string): string {
  try { return fs.readFileSync(file, 'utf8'); } catch { return ''; }
}
