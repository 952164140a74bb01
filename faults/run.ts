// `npm run faults`: the full fault-injection matrix. Writes faults/results/latest.json and
// latest.md; exits non-zero if any case breaks an invariant. `--only <substring>` filters cases;
// `--plaintext` runs them between hosts without data-plane TLS (zero-copy receive), into
// latest-plaintext.{json,md}.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FaultLab, matrix, representative, runCase, type CaseResult } from './harness.js';

const args = process.argv.slice(2);
const only = args.includes('--only') ? args[args.indexOf('--only') + 1] : undefined;
const quick = args.includes('--quick');
const plaintext = args.includes('--plaintext');
const out = plaintext ? 'latest-plaintext' : 'latest';
const cases = (quick ? representative() : matrix()).filter((c) => !only || `${c.move}/${c.point}/${c.fault}`.includes(only));
const outDir = path.join(path.dirname(fileURLToPath(import.meta.url)), 'results');

const lab = await FaultLab.start({ plaintext });
const results: CaseResult[] = [];
try {
  for (const c of cases) {
    const t0 = Date.now();
    const r = await runCase(lab, c);
    results.push(r);
    const bad = Object.entries(r.invariants).filter(([, v]) => v !== true).map(([k, v]) => `${k}: ${v}`);
    console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${c.move}/${c.point}/${c.fault}: ${r.outcome} (${Date.now() - t0} ms)${r.error ? ` error: ${r.error}` : ''}${bad.length ? ` — ${bad.join('; ')}` : ''}`);
  }
} finally {
  await lab.stop();
}
fs.mkdirSync(outDir, { recursive: true });
fs.writeFileSync(path.join(outDir, `${out}.json`), JSON.stringify({ when: new Date().toISOString(), plaintext, cases: results }, null, 2));
const rows = results.map((r) => `| ${r.move} | ${r.point} | ${r.fault} | ${r.outcome} | ${r.recoveryMs} | ${r.ok ? '✔' : '✘ ' + (r.error ?? Object.entries(r.invariants).filter(([, v]) => v !== true).map(([k, v]) => `${k}: ${v}`).join('; '))} |`);
fs.writeFileSync(path.join(outDir, `${out}.md`), [
  `# Fault matrix${plaintext ? ' (plaintext data plane)' : ''} — ${new Date().toISOString()}`, '',
  `${results.filter((r) => r.ok).length} of ${results.length} cases keep every invariant.`, '',
  '| move | point | fault | outcome | recovery ms | invariants |', '|---|---|---|---|---|---|', ...rows, '',
].join('\n'));
const failed = results.filter((r) => !r.ok).length;
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
