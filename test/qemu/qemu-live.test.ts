// Live migration between two real QEMU processes on this machine, through the driver API
// directly (no Temporal): two "hosts" (separate run dirs, one shared storage root).
// The guest (scripts/qemu/build-guest.sh, cached under .cache/qemu-guest) prints
// `tick N mem=ok disk=ok` on its serial console; the destination must continue the counter.
// Skips only when qemu-system-x86_64 is missing (scripts/qemu/install-qemu.sh installs it).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_POLICY, type MigrationPolicy, type ProgressSample, type VmSpec } from '../../common/types.js';
import type { HostConfig } from '../../common/host-config.js';
import { QemuDriver, isAlive, precopyHazard, readSerialTicks } from '../../drivers/qemu/qemu-driver.js';
import { waitSerialTicks } from '../helpers/qemu.js';

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const QEMU = process.env.VMFERRY_QEMU_BINARY ?? 'qemu-system-x86_64';
const qemuVersion = spawnSync(QEMU, ['--version'], { encoding: 'utf8' });
const haveQemu = qemuVersion.status === 0;
if (!haveQemu) console.warn(`[qemu tests] SKIPPED: ${QEMU} not found — run scripts/qemu/install-qemu.sh`);

function host(base: string, name: string): HostConfig {
  return {
    name,
    memoryCapacityBytes: 2 * 2 ** 30,
    storageRoots: [{ name: 'shared', path: path.join(base, 'shared'), shared: true }],
    runDir: path.join(base, name, 'run'),
    dataPlane: { host: '127.0.0.1', port: 0 },
    maxConcurrentMigrations: 2,
  };
}

function spec(name: string): VmSpec {
  return {
    name,
    driver: 'qemu' as VmSpec['driver'],
    memoryBytes: 128 * 2 ** 20,
    disks: [{ id: 'root', sizeBytes: 16 * 2 ** 20, root: 'shared' }],
    dirtyRate: 0,
    writeRate: 0,
    fill: 0,
    probe: { address: '127.0.0.1', port: 0 },
  };
}

const waitTicks = waitSerialTicks;

