// The local lab: a Temporal dev server (unless one is named by TEMPORAL_ADDRESS), the
// orchestrator worker, and one host agent per simulated host, each with its own storage roots
// and data-plane port. All state lives in one folder (.lab/ by default).
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import type { HostConfig } from '../common/host-config.js';
import { hostTaskQueue } from '../common/names.js';
import { PROJECT_ROOT, ensureSearchAttributes, freePort, portOpen, startDevServer } from './temporal-server.js';
import { isAlive } from '../drivers/sim/sim-driver.js';
import { ensureLabPki } from './pki.js';

import { TSX_LOADER as TSX, profilingFlags } from '../common/tsx.js';
export const DEFAULT_HOSTS = ['hostA', 'hostB'];
export const DEFAULT_HOST_MEMORY = 8 * 2 ** 30;

export interface LabState {
  dir: string;
  temporal: { address: string; uiUrl: string | null; pid: number | null; managed: boolean; namespace: string };
  worker: { pid: number | null; metricsUrl?: string };
  hosts: Array<{ name: string; pid: number | null; taskQueue: string; dataPlane: { host: string; port: number }; config: string }>;
}

export interface LabStatus {
  dir: string;
  temporal: LabState['temporal'] & { up: boolean };
  worker: { pid: number | null; up: boolean; metricsUrl?: string };
  hosts: Array<LabState['hosts'][number] & { up: boolean; vms: number }>;
}

export function labDir(dir?: string): string {
  return path.resolve(dir ?? process.env.VMFERRY_LAB ?? path.join(process.cwd(), '.lab'));
}

export function readLab(dir: string): LabState | null {
  try { return JSON.parse(fs.readFileSync(path.join(dir, 'lab.json'), 'utf8')) as LabState; } catch { return null; }
}

function writeLab(s: LabState): void {
  fs.mkdirSync(s.dir, { recursive: true });
  fs.writeFileSync(path.join(s.dir, 'lab.json'), JSON.stringify(s, null, 2));
}

const alive = (pid: number | null | undefined): boolean => !!pid && isAlive(pid);

function spawnNode(script: string, args: string[], logFile: string, env: Record<string, string>): number {
  const log = fs.openSync(logFile, 'a');
  const child = spawn(process.execPath, [...profilingFlags(), '--import', TSX, path.join(PROJECT_ROOT, script), ...args], {
    detached: true,
    stdio: ['ignore', log, log],
    env: { ...process.env, ...env },
  });
  fs.closeSync(log);
  child.unref();
  return child.pid!;
}

async function waitFor(what: string, check: () => boolean, pid: number, logFile: string, timeoutMs = 90_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (check()) return;
    if (!isAlive(pid)) throw new Error(`${what} exited while starting: ${fs.readFileSync(logFile, 'utf8').split('\n').slice(-8).join('\n')}`);
    await sleep(100);
  }
  throw new Error(`${what} did not become ready within ${timeoutMs / 1000} s; see ${logFile}`);
}

function hostConfigFor(dir: string, name: string, port: number, maxConcurrentMigrations = 2): HostConfig {
  const home = path.join(dir, 'hosts', name);
  return {
    name,
    memoryCapacityBytes: DEFAULT_HOST_MEMORY,
    storageRoots: [
      { name: 'shared', path: path.join(dir, 'shared'), shared: true },
      { name: 'local', path: path.join(home, 'local'), shared: false },
      { name: 'local2', path: path.join(home, 'local2'), shared: false },
    ],
    runDir: path.join(home, 'run'),
    dataPlane: { host: '127.0.0.1', port },
    maxConcurrentMigrations,
  };
}

export interface LabUpOptions {
  dir?: string;
  hosts?: string[];
  log?: (m: string) => void;
  /** Each host's limit on simultaneous migrations (default 2). */
  maxConcurrentMigrations?: number;
  /**
   * Hosts whose data plane is plaintext (no `tls` in host.json): a trusted migration network,
   * like Proxmox's `migration: type=insecure`. Pages are then read straight into guest memory
   * (no TLS record layer in between); both ends of a migration must be plaintext hosts.
   */
  plaintextHosts?: string[];
  /** Hosts whose guests use the reserved huge pages (host.json `hugepages`; see HostConfig). */
  hugepageHosts?: string[];
}

