// The source agent's record of cutovers it completed and then released the source of, beside
// (never inside) its runtime directory. When the cutover activity releases the source itself,
// the VM process that knew the result is gone; a retried attempt (lost completion, agent killed
// after the release) answers from here instead. Bounded: the newest entries only.
import fs from 'node:fs';
import path from 'node:path';
import type { CutoverResult } from '../common/types.js';

const KEEP = 500;

type Journal = Record<string, { at: string; vm: string; result: CutoverResult }>;

export const journalPath = (runDir: string): string => path.join(path.dirname(path.resolve(runDir)), `${path.basename(path.resolve(runDir))}.cutovers.json`);

function read(file: string): Journal {
  try { return JSON.parse(fs.readFileSync(file, 'utf8')) as Journal; } catch { return {}; }
}

export function savedCutover(runDir: string, migrationId: string, vm: string): CutoverResult | undefined {
  const e = read(journalPath(runDir))[migrationId];
  return e && e.vm === vm ? e.result : undefined;
}

/** Synchronous read-modify-rename: concurrent cutovers in one agent cannot interleave. */
export function saveCutover(runDir: string, migrationId: string, vm: string, result: CutoverResult): void {
  const file = journalPath(runDir);
  const j = read(file);
  j[migrationId] = { at: new Date().toISOString(), vm, result };
  const keys = Object.keys(j);
  for (const k of keys.slice(0, Math.max(0, keys.length - KEEP))) delete j[k];
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(j));
  fs.renameSync(tmp, file);
}
