// Storage moves of real QEMU guests through the driver API directly (no Temporal): a live
// storage move on one host (blockdev-mirror + job-complete) and a shared-nothing move between
// two "hosts" on this machine (NBD export on the destination, mirror into it, memory migration,
// mirror ended at the pause, destination resumed by its driver). The guest's tick lines
// (`tick N mem=ok disk=ok`) check memory and disk content on whichever image it runs.
// Skips only when qemu-system-x86_64 is missing (scripts/qemu/install-qemu.sh installs it).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_POLICY, type VmSpec } from '../../common/types.js';
import type { HostConfig } from '../../common/host-config.js';
import { QemuDriver, isAlive, readSerialTicks } from '../../drivers/qemu/qemu-driver.js';
import { waitSerialTicks } from '../helpers/qemu.js';

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const QEMU = process.env.VMFERRY_QEMU_BINARY ?? 'qemu-system-x86_64';
const haveQemu = spawnSync(QEMU, ['--version'], { encoding: 'utf8' }).status === 0 && spawnSync('qemu-img', ['--version']).status === 0;
if (!haveQemu) console.warn(`[qemu storage tests] SKIPPED: ${QEMU} or qemu-img not found — run scripts/qemu/install-qemu.sh`);

const MiB = 2 ** 20;

function host(base: string, name: string): HostConfig {
  for (const r of ['local', 'local2']) fs.mkdirSync(path.join(base, name, r), { recursive: true });
  return {
    name,
    memoryCapacityBytes: 2 * 2 ** 30,
    storageRoots: [
      { name: 'local', path: path.join(base, name, 'local'), shared: false },
      { name: 'local2', path: path.join(base, name, 'local2'), shared: false },
    ],
    runDir: path.join(base, name, 'run'),
    dataPlane: { host: '127.0.0.1', port: 0 },
    maxConcurrentMigrations: 2,
  };
}

function spec(name: string): VmSpec {
  return {
    name, driver: 'qemu', memoryBytes: 128 * MiB, disks: [{ id: 'root', sizeBytes: 64 * MiB, root: 'local' }, { id: 'data', sizeBytes: 16 * MiB, root: 'local' }],
    dirtyRate: 0, writeRate: 0, fill: 0, probe: { address: '127.0.0.1', port: 0 },
  };
}

const waitTicks = waitSerialTicks;

/** Random data past the guest's working set (it cycles the first 64 KiB): real bytes to copy. */
export function fillImage(file: string, offset: number, bytes: number): void {
  const fd = fs.openSync(file, 'r+');
  try { fs.writeSync(fd, crypto.randomBytes(bytes), 0, bytes, offset); } finally { fs.closeSync(fd); }
}

function sameRange(a: string, b: string, offset: number, bytes: number): boolean {
  const read = (f: string): Buffer => { const buf = Buffer.alloc(bytes); const fd = fs.openSync(f, 'r'); try { fs.readSync(fd, buf, 0, bytes, offset); } finally { fs.closeSync(fd); } return buf; };
  return read(a).equals(read(b));
}

