// Our processes (VM processes, agents, workers) run TypeScript through tsx's loader: no build
// step. Resolved from this file so it works from any cwd (vitest has no import.meta.resolve).
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const require = createRequire(import.meta.url);
export const TSX_LOADER = pathToFileURL(path.join(path.dirname(require.resolve('tsx/package.json')), 'dist', 'loader.mjs')).href;
