// The host agent's driver router, without Temporal or VM processes: routing by spec.driver and by
// the kind recorded in the runtime directory, and the clear refusal when QEMU is not installed.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { HostConfig } from '../../common/host-config.js';
import type { VmSpec } from '../../common/types.js';
import { SimDriver } from '../../drivers/sim/sim-driver.js';
import { DriverRouter, detectQemu } from '../../drivers/router.js';
import { hasStorageMoves } from '../../drivers/driver.js';

const base = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-router-'));
afterAll(() => fs.rmSync(base, { recursive: true, force: true }));
const host: HostConfig = {
  name: 'h1',
  memoryCapacityBytes: 2 ** 30,
  storageRoots: [{ name: 'shared', path: path.join(base, 'shared'), shared: true }],
  runDir: path.join(base, 'run'),
  dataPlane: { host: '127.0.0.1', port: 0 },
  maxConcurrentMigrations: 2,
};
const spec = (name: string, driver: VmSpec['driver']): VmSpec => ({
  name, driver, memoryBytes: 64 * 2 ** 20, disks: [{ id: 'disk0', sizeBytes: 2 ** 20, root: 'shared' }],
  dirtyRate: 0, writeRate: 0, fill: 0, probe: { address: '127.0.0.1', port: 0 },
});

describe('driver router', () => {
  const missing = detectQemu(path.join(base, 'no-such-qemu'));
  const router = new DriverRouter(host, new SimDriver(host), null, missing.ok ? 'unexpected' : missing.reason);

  it('detects a missing QEMU binary', () => {
    expect(missing).toMatchObject({ ok: false });
    expect(missing.ok ? '' : missing.reason).toMatch(/no-such-qemu not found/);
  });

  it('without QEMU, refuses QEMU VMs naming the missing binary and the install script', async () => {
    await expect(router.create(spec('q1', 'qemu'))).rejects.toThrow(/no-such-qemu not found.*scripts\/qemu\/install-qemu\.sh/);
    await expect(router.prepareIncoming(spec('q1', 'qemu'), 'm1', 'h0')).rejects.toThrow(/QEMU driver is not available/);
    await expect(router.create({ ...spec('q2', 'sim'), driver: 'xen' as VmSpec['driver'] })).rejects.toThrow(/unknown driver "xen"/);
  });

  it('routes by the kind in vm.json: the simulator never sees QEMU runtime dirs', async () => {
    fs.mkdirSync(path.join(host.runDir, 'q3'), { recursive: true });
    fs.writeFileSync(path.join(host.runDir, 'q3', 'vm.json'), JSON.stringify({ kind: 'qemu', spec: spec('q3', 'qemu'), pid: 0 }));
    expect(await router.sim.list()).toEqual([]);
    expect(await router.list()).toEqual([]);
    await expect(router.verify('q3')).rejects.toThrow(/VM q3 is a QEMU VM: the QEMU driver is not available/);
    // A sim VM of the same name would overwrite QEMU's files: refused before any driver runs.
    await expect(router.create(spec('q3', 'sim'))).rejects.toThrow(/already exists on h1 \(a qemu VM\)/);
    // Storage moves of QEMU VMs need the QEMU driver; without it their compensations are no-ops
    // (nothing was started, and a throwing compensation would be retried forever).
    expect(hasStorageMoves(router)).toBe(true);
    await expect(router.startLocalDiskMirror('q3', 'm2', { disk0: path.join(base, 'shared', 'x') })).rejects.toThrow(/storage move of QEMU VM q3: the QEMU driver is not available/);
    await expect(router.prepareDiskTargets(spec('q3', 'qemu'), 'm2', 'h0', 2)).rejects.toThrow(/QEMU driver is not available/);
    expect(await router.abortDiskMirror('q3', 'm2')).toEqual({ aborted: false });
    expect(await router.deleteDiskTargets('q3', 'm2')).toEqual({ deleted: false });
    // A VM on neither driver goes to the simulator, whose answers for absent VMs stand.
    expect(await router.abortIncoming('nope', 'm3')).toEqual({ aborted: true, running: false });
    expect(await router.get('nope')).toBeUndefined();
  });
});
