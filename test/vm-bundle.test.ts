// Agents start VM processes from one bundled file (drivers/sim/vm-bundle.ts), not through tsx:
// the bundle must run as the VM process does (a spare reports ready, a VM boots), keep stack
// traces pointing at the TypeScript source, and fall back to tsx when it cannot be built.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { vmProcessArgs } from '../drivers/sim/vm-bundle.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vm-bundle-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Runs the VM process with `args` + `extra`; resolves with its first IPC message, or its exit and output. */
function run(args: string[], extra: string[]): Promise<{ message?: unknown; code?: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--expose-gc', ...args, ...extra], { stdio: ['ignore', 'pipe', 'pipe', 'ipc'] });
    let output = '';
    child.stdout!.on('data', (d: Buffer) => { output += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { output += d.toString(); });
    child.once('message', (message) => { child.kill('SIGKILL'); resolve({ message, output }); });
    child.once('exit', (code) => setTimeout(() => resolve({ code, output }), 50));
  });
}

describe('bundled VM process', () => {
  it('builds one file that runs as a spare VM process', async () => {
    const { args, why } = vmProcessArgs(path.join(tmp, 'ok'));
    expect(why).toBeUndefined();
    const entry = args.at(-1)!;
    expect(entry).toBe(path.join(tmp, 'ok', 'vm-process.mjs'));
    expect(args).toContain('--enable-source-maps');
    // Only Node's own modules are left to import: the file runs from anywhere.
    const imports = [...fs.readFileSync(entry, 'utf8').matchAll(/^import .* from ["']([^"']+)["']/gm)].map((m) => m[1]);
    expect(imports.filter((m) => !m!.startsWith('node:'))).toEqual([]);
    const r = await run(args, ['--spare']);
    expect(r.message, r.output).toBeDefined();
  });

  it('reports errors with the TypeScript source lines', async () => {
    const { args } = vmProcessArgs(path.join(tmp, 'maps'));
    // A runtime directory without vm.json: the VM process logs its fatal error and exits.
    const dir = fs.mkdtempSync(path.join(tmp, 'vm-'));
    const r = await run(args, [dir]);
    expect(r.code).not.toBe(0);
    expect(r.output).toMatch(/vm-process\.ts:\d+/);
  });

  it('falls back to tsx when the bundle cannot be written, and says why', () => {
    const blocked = path.join(tmp, 'a-file');
    fs.writeFileSync(blocked, '');
    const { args, why } = vmProcessArgs(blocked);
    expect(why).toMatch(/EEXIST|ENOTDIR/);
    expect(args.slice(0, 1)).toEqual(['--import']);
    expect(args.at(-1)).toMatch(/vm-process\.ts$/);
  });
});
