// QEMU guests through the product path: client → Temporal workflows → host agents → driver
// router → QEMU driver. Real Temporal dev server (root vitest global setup), a lab of two agents
// sharing one storage root, the test guest of scripts/qemu/build-guest.sh (built on demand by the
// agent, cached under .cache/qemu-guest), whose console prints `tick N mem=ok disk=ok`.
// Skips when qemu-system-x86_64 is missing (scripts/qemu/install-qemu.sh installs it), or when
// run without the Temporal global setup (test/qemu/vitest.config.ts).
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { startTestLab, waitUntil, sleep, type TestLab } from '../helpers/lab.js';
import { readSerialTicks, isAlive } from '../../drivers/qemu/qemu-driver.js';
import { waitSerialTicks } from '../helpers/qemu.js';
import { withQmp } from '../../drivers/qemu/qmp.js';

const QEMU = process.env.VMFERRY_QEMU_BINARY ?? 'qemu-system-x86_64';
const haveQemu = spawnSync(QEMU, ['--version'], { encoding: 'utf8' }).status === 0;
let temporalAddress: string | undefined;
try { temporalAddress = inject('temporalAddress'); } catch { temporalAddress = undefined; }
if (!haveQemu) console.warn(`[qemu temporal tests] SKIPPED: ${QEMU} not found — run scripts/qemu/install-qemu.sh`);
else if (!temporalAddress) console.warn('[qemu temporal tests] SKIPPED: no Temporal server (run with the root config: npx vitest run test/qemu/)');