/** Starts whatever is missing; touches nothing that already runs. */
export async function labUp(opts: LabUpOptions = {}): Promise<LabStatus> {
  const dir = labDir(opts.dir);
  const say = opts.log ?? (() => undefined);
  fs.mkdirSync(dir, { recursive: true });
  const prev = readLab(dir);
  const hostNames = opts.hosts ?? prev?.hosts.map((h) => h.name) ?? DEFAULT_HOSTS;
  for (const h of hostNames) if (!/^[A-Za-z][A-Za-z0-9-]{0,31}$/.test(h)) throw new Error(`bad host name "${h}": letters, digits and dashes, starting with a letter`);
  const plain = new Set(opts.plaintextHosts ?? []);
  for (const h of plain) if (!hostNames.includes(h)) throw new Error(`plaintext host "${h}" is not one of the lab's hosts (${hostNames.join(', ')})`);
  const huge = new Set(opts.hugepageHosts ?? []);
  for (const h of huge) if (!hostNames.includes(h)) throw new Error(`huge-page host "${h}" is not one of the lab's hosts (${hostNames.join(', ')})`);

  let temporal: LabState['temporal'];
  const namespace = process.env.TEMPORAL_NAMESPACE ?? 'default';
  if (process.env.TEMPORAL_ADDRESS) {
    temporal = { address: process.env.TEMPORAL_ADDRESS, uiUrl: prev?.temporal.managed === false ? prev.temporal.uiUrl : null, pid: null, managed: false, namespace };
    await ensureSearchAttributes(temporal.address);
  } else if (prev?.temporal.managed && alive(prev.temporal.pid)) {
    temporal = prev.temporal;
  } else {
    say('starting Temporal dev server (SQLite in .lab/temporal.db, Web UI)…');
    // The usual ports when they are free (bookmarks keep working), any free ones otherwise.
    const port = (await portOpen(7233)) ? undefined : 7233;
    const uiPort = (await portOpen(8233)) ? undefined : 8233;
    const s = await startDevServer({ dbFile: path.join(dir, 'temporal.db'), logFile: path.join(dir, 'temporal.log'), port, uiPort });
    temporal = { address: s.address, uiUrl: s.uiUrl, pid: s.pid, managed: true, namespace };
  }
  const env = { TEMPORAL_ADDRESS: temporal.address, TEMPORAL_NAMESPACE: namespace };

  const state: LabState = { dir, temporal, worker: prev?.worker ?? { pid: null }, hosts: [] };
  writeLab(state);

  const pending: Array<Promise<void>> = [];
  if (!alive(state.worker.pid)) {
    say('starting orchestrator worker…');
    const logFile = path.join(dir, 'orchestrator.log');
    const start = fs.existsSync(logFile) ? fs.statSync(logFile).size : 0;
    const metrics = `127.0.0.1:${await freePort()}`;
    const pid = spawnNode('worker/orchestrator.ts', [], logFile, { ...env, VMFERRY_METRICS_ADDRESS: metrics });
    state.worker = { pid, metricsUrl: `http://${metrics}/metrics` };
    pending.push(waitFor('orchestrator worker', () => fs.readFileSync(logFile, 'utf8').slice(start).includes('[orchestrator] serving'), pid, logFile));
  }
  // Data-plane TLS: a lab CA and one certificate per host (lab/pki.ts), on unless a host is named plaintext.
  const pki = ensureLabPki(dir, hostNames.filter((h) => !plain.has(h) && !fs.existsSync(path.join(dir, 'hosts', h, 'host.json'))));
  for (const name of hostNames) {
    const home = path.join(dir, 'hosts', name);
    const configFile = path.join(home, 'host.json');
    let cfg: HostConfig;
    if (fs.existsSync(configFile)) {
      cfg = JSON.parse(fs.readFileSync(configFile, 'utf8')) as HostConfig;
      // An existing host.json is the operator's: a plaintext host stays plaintext on a later
      // `lab up` without --plaintext-hosts (only naming it again could add TLS, and does not).
    } else {
      cfg = { ...hostConfigFor(dir, name, await freePort(), opts.maxConcurrentMigrations), ...(plain.has(name) ? {} : { tls: pki[name] }), ...(huge.has(name) ? { hugepages: true } : {}) };
      fs.mkdirSync(home, { recursive: true });
      fs.writeFileSync(configFile, JSON.stringify(cfg, null, 2));
    }
    for (const r of cfg.storageRoots) fs.mkdirSync(r.path, { recursive: true });
    fs.mkdirSync(cfg.runDir, { recursive: true });
    const old = prev?.hosts.find((h) => h.name === name);
    let pid = old?.pid ?? null;
    if (!alive(pid)) {
      say(`starting host agent ${name}…`);
      const logFile = path.join(home, 'agent.log');
      const agentFile = path.join(home, 'agent.json');
      fs.rmSync(agentFile, { force: true });
      const p = spawnNode('worker/host-agent.ts', [configFile], logFile, env);
      pid = p;
      pending.push(waitFor(`host agent ${name}`, () => fs.existsSync(agentFile), p, logFile));
    }
    state.hosts.push({ name, pid, taskQueue: hostTaskQueue(name), dataPlane: cfg.dataPlane, config: configFile });
  }
  writeLab(state);
  await Promise.all(pending);
  return labStatus(dir);
}

