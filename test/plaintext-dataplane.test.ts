// Hosts on a trusted migration network (no data-plane TLS): the destination VM process reads
// pages straight into guest memory. Real lab, real workflows, real dirtying guests.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, type TestLab } from './helpers/lab.js';

let lab: TestLab;
let A: string;
let B: string;

beforeAll(async () => {
  lab = await startTestLab(['A', 'B'], { plaintext: true });
  [A, B] = lab.hosts as [string, string];
});

afterAll(async () => {
  await lab?.down();
});

const vmLog = (host: string, vm: string): string => fs.readFileSync(path.join(lab.runDir(host), vm, 'vm.log'), 'utf8');

describe('plaintext data plane (zero-copy receive)', () => {
  it('host configs carry no TLS; live moves there and back (2 streams, then 1) keep every page and write', async () => {
    for (const h of [A, B]) expect(JSON.parse(fs.readFileSync(path.join(lab.dir, 'hosts', h, 'host.json'), 'utf8')).tls).toBeUndefined();
    await lab.client.createVm({ name: 'pt1', host: A, memory: '96MiB', disk: '8MiB', dirtyRate: '48MiB', writeRate: '1MiB', fill: 0.8 });
    for (const [to, streams] of [[B, 2], [A, 1]] as const) {
      const { id } = await lab.client.startMigration({ type: 'live', vm: 'pt1', to, policy: { verify: 'full', streams } });
      const r = await lab.client.awaitMigration(id);
      expect(r.outcome, r.reason).toBe('completed');
      expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
      expect(r.cutover!.destinationDigest).toBe(r.cutover!.sourceDigest);
      expect(await lab.whereIs('pt1')).toEqual([{ host: to, state: 'running' }]);
      expect(vmLog(to, 'pt1')).toContain(`incoming data plane: plaintext${streams > 1 ? `, ${streams} streams` : ''}, pages read straight into guest memory`);
      const v = await lab.client.verifyVm('pt1');
      expect(v.checks.filter((c) => !c.ok)).toEqual([]);
    }
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
