// Helpers of the QEMU driver's storage moves (drivers/qemu/qemu-driver.ts): block jobs over QMP,
// qemu-img, and the names QEMU is given. No state here: the driver records everything in the
// VM's vm.json, so a restarted agent finds its jobs again by their ids.
import crypto from 'node:crypto';
import { execFile } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpError, type QmpClient } from './qmp.js';

/** One entry of query-jobs. */
export interface QmpJob {
  id: string;
  type: string;
  status: string;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}

/** Job states in which a mirror is synchronised and keeps mirroring guest writes. */
export const READY_STATES = new Set(['ready', 'standby']);

/** Short stable tag of a migration id, for QEMU node and job names (at most 31 characters). */
export function migrationTag(migrationId: string): string {
  return crypto.createHash('sha1').update(migrationId).digest('hex').slice(0, 10);
}

/** Node and job names of one disk in one move: unique per migration and disk index. */
export function mirrorNames(migrationId: string, diskIndex: number): { node: string; job: string } {
  const t = migrationTag(migrationId);
  return { node: `vmf-t${t}-${diskIndex}`, job: `vmf-j${t}-${diskIndex}` };
}

/** NBD export of one disk of a shared-nothing move (both sides derive it from the grant token). */
export const nbdExportName = (token: string, diskId: string): string => `vmf-${token}-${diskId}`;

/** The -drive block backend of disk `id` (see QemuDriver.qemuArgs). */
export const driveName = (diskId: string): string => `drive-${diskId}`;

export async function queryJobs(q: QmpClient): Promise<QmpJob[]> {
  return q.execute<QmpJob[]>('query-jobs');
}

/** Runs a QMP command whose "already done" errors are fine (idempotent clean-up). */
export async function tolerate(q: QmpClient, command: string, args: Record<string, unknown>, ok: RegExp): Promise<boolean> {
  try {
    await q.execute(command, args);
    return true;
  } catch (e) {
    if (e instanceof QmpError && ok.test(e.desc)) return false;
    throw e;
  }
}

export async function namedNodes(q: QmpClient): Promise<Set<string>> {
  const nodes = await q.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
  return new Set(nodes.map((n) => n['node-name']));
}

/** File each -drive backend currently writes (after a mirror pivot: the new image). */
export async function driveFiles(q: QmpClient): Promise<Record<string, { file: string; node: string }>> {
  const blocks = await q.execute<Array<{ device: string; inserted?: { file: string; 'node-name': string } }>>('query-block');
  const out: Record<string, { file: string; node: string }> = {};
  for (const b of blocks) if (b.inserted) out[b.device] = { file: b.inserted.file, node: b.inserted['node-name'] };
  return out;
}

/**
 * Waits until every job in `ids` has concluded (auto-dismiss is off, so a concluded job stays
 * listed with its error) or is gone. Returns the last seen entry of each (undefined: gone).
 */
export async function waitJobsEnded(open: () => Promise<QmpJob[]>, ids: string[], timeoutMs: number, what: string): Promise<Record<string, QmpJob | undefined>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const jobs = await open();
    const seen: Record<string, QmpJob | undefined> = {};
    for (const id of ids) seen[id] = jobs.find((j) => j.id === id);
    if (ids.every((id) => !seen[id] || seen[id]!.status === 'concluded' || seen[id]!.status === 'null')) return seen;
    if (Date.now() > deadline) throw new Error(`${what}: jobs still ${ids.map((id) => `${id}=${seen[id]?.status}`).join(', ')} after ${timeoutMs} ms`);
    await sleep(30);
  }
}

/** `qemu-img create -f raw` (sparse), replacing what is there. */
export function createRawImage(qemuImg: string, file: string, sizeBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(qemuImg, ['create', '-q', '-f', 'raw', file, String(sizeBytes)], { timeout: 60_000 }, (err, _out, stderr) => {
      if (err) reject(new Error(`qemu-img create ${file}: ${stderr.trim() || err.message}`));
      else resolve();
    });
  });
}

export { freePort } from '../../common/ports.js';
