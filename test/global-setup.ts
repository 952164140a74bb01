// One Temporal dev server per test run, shared by every test file; torn down at the end.
// A server already named by TEMPORAL_ADDRESS is used instead (and left alone).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestProject } from 'vitest/node';
import { ensureSearchAttributes, startDevServer } from '../lab/temporal-server.js';

declare module 'vitest' {
  export interface ProvidedContext {
    temporalAddress: string;
    temporalUiUrl: string | null;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  if (process.env.TEMPORAL_ADDRESS) {
    await ensureSearchAttributes(process.env.TEMPORAL_ADDRESS);
    project.provide('temporalAddress', process.env.TEMPORAL_ADDRESS);
    project.provide('temporalUiUrl', null);
    return async () => undefined;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-temporal-'));
  const server = await startDevServer({ dbFile: path.join(dir, 'temporal.db'), logFile: path.join(dir, 'temporal.log') });
  project.provide('temporalAddress', server.address);
  project.provide('temporalUiUrl', server.uiUrl);
  return async () => {
    try { process.kill(server.pid, 'SIGTERM'); } catch { /* gone */ }
    for (let i = 0; i < 100; i++) {
      try { process.kill(server.pid, 0); } catch { break; }
      await new Promise((r) => setTimeout(r, 100));
    }
    try { process.kill(server.pid, 'SIGKILL'); } catch { /* gone */ }
    fs.rmSync(dir, { recursive: true, force: true });
  };
}
