// Live storage migration, shared-nothing migration and fencing: real files, real processes.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, waitUntil, sleep, type TestLab } from './helpers/lab.js';
import { TSX_LOADER } from '../common/tsx.js';
import type { VmRuntimeConfig } from '../drivers/sim/vm-process.js';

const root = path.resolve(fileURLToPath(new URL('..', import.meta.url)));
const MiB = 2 ** 20;
let lab: TestLab;
let A: string;
let B: string;
const mounts: string[] = [];

beforeAll(async () => {
  lab = await startTestLab();
  [A, B] = lab.hosts as [string, string];
});
afterAll(async () => {
  for (const m of mounts) { try { execFileSync('umount', [m]); } catch { /* gone */ } }
  await lab?.down();
});

const hostDir = (h: string, ...p: string[]): string => path.join(lab.dir, 'hosts', h, ...p);
const runtime = (h: string, vm: string): VmRuntimeConfig => JSON.parse(fs.readFileSync(hostDir(h, 'run', vm, 'vm.json'), 'utf8')) as VmRuntimeConfig;
const sha = (f: string): string => crypto.createHash('sha1').update(fs.readFileSync(f)).digest('hex');

const whereIs = (vm: string): Promise<Array<{ host: string; state: string }>> => lab.whereIs(vm);

describe('live storage migration', () => {
  it('moves two disks, each to its own place, while the guest writes; old files deleted after the switch', async () => {
    await lab.client.createVm({ name: 'st1', host: A, memory: '32MiB', disk: '24MiB', disks: 2, storage: 'local', writeRate: '4MiB', diskFill: 0.5 });
    const before = runtime(A, 'st1').diskPaths;
    const to0 = hostDir(A, 'local2', 'fast', 'st1');
    const to1 = hostDir(A, 'local', 'other', 'st1');
    const { id } = await lab.client.startMigration({ type: 'storage', vm: 'st1', disks: { disk0: to0, disk1: to1 }, maxBandwidth: 24 * MiB });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    const after = runtime(A, 'st1').diskPaths;
    expect(after).toEqual({ disk0: path.join(to0, 'disk0.img'), disk1: path.join(to1, 'disk1.img') });
    for (const p of Object.values(before)) expect(fs.existsSync(p)).toBe(false);
    expect(fs.existsSync(path.dirname(before.disk0!))).toBe(false);
    // Every acknowledged write, before and during the copy, is on the new files.
    const v = await lab.client.verifyVm('st1');
    expect(v.checks.filter((c) => !c.ok)).toEqual([]);
    expect(v.checks.find((c) => c.name === 'disk-disk1-ledger')!.detail).toContain(to1);
    const p = await lab.client.migrationStatus(id);
    expect(p.bytesTransferred).toBeGreaterThanOrEqual(48 * MiB);
  });

  it('cancel during the copy: the VM stays on its original files, no partial copy left', async () => {
    await lab.client.createVm({ name: 'st2', host: A, memory: '16MiB', disk: '64MiB', storage: 'local', writeRate: '2MiB', diskFill: 0.2 });
    const before = runtime(A, 'st2').diskPaths;
    const to = hostDir(A, 'local2', 'st2');
    const { id } = await lab.client.startMigration({ type: 'storage', vm: 'st2', toPath: to, maxBandwidth: 8 * MiB });
    await waitUntil('copy under way', async () => ((await lab.client.progress(id)).bytesCopied ?? 0) > 4 * MiB);
    await lab.client.cancelMigration(id);
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('rolled-back');
    expect(runtime(A, 'st2').diskPaths).toEqual(before);
    expect(fs.existsSync(path.join(to, 'disk0.img'))).toBe(false);
    expect((await lab.client.verifyVm('st2')).ok).toBe(true);
  });

  it('destination out of space (ENOSPC): clean rollback, the reason names the full path', async (ctx) => {
    const tiny = hostDir(A, 'local2', 'tiny');
    fs.mkdirSync(tiny, { recursive: true });
    try { execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', tiny]); } catch (e) {
      ctx.skip(`cannot mount a small tmpfs to provoke ENOSPC: ${(e as Error).message}`);
    }
    mounts.push(tiny);
    await lab.client.createVm({ name: 'st3', host: A, memory: '16MiB', disk: '16MiB', storage: 'local', writeRate: '1MiB', diskFill: 0.6 });
    const { id } = await lab.client.startMigration({ type: 'storage', vm: 'st3', toPath: path.join(tiny, 'st3') });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('rolled-back');
    expect(r.reason).toContain('ENOSPC');
    expect(r.reason).toContain(path.join(tiny, 'st3', 'disk0.img'));
    expect(fs.readdirSync(tiny).flatMap((d) => fs.readdirSync(path.join(tiny, d)))).toEqual([]);
    expect(await whereIs('st3')).toEqual([{ host: A, state: 'running' }]);
    expect((await lab.client.verifyVm('st3')).ok).toBe(true);
  });

  it('killing the agent that follows the copy: the retried activity picks up from the checkpoint', async () => {
    await lab.client.createVm({ name: 'st4', host: A, memory: '16MiB', disk: '48MiB', storage: 'local', writeRate: '1MiB', diskFill: 0.5 });
    const { id } = await lab.client.startMigration({ type: 'storage', vm: 'st4', toPath: hostDir(A, 'local2', 'st4'), maxBandwidth: 12 * MiB });
    await waitUntil('copy under way', async () => ((await lab.client.progress(id)).bytesCopied ?? 0) > 8 * MiB);
    await lab.killAgent(A);
    await sleep(300);
    await lab.up();
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    // The copy was not restarted: about one disk's worth copied, plus the mirrored writes.
    expect(r.bytesTransferred).toBeLessThan(48 * MiB * 1.25);
    expect(r.bytesTransferred).toBeGreaterThanOrEqual(48 * MiB);
    expect((await lab.client.verifyVm('st4')).ok).toBe(true);
  });

  it('refuses a destination outside the storage roots, before anything starts', async () => {
    await expect(lab.client.startMigration({ type: 'storage', vm: 'st1', toPath: '/tmp/elsewhere' })).rejects.toThrow(/not inside any storage root/);
    await expect(lab.client.startMigration({ type: 'storage', vm: 'st1', toPath: `${hostDir(A, 'local')}/../../../../etc` })).rejects.toThrow(/may not contain ".."/);
  });
});

