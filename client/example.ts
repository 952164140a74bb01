// A script that starts a live migration and follows it, as Temporal users expect:
//   npx tsx client/example.ts <vm> <destination-host>
import { VmferryClient } from './index.js';

const [vm, to] = process.argv.slice(2);
if (!vm || !to) {
  console.error('usage: tsx client/example.ts <vm> <destination-host>');
  process.exit(2);
}
const c = await VmferryClient.connect();
try {
  const { id, from } = await c.startMigration({ type: 'live', vm, to, policy: { downtimeLimitMs: 200 } });
  console.log(`started ${id}: ${vm} ${from} → ${to}`);
  const done = c.awaitMigration(id);
  let finished = false;
  void done.finally(() => { finished = true; });
  while (!finished) {
    const p = await c.progress(id).catch(() => null);
    if (p) console.log(`${p.phase} round ${p.round}: ${p.bytesTransferred} bytes sent, ${p.dirtyPages} pages dirty`);
    await new Promise((r) => setTimeout(r, 500));
  }
  const r = await done;
  console.log(`${r.outcome}: ${r.reason} (downtime ${r.downtimeMs} ms, ${r.rounds} rounds)`);
  process.exitCode = r.outcome === 'completed' ? 0 : 3;
} finally {
  await c.close();
}
