// Our processes (VM processes, agents, workers) run TypeScript through tsx's loader: no build
// step. Resolved from this file so it works from any cwd (vitest has no import.meta.resolve).
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const require = createRequire(import.meta.url);
export const TSX_LOADER = pathToFileURL(path.join(path.dirname(require.resolve('tsx/package.json')), 'dist', 'loader.mjs')).href;

/**
 * Extra Node flags for the processes we spawn: `VMFERRY_CPU_PROF_DIR` (set by `bench --prof`)
 * has each write a CPU profile there. Node refuses --cpu-prof in NODE_OPTIONS, so it travels
 * in its own variable, inherited by agents and passed on to their VM processes.
 */
export function profilingFlags(env: NodeJS.ProcessEnv = process.env): string[] {
  const dir = env.VMFERRY_CPU_PROF_DIR;
  return dir ? ['--cpu-prof', `--cpu-prof-dir=${dir}`] : [];
}