describe('shared-nothing live migration', () => {
  it('mirrors two local disks to the destination, moves memory, leaves nothing on the source', async () => {
    await lab.client.createVm({ name: 'sn1', host: A, memory: '48MiB', disk: '16MiB', disks: 2, storage: 'local', dirtyRate: '8MiB', writeRate: '4MiB', diskFill: 0.5, fill: 0.7 });
    const srcDir = path.dirname(runtime(A, 'sn1').diskPaths.disk0!);
    const { id } = await lab.client.startMigration({ type: 'shared-nothing', vm: 'sn1', to: B, policy: { verify: 'full' } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
    expect(await whereIs('sn1')).toEqual([{ host: B, state: 'running' }]);
    expect(fs.existsSync(srcDir)).toBe(false);
    expect(fs.readdirSync(lab.runDir(A))).not.toContain('sn1');
    const dest = runtime(B, 'sn1');
    expect(dest.diskPaths.disk1!.startsWith(hostDir(B, 'local'))).toBe(true);
    // Every acknowledged write (including those mirrored during the move) is on B's disks.
    const v = await lab.client.verifyVm('sn1');
    expect(v.checks.filter((c) => !c.ok)).toEqual([]);
  });

  it('a broken mirror connection resumes from its checkpoint (destination agent killed mid-copy)', async () => {
    await lab.client.createVm({ name: 'sn2', host: A, memory: '16MiB', disk: '48MiB', storage: 'local', writeRate: '1MiB', diskFill: 1 });
    const { id } = await lab.client.startMigration({ type: 'shared-nothing', vm: 'sn2', to: B, policy: { maxBandwidth: 12 * MiB } });
    await waitUntil('copy half-way', async () => ((await lab.client.progress(id)).bytesCopied ?? 0) > 20 * MiB, 30_000, 50);
    await lab.killAgent(B);
    await sleep(300);
    await lab.up();
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.decisions.some((d) => d.action === 'reconnect')).toBe(true);
    // Far less than the whole disk went twice: the copy resumed where the target had confirmed.
    expect(r.bytesTransferred).toBeLessThan(48 * MiB * 1.5 + 16 * MiB /* memory */);
    const v = await lab.client.verifyVm('sn2');
    expect(v.checks.filter((c) => !c.ok)).toEqual([]);
    expect(v.host).toBe(B);
  });

  it('cancel during the mirror: VM stays on the source with its storage, destination copies deleted', async () => {
    await lab.client.createVm({ name: 'sn3', host: A, memory: '16MiB', disk: '64MiB', storage: 'local', writeRate: '1MiB', diskFill: 1 });
    const { id } = await lab.client.startMigration({ type: 'shared-nothing', vm: 'sn3', to: B, policy: { maxBandwidth: 8 * MiB } });
    await waitUntil('copy under way', async () => ((await lab.client.progress(id)).bytesCopied ?? 0) > 4 * MiB);
    await lab.client.cancelMigration(id);
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('rolled-back');
    expect(await whereIs('sn3')).toEqual([{ host: A, state: 'running' }]);
    expect(fs.existsSync(hostDir(B, 'local', 'vms', 'sn3'))).toBe(false);
    expect(fs.readdirSync(lab.runDir(B))).not.toContain('sn3');
    expect((await lab.client.verifyVm('sn3')).ok).toBe(true);
  });
});

describe('fencing', () => {
  it('a former owner cannot open the disk for writing after the handoff', async () => {
    // No guest writes after boot: any change to the disk would be the stale process's.
    await lab.client.createVm({ name: 'fx', host: A, memory: '16MiB', disk: '8MiB', writeRate: 0, diskFill: 0.3 });
    const stale = runtime(A, 'fx'); // epoch 1 on A, shared storage
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'fx', to: B });
    expect((await lab.client.awaitMigration(id)).outcome).toBe('completed');
    // The old source comes back with its old epoch (a zombie, a confused operator, …).
    const dir = fs.mkdtempSync(path.join(lab.dir, 'stale-'));
    // Unfenced, its boot would write the first 60% of the disk.
    fs.writeFileSync(path.join(dir, 'vm.json'), JSON.stringify({ ...stale, mode: 'boot', spec: { ...stale.spec, diskFill: 0.6 } }));
    const diskBefore = sha(stale.diskPaths.disk0!);
    const child = spawn(process.execPath, ['--import', TSX_LOADER, path.join(root, 'drivers', 'sim', 'vm-process.ts'), dir], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (c: Buffer) => { output += c.toString(); });
    const code = await new Promise<number | null>((r) => child.on('exit', r));
    expect(code).toBe(1);
    expect(output).toMatch(new RegExp(`fenced: ${A} holds epoch 1 but the storage is owned by ${B} at epoch 2`));
    // It wrote nothing to the disk the new owner uses, and the VM still verifies there.
    expect(sha(stale.diskPaths.disk0!)).toBe(diskBefore);
    const v = await lab.client.verifyVm('fx');
    expect(v.ok).toBe(true);
    expect(v.host).toBe(B);
  });
});
