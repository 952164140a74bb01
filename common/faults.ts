// Named fault-injection points for the fault matrix (faults/). Off unless VMFERRY_FAULTS_FILE is
// set in the environment — then the file (JSON: { "<point>": "<action>" }) is read at the point,
// so a test can arm and disarm points while processes run. Zero cost when off: one constant test.
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

const FILE = process.env.VMFERRY_FAULTS_FILE;

export type FaultPoint = 'cutover-after-pause' | 'destination-after-resume' | 'before-release-source' | 'rollback-step' | 'destination-before-resume' | 'source-before-connect' | 'prepare-incoming' | 'destination-digest';

/** The action armed at `point`, if any ('delay:<ms>', 'drop-ack', 'crash', ...). */
export function faultAt(point: FaultPoint): string | null {
  if (!FILE) return null;
  try {
    const armed = JSON.parse(fs.readFileSync(FILE, 'utf8')) as Record<string, string>;
    return armed[point] ?? null;
  } catch {
    return null;
  }
}

/** Applies the generic actions (delay, crash); returns the action for point-specific ones. */
export async function faultPoint(point: FaultPoint): Promise<string | null> {
  const a = faultAt(point);
  if (!a) return null;
  const delay = /^delay:(\d+)$/.exec(a);
  if (delay) { await sleep(Number(delay[1])); return null; }
  if (a === 'crash') process.kill(process.pid, 'SIGKILL');
  return a;
}
