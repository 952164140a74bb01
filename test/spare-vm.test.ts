// The spare VM process an agent keeps loaded (prepareIncoming and createVm adopt it instead of
// paying a process start) must not take CPU from the migrations running meanwhile: it runs at
// the lowest priority, every thread of it and its session's autogroup (with autogroup
// scheduling, on by default in most distributions, a thread's nice ranks it only inside its
// group, and a detached VM process is a group of its own). Adopted as a VM, it gets normal
// priority back. Raising a priority back needs root, as agents (and CI) run.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sleep, startTestLab, waitUntil, type TestLab } from './helpers/lab.js';

let lab: TestLab;
let A: string;
let B: string;

/** Fields after the command name in /proc/<pid>[/task/<tid>]/stat. */
const statFields = (file: string): string[] => { const s = fs.readFileSync(file, 'utf8'); return s.slice(s.lastIndexOf(')') + 2).split(' '); };
const threadNices = (pid: number): number[] => fs.readdirSync(`/proc/${pid}/task`).map((t) => Number(statFields(`/proc/${pid}/task/${t}/stat`)[16]));
const cpuTicks = (pid: number): number => { const f = statFields(`/proc/${pid}/stat`); return Number(f[11]) + Number(f[12]); };
const autogroupNice = (pid: number): number | null => {
  try { return Number(/nice (-?\d+)/.exec(fs.readFileSync(`/proc/${pid}/autogroup`, 'utf8'))?.[1]); } catch { return null; }
};

/** Spare VM processes (vm-process.ts --spare, not adopted yet) of an agent. */
const sparesOf = (agentPid: number): number[] => fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p)).map(Number).filter((p) => {
  try {
    return Number(statFields(`/proc/${p}/stat`)[1]) === agentPid && fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').includes('--spare')
      && fs.readlinkSync(`/proc/${p}/fd/1`).includes('.spare-vm-'); // an adopted one logs into its VM's directory
  } catch { return false; }
});
const agentPid = (host: string): number => lab.status().hosts.find((h) => h.name === host)!.pid!;
const vmPid = (host: string, vm: string): number => (JSON.parse(fs.readFileSync(path.join(lab.runDir(host), vm, 'state.json'), 'utf8')) as { pid: number }).pid;

/** The agent's spare, once it has loaded (idle for a second). */
async function loadedSpare(agent: number, not?: number): Promise<number> {
  const pid = await waitUntil('a spare VM process', async () => sparesOf(agent).find((p) => p !== not), 30_000);
  await waitUntil('the spare idle (modules loaded)', async () => { const t = cpuTicks(pid); await sleep(1000); return cpuTicks(pid) === t; }, 60_000, 0);
  return pid;
}

beforeAll(async () => {
  if (process.getuid?.() !== 0) throw new Error('this suite checks priorities an agent restores as root (as agents and CI run)');
  lab = await startTestLab(['A', 'B']);
  [A, B] = lab.hosts as [string, string];
});

afterAll(async () => { await lab?.down(); });

describe('spare VM process', () => {
  it('waits at the lowest priority, in a low-priority autogroup; adopted as a VM it runs at normal priority', async () => {
    const spare = await loadedSpare(agentPid(A));
    expect(new Set(threadNices(spare))).toEqual(new Set([19]));
    const groups = fs.existsSync(`/proc/${spare}/autogroup`);
    if (groups) expect(autogroupNice(spare)).toBe(19);

    await lab.client.createVm({ name: 'sp1', host: A, memory: '16MiB', disk: '1MiB', dirtyRate: '1MiB' });
    const pid = vmPid(A, 'sp1');
    expect(pid, 'createVm adopted the spare').toBe(spare);
    expect(new Set(threadNices(pid))).toEqual(new Set([0]));
    if (groups) expect(autogroupNice(pid)).toBe(0);

    // The next spare, started right away, waits at low priority again.
    const next = await loadedSpare(agentPid(A), spare);
    expect(new Set(threadNices(next))).toEqual(new Set([19]));
    if (groups) expect(autogroupNice(next)).toBe(19);
    await lab.client.destroyVm('sp1');
  });

  it('the destination loads its next spare only after the incoming migration, not during it', async () => {
    const spareB = await loadedSpare(agentPid(B));
    await lab.client.createVm({ name: 'sp2', host: A, memory: '64MiB', disk: '1MiB', dirtyRate: '1MiB', fill: 1 });
    // A capped link: the transfer lasts seconds.
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'sp2', to: B, policy: { maxBandwidth: 16 * 2 ** 20 } });
    await waitUntil('the destination adopted the spare', async () => { try { return vmPid(B, 'sp2') === spareB; } catch { return false; } });
    const seen: number[] = [];
    const receiving = (): boolean => { try { return (JSON.parse(fs.readFileSync(path.join(lab.runDir(B), 'sp2', 'state.json'), 'utf8')) as { state: string }).state === 'incoming'; } catch { return false; } };
    let samples = 0;
    const watch = setInterval(() => {
      const spares = sparesOf(agentPid(B));
      if (receiving()) { samples++; seen.push(...spares); }
    }, 50);
    let r;
    try { r = await lab.client.awaitMigration(id); } finally { clearInterval(watch); }
    expect(r.outcome, r.reason).toBe('completed');
    expect(samples, 'watched the transfer').toBeGreaterThan(20);
    expect(seen, 'no spare loading on the destination while it received the VM').toEqual([]);
    await loadedSpare(agentPid(B), spareB); // and after it, one comes
    await lab.client.destroyVm('sp2');
  });
});
