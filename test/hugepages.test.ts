// Guests on the host's reserved huge pages (host.json `hugepages`): the VM processes' memory
// really comes from the pool on both ends, and a migration between such hosts keeps every byte.
// Needs root to reserve a small pool for the run (restored after), as CI runs.
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, waitUntil, type TestLab } from './helpers/lab.js';
import { withHugetlb } from '../drivers/sim/sim-driver.js';
import { AHEAD_PAGES } from '../drivers/sim/prefault.js';
import { TSX_LOADER } from '../common/tsx.js';

const POOL_FILE = '/proc/sys/vm/nr_hugepages';
const EXTRA_PAGES = 224; // 448 MiB: two 64 MiB guests, the prefault probe's 64 MiB, spares and the rest of their large allocations
let previous = -1;
let lab: TestLab;
let A: string;
let B: string;

const hugetlbKiB = (pid: number): number => Number(/HugetlbPages:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
const vmLog = (host: string, vm: string): string => fs.readFileSync(path.join(lab.runDir(host), vm, 'vm.log'), 'utf8');
const vmState = (host: string, vm: string): { pid: number; hugePages?: boolean } => JSON.parse(fs.readFileSync(path.join(lab.runDir(host), vm, 'state.json'), 'utf8')) as { pid: number; hugePages?: boolean };
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

  it('an incoming guest on huge pages is left to the receiver; on 4 KiB pages a window ahead is faulted in', () => {
    // drivers/sim/prefault.ts: the worker reads the mapping's page size from /proc/self/smaps.
    const probe = (env: NodeJS.ProcessEnv): { onHugePages: boolean; rssGrowthKiB: number; hugetlbGrowthKiB: number } => JSON.parse(execFileSync(process.execPath, ['--import', TSX_LOADER, fileURLToPath(new URL('./helpers/prefault-probe.ts', import.meta.url)), String(64 * 2 ** 20)], { env, encoding: 'utf8' })) as { onHugePages: boolean; rssGrowthKiB: number; hugetlbGrowthKiB: number };
    const { GLIBC_TUNABLES: _none, ...plainEnv } = process.env;
    const huge = probe({ ...plainEnv, GLIBC_TUNABLES: withHugetlb(undefined) });
    expect(huge.onHugePages).toBe(true);
    expect(huge.hugetlbGrowthKiB).toBeLessThan(8 * 1024); // the guest's 64 MiB untouched
    const small = probe(plainEnv);
    expect(small.onHugePages).toBe(false);
    expect(small.hugetlbGrowthKiB).toBe(0);
    expect(small.rssGrowthKiB).toBeGreaterThanOrEqual((AHEAD_PAGES * 4 - 2048)); // the window (32 MiB), from page 0
    expect(small.rssGrowthKiB).toBeLessThan(56 * 1024); // not the whole guest
  });

  it('source and destination guests take their memory from the pool; a live move keeps every page', async () => {
    await lab.client.createVm({ name: 'hp1', host: A, memory: '64MiB', disk: '4MiB', dirtyRate: '16MiB', fill: 0.9 });
    expect(hugetlbKiB(vmPid(A, 'hp1'))).toBeGreaterThanOrEqual(64 * 1024);
    expect(vmLog(A, 'hp1')).toContain('guest memory on reserved huge pages');
    expect(vmState(A, 'hp1').hugePages).toBe(true);
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'hp1', to: B, policy: { verify: 'full' } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
    expect(await lab.whereIs('hp1')).toEqual([{ host: B, state: 'running' }]);
    expect(hugetlbKiB(vmPid(B, 'hp1'))).toBeGreaterThanOrEqual(64 * 1024);
    await waitUntil('the destination reports its guest on huge pages', async () => vmState(B, 'hp1').hugePages === true);
    expect(vmLog(B, 'hp1')).toContain('guest memory on reserved huge pages');
    expect((await lab.client.listVms()).find((v) => v.name === 'hp1')).toMatchObject({ host: B, hugePages: true });
    expect((await lab.client.verifyVm('hp1')).ok).toBe(true);
    // The source's copy is gone.
    await waitUntil('source copy removed', async () => !fs.readdirSync(lab.runDir(A)).includes('hp1'));
  });

  it('a guest the pool cannot hold runs on 4 KiB pages, and says so (log, status)', async () => {
    // Larger than what the pool has free now: glibc falls back without a word; the VM reports it.
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
    await lab.client.createVm({ name: 'hp2', host: A, memory: (free + 32) * 2 * 2 ** 20, disk: '1MiB', dirtyRate: 0, writeRate: 0, fill: 0 });
    expect(vmState(A, 'hp2').hugePages).toBe(false);
    expect(vmLog(A, 'hp2')).toMatch(/guest memory on 4 KiB pages: this host asks for huge pages \(host\.json hugepages\), but its pool could not hold \d+ bytes/);
    expect(hugetlbKiB(vmPid(A, 'hp2'))).toBeLessThan((free + 32) * 2 * 1024);
    expect((await lab.client.listVms()).find((v) => v.name === 'hp2')).toMatchObject({ host: A, hugePages: false });
    await lab.client.destroyVm('hp2');
  });
});
