// Hosts on a trusted migration network (no data-plane TLS): the destination VM process reads
// pages straight into guest memory. Real lab, real workflows, real dirtying guests.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, waitUntil, type TestLab } from './helpers/lab.js';
import { labUp } from '../lab/lab.js';

let lab: TestLab;
let A: string;
let B: string;
let T: string;

beforeAll(async () => {
  lab = await startTestLab(['A', 'B', 'T'], { plaintext: ['A', 'B'] }); // T keeps TLS
  [A, B, T] = lab.hosts as [string, string, string];
});

afterAll(async () => {
  await lab?.down();
});

const vmLog = (host: string, vm: string): string => fs.readFileSync(path.join(lab.runDir(host), vm, 'vm.log'), 'utf8');

/**
 * Moves `vm` there and back (streams as given), checking each landing: the digests agree, the
 * VM runs only at its destination, which read pages straight into guest memory, and the
 * guest's own ledger (a generation per page, a sequence per disk block) finds nothing lost.
 */
async function thereAndBack(vm: string, legs: ReadonlyArray<readonly [string, number]>, verify: 'full' | 'sequence'): Promise<void> {
  for (const [to, streams] of legs) {
    const { id } = await lab.client.startMigration({ type: 'live', vm, to, policy: { verify, streams } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.cutover!.destinationDigest).toBe(r.cutover!.sourceDigest);
    if (verify === 'full') expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
    expect(await lab.whereIs(vm)).toEqual([{ host: to, state: 'running' }]);
    expect(vmLog(to, vm)).toContain(`incoming data plane: plaintext${streams > 1 ? `, ${streams} streams` : ''}, pages read straight into guest memory`);
    const v = await lab.client.verifyVm(vm);
    expect(v.checks.filter((c) => !c.ok)).toEqual([]);
  }
}

describe('plaintext data plane (zero-copy receive)', () => {
  it('host configs carry no TLS; live moves there and back (2 streams, then 1) keep every page and write', async () => {
    for (const h of [A, B]) expect(JSON.parse(fs.readFileSync(path.join(lab.dir, 'hosts', h, 'host.json'), 'utf8')).tls).toBeUndefined();
    await lab.client.createVm({ name: 'pt1', host: A, memory: '96MiB', disk: '8MiB', dirtyRate: '48MiB', writeRate: '1MiB', fill: 0.8 });
    await thereAndBack('pt1', [[B, 2], [A, 1]], 'full');
  });

  it("verify 'sequence' (no per-page CRCs): a dirtying guest moves over 3 streams and back over 1 with every page and write intact", async () => {
    await lab.client.createVm({ name: 'ps1', host: A, memory: '96MiB', disk: '8MiB', dirtyRate: '64MiB', writeRate: '1MiB', fill: 0.9 });
    await thereAndBack('ps1', [[B, 3], [A, 1]], 'sequence');
  });

  it('refuses a plaintext host that is not one of the lab\'s hosts, before starting anything', async () => {
    await expect(labUp({ dir: lab.dir, hosts: lab.hosts, plaintextHosts: ['nope'] })).rejects.toThrow(/plaintext host "nope" is not one of the lab's hosts/);
  });

  it('a TLS host and a plaintext host refuse each other with a clear reason; the VM stays where it was, nothing left behind', async () => {
    await lab.client.createVm({ name: 'pt3', host: T, memory: '16MiB', disk: '4MiB', dirtyRate: '4MiB' });
    await lab.client.createVm({ name: 'pt4', host: A, memory: '16MiB', disk: '4MiB', dirtyRate: '4MiB' });
    for (const [vm, from, to, why] of [
      ['pt3', T, A, /plaintext data plane .* the source speaks TLS: both ends must use the same mode/],
      ['pt4', A, T, /the source has a plaintext data plane .* this host has TLS: both ends must use the same mode/],
    ] as const) {
      const t0 = Date.now();
      const { id } = await lab.client.startMigration({ type: 'live', vm, to });
      const r = await lab.client.awaitMigration(id);
      expect(r.outcome).toBe('rolled-back');
      expect(r.reason).toMatch(why);
      expect(Date.now() - t0).toBeLessThan(15_000);
      expect(await lab.whereIs(vm)).toEqual([{ host: from, state: 'running' }]);
      expect(fs.readdirSync(lab.runDir(to))).not.toContain(vm);
      expect((await lab.client.verifyVm(vm)).ok).toBe(true);
    }
  });

  it('mid-transfer failures roll back cleanly: a cancel, then the destination VM process killed; the VM then moves', async () => {
    await lab.client.createVm({ name: 'pt5', host: A, memory: '64MiB', disk: '4MiB', dirtyRate: '8MiB', fill: 0.9 });
    for (const how of ['cancel', 'kill destination'] as const) {
      const { id } = await lab.client.startMigration({ type: 'live', vm: 'pt5', to: B, policy: { maxBandwidth: 8 * 2 ** 20 } });
      await waitUntil('pre-copy under way', async () => (await lab.client.progress(id)).phase === 'precopy' && fs.existsSync(path.join(lab.runDir(B), 'pt5', 'state.json')));
      if (how === 'cancel') await lab.client.cancelMigration(id);
      else process.kill((JSON.parse(fs.readFileSync(path.join(lab.runDir(B), 'pt5', 'state.json'), 'utf8')) as { pid: number }).pid, 'SIGKILL');
      const r = await lab.client.awaitMigration(id);
      expect(r.outcome, how).toBe('rolled-back');
      expect(await lab.whereIs('pt5')).toEqual([{ host: A, state: 'running' }]);
      await waitUntil('destination cleaned', async () => !fs.readdirSync(lab.runDir(B)).includes('pt5'));
      expect((await lab.client.verifyVm('pt5')).ok).toBe(true);
    }
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'pt5', to: B, policy: { verify: 'full' } });
    expect((await lab.client.awaitMigration(id)).outcome).toBe('completed');
    expect((await lab.client.verifyVm('pt5')).ok).toBe(true);
  });

  it('shared-nothing: disks mirrored, memory placed directly, nothing left on the source', async () => {
    await lab.client.createVm({ name: 'pt2', host: A, memory: '32MiB', disk: '8MiB', storage: 'local', dirtyRate: '8MiB', writeRate: '2MiB', diskFill: 0.5, fill: 0.7 });
    const { id } = await lab.client.startMigration({ type: 'shared-nothing', vm: 'pt2', to: B, policy: { verify: 'full' } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
    expect(await lab.whereIs('pt2')).toEqual([{ host: B, state: 'running' }]);
    expect(fs.readdirSync(lab.runDir(A))).not.toContain('pt2');
    expect(vmLog(B, 'pt2')).toContain('incoming data plane: plaintext, pages read straight into guest memory');
    const v = await lab.client.verifyVm('pt2');
    expect(v.checks.filter((c) => !c.ok)).toEqual([]);
  });
});
