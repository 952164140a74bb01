// A host's static configuration, written by `lab up` (or by an operator on a real host).
import fs from 'node:fs';
import path from 'node:path';
import type { StorageRoot } from './types.js';

export interface HostConfig {
  name: string;
  memoryCapacityBytes: number;
  storageRoots: StorageRoot[];
  /** Where this host keeps VM runtime state (control sockets, state files, logs). */
  runDir: string;
  dataPlane: { host: string; port: number };
  maxConcurrentMigrations: number;
  /**
   * Data-plane TLS (PEM files): the CA that signs every host's certificate, and this host's
   * certificate (CN = host name) and key. Absent: plaintext data plane (see docs/SECURITY.md).
   */
  tls?: { ca: string; cert: string; key: string };
  /**
   * Back guest memory with the host's reserved huge pages (`sysctl vm.nr_hugepages`), as KVM
   * hosts do for guests: a destination guest's memory then costs one fault per 2 MiB instead of
   * one per 4 KiB page, and pages come pre-zeroed from a pool the host already backs. Simulated
   * VMs get them through glibc (`GLIBC_TUNABLES=glibc.malloc.hugetlb=2`); when the pool is short
   * an allocation silently falls back to normal pages.
   */
  hugepages?: boolean;
}

export { hostTaskQueue, ORCHESTRATOR_TASK_QUEUE } from './names.js';

export function readHostConfig(file: string): HostConfig {
  const c = JSON.parse(fs.readFileSync(file, 'utf8')) as HostConfig;
  if (!c.name || !Array.isArray(c.storageRoots)) throw new Error(`${file}: not a host config (needs name and storageRoots)`);
  return c;
}

/** Resolves a VM's directory on a storage root; the name is validated elsewhere, this guards again. */
export function vmStorageDir(root: StorageRoot, vm: string): string {
  const dir = path.resolve(root.path, 'vms', vm);
  if (!dir.startsWith(path.resolve(root.path) + path.sep)) throw new Error(`VM name ${vm} escapes storage root ${root.name}`);
  return dir;
}

/**
 * Confines a directory to one of the host's storage roots: resolves "..", follows symlinks of
 * the part that exists, and refuses anything that ends up outside every root.
 */
export function resolveStorageDir(roots: StorageRoot[], dir: string): { root: StorageRoot; dir: string } {
  if (!path.isAbsolute(dir)) throw new Error(`storage path ${dir} must be absolute`);
  let probe = path.resolve(dir);
  const rest: string[] = [];
  // lstat, not exists: a dangling symlink is an existing entry (mkdir would follow it outside).
  while (!fs.lstatSync(probe, { throwIfNoEntry: false })) {
    rest.unshift(path.basename(probe));
    const up = path.dirname(probe);
    if (up === probe) break;
    probe = up;
  }
  let realProbe: string;
  try { realProbe = fs.realpathSync(probe); } catch (e) { throw new Error(`storage path ${dir}: ${probe} cannot be resolved (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}; a dangling symlink?)`); }
  const real = path.join(realProbe, ...rest);
  for (const r of roots) {
    let rootReal: string;
    try { rootReal = fs.realpathSync(r.path); } catch { continue; }
    if (real.startsWith(rootReal + path.sep)) return { root: r, dir: real };
  }
  throw new Error(`storage path ${dir} is not inside any storage root of this host (${roots.map((r) => `${r.name}: ${r.path}`).join(', ')})`);
}
