// A new VM's files, for every driver: its directories, sparse disk files (never overwriting an
// existing one) and the ownership record that fences it (epoch 1, this host).
import fs from 'node:fs';
import type { VmSpec } from '../common/types.js';
import { writeOwner } from './sim/ownership.js';

export function createVmFiles(host: string, spec: VmSpec, paths: { dirs: string[]; diskPaths: Record<string, string>; ownerPath: string }): void {
  for (const d of paths.dirs) fs.mkdirSync(d, { recursive: true });
  for (const d of spec.disks) {
    const fd = fs.openSync(paths.diskPaths[d.id]!, 'wx');
    fs.ftruncateSync(fd, d.sizeBytes);
    fs.closeSync(fd);
  }
  writeOwner(paths.ownerPath, { host, epoch: 1, state: 'active' });
}