// TCG guests on a shared 2-core machine: boots alone take 5-15 s.
describe.skipIf(!haveQemu || !temporalAddress)('QEMU guests through Temporal workflows', { timeout: 240_000 }, () => {
  let lab: TestLab;
  let A: string;
  let B: string;

  beforeAll(async () => {
    lab = await startTestLab();
    [A, B] = lab.hosts as [string, string];
  });
  afterAll(async () => {
    await lab?.down();
  });

  const serial = (host: string, vm: string): string => path.join(lab.runDir(host), vm, 'serial.log');
  const waitTicks = (host: string, vm: string, atLeast: number, timeoutMs = 60_000): Promise<number> => waitSerialTicks(serial(host, vm), atLeast, timeoutMs);
  const whereIs = (vm: string): Promise<Array<{ host: string; state: string }>> => lab.whereIs(vm);
  const qemuPid = (host: string, vm: string): number => (JSON.parse(fs.readFileSync(path.join(lab.runDir(host), vm, 'vm.json'), 'utf8')) as { pid: number }).pid;

  it('live-migrates a QEMU guest A → B over 2 multifd channels (--streams 2): completed, downtime reported, the guest keeps ticking on B with mem=ok disk=ok', async () => {
    const t0 = Date.now();
    const created = await lab.client.createVm({ name: 'qm1', host: A, memory: '128MiB', disk: '16MiB', driver: 'qemu' });
    expect(created).toMatchObject({ host: A, state: 'running' });
    expect(created.spec.driver).toBe('qemu');
    await waitTicks(A, 'qm1', 5);
    const bootMs = Date.now() - t0;

    const m0 = Date.now();
    // policy.streams maps to QEMU's multifd channels, on both ends (the destination learns the
    // count in prepareIncoming, before its migrate-incoming).
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'qm1', to: B, policy: { streams: 2 } });
    const r = await lab.client.awaitMigration(id);
    const wallMs = Date.now() - m0;
    console.log(`[qemu temporal tests] create+boot to tick 5: ${bootMs} ms; migration ${wallMs} ms wall (${r.durationMs} ms in the workflow), ` +
      `${r.rounds} round(s), ${(r.bytesTransferred / 2 ** 20).toFixed(1)} MiB, downtime ${r.downtimeMs} ms; decisions ${JSON.stringify(r.decisions)}`);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.downtimeMs).toBeGreaterThan(0);
    expect(r.rounds).toBeGreaterThanOrEqual(1);
    expect(r.bytesTransferred).toBeGreaterThan(0);
    expect(r.cutover?.epoch).toBe(2);
    const migParams = await withQmp(path.join(lab.runDir(B), 'qm1', 'qmp.sock'), async (q) => ({
      caps: await q.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities'),
      params: await q.execute<Record<string, unknown>>('query-migrate-parameters'),
    }));
    expect(migParams.caps.find((c) => c.capability === 'multifd')?.state).toBe(true);
    expect(migParams.params['multifd-channels']).toBe(2);

    // Exactly one copy, running on B; nothing left of it on A.
    expect(await whereIs('qm1')).toEqual([{ host: B, state: 'running' }]);
    expect(fs.readdirSync(lab.runDir(A))).not.toContain('qm1');

    // Ticks continue on B where the source stopped: no reboot, no gap, every check ok.
    await waitTicks(B, 'qm1', 1, 20_000);
    const first = readSerialTicks(serial(B, 'qm1'));
    expect(first.boots, 'the destination must not have rebooted the guest').toBe(0);
    expect(first.ticks[0]).toBeGreaterThanOrEqual(5);
    const v = await lab.client.verifyVm('qm1');
    expect(v.host).toBe(B);
    expect(v.checks.filter((c) => !c.ok)).toEqual([]);
    expect(v.ok).toBe(true);
    const later = await waitTicks(B, 'qm1', (first.ticks.at(-1) ?? 0) + 3, 20_000);
    const after = readSerialTicks(serial(B, 'qm1'));
    expect(after.bad).toEqual([]);
    for (let i = 1; i < after.ticks.length; i++) expect(after.ticks[i]).toBe(after.ticks[i - 1]! + 1);
    expect(later).toBeGreaterThan(first.ticks.at(-1) ?? 0);

    // The migrated VM is free for another migration (no stale migration id on B).
    const info = (await lab.client.hostInfo(B)).vms.find((x) => x.name === 'qm1')!;
    expect(info).toMatchObject({ state: 'running', epoch: 2 });
    expect(info.migrationId).toBeUndefined();

    await lab.client.destroyVm('qm1');
    expect(await whereIs('qm1')).toEqual([]);
  });

  it('cancel during pre-copy (slow link) rolls back: the source keeps ticking, nothing left on B', async () => {
    await lab.client.createVm({ name: 'qm2', host: A, memory: '128MiB', disk: '16MiB', driver: 'qemu' });
    await waitTicks(A, 'qm2', 3);
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'qm2', to: B, policy: { maxBandwidth: 1 * 2 ** 20 } });
    await waitUntil('pre-copy with bytes flowing', async () => {
      const p = await lab.client.progress(id);
      return p.phase === 'precopy' && p.bytesTransferred > 0;
    }, 60_000);
    expect(fs.readdirSync(lab.runDir(B))).toContain('qm2'); // the incoming QEMU exists
    const tickAtCancel = readSerialTicks(serial(A, 'qm2')).ticks.at(-1)!;
    await lab.client.cancelMigration(id);
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('rolled-back');
    expect(r.reason).toMatch(/cancelled/);

    expect(await whereIs('qm2')).toEqual([{ host: A, state: 'running' }]);
    await waitUntil('destination runtime dir gone', async () => !fs.readdirSync(lab.runDir(B)).includes('qm2'));
    await waitTicks(A, 'qm2', tickAtCancel + 4, 20_000);
    const src = readSerialTicks(serial(A, 'qm2'));
    expect(src.bad).toEqual([]);
    expect(src.boots).toBe(1);
    const v = await lab.client.verifyVm('qm2');
    expect(v.host).toBe(A);
    expect(v.ok, JSON.stringify(v.checks)).toBe(true);
    await lab.client.destroyVm('qm2');
  });

  it('destination QEMU killed mid-migration rolls back: the source keeps ticking, nothing left on B', async () => {
    await lab.client.createVm({ name: 'qm3', host: A, memory: '128MiB', disk: '16MiB', driver: 'qemu' });
    await waitTicks(A, 'qm3', 3);
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'qm3', to: B, policy: { maxBandwidth: 1 * 2 ** 20 } });
    await waitUntil('pre-copy with bytes flowing', async () => {
      const p = await lab.client.progress(id);
      return p.phase === 'precopy' && p.bytesTransferred > 0;
    }, 60_000);
    const dstPid = qemuPid(B, 'qm3');
    expect(isAlive(dstPid)).toBe(true);
    const tickAtKill = readSerialTicks(serial(A, 'qm3')).ticks.at(-1)!;
    process.kill(dstPid, 'SIGKILL');
    const r = await lab.client.awaitMigration(id);
    console.log(`[qemu temporal tests] destination killed: ${r.outcome}: ${r.reason}`);
    expect(r.outcome, r.reason).toBe('rolled-back');

    expect(await whereIs('qm3')).toEqual([{ host: A, state: 'running' }]);
    await waitUntil('destination runtime dir gone', async () => !fs.readdirSync(lab.runDir(B)).includes('qm3'));
    await waitTicks(A, 'qm3', tickAtKill + 4, 20_000);
    const src = readSerialTicks(serial(A, 'qm3'));
    expect(src.bad).toEqual([]);
    expect(src.boots).toBe(1);
    expect((await lab.client.verifyVm('qm3')).ok).toBe(true);
    await lab.client.destroyVm('qm3');
  });

  // Storage moves of QEMU guests: test/qemu/qemu-storage-temporal.test.ts.
  it('refuses cutover approval for a QEMU VM clearly, and the VM keeps running', async () => {
    await lab.client.createVm({ name: 'qm4', host: A, memory: '128MiB', disk: '16MiB', driver: 'qemu' });
    // QEMU pauses the guest once it converges: waiting there for an operator would freeze it.
    const a = await lab.client.startMigration({ type: 'live', vm: 'qm4', to: B, policy: { approveCutover: true } });
    const ra = await lab.client.awaitMigration(a.id);
    expect(ra.outcome).toBe('rolled-back');
    expect(ra.reason).toMatch(/cutover approval is not supported by the QEMU driver yet/);
    expect(await whereIs('qm4')).toEqual([{ host: A, state: 'running' }]);
    await waitUntil('destination runtime dir gone', async () => !fs.readdirSync(lab.runDir(B)).includes('qm4'));
    await sleep(100);
    await lab.client.destroyVm('qm4');
  });
});