describe.skipIf(!haveQemu)('QEMU driver: storage moves', { timeout: 180_000 }, () => {
  let base: string;
  let h1: QemuDriver;
  let h2: QemuDriver;

  beforeAll(() => {
    const r = spawnSync('bash', [path.join(REPO, 'scripts/qemu/build-guest.sh')], { encoding: 'utf8', timeout: 600_000 });
    if (r.status !== 0) throw new Error(`build-guest.sh failed:\n${r.stderr}`);
    base = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-qemu-st-'));
    h1 = new QemuDriver(host(base, 'h1'));
    h2 = new QemuDriver(host(base, 'h2'));
  });
  afterAll(async () => {
    for (const d of [h1, h2]) {
      if (!d) continue;
      for (const vm of await d.list().catch(() => [])) await d.destroy(vm.name, { deleteStorage: true }).catch(() => undefined);
    }
    if (base) fs.rmSync(base, { recursive: true, force: true });
  });

  it('live storage move on one host: mirror, switch, old file deleted, guest keeps ticking ok', async () => {
    const s = spec('st1');
    await h1.create(s);
    const log = h1.serialLog(s.name);
    await waitTicks(log, 3, 60_000);
    const oldFile = path.join(base, 'h1', 'local', 'vms', 'st1', 'root.img');
    fillImage(oldFile, 1 * MiB, 8 * MiB);
    const toDir = path.join(base, 'h1', 'local2', 'moved');
    const t0 = Date.now();
    const dataDir = path.join(base, 'h1', 'local2', 'data');
    const targets = { root: toDir, data: dataDir };
    fillImage(path.join(base, 'h1', 'local', 'vms', 'st1', 'data.img'), 0, 4 * MiB);
    let st = await h1.startLocalDiskMirror(s.name, 'sm1', targets);
    expect(['copying', 'synced']).toContain(st.state);
    // Idempotent start (a retried activity).
    await h1.startLocalDiskMirror(s.name, 'sm1', targets);
    expect((await h1.get(s.name))?.migrationId).toBe('sm1');
    while (st.state === 'copying') { await sleep(100); st = await h1.diskMirrorStatus(s.name, 'sm1'); }
    expect(st.state, st.error).toBe('synced');
    const newFile = path.join(toDir, 'root.img');
    expect(sameRange(oldFile, newFile, 1 * MiB, 8 * MiB)).toBe(true);
    const sw = await h1.switchDisks(s.name, 'sm1', targets);
    console.log(`[qemu storage tests] local move synced+switched in ${Date.now() - t0} ms`);
    expect(sw.newPaths).toEqual([newFile, path.join(dataDir, 'data.img')]);
    expect(sameRange(path.join(base, 'h1', 'local', 'vms', 'st1', 'data.img'), path.join(dataDir, 'data.img'), 0, 16 * MiB)).toBe(true);
    expect(sw.oldPaths).toContain(oldFile);
    expect(sw.epoch).toBe(2);
    expect(await h1.switchDisks(s.name, 'sm1', targets)).toEqual(sw); // retried: same answer
    expect(await h1.abortDiskMirror(s.name, 'sm1')).toEqual({ aborted: true }); // late compensation: keeps the files
    expect(fs.existsSync(newFile)).toBe(true);
    const tick = readSerialTicks(log).ticks.at(-1)!;
    expect((await h1.deleteOldDiskFiles(s.name, [...sw.oldPaths, newFile])).deleted).toEqual(sw.oldPaths);
    expect(fs.existsSync(oldFile)).toBe(false);
    expect(fs.existsSync(newFile)).toBe(true);
    await waitTicks(log, tick + 4, 20_000);
    const after = readSerialTicks(log);
    expect(after.bad).toEqual([]);
    const info = await h1.get(s.name);
    expect(info).toMatchObject({ state: 'running', epoch: 2 });
    expect(info?.migrationId).toBeUndefined();
    expect(info?.spec.disks[0]).toMatchObject({ root: 'local2', dir: toDir });
    expect((await h1.verify(s.name)).ok).toBe(true);

    // A second move, then an aborted one: the partial copy goes, the VM stays where it was.
    const back = path.join(base, 'h1', 'local', 'back');
    await h1.startLocalDiskMirror(s.name, 'sm2', { root: back, data: back });
    expect(await h1.abortDiskMirror(s.name, 'sm2', { root: back, data: back })).toEqual({ aborted: true });
    expect(fs.existsSync(back)).toBe(false);
    expect(fs.existsSync(newFile)).toBe(true);
    expect((await h1.get(s.name))?.migrationId).toBeUndefined();
    await waitTicks(log, (readSerialTicks(log).ticks.at(-1) ?? 0) + 2, 20_000);
    expect(readSerialTicks(log).bad).toEqual([]);
    await h1.destroy(s.name, { deleteStorage: true });
    expect(fs.existsSync(newFile)).toBe(false);
  });

  it('shared-nothing between two hosts: NBD mirror, memory, identical disks at the switch-over, destination continues', async () => {
    const s = spec('sn1');
    await h1.create(s);
    const srcLog = h1.serialLog(s.name);
    await waitTicks(srcLog, 3, 60_000);
    const srcFile = path.join(base, 'h1', 'local', 'vms', 'sn1', 'root.img');
    fillImage(srcFile, 2 * MiB, 8 * MiB);
    fillImage(path.join(path.dirname(srcFile), 'data.img'), 0, 8 * MiB);
    const grant = await h2.prepareDiskTargets(s, 'sn-m1', 'h1', 2);
    expect(grant.endpoint.port).toBeGreaterThan(0);
    expect(await h2.prepareDiskTargets(s, 'sn-m1', 'h1', 2)).toEqual(grant); // retry
    const dstFile = grant.paths.root!;
    expect(dstFile).toBe(path.join(base, 'h2', 'local', 'vms', 'sn1', 'root.img'));
    let st = await h1.startDiskMirror(s.name, 'sn-m1', { kind: 'remote', endpoint: grant.endpoint, token: grant.token, hello: { migrationId: 'sn-m1', vm: s.name, from: 'h1' } });
    while (st.state === 'copying') { await sleep(100); st = await h1.diskMirrorStatus(s.name, 'sn-m1'); }
    expect(st.state, st.error).toBe('synced');
    const target = await h2.prepareIncoming(grant.spec, 'sn-m1', 'h1');
    const dstPid = (await h2.get(s.name))!.pid;
    expect(await h2.prepareIncoming(grant.spec, 'sn-m1', 'h1')).toEqual(target);
    expect((await h2.get(s.name))!.pid).toBe(dstPid); // the same incoming QEMU
    await h1.startOutgoing(s.name, 'sn-m1', target, { ...DEFAULT_POLICY });
    let round = 0;
    for (;;) {
      const p = await h1.outgoingProgress(s.name, 'sn-m1', round, 2000);
      expect(p.state, p.error).toBe('precopy');
      round = p.round;
      if (p.round >= 1 && p.expectedDowntimeMs <= 300) break;
    }
    const cut = await h1.cutover(s.name, 'sn-m1', 'h2', 'digest');
    expect(cut.epoch).toBe(2);
    // Source done, destination not resumed yet (nobody asked its driver): the disks are identical.
    expect(readSerialTicks(h2.serialLog(s.name)).ticks).toEqual([]);
    for (const [a, b] of [[srcFile, dstFile], [path.join(path.dirname(srcFile), 'data.img'), grant.paths.data!]] as const) {
      const cmp = spawnSync('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', a, b], { encoding: 'utf8' });
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
    }
    const inc = await h2.incomingStatus(s.name, 'sn-m1');
    expect(inc.state).toBe('running');
    const lastSrc = readSerialTicks(srcLog).ticks.at(-1)!;
    const dstLog = h2.serialLog(s.name);
    await waitTicks(dstLog, lastSrc + 4, 30_000);
    const dst = readSerialTicks(dstLog);
    expect(dst.bad).toEqual([]);
    expect(dst.boots).toBe(0);
    expect(dst.ticks[0]).toBeLessThanOrEqual(lastSrc + 1);
    await h2.adoptDiskTargets(s.name, 'sn-m1');
    expect(fs.existsSync(path.join(path.dirname(dstFile), '.migration'))).toBe(false);
    expect(await h2.get(s.name)).toMatchObject({ state: 'running', epoch: 2 });
    await h1.destroy(s.name, { deleteStorage: true });
    expect(fs.existsSync(srcFile)).toBe(false);
    expect((await h2.verify(s.name)).ok).toBe(true);
    await h2.destroy(s.name, { deleteStorage: true });
  });

  it('shared-nothing: destination killed during the mirror → mirror failed; abort and delete leave nothing', async () => {
    const s = spec('sn2');
    await h1.create(s);
    const srcLog = h1.serialLog(s.name);
    await waitTicks(srcLog, 3, 60_000);
    fillImage(path.join(base, 'h1', 'local', 'vms', 'sn2', 'root.img'), 1 * MiB, 32 * MiB);
    const grant = await h2.prepareDiskTargets(s, 'sn-m2', 'h1', 2);
    let st = await h1.startDiskMirror(s.name, 'sn-m2', { kind: 'remote', endpoint: grant.endpoint, token: grant.token, hello: { migrationId: 'sn-m2', vm: s.name, from: 'h1' } }, 2 * MiB);
    await sleep(1000);
    const dstPid = (await h2.get(s.name))!.pid;
    process.kill(dstPid, 'SIGKILL');
    const killedAt = Date.now();
    const deadline = Date.now() + 30_000;
    while (st.state !== 'failed' && Date.now() < deadline) { await sleep(200); st = await h1.diskMirrorStatus(s.name, 'sn-m2'); }
    expect(st.state).toBe('failed');
    const k0 = Date.now();
    expect(await h2.abortIncoming(s.name, 'sn-m2')).toEqual({ aborted: true, running: false });
    const k1 = Date.now();
    expect(await h1.abortDiskMirror(s.name, 'sn-m2')).toEqual({ aborted: true });
    const k2 = Date.now();
    expect(await h2.deleteDiskTargets(s.name, 'sn-m2')).toEqual({ deleted: true });
    console.log(`[qemu storage tests] destination killed: ${st.error}; failure seen after ${k0 - killedAt} ms, abortIncoming ${k1 - k0} ms, abortDiskMirror ${k2 - k1} ms, deleteDiskTargets ${Date.now() - k2} ms`);
    expect(fs.existsSync(path.dirname(grant.paths.root!))).toBe(false);
    expect(isAlive(dstPid)).toBe(false);
    const t = readSerialTicks(srcLog).ticks.at(-1)!;
    await waitTicks(srcLog, t + 3, 20_000);
    expect(readSerialTicks(srcLog).bad).toEqual([]);
    expect((await h1.get(s.name))?.migrationId).toBeUndefined();
    await h1.destroy(s.name, { deleteStorage: true });
  });
});
