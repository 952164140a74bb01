// `npm run demo`: brings the local lab up, boots a VM on hostA whose guest keeps dirtying
// memory and writing its disk, live-migrates it to hostB while probing it every 10 ms, and
// prints what an operator cares about. Exits 0 only if the VM verified intact on hostB.
// With the default page checks; `--verify-full` also CRCs all memory on both ends in the pause
// (one pass over 256 MiB, ~55 ms here, added to the downtime). `--down` stops the lab after.
import crypto from 'node:crypto';
import { labUp, labDown } from '../lab/lab.js';
import { VmferryClient } from '../client/index.js';
import { Prober } from '../client/probe.js';
import { downtimePhases, follow } from './main.js';
import { formatBytes } from '../common/sizes.js';
import { PAGE_SIZE } from '../common/types.js';

const args = new Set(process.argv.slice(2));
const say = (m: string): void => { process.stdout.write(m + '\n'); };

async function demo(): Promise<number> {
  say('vmferry demo: live migration hostA → hostB on the embedded simulator');
  const st = await labUp({ hosts: ['hostA', 'hostB'], log: (m) => say(`  ${m}`) });
  say(`  lab: Temporal ${st.temporal.address}${st.temporal.uiUrl ? `, UI ${st.temporal.uiUrl}` : ''}; agents ${st.hosts.map((h) => `${h.name} (pid ${h.pid})`).join(', ')}`);
  const c = await VmferryClient.connect();
  try {
    const name = `demo-${crypto.randomBytes(2).toString('hex')}`;
    const vm = await c.createVm({ name, host: 'hostA', memory: '256MiB', disk: '64MiB', dirtyRate: '32MiB', writeRate: '1MiB', fill: 0.7 });
    say(`  VM ${name} running on hostA (pid ${vm.pid}): 256 MiB memory, 64 MiB disk, guest dirtying 32 MiB/s and writing 1 MiB/s`);
    const probe = new Prober(vm.spec.probe, 10).start();
    await new Promise((r) => setTimeout(r, 500));
    const full = args.has('--verify-full');
    const { id } = await c.startMigration({ type: 'live', vm: name, to: 'hostB', policy: full ? { verify: 'full' } : {} });
    say(`  migration ${id} started`);
    const r = await follow(c, id, vm.spec.memoryBytes, false);
    await new Promise((r2) => setTimeout(r2, 300));
    const p = await probe.stop();
    const v = r.outcome === 'completed' ? await c.verifyVm(name) : null;
    const intact = !!v && v.ok && v.host === 'hostB';
    say('');
    say(`outcome          ${r.outcome}${r.reason ? ` — ${r.reason}` : ''}`);
    say(`total time       ${r.durationMs} ms`);
    say(`downtime         ${r.downtimeMs} ms (pause on hostA → running on hostB)`);
    if (r.cutover?.downtimePhasesMs) say(`  of which        ${downtimePhases(r.cutover.downtimePhasesMs)}`);
    say(`rounds           ${r.rounds} pre-copy round(s) + final copy of ${r.cutover?.finalPages ?? 0} dirty pages`);
    say(`bytes sent       ${formatBytes(r.bytesTransferred)} (${((r.bytesTransferred / vm.spec.memoryBytes) * 100).toFixed(0)}% of memory; zero pages are not sent)`);
    say(`lost probes      ${p.lost} of ${p.sent} at ${p.intervalMs} ms (longest gap ${p.maxGapMs} ms)`);
    const cut = r.cutover;
    if (cut) {
      say(`memory check     ${cut.sourceDigest === cut.destinationDigest ? `every page's CRC-32 checked on arrival; both ends' tables for all ${vm.spec.memoryBytes / PAGE_SIZE} pages equal in the pause (digest ${cut.sourceDigest.toString(16)})` : 'MISMATCH'}`);
      if (full) say(`                 ${cut.sourceFullCrc === cut.destinationFullCrc ? `CRC-32 of all memory equal on both sides (${cut.sourceFullCrc?.toString(16)})` : 'MISMATCH'}`);
    }
    for (const ch of v?.checks ?? []) say(`verify           ${ch.ok ? 'ok ' : 'BAD'} ${ch.name}: ${ch.detail}`);
    say(`VM now on        ${v?.host ?? '?'} — ${intact ? 'verified intact' : 'NOT verified'}`);
    const url = c.workflowUrl(id);
    if (url) say(`Temporal UI      ${url}`);
    if (args.has('--down')) await labDown();
    else say('The lab stays up for the UI; stop it with: npm run -s vmferry -- lab down');
    return intact ? 0 : 1;
  } finally {
    await c.close();
  }
}

demo().then(
  (code) => process.exit(code),
  (e: Error) => {
    process.stderr.write(`demo failed: ${e.message}\n`);
    process.exit(1);
  },
);
