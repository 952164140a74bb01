// Two host agents "on separate machines": each in a network namespace of its own, reaching
// Temporal over a routed link, and a live migration whose memory stream crosses the veth pair
// between the two namespaces. See docs/SCALE-OUT.md for the same set-up on real machines.
//
// Needs root and iproute2 (`ip netns`, veth); skips with the reason otherwise.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { spawn } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createNsPair, netnsUnavailableReason, readLog, startTcpRelay, type NsHost, type NsPair } from './helpers/netns.js';
import { sleep, waitUntil } from './helpers/lab.js';
import { labDown, labUp } from '../lab/lab.js';
import { PROJECT_ROOT } from '../lab/temporal-server.js';
import { TSX_LOADER } from '../common/tsx.js';
import { VmferryClient } from '../client/index.js';
import { isAlive } from '../drivers/sim/sim-driver.js';
import type { HostConfig } from '../common/host-config.js';

const unavailable = netnsUnavailableReason();
if (unavailable) console.warn(`[netns.test] skipped: ${unavailable}`);

const DATA_PLANE_PORT = 7390; // each namespace has its own port space: the same port on both

interface Agent { name: string; host: NsHost; configFile: string; config: HostConfig; logFile: string; pid: number }

let pair: NsPair | undefined;
let relay: Awaited<ReturnType<typeof startTcpRelay>> | undefined;
let dir: string;
let client: VmferryClient | undefined;
const agents: Agent[] = [];

async function stopPid(pid: number, graceMs: number): Promise<void> {
  if (!isAlive(pid)) return;
  try { process.kill(pid, 'SIGTERM'); } catch { return; }
  const deadline = Date.now() + graceMs;
  while (isAlive(pid) && Date.now() < deadline) await sleep(50);
  if (isAlive(pid)) { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }
}

/** Starts `ip netns exec <ns> node --import tsx worker/host-agent.ts host.json`, as on a real host. */
async function startAgent(name: string, host: NsHost, temporalAddress: string): Promise<Agent> {
  const home = path.join(dir, 'hosts', name);
  const config: HostConfig = {
    name,
    memoryCapacityBytes: 8 * 2 ** 30,
    storageRoots: [
      { name: 'shared', path: path.join(dir, 'shared'), shared: true },
      { name: 'local', path: path.join(home, 'local'), shared: false },
    ],
    runDir: path.join(home, 'run'),
    dataPlane: { host: host.dataAddress, port: DATA_PLANE_PORT },
    maxConcurrentMigrations: 2,
  };
  for (const r of config.storageRoots) fs.mkdirSync(r.path, { recursive: true });
  fs.mkdirSync(config.runDir, { recursive: true });
  const configFile = path.join(home, 'host.json');
  fs.writeFileSync(configFile, JSON.stringify(config, null, 2));
  const logFile = path.join(home, 'agent.log');
  const log = fs.openSync(logFile, 'a');
  // `ip netns exec` execs the command: the pid is the agent's own.
  const child = spawn('ip', ['netns', 'exec', host.ns, process.execPath, '--import', TSX_LOADER, path.join(PROJECT_ROOT, 'worker/host-agent.ts'), configFile], {
    detached: true,
    stdio: ['ignore', log, log],
    env: { ...process.env, TEMPORAL_ADDRESS: temporalAddress, TEMPORAL_NAMESPACE: process.env.TEMPORAL_NAMESPACE ?? 'default' },
  });
  fs.closeSync(log);
  child.unref();
  const agent: Agent = { name, host, configFile, config, logFile, pid: child.pid! };
  agents.push(agent);
  await waitUntil(`host agent ${name} in ${host.ns}`, async () => {
    if (!isAlive(agent.pid)) throw new Error(`agent exited: ${readLog(logFile).split('\n').slice(-8).join('\n')}`);
    return fs.existsSync(path.join(home, 'agent.json'));
  }, 90_000, 200).catch((e: Error) => { throw new Error(`${e.message}\n${readLog(logFile)}`); });
  return agent;
}

function vmPids(a: Agent): number[] {
  const out: number[] = [];
  try {
    for (const vm of fs.readdirSync(a.config.runDir)) {
      try { out.push((JSON.parse(fs.readFileSync(path.join(a.config.runDir, vm, 'state.json'), 'utf8')) as { pid: number }).pid); } catch { /* no state */ }
    }
  } catch { /* no run dir */ }
  return out;
}

