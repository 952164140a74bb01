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

/** Fields after the command name in /proc/<pid>[/task/<tid>]/stat. */
const statFields = (file: string): string[] => { const s = fs.readFileSync(file, 'utf8'); return s.slice(s.lastIndexOf(')') + 2).split(' '); };
const threadNices = (pid: number): number[] => fs.readdirSync(`/proc/${pid}/task`).map((t) => Number(statFields(`/proc/${pid}/task/${t}/stat`)[16]));
const cpuTicks = (pid: number): number => { const f = statFields(`/proc/${pid}/stat`); return Number(f[11]) + Number(f[12]); };
const autogroupNice = (pid: number): number | null => {
  try { return Number(/nice (-?\d+)/.exec(fs.readFileSync(`/proc/${pid}/autogroup`, 'utf8'))?.[1]); } catch { return null; }
};

/** The agent's spare: a vm-process.ts --spare child of the agent, once it has loaded (idle for a second). */
async function loadedSpare(agentPid: number, not?: number): Promise<number> {
  const pid = await waitUntil('a spare VM process', async () => fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p)).map(Number).find((p) => {
    if (p === not) return false;
    try {
      return Number(statFields(`/proc/${p}/stat`)[1]) === agentPid && fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').includes('--spare');
    } catch { return false; }
  }), 30_000);
  await waitUntil('the spare idle (modules loaded)', async () => { const t = cpuTicks(pid); await sleep(1000); return cpuTicks(pid) === t; }, 60_000, 0);
  return pid;
}

beforeAll(async () => {
  if (process.getuid?.() !== 0) throw new Error('this suite checks priorities an agent restores as root (as agents and CI run)');
  lab = await startTestLab(['A']);
  [A] = lab.hosts as [string];
});

afterAll(async () => { await lab?.down(); });

describe('spare VM process', () => {
  it('waits at the lowest priority, in a low-priority autogroup; adopted as a VM it runs at normal priority', async () => {
    const agentPid = lab.status().hosts.find((h) => h.name === A)!.pid!;
    const spare = await loadedSpare(agentPid);
    expect(new Set(threadNices(spare))).toEqual(new Set([19]));
    const groups = fs.existsSync(`/proc/${spare}/autogroup`);
    if (groups) expect(autogroupNice(spare)).toBe(19);

    await lab.client.createVm({ name: 'sp1', host: A, memory: '16MiB', disk: '1MiB', dirtyRate: '1MiB' });
    const vmPid = (JSON.parse(fs.readFileSync(path.join(lab.runDir(A), 'sp1', 'state.json'), 'utf8')) as { pid: number }).pid;
    expect(vmPid, 'createVm adopted the spare').toBe(spare);
    expect(new Set(threadNices(vmPid))).toEqual(new Set([0]));
    if (groups) expect(autogroupNice(vmPid)).toBe(0);

    // The next spare, started right away, waits at low priority again.
    const next = await loadedSpare(agentPid, spare);
    expect(new Set(threadNices(next))).toEqual(new Set([19]));
    if (groups) expect(autogroupNice(next)).toBe(19);
    await lab.client.destroyVm('sp1');
  });
});
