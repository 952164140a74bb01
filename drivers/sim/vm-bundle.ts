// How an agent starts its VM processes: from vm-process.ts bundled into one ES module by
// esbuild when the agent starts, instead of through tsx's loader. The VM process imports only
// Node's own modules (and koffi, by absolute path: see koffiPath), so the bundle stands alone.
// Measured here: ready (as a spare) in ~0.15 s instead of ~0.3 s with the loader, at about half
// the CPU. That start lands on a migration's path whenever no spare is ready, e.g. for every VM
// after the first in an evacuation, where two cores shared with the transfers stretched it to
// 0.6-0.9 s.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { buildSync } from 'esbuild';
import { TSX_LOADER } from '../../common/tsx.js';

const VM_PROCESS = fileURLToPath(new URL('./vm-process.ts', import.meta.url));

/** koffi's entry point, for dataplane/send-buffer.ts inside the bundle (null: not installed). */
function koffiPath(): string | null {
  try { return createRequire(import.meta.url).resolve('koffi'); } catch { return null; }
}

/**
 * Node arguments that run the VM process (its own arguments follow): `outDir/vm-process.mjs`,
 * built now, with a source map (stack traces in VM logs name the TypeScript lines); the source
 * through tsx when the build fails (`why` says why, for the agent's log).
 */
export function vmProcessArgs(outDir: string): { args: string[]; why?: string } {
  try {
    fs.mkdirSync(outDir, { recursive: true });
    const out = path.join(outDir, 'vm-process.mjs');
    const built = buildSync({ entryPoints: [VM_PROCESS], outfile: out, bundle: true, platform: 'node', format: 'esm', target: 'node20', sourcemap: true, logLevel: 'silent', write: false, define: { __VMFERRY_KOFFI__: JSON.stringify(koffiPath()) } });
    // Written beside, then renamed over: a VM process starting meanwhile reads a whole file.
    for (const f of built.outputFiles) {
      const tmp = path.join(outDir, `.${path.basename(f.path)}-${process.pid}`);
      fs.writeFileSync(tmp, f.contents);
      fs.renameSync(tmp, f.path);
    }
    return { args: ['--enable-source-maps', out] };
  } catch (e) {
    return { args: ['--import', TSX_LOADER, VM_PROCESS], why: (e as Error).message };
  }
}