describe.skipIf(!!unavailable)(`host agents in network namespaces${unavailable ? ` (skipped: ${unavailable})` : ''}`, () => {
  let A: Agent;
  let B: Agent;

  beforeAll(async () => {
    const serverAddress = inject('temporalAddress');
    process.env.TEMPORAL_ADDRESS = serverAddress;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-netns-'));
    pair = createNsPair();
    // The run's dev server listens on the root namespace's loopback; the namespaces reach it on
    // the root end of their uplink, through a relay (as through a load balancer).
    relay = await startTcpRelay([pair.a.gatewayAddress, pair.b.gatewayAddress], serverAddress);
    // The orchestrator "anywhere": here in the root namespace, on the server's own address.
    await labUp({ dir: path.join(dir, 'orchestrator'), hosts: [] });
    const tag = crypto.randomBytes(3).toString('hex');
    [A, B] = await Promise.all([
      startAgent(`nsA-${tag}`, pair.a, relay.addressOn(pair.a.gatewayAddress)),
      startAgent(`nsB-${tag}`, pair.b, relay.addressOn(pair.b.gatewayAddress)),
    ]);
    client = await VmferryClient.connect({ labDir: path.join(dir, 'orchestrator'), hosts: [A.name, B.name] });
  });

  afterAll(async () => {
    await client?.close().catch(() => undefined);
    const vms = agents.flatMap(vmPids);
    await Promise.all(agents.map((a) => stopPid(a.pid, 5000)));
    await Promise.all(vms.map((p) => stopPid(p, 2000)));
    if (dir) await labDown(path.join(dir, 'orchestrator'), { purge: true }).catch(() => undefined);
    await relay?.close();
    pair?.destroy();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('each agent lives in its namespace and serves its data plane on its veth address', () => {
    expect(pair!.identify(A.pid)).toBe(pair!.a.ns);
    expect(pair!.identify(B.pid)).toBe(pair!.b.ns);
    expect(readLog(A.logFile)).toContain(`data plane ${pair!.a.dataAddress}:${DATA_PLANE_PORT}`);
    expect(readLog(B.logFile)).toContain(`data plane ${pair!.b.dataAddress}:${DATA_PLANE_PORT}`);
    expect(readLog(A.logFile)).toContain(`on ${pair!.a.gatewayAddress}:`);
  });

  it('live-migrates a VM from A to B; the memory stream crosses the veth pair between the namespaces', async () => {
    const c = client!;
    await c.createVm({ name: 'nsweb1', host: A.name, memory: '64MiB', disk: '16MiB', dirtyRate: '8MiB', writeRate: '512KiB', fill: 0.6 });
    const [vmPidA] = vmPids(A);
    expect(pair!.identify(vmPidA!)).toBe(pair!.a.ns); // the VM process runs "on machine A"

    const before = { a: pair!.counters(pair!.a, pair!.a.dataDev), b: pair!.counters(pair!.b, pair!.b.dataDev) };
    const { id, from, to } = await c.startMigration({ type: 'live', vm: 'nsweb1', to: B.name, policy: { verify: 'full' } });
    expect([from, to]).toEqual([A.name, B.name]);
    const r = await c.awaitMigration(id);
    const after = { a: pair!.counters(pair!.a, pair!.a.dataDev), b: pair!.counters(pair!.b, pair!.b.dataDev) };

    expect(r.outcome, r.reason).toBe('completed');
    expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
    // At least everything the migration counted went A → B over dp0 (plus framing and TCP).
    const sentOverVeth = after.a.tx - before.a.tx;
    const receivedOverVeth = after.b.rx - before.b.rx;
    expect(r.bytesTransferred).toBeGreaterThan(0.5 * 64 * 2 ** 20 * 0.6);
    expect(sentOverVeth).toBeGreaterThanOrEqual(r.bytesTransferred);
    expect(receivedOverVeth).toBeGreaterThanOrEqual(r.bytesTransferred);
    console.log(`[netns.test] ${id}: ${r.bytesTransferred} bytes counted by the migration, ${sentOverVeth} bytes sent on ${pair!.a.ns}/${pair!.a.dataDev} (${pair!.a.dataAddress} → ${pair!.b.dataAddress}), ${r.rounds} rounds, downtime ${r.downtimeMs} ms`);

    const where = (await c.listVms()).filter((v) => v.name === 'nsweb1').map((v) => ({ host: v.host, state: v.state }));
    expect(where).toEqual([{ host: B.name, state: 'running' }]);
    const [vmPidB] = vmPids(B);
    expect(pair!.identify(vmPidB!)).toBe(pair!.b.ns);
    expect(fs.readdirSync(A.config.runDir)).toEqual([]);
    const v = await c.verifyVm('nsweb1');
    expect(v.checks.filter((x) => !x.ok)).toEqual([]);
    expect(v.ok).toBe(true);
  });
});