describe.skipIf(!haveQemu)('QEMU driver: live migration (shared disk)', () => {
  let base: string;
  let h1: QemuDriver;
  let h2: QemuDriver;
  const logs: string[] = [];
  const log = (m: string): void => { logs.push(m); };

  beforeAll(() => {
    const t0 = Date.now();
    const r = spawnSync('bash', [path.join(REPO, 'scripts/qemu/build-guest.sh')], { encoding: 'utf8', timeout: 600_000 });
    if (r.status !== 0) throw new Error(`build-guest.sh failed:\n${r.stderr}`);
    console.log(`[qemu tests] ${qemuVersion.stdout.split('\n')[0]}; guest ready in ${Date.now() - t0} ms (${r.stdout.trim()})`);
    base = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-qemu-'));
    h1 = new QemuDriver(host(base, 'h1'), (m) => log(`h1: ${m}`));
    h2 = new QemuDriver(host(base, 'h2'), (m) => log(`h2: ${m}`));
  });

  afterAll(async () => {
    for (const d of [h1, h2]) {
      if (!d) continue;
      for (const vm of await d.list().catch(() => [])) await d.destroy(vm.name, { deleteStorage: false }).catch(() => undefined);
    }
    if (base) fs.rmSync(base, { recursive: true, force: true });
  });

  it('refuses live pre-copy on QEMU < 9 under TCG, and says why', () => {
    expect(precopyHazard({ major: 7, minor: 2, micro: 0 }, 'tcg')).toMatch(/QEMU 7\.2\.0 under TCG loses guest memory writes.*fixed in QEMU 9\.0/);
    expect(precopyHazard({ major: 7, minor: 2, micro: 0 }, 'kvm')).toBeNull();
    expect(precopyHazard({ major: 9, minor: 2, micro: 0 }, 'tcg')).toBeNull();
  });

  it('migrates a running guest: the destination continues the tick counter, mem=ok disk=ok', async () => {
    const s = spec('vm-live');
    const t0 = Date.now();
    const created = await h1.create(s);
    expect(created.state).toBe('running');
    const srcLog = h1.serialLog(s.name);
    await waitTicks(srcLog, 1, 60_000);
    const bootMs = Date.now() - t0;
    await waitTicks(srcLog, 5, 30_000);

    const policy: MigrationPolicy = { ...DEFAULT_POLICY, downtimeLimitMs: 300 };
    const m0 = Date.now();
    const target = await h2.prepareIncoming(s, 'mig-live', 'h1');
    expect(target.endpoint.port).toBeGreaterThan(0);
    expect((await h2.get(s.name))?.state).toBe('incoming');
    await h1.startOutgoing(s.name, 'mig-live', target, policy);

    const samples: ProgressSample[] = [];
    let round = 0;
    for (;;) {
      const p = await h1.outgoingProgress(s.name, 'mig-live', round, 2000);
      samples.push(p);
      expect(p.state, p.error).toBe('precopy');
      round = p.round;
      if (p.round >= 1 && p.expectedDowntimeMs <= policy.downtimeLimitMs) break;
      expect(Date.now() - m0, `no convergence: ${JSON.stringify(samples.slice(-3))}`).toBeLessThan(90_000);
    }
    const lastSample = samples.at(-1)!;
    // QEMU converged and holds the guest paused at pre-switchover until the cutover command.
    const cut = await h1.cutover(s.name, 'mig-live', 'h2', 'digest');
    const migrationMs = Date.now() - m0;
    console.log(`[qemu tests] boot to first tick ${bootMs} ms; migration ${migrationMs} ms, ${samples.length} samples, last round ${lastSample.round}, ` +
      `${(cut.bytesSent / 2 ** 20).toFixed(1)} MiB sent, downtime ${cut.downtimeMs} ms (QEMU), source stopped at tick ${cut.deviceState.vcpuTicks}`);
    expect(cut.downtimeMs).toBeGreaterThan(0);
    expect(cut.epoch).toBe(2);

    const srcAfter = readSerialTicks(srcLog);
    const lastSrc = srcAfter.ticks.at(-1)!;
    expect(srcAfter.bad).toEqual([]);
    expect((await h1.get(s.name))?.state).toBe('migrated');

    const dstLog = h2.serialLog(s.name);
    await waitTicks(dstLog, lastSrc + 5, 30_000);
    const dst = readSerialTicks(dstLog);
    expect(dst.boots, 'the destination must not have rebooted the guest').toBe(0);
    // The counter continues where the source stopped (a line in flight at the switch may show twice).
    expect(dst.ticks[0]).toBeGreaterThanOrEqual(lastSrc);
    expect(dst.ticks[0]).toBeLessThanOrEqual(lastSrc + 1);
    for (let i = 1; i < dst.ticks.length; i++) expect(dst.ticks[i]).toBe(dst.ticks[i - 1]! + 1);
    expect(dst.bad).toEqual([]);

    const info = await h2.get(s.name);
    expect(info?.state).toBe('running');
    expect(info?.epoch).toBe(2);
    const v = await h2.verify(s.name);
    expect(v.ok, JSON.stringify(v.checks)).toBe(true);
    // The source copy is gone for good once destroyed; the destination keeps running.
    await h1.destroy(s.name, { deleteStorage: false });
    await waitTicks(dstLog, (readSerialTicks(dstLog).ticks.at(-1) ?? 0) + 2, 15_000);
    await h2.destroy(s.name, { deleteStorage: true });
  });

  it('destination killed mid-migration: the source keeps running and ticking', async () => {
    const s = spec('vm-kill');
    await h1.create(s);
    const srcLog = h1.serialLog(s.name);
    await waitTicks(srcLog, 3, 60_000);
    const target = await h2.prepareIncoming(s, 'mig-kill', 'h1');
    const dstPid = (await h2.get(s.name))!.pid;
    expect(isAlive(dstPid)).toBe(true);
    // Slow link: the memory job is still busy when the destination dies.
    await h1.startOutgoing(s.name, 'mig-kill', target, { ...DEFAULT_POLICY, maxBandwidth: 4 * 2 ** 20 });
    let p = await h1.outgoingProgress(s.name, 'mig-kill', 0, 5000);
    expect(p.state).toBe('precopy');
    for (let i = 0; i < 50 && p.bytesSent < 2 ** 20; i++) p = await h1.outgoingProgress(s.name, 'mig-kill', p.round, 200);
    expect(p.bytesSent).toBeGreaterThan(0);
    const tickAtKill = readSerialTicks(srcLog).ticks.at(-1)!;
    const sentAtKill = p.bytesSent;
    process.kill(dstPid, 'SIGKILL');

    const deadline = Date.now() + 30_000;
    while (p.state !== 'failed' && Date.now() < deadline) p = await h1.outgoingProgress(s.name, 'mig-kill', p.round, 1000);
    expect(p.state).toBe('failed');
    console.log(`[qemu tests] destination killed after ${(sentAtKill / 2 ** 20).toFixed(1)} MiB: source reports "${p.error}"`);

    const rb = await h1.rollbackOutgoing(s.name, 'mig-kill');
    expect(rb).toMatchObject({ runsOn: 'source', state: 'running', epoch: 1 });
    await waitTicks(srcLog, tickAtKill + 4, 20_000);
    const src = readSerialTicks(srcLog);
    expect(src.bad).toEqual([]);
    expect(src.boots).toBe(1);
    expect((await h1.get(s.name))?.state).toBe('running');
    expect(await h2.abortIncoming(s.name, 'mig-kill')).toEqual({ aborted: true, running: false });
    expect(await h2.get(s.name)).toBeUndefined();
    const v = await h1.verify(s.name);
    expect(v.ok, JSON.stringify(v.checks)).toBe(true);
    await h1.destroy(s.name, { deleteStorage: true });
  });
});
