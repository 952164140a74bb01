// Fencing: the ownership record of a VM's storage. It lives beside the disks (on shared
// storage both hosts read the same file), carries an epoch that only moves forward, and is
// checked before a VM process opens its disks for writing or resumes. A former owner can
// therefore never write after a handoff, whatever the workflow or network does.
import fs from 'node:fs';
import path from 'node:path';

export interface OwnerRecord {
  host: string;
  epoch: number;
  /** 'handoff': the previous owner released the VM to `host`, which has not claimed it yet. */
  state: 'active' | 'handoff';
  from?: string;
  migrationId?: string;
  updatedAt: string;
}

export function readOwner(file: string): OwnerRecord | null {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as OwnerRecord;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}

export function writeOwner(file: string, rec: Omit<OwnerRecord, 'updatedAt'>): OwnerRecord {
  const full: OwnerRecord = { ...rec, updatedAt: new Date().toISOString() };
  const tmp = path.join(path.dirname(file), `.owner.${process.pid}.${Date.now()}.tmp`);
  fs.writeFileSync(tmp, JSON.stringify(full, null, 2));
  fs.renameSync(tmp, file);
  return full;
}

export class FencedError extends Error {
  constructor(host: string, epoch: number, owner: OwnerRecord | null) {
    super(
      owner
        ? `fenced: ${host} holds epoch ${epoch} but the storage is owned by ${owner.host} at epoch ${owner.epoch} (${owner.state})`
        : `fenced: no ownership record for ${host} epoch ${epoch}`,
    );
    this.name = 'FencedError';
  }
}

/** Throws unless `host` at `epoch` is the active owner. */
export function assertOwner(file: string, host: string, epoch: number): void {
  const o = readOwner(file);
  if (!o || o.host !== host || o.epoch !== epoch || o.state !== 'active') throw new FencedError(host, epoch, o);
}

/**
 * Compare-and-set under an exclusive lock file: the claim by a destination and a reclaim by
 * the source can race after a lost acknowledgement; exactly one of them wins.
 */
export function updateOwner(file: string, change: (cur: OwnerRecord | null) => Omit<OwnerRecord, 'updatedAt'>): OwnerRecord {
  const lock = file + '.lock';
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      fs.closeSync(fs.openSync(lock, 'wx'));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      try {
        // A holder that died leaves the lock behind; it is only ever held for microseconds.
        if (Date.now() - fs.statSync(lock).mtimeMs > 2000) fs.rmSync(lock, { force: true });
      } catch { /* raced with its removal */ }
      if (Date.now() > deadline) throw new Error(`ownership lock ${lock} stays held`);
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
    }
  }
  try {
    return writeOwner(file, change(readOwner(file)));
  } finally {
    fs.rmSync(lock, { force: true });
  }
}
