// Storage moves of QEMU guests through the product path: CLI / client → Temporal workflows
// (storageMigration, sharedNothingMigration, unchanged) → host agents → driver router → QEMU
// driver (block jobs over QMP, NBD between the hosts). Real Temporal dev server (root vitest
// global setup), a lab of two agents, the test guest whose console prints
// `tick N mem=ok disk=ok` (its disk check re-reads what it wrote on whichever image it runs).
// At the shared-nothing switch-over a fault point holds the destination paused while the test
// compares both images with `qemu-img compare -U`.
// Skips when qemu-system-x86_64 / qemu-img are missing (scripts/qemu/install-qemu.sh), or when
// run without the Temporal global setup (test/qemu/vitest.config.ts).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFile, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { sleep, startTestLab, waitUntil, type TestLab } from '../helpers/lab.js';
import { readSerialTicks, isAlive } from '../../drivers/qemu/qemu-driver.js';
import { waitSerialTicks } from '../helpers/qemu.js';
import { TSX_LOADER } from '../../common/tsx.js';

const ROOT = path.resolve(fileURLToPath(new URL('../..', import.meta.url)));
const QEMU = process.env.VMFERRY_QEMU_BINARY ?? 'qemu-system-x86_64';
const haveQemu = spawnSync(QEMU, ['--version'], { encoding: 'utf8' }).status === 0 && spawnSync('qemu-img', ['--version']).status === 0;
let temporalAddress: string | undefined;
try { temporalAddress = inject('temporalAddress'); } catch { temporalAddress = undefined; }
if (!haveQemu) console.warn(`[qemu storage temporal tests] SKIPPED: ${QEMU} or qemu-img not found — run scripts/qemu/install-qemu.sh`);
else if (!temporalAddress) console.warn('[qemu storage temporal tests] SKIPPED: no Temporal server (run with the root config: npx vitest run test/qemu/)');

const MiB = 2 ** 20;

/** Random data past the guest's working set (it cycles the first 64 KiB): real bytes to copy. */
function fillImage(file: string, offset: number, bytes: number): void {
  const fd = fs.openSync(file, 'r+');
  try { fs.writeSync(fd, crypto.randomBytes(bytes), 0, bytes, offset); } finally { fs.closeSync(fd); }
}

/** Files a process has open (what QEMU really writes). */
function openFiles(pid: number): string[] {
  const dir = `/proc/${pid}/fd`;
  return fs.readdirSync(dir).map((f) => { try { return fs.readlinkSync(path.join(dir, f)); } catch { return ''; } }).filter(Boolean);
}