export function labStatus(dirOpt?: string): LabStatus {
  const dir = labDir(dirOpt);
  const s = readLab(dir);
  if (!s) throw new Error(`no lab at ${dir}: run \`vmferry lab up\` first`);
  return {
    dir,
    temporal: { ...s.temporal, up: s.temporal.managed ? alive(s.temporal.pid) : true },
    worker: { pid: s.worker.pid, up: alive(s.worker.pid), metricsUrl: s.worker.metricsUrl },
    hosts: s.hosts.map((h) => {
      let vms = 0;
      try { vms = fs.readdirSync((JSON.parse(fs.readFileSync(h.config, 'utf8')) as HostConfig).runDir).length; } catch { /* none */ }
      return { ...h, up: alive(h.pid), vms };
    }),
  };
}

async function stopPid(pid: number | null | undefined, graceMs = 5000): Promise<void> {
  if (!alive(pid)) return;
  try { process.kill(pid!, 'SIGTERM'); } catch { return; }
  const deadline = Date.now() + graceMs;
  while (alive(pid) && Date.now() < deadline) await sleep(50);
  if (alive(pid)) { try { process.kill(pid!, 'SIGKILL'); } catch { /* gone */ } }
}

/** Stops everything: VM processes, agents, the worker, and the dev server if the lab started it. */
export async function labDown(dirOpt?: string, opts: { purge?: boolean } = {}): Promise<void> {
  const dir = labDir(dirOpt);
  const s = readLab(dir);
  if (!s) return;
  const vmPids: number[] = [];
  for (const h of s.hosts) {
    try {
      const runDir = (JSON.parse(fs.readFileSync(h.config, 'utf8')) as HostConfig).runDir;
      for (const vm of fs.readdirSync(runDir)) {
        try { vmPids.push((JSON.parse(fs.readFileSync(path.join(runDir, vm, 'state.json'), 'utf8')) as { pid: number }).pid); } catch { /* no state */ }
        // QEMU guests (drivers/qemu): their vm.json says kind 'qemu' and carries the QEMU pid.
        try {
          const q = JSON.parse(fs.readFileSync(path.join(runDir, vm, 'vm.json'), 'utf8')) as { kind?: string; pid?: number };
          if (q.kind === 'qemu' && q.pid && fs.readFileSync(`/proc/${q.pid}/cmdline`, 'latin1').includes('qemu')) vmPids.push(q.pid);
        } catch { /* no state */ }
      }
    } catch { /* host never started */ }
  }
  await Promise.all([...s.hosts.map((h) => stopPid(h.pid)), stopPid(s.worker.pid)]);
  await Promise.all(vmPids.map((p) => stopPid(p, 2000)));
  // Lab VMs do not outlive the lab: drop their runtime and storage so names can be reused.
  for (const h of s.hosts) {
    try {
      const cfg = JSON.parse(fs.readFileSync(h.config, 'utf8')) as HostConfig;
      fs.rmSync(cfg.runDir, { recursive: true, force: true });
      for (const r of cfg.storageRoots) fs.rmSync(path.join(r.path, 'vms'), { recursive: true, force: true });
    } catch { /* host never started */ }
  }
  if (s.temporal.managed) await stopPid(s.temporal.pid, 10_000);
  s.worker.pid = null;
  for (const h of s.hosts) h.pid = null;
  if (s.temporal.managed) s.temporal.pid = null;
  writeLab(s);
  if (opts.purge) fs.rmSync(dir, { recursive: true, force: true });
}
