// Guests on the host's reserved huge pages (host.json `hugepages`): the VM processes' memory
// really comes from the pool on both ends, and a migration between such hosts keeps every byte.
// Needs root to reserve a small pool for the run (restored after), as CI runs.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, waitUntil, type TestLab } from './helpers/lab.js';
import { withHugetlb } from '../drivers/sim/sim-driver.js';

const POOL_FILE = '/proc/sys/vm/nr_hugepages';
const EXTRA_PAGES = 160; // 320 MiB: two 64 MiB guests, spares and the rest of their large allocations
let previous = -1;
let lab: TestLab;
let A: string;
let B: string;

const hugetlbKiB = (pid: number): number => Number(/HugetlbPages:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
const vmPid = (host: string, vm: string): number => (JSON.parse(fs.readFileSync(path.join(lab.runDir(host), vm, 'state.json'), 'utf8')) as { pid: number }).pid;

beforeAll(async () => {
  if (process.getuid?.() !== 0) throw new Error('this suite reserves huge pages for its run: it needs root (as CI runs)');
  previous = Number(fs.readFileSync(POOL_FILE, 'utf8'));
  fs.writeFileSync(POOL_FILE, String(previous + EXTRA_PAGES));
  lab = await startTestLab(['A', 'B'], { plaintext: true, hugepages: true });
  [A, B] = lab.hosts as [string, string];
});

afterAll(async () => {
  await lab?.down();
  if (previous >= 0) fs.writeFileSync(POOL_FILE, String(previous));
});

describe('guest memory on huge pages', () => {
  it('GLIBC_TUNABLES gets glibc.malloc.hugetlb=2, other tunables kept', () => {
    expect(withHugetlb(undefined)).toBe('glibc.malloc.hugetlb=2');
    expect(withHugetlb('glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')).toBe('glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2');
  });

  it('source and destination guests take their memory from the pool; a live move keeps every page', async () => {
    await lab.client.createVm({ name: 'hp1', host: A, memory: '64MiB', disk: '4MiB', dirtyRate: '16MiB', fill: 0.9 });
    expect(hugetlbKiB(vmPid(A, 'hp1'))).toBeGreaterThanOrEqual(64 * 1024);
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'hp1', to: B, policy: { verify: 'full' } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
    expect(await lab.whereIs('hp1')).toEqual([{ host: B, state: 'running' }]);
    expect(hugetlbKiB(vmPid(B, 'hp1'))).toBeGreaterThanOrEqual(64 * 1024);
    expect((await lab.client.verifyVm('hp1')).ok).toBe(true);
    // The source's copy is gone.
    await waitUntil('source copy removed', async () => !fs.readdirSync(lab.runDir(A)).includes('hp1'));
  });
});
