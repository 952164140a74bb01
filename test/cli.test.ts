// The CLI as a user runs it: a real process, against a real lab. Bad input gets a message that
// names the problem, exit code 2, and changes nothing.
import { execFile } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, type TestLab } from './helpers/lab.js';
import { TSX_LOADER } from '../common/tsx.js';

const root = path.resolve(fileURLToPath(new URL('..', import.meta.url)));
let lab: TestLab;
let A: string;
let B: string;

/** Runs the CLI as a separate process (async: a blocked test worker would stall vitest). */
function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', TSX_LOADER, path.join(root, 'cli', 'main.ts'), '--lab', lab.dir, ...args], { encoding: 'utf8', timeout: 120_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
    });
  });
}

beforeAll(async () => {
  lab = await startTestLab();
  [A, B] = lab.hosts as [string, string];
  const r = await cli('vm', 'create', 'vm1', '--host', A, '--memory', '32MiB', '--disk', '4MiB', '--json');
  expect(r.code, r.stderr).toBe(0);
});
afterAll(async () => {
  await lab?.down();
});

describe('CLI', () => {
  it('lab status --json lists every process with its pid', async () => {
    const r = await cli('lab', 'status', '--json');
    expect(r.code).toBe(0);
    const s = JSON.parse(r.stdout);
    expect(s.temporal.address).toMatch(/:\d+$/);
    expect(s.worker.pid).toBeGreaterThan(0);
    expect(s.hosts.map((h: { name: string }) => h.name)).toEqual([A, B]);
    for (const h of s.hosts) {
      expect(h.pid).toBeGreaterThan(0);
      expect(h.taskQueue).toBe(`host-${h.name}`);
      expect(h.dataPlane.port).toBeGreaterThan(0);
    }
  });

  const bad: Array<[string, () => string[], RegExp]> = [
    ['unknown VM', () => ['migrate', 'live', 'nope', '--to', B], /no VM named nope/],
    ['unknown host', () => ['migrate', 'live', 'vm1', '--to', 'hostZ'], /unknown host "hostZ"/],
    ['same host', () => ['migrate', 'live', 'vm1', '--to', A], /same host/],
    ['bad memory size', () => ['vm', 'create', 'vm2', '--host', A, '--memory', '12parsecs', '--disk', '4MiB'], /bad memory size "12parsecs"/],
    ['bad disk size', () => ['vm', 'create', 'vm2', '--host', A, '--memory', '32MiB', '--disk', '-4'], /bad disk size "-4"/],
    ['bad VM name', () => ['vm', 'create', '../etc', '--host', A, '--memory', '32MiB', '--disk', '4MiB'], /VM names are letters/],
    ['unknown host for create', () => ['vm', 'create', 'vm2', '--host', 'hostZ', '--memory', '32MiB', '--disk', '4MiB'], /unknown host "hostZ"/],
    ['duplicate VM', () => ['vm', 'create', 'vm1', '--host', B, '--memory', '32MiB', '--disk', '4MiB'], /already exists/],
    ['missing --to', () => ['migrate', 'live', 'vm1'], /required option '--to <host>'/],
    ['bad downtime limit', () => ['migrate', 'live', 'vm1', '--to', B, '--downtime-limit', 'soon'], /--downtime-limit must be a whole number/],
    ['unknown migration', () => ['migration', 'status', 'live-nope-123'], /no migration with id live-nope-123/],
    ['unknown storage root', () => ['vm', 'create', 'vm2', '--host', A, '--memory', '32MiB', '--disk', '4MiB', '--storage', 'tape'], /no storage root "tape"/],
  ];
  it.each(bad)('%s: clear error, exit 2, nothing started', async (_name, args, message) => {
    const before = await lab.client.listMigrations();
    const vmsBefore = await lab.client.listVms();
    const r = await cli(...args());
    expect(r.stderr).toMatch(message);
    expect(r.code).toBe(2);
    expect(await lab.client.listMigrations()).toEqual(before);
    expect(await lab.client.listVms()).toEqual(vmsBefore);
  });

  it('vm create without --disk gives one 64 MiB disk', async () => {
    const r = await cli('vm', 'create', 'vm3', '--host', B, '--memory', '16MiB', '--json');
    expect(r.code, r.stderr).toBe(0);
    try {
      expect((await lab.client.vmSpec('vm3'))!.spec.disks.map((d) => d.sizeBytes)).toEqual([64 * 2 ** 20]);
    } finally {
      expect((await cli('vm', 'destroy', 'vm3')).code).toBe(0);
    }
  });

  it('migrate live --wait --json reports the outcome, and status reports the same', async () => {
    const r = await cli('migrate', 'live', 'vm1', '--to', B, '--wait', '--json');
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    for (const k of ['id', 'type', 'vm', 'from', 'to', 'outcome', 'reason', 'durationMs', 'downtimeMs', 'rounds', 'bytesTransferred']) expect(j).toHaveProperty(k);
    expect(j).toMatchObject({ type: 'live', vm: 'vm1', from: A, to: B, outcome: 'completed' });
    // Where the downtime went: four phases that add up to it (rounding aside).
    const p = j.downtimePhasesMs as Record<string, number>;
    expect(Object.keys(p)).toEqual(expect.arrayContaining(['finalPages', 'verify', 'handoff', 'resume']));
    expect(Math.abs(p.finalPages! + p.verify! + p.handoff! + p.resume! - j.downtimeMs)).toBeLessThanOrEqual(2);
    const s = JSON.parse((await cli('migration', 'status', j.id, '--json')).stdout);
    expect(s).toMatchObject({ id: j.id, outcome: 'completed', downtimeMs: j.downtimeMs, rounds: j.rounds });
    const list = JSON.parse((await cli('vm', 'list', '--json')).stdout);
    expect(list).toEqual([expect.objectContaining({ name: 'vm1', host: B, state: 'running' })]);
    const v = await cli('vm', 'verify', 'vm1', '--json');
    expect(v.code).toBe(0);
    expect(JSON.parse(v.stdout)).toMatchObject({ ok: true, host: B });
  });

  it('migrate without --wait returns the id at once; a rolled-back migration exits 3', async () => {
    const r = await cli('migrate', 'live', 'vm1', '--to', A, '--json', '--max-bandwidth', '2MiB/s');
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.outcome).toBe('running');
    expect(j.id).toMatch(/^live-vm1-/);
    const running = JSON.parse((await cli('migration', 'status', j.id, '--json')).stdout);
    expect(running.outcome).toBe('running');
    expect((await cli('migration', 'cancel', j.id)).code).toBe(0);
    const done = await cli('migration', 'status', j.id, '--wait', '--json');
    expect(done.code).toBe(3);
    expect(JSON.parse(done.stdout)).toMatchObject({ outcome: 'rolled-back', reason: 'cancelled by operator' });
  });

  it('--from names the source (no lookup): a wrong one is refused by the workflow, exit 2; the right one moves', async () => {
    // vm1 is on B (the move above rolled back).
    const wrong = await cli('migrate', 'live', 'vm1', '--from', A, '--to', B);
    expect(wrong.code).toBe(2);
    expect(wrong.stderr).toMatch(`VM vm1 is not on host ${A}`);
    const r = await cli('migrate', 'live', 'vm1', '--from', B, '--to', A, '--wait', '--json');
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ from: B, to: A, outcome: 'completed' });
  });
});