describe.skipIf(!haveQemu || !temporalAddress)('QEMU storage moves through Temporal workflows', { timeout: 240_000 }, () => {
  let lab: TestLab;
  let A: string;
  let B: string;
  let faults: string;

  beforeAll(async () => {
    // Agents read the fault file at the point (only when the variable is set at their start).
    faults = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-qemu-faults-')), 'faults.json');
    fs.writeFileSync(faults, '{}');
    process.env.VMFERRY_FAULTS_FILE = faults;
    try { lab = await startTestLab(); } finally { delete process.env.VMFERRY_FAULTS_FILE; }
    [A, B] = lab.hosts as [string, string];
  });
  afterAll(async () => {
    await lab?.down();
    if (faults) fs.rmSync(path.dirname(faults), { recursive: true, force: true });
  });

  const runDir = (host: string, vm: string): string => path.join(lab.runDir(host), vm);
  const serial = (host: string, vm: string): string => path.join(runDir(host, vm), 'serial.log');
  const vmJson = (host: string, vm: string): { pid: number; diskPaths: Record<string, string>; migratedTo?: unknown } => JSON.parse(fs.readFileSync(path.join(runDir(host, vm), 'vm.json'), 'utf8'));
  const localImage = (host: string, vm: string, root = 'local'): string => path.join(lab.dir, 'hosts', host, root, 'vms', vm, 'disk0.img');
  const waitTicks = (host: string, vm: string, atLeast: number, timeoutMs = 60_000): Promise<number> => waitSerialTicks(serial(host, vm), atLeast, timeoutMs);
  const whereIs = (vm: string): Promise<Array<{ host: string; state: string }>> => lab.whereIs(vm);
  function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    return new Promise((resolve) => {
      execFile(process.execPath, ['--import', TSX_LOADER, path.join(ROOT, 'cli', 'main.ts'), '--lab', lab.dir, ...args], { encoding: 'utf8', timeout: 180_000, env: { ...process.env, TEMPORAL_ADDRESS: temporalAddress } }, (err, stdout, stderr) => {
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
      });
    });
  }

  it('storage migration (CLI): completes, the guest keeps ticking mem=ok disk=ok on its new image, the old image is deleted', async () => {
    await lab.client.createVm({ name: 'qs1', host: A, memory: '128MiB', disk: '64MiB', storage: 'local', driver: 'qemu' });
    await waitTicks(A, 'qs1', 3);
    const oldImage = localImage(A, 'qs1');
    fillImage(oldImage, 1 * MiB, 16 * MiB);
    const toDir = path.join(lab.dir, 'hosts', A, 'local2', 'qs1-moved');
    const newImage = path.join(toDir, 'disk0.img');
    const pid = vmJson(A, 'qs1').pid;
    expect(openFiles(pid)).toContain(oldImage);

    const t0 = Date.now();
    const r = await cli('migrate', 'storage', 'qs1', '--to-path', toDir, '--wait', '--json');
    const out = JSON.parse(r.stdout) as { outcome: string; reason: string; bytesTransferred: number };
    console.log(`[qemu storage temporal tests] storage migration via CLI: ${Date.now() - t0} ms wall; ${out.outcome}: ${out.reason}; ${(out.bytesTransferred / MiB).toFixed(1)} MiB`);
    expect(r.code, r.stderr).toBe(0);
    expect(out.outcome, out.reason).toBe('completed');

    // The same QEMU process now writes the new image only; the old one is gone.
    expect(vmJson(A, 'qs1').pid).toBe(pid);
    expect(vmJson(A, 'qs1').diskPaths).toEqual({ disk0: newImage });
    await waitUntil('QEMU let go of the old image', async () => !openFiles(pid).includes(oldImage) && openFiles(pid).includes(newImage), 10_000);
    expect(fs.existsSync(oldImage)).toBe(false);
    expect(fs.existsSync(newImage)).toBe(true);
    const info = (await lab.client.listVms()).find((v) => v.name === 'qs1')!;
    expect(info).toMatchObject({ host: A, state: 'running', epoch: 2 });
    expect(info.migrationId).toBeUndefined();
    expect((await lab.client.vmSpec('qs1'))?.spec.disks[0]).toMatchObject({ root: 'local2', dir: toDir });

    const tick = readSerialTicks(serial(A, 'qs1')).ticks.at(-1)!;
    await waitTicks(A, 'qs1', tick + 4, 20_000);
    const log = readSerialTicks(serial(A, 'qs1'));
    expect(log.bad).toEqual([]);
    expect(log.boots).toBe(1);
    const v = await lab.client.verifyVm('qs1');
    expect(v.ok, JSON.stringify(v.checks)).toBe(true);
    await lab.client.destroyVm('qs1');
    expect(fs.existsSync(newImage)).toBe(false);
  });

  it('storage migration cancelled during the copy rolls back: the partial copy is deleted, the guest stays on its image', async () => {
    await lab.client.createVm({ name: 'qs4', host: A, memory: '128MiB', disk: '64MiB', storage: 'local', driver: 'qemu' });
    await waitTicks(A, 'qs4', 3);
    const image = localImage(A, 'qs4');
    fillImage(image, 1 * MiB, 32 * MiB);
    const toDir = path.join(lab.dir, 'hosts', A, 'local2', 'qs4-moved');
    const { id } = await lab.client.startMigration({ type: 'storage', vm: 'qs4', toPath: toDir, maxBandwidth: 4 * MiB });
    await waitUntil('the copy under way', async () => (await lab.client.progress(id)).phase === 'mirror' && fs.existsSync(path.join(toDir, 'disk0.img')), 30_000);
    await sleep(1000);
    await lab.client.cancelMigration(id);
    const r = await lab.client.awaitMigration(id);
    console.log(`[qemu storage temporal tests] storage migration cancelled: ${r.outcome}: ${r.reason}`);
    expect(r.outcome, r.reason).toBe('rolled-back');
    expect(fs.existsSync(path.join(toDir, 'disk0.img'))).toBe(false);
    expect(fs.existsSync(image)).toBe(true);
    expect(vmJson(A, 'qs4').diskPaths).toEqual({ disk0: image });
    const info = (await lab.client.listVms()).find((v) => v.name === 'qs4')!;
    expect(info).toMatchObject({ host: A, state: 'running', epoch: 1 });
    expect(info.migrationId).toBeUndefined();
    const tick = readSerialTicks(serial(A, 'qs4')).ticks.at(-1)!;
    await waitTicks(A, 'qs4', tick + 3, 20_000);
    expect(readSerialTicks(serial(A, 'qs4')).bad).toEqual([]);
    await lab.client.destroyVm('qs4');
  });

  it('shared-nothing A → B (CLI): identical disks at the switch-over (qemu-img compare), the destination continues the ticks, nothing left on A', async () => {
    await lab.client.createVm({ name: 'qs2', host: A, memory: '128MiB', disk: '64MiB', storage: 'local', driver: 'qemu' });
    await waitTicks(A, 'qs2', 3);
    const srcImage = localImage(A, 'qs2');
    const dstImage = localImage(B, 'qs2');
    fillImage(srcImage, 1 * MiB, 16 * MiB);
    fs.writeFileSync(faults, JSON.stringify({ 'destination-before-resume': 'hold' }));
    let released = false;
    try {
      const t0 = Date.now();
      const started = await cli('migrate', 'shared-nothing', 'qs2', '--to', B, '--json');
      expect(started.code, started.stderr).toBe(0);
      const { id } = JSON.parse(started.stdout) as { id: string };
      // The source finished (memory sent, mirror ended); the destination is held before its resume.
      await waitUntil('source handed over', async () => Boolean(vmJson(A, 'qs2').migratedTo), 120_000, 100);
      await sleep(1000); // the guest ticks every 200 ms: a destination that ran would show it
      expect(readSerialTicks(serial(B, 'qs2')).ticks, 'the destination must not run before the disks are complete').toEqual([]);
      const cmp = spawnSync('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', srcImage, dstImage], { encoding: 'utf8' });
      console.log(`[qemu storage temporal tests] at the switch-over (${Date.now() - t0} ms): qemu-img compare -U → exit ${cmp.status}: ${cmp.stdout.trim()}`);
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      expect(readSerialTicks(serial(B, 'qs2')).ticks).toEqual([]);
      // Held by the fault point: the source gave the VM away, the destination waits paused.
      expect((await lab.client.listVms()).filter((v) => v.name === 'qs2').map((v) => [v.host, v.state]).sort()).toEqual([[A, 'migrated'], [B, 'incoming']].sort());
      const lastSrc = readSerialTicks(serial(A, 'qs2')).ticks.at(-1)!;
      fs.writeFileSync(faults, '{}');
      released = true;

      const r = await lab.client.awaitMigration(id);
      console.log(`[qemu storage temporal tests] shared-nothing: ${Date.now() - t0} ms wall (${r.durationMs} ms in the workflow), downtime ${r.downtimeMs} ms (QEMU's figure), ${r.rounds} round(s); ${r.outcome}: ${r.reason}`);
      expect(r.outcome, r.reason).toBe('completed');
      expect(await whereIs('qs2')).toEqual([{ host: B, state: 'running' }]);
      expect(fs.existsSync(runDir(A, 'qs2'))).toBe(false);
      expect(fs.existsSync(path.dirname(srcImage))).toBe(false);
      expect(fs.existsSync(path.join(path.dirname(dstImage), '.migration'))).toBe(false);

      await waitTicks(B, 'qs2', lastSrc + 4, 30_000);
      const dst = readSerialTicks(serial(B, 'qs2'));
      expect(dst.boots, 'the destination must not have rebooted the guest').toBe(0);
      expect(dst.ticks[0]).toBeLessThanOrEqual(lastSrc + 1);
      for (let i = 1; i < dst.ticks.length; i++) expect(dst.ticks[i]).toBe(dst.ticks[i - 1]! + 1);
      expect(dst.bad).toEqual([]);
      const info = (await lab.client.listVms()).find((v) => v.name === 'qs2')!;
      expect(info).toMatchObject({ host: B, state: 'running', epoch: 2 });
      expect(info.migrationId).toBeUndefined();
      const v = await lab.client.verifyVm('qs2');
      expect(v.ok, JSON.stringify(v.checks)).toBe(true);
      await lab.client.destroyVm('qs2');
      expect(fs.existsSync(dstImage)).toBe(false);
    } finally {
      if (!released) fs.writeFileSync(faults, '{}');
    }
  });

  it('shared-nothing with the destination QEMU killed during the disk mirror rolls back: the source keeps ticking, nothing left on B', async () => {
    await lab.client.createVm({ name: 'qs3', host: A, memory: '128MiB', disk: '64MiB', storage: 'local', driver: 'qemu' });
    await waitTicks(A, 'qs3', 3);
    fillImage(localImage(A, 'qs3'), 1 * MiB, 48 * MiB);
    // A slow mirror (the policy's bandwidth caps it): still copying when the destination dies.
    const { id } = await lab.client.startMigration({ type: 'shared-nothing', vm: 'qs3', to: B, policy: { maxBandwidth: 4 * MiB } });
    const dstPid = await waitUntil('the destination QEMU of the mirror', async () => {
      const p = await lab.client.progress(id);
      if (p.phase !== 'mirror') return null;
      try { const pid = vmJson(B, 'qs3').pid; return pid && isAlive(pid) && fs.existsSync(localImage(B, 'qs3')) ? pid : null; } catch { return null; }
    }, 60_000);
    await sleep(1500); // some MiB mirrored, most still to copy (48 MiB at 4 MiB/s)
    expect((await lab.client.progress(id)).phase).toBe('mirror');
    const tickAtKill = readSerialTicks(serial(A, 'qs3')).ticks.at(-1)!;
    process.kill(dstPid, 'SIGKILL');
    const r = await lab.client.awaitMigration(id);
    console.log(`[qemu storage temporal tests] destination killed during the mirror: ${r.outcome}: ${r.reason}`);
    expect(r.outcome, r.reason).toBe('rolled-back');

    expect(await whereIs('qs3')).toEqual([{ host: A, state: 'running' }]);
    await waitUntil('destination runtime dir and images gone', async () => !fs.existsSync(runDir(B, 'qs3')) && !fs.existsSync(path.dirname(localImage(B, 'qs3'))), 30_000);
    expect(isAlive(dstPid)).toBe(false);
    await waitTicks(A, 'qs3', tickAtKill + 4, 20_000);
    const src = readSerialTicks(serial(A, 'qs3'));
    expect(src.bad).toEqual([]);
    expect(src.boots).toBe(1);
    const info = (await lab.client.listVms()).find((v) => v.name === 'qs3')!;
    expect(info.migrationId).toBeUndefined();
    expect((await lab.client.verifyVm('qs3')).ok).toBe(true);
    await lab.client.destroyVm('qs3');
  });
});
