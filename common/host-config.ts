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
