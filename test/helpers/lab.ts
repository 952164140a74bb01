// A lab per test file, on the run's shared Temporal server, with host names of its own so
// nothing a previous file left on the server can reach this file's hosts.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { inject } from 'vitest';
import { labDown, labStatus, labUp, type LabStatus } from '../../lab/lab.js';
import { VmferryClient } from '../../client/index.js';
import { isAlive } from '../../drivers/sim/sim-driver.js';

export interface TestLab {
  dir: string;
  hosts: string[];
  client: VmferryClient;
  status(): LabStatus;
  /** Starts whatever is missing, as a supervisor would. */
  up(): Promise<LabStatus>;
  killAgent(host: string): Promise<void>;
  runDir(host: string): string;
  /** Where every copy of `vm` is: the VM must be on exactly one host, and nothing elsewhere. */
  whereIs(vm: string): Promise<Array<{ host: string; state: string }>>;
  down(): Promise<void>;
}

export async function startTestLab(names = ['A', 'B'], labOpts: { maxConcurrentMigrations?: number; plaintext?: boolean | string[]; hugepages?: boolean } = {}): Promise<TestLab> {
  process.env.TEMPORAL_ADDRESS = inject('temporalAddress');
  const tag = crypto.randomBytes(3).toString('hex');
  const hosts = names.map((n) => `h${n}-${tag}`);
  // plaintext: hosts without data-plane TLS (a trusted migration network): all, or those named.
  const plain = labOpts.plaintext === true ? names : labOpts.plaintext || [];
  const opts = { maxConcurrentMigrations: labOpts.maxConcurrentMigrations, plaintextHosts: hosts.filter((_, i) => plain.includes(names[i]!)), hugepageHosts: labOpts.hugepages ? hosts : undefined };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-lab-'));
  await labUp({ dir, hosts, ...opts });
  const client = await VmferryClient.connect({ labDir: dir });
  const lab: TestLab = {
    dir,
    hosts,
    client,
    status: () => labStatus(dir),
    up: () => labUp({ dir, hosts, ...opts }),
    async killAgent(host) {
      const h = labStatus(dir).hosts.find((x) => x.name === host)!;
      process.kill(h.pid!, 'SIGKILL');
      while (isAlive(h.pid!)) await new Promise((r) => setTimeout(r, 20));
    },
    runDir: (host) => path.join(dir, 'hosts', host, 'run'),
    whereIs: async (vm) => (await client.listVms()).filter((v) => v.name === vm).map((v) => ({ host: v.host, state: v.state })),
    async down() {
      await client.close().catch(() => undefined);
      await labDown(dir, { purge: true });
    },
  };
  return lab;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function waitUntil<T>(what: string, fn: () => Promise<T | undefined | null | false>, timeoutMs = 30_000, everyMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) { last = e; }
    await sleep(everyMs);
  }
  throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ''}`);
}
