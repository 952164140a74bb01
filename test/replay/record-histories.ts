// Records workflow histories from real runs into test/replay/histories/, for the replay suite.
// Run against a lab (`npm run -s vmferry -- lab up --detach`), then: npm run record-histories
// Re-record only on purpose: the old files are what keep old executions replayable.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync } from 'node:child_process';
import { findTemporalCli } from '../../lab/temporal-server.js';
import { temporalConfig } from '../../common/temporal.js';
import { readLab, labDir } from '../../lab/lab.js';
import { VmferryClient, type CreateVmInput } from '../../client/index.js';
import { WithStartWorkflowOperation } from '@temporalio/client';
import { ORCHESTRATOR_TASK_QUEUE, migrationIdFor } from '../../common/names.js';

const out = path.join(path.dirname(fileURLToPath(import.meta.url)), 'histories');
const c = await VmferryClient.connect();
const [A, B] = c.knownHosts as [string, string];
const tag = Date.now().toString(36);

async function save(name: string, workflowId: string): Promise<void> {
  // Existing fixtures are never overwritten: they keep the old code paths replayable.
  if (fs.existsSync(path.join(out, `${name}.json`))) { console.log(`kept existing ${name}`); return; }
  // The CLI's JSON export is the format the SDK's historyFromJSON reads (as the UI's download).
  const { connectionOptions, namespace } = temporalConfig(readLab(labDir())?.temporal.address);
  const json = execFileSync(findTemporalCli(), ['workflow', 'show', '--address', connectionOptions.address!, '--namespace', namespace, '-w', workflowId, '-o', 'json'], { encoding: 'utf8', maxBuffer: 64 << 20 });
  fs.writeFileSync(path.join(out, `${name}.json`), json);
  const idsFile = path.join(out, 'workflow-ids.json');
  const ids = fs.existsSync(idsFile) ? (JSON.parse(fs.readFileSync(idsFile, 'utf8')) as Record<string, string>) : {};
  fs.writeFileSync(idsFile, JSON.stringify({ ...ids, [name]: workflowId }, null, 2));
  console.log(`saved ${name} (${(JSON.parse(json) as { events: unknown[] }).events.length} events) from ${workflowId}`);
}

/** A VM on shared storage with a dirtying guest, and one on local storage with a writing guest. */
const LIVE_VM = { memory: '16MiB', disk: '4MiB', dirtyRate: '4MiB', fill: 0.5 } as const;
const LOCAL_VM = { memory: '16MiB', disk: '8MiB', storage: 'local', writeRate: '1MiB', diskFill: 0.5 } as const;

/** Creates `vm` on A, moves it to B and saves the history as `name`; nothing at all if that fixture is kept. */
async function recordMove(name: string, vm: string, type: 'live' | 'shared-nothing', spec: Omit<CreateVmInput, 'name' | 'host'>): Promise<void> {
  if (fs.existsSync(path.join(out, `${name}.json`))) { console.log(`kept existing ${name}`); return; }
  await c.createVm({ ...spec, name: vm, host: A });
  const m = await c.startMigration({ type, vm, to: B });
  console.log((await c.awaitMigration(m.id)).outcome);
  await save(name, m.id);
}

// 1. A completed live migration under a dirtying workload.
await c.createVm({ name: `rec-ok-${tag}`, host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '8MiB', fill: 0.5 });
const ok = await c.startMigration({ type: 'live', vm: `rec-ok-${tag}`, to: B });
console.log((await c.awaitMigration(ok.id)).outcome);
await save('live-migration-completed', ok.id);

// 2. Cancelled during pre-copy → rolled back.
await c.createVm({ name: `rec-cancel-${tag}`, host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '8MiB', fill: 0.9 });
const cancel = await c.startMigration({ type: 'live', vm: `rec-cancel-${tag}`, to: B, policy: { maxBandwidth: 4 * 2 ** 20 } });
for (;;) {
  const p = await c.progress(cancel.id);
  if (p.phase === 'precopy' && p.bytesTransferred > 0) break;
  await new Promise((r) => setTimeout(r, 100));
}
await c.cancelMigration(cancel.id);
console.log((await c.awaitMigration(cancel.id)).outcome);
await save('live-migration-cancelled', cancel.id);

// 3. Auto-converge: a guest that outruns a capped link gets throttled.
await c.createVm({ name: `rec-throttle-${tag}`, host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '16MiB', fill: 0.5 });
const thr = await c.startMigration({ type: 'live', vm: `rec-throttle-${tag}`, to: B, policy: { maxBandwidth: 12 * 2 ** 20, downtimeLimitMs: 50 } });
console.log((await c.awaitMigration(thr.id)).outcome);
await save('live-migration-throttled', thr.id);

// 4. Admin workflows.
const inv = `inventory-rec-${tag}`;
await c.client.workflow.execute('inventory', { taskQueue: 'vmferry-orchestrator', workflowId: inv, args: [[A, B]] });
await save('inventory', inv);
const hr = `host-request-rec-${tag}`;
await c.client.workflow.execute('hostRequest', { taskQueue: 'vmferry-orchestrator', workflowId: hr, args: [{ op: 'hostInfo', host: A }] });
await save('host-request', hr);

// 5. Live storage migration (two disks), completed; and one cancelled during the copy.
const lab = readLab(labDir())!;
const hostRoot = (h: string, root: string): string => path.join(lab.dir, 'hosts', h, root);
await c.createVm({ name: `rec-st-${tag}`, host: A, memory: '16MiB', disk: '8MiB', disks: 2, storage: 'local', writeRate: '1MiB', diskFill: 0.5 });
const st = await c.startMigration({ type: 'storage', vm: `rec-st-${tag}`, toPath: path.join(hostRoot(A, 'local2'), `rec-st-${tag}`) });
console.log((await c.awaitMigration(st.id)).outcome);
await save('storage-migration-completed', st.id);
await c.createVm({ name: `rec-stc-${tag}`, host: A, memory: '16MiB', disk: '32MiB', storage: 'local', writeRate: '1MiB', diskFill: 0.5 });
const stc = await c.startMigration({ type: 'storage', vm: `rec-stc-${tag}`, toPath: path.join(hostRoot(A, 'local2'), `rec-stc-${tag}`), maxBandwidth: 4 * 2 ** 20 });
for (;;) {
  if (((await c.progress(stc.id)).bytesCopied ?? 0) > 2 ** 20) break;
  await new Promise((r) => setTimeout(r, 100));
}
await c.cancelMigration(stc.id);
console.log((await c.awaitMigration(stc.id)).outcome);
await save('storage-migration-cancelled', stc.id);

// 6. Shared-nothing, completed.
await recordMove('shared-nothing-completed', `rec-sn-${tag}`, 'shared-nothing', LOCAL_VM);

// 7. Live migration on the current code path (supervision ends by itself).
await recordMove('live-migration-completed-v2', `rec-v2-${tag}`, 'live', LIVE_VM);

// 8. Evacuation of a host with two VMs (children: live and shared-nothing).
await c.createVm({ name: `rec-ev1-${tag}`, host: A, memory: '16MiB', disk: '4MiB' });
await c.createVm({ name: `rec-ev2-${tag}`, host: A, memory: '16MiB', disk: '4MiB', storage: 'local' });
const ev = await c.evacuate(A, { to: [B] });
console.log(JSON.stringify((await c.awaitEvacuation(ev.id)).items.map((i) => i.state)));
await save('evacuate-host', ev.id);
for (const n of [`rec-ev1-${tag}`, `rec-ev2-${tag}`]) await c.destroyVm(n).catch(() => undefined);

// 9. Live and shared-nothing migrations on the fast path (patch 'fast-path-v3': preflight in
// parallel, cleanup overlapping the end of supervision).
await recordMove('live-migration-completed-v3', `rec-v3-${tag}`, 'live', LIVE_VM);
await recordMove('shared-nothing-completed-v3', `rec-sn3-${tag}`, 'shared-nothing', LOCAL_VM);

// 10. Parallel start (patch 'parallel-start'): the grant minted by a local activity, the
// destination prepared while the source connects.
await recordMove('live-migration-completed-v4', `rec-v4-${tag}`, 'live', LIVE_VM);
await recordMove('shared-nothing-completed-v4', `rec-sn4-${tag}`, 'shared-nothing', LOCAL_VM);

// 11. The cutover activity releases the source itself (patch 'release-in-cutover').
await recordMove('live-migration-completed-v5', `rec-v5-${tag}`, 'live', LIVE_VM);

// 12. The workflow finds the source itself (input `candidates`, no `from`: a direct start, as
// the client always names the source) and answers the admission update; and a request it
// refuses (no such VM) before anything moves.
async function recordFound(name: string, vm: string, type: 'live' | 'shared-nothing', spec?: Omit<CreateVmInput, 'name' | 'host'>): Promise<void> {
  if (fs.existsSync(path.join(out, `${name}.json`))) { console.log(`kept existing ${name}`); return; }
  if (spec) await c.createVm({ ...spec, name: vm, host: A });
  const id = migrationIdFor(type, vm, Date.now().toString(36));
  const start = new WithStartWorkflowOperation(type === 'live' ? 'liveMigration' : 'sharedNothingMigration', {
    taskQueue: ORCHESTRATOR_TASK_QUEUE, workflowId: id, workflowIdConflictPolicy: 'FAIL', args: [{ migrationId: id, vm, candidates: [A, B], to: B }],
  });
  await c.client.workflow.executeUpdateWithStart('admission', { startWorkflowOperation: start }).catch((e: Error) => console.log(`refused: ${e.message}`));
  console.log((await c.awaitMigration(id)).outcome);
  await save(name, id);
}
await recordFound('live-migration-completed-v6', `rec-v6-${tag}`, 'live', LIVE_VM);
await recordFound('shared-nothing-completed-v6', `rec-sn6-${tag}`, 'shared-nothing', LOCAL_VM);
await recordFound('live-migration-refused', `rec-none-${tag}`, 'live');

// 13. The destination mints the grant token in the checks (patch 'grant-from-destination'):
// no local activity before the start.
await recordMove('live-migration-completed-v7', `rec-v7-${tag}`, 'live', LIVE_VM);
await recordMove('shared-nothing-completed-v7', `rec-sn7-${tag}`, 'shared-nothing', LOCAL_VM);

// 14. The round that converges cuts over in the source's awaitProgress (patch
// 'cutover-in-round'): no separate cutover activity.
await recordMove('live-migration-completed-v8', `rec-v8-${tag}`, 'live', LIVE_VM);
await recordMove('shared-nothing-completed-v8', `rec-sn8-${tag}`, 'shared-nothing', LOCAL_VM);

for (const n of [`rec-v8-${tag}`, `rec-sn8-${tag}`, `rec-v7-${tag}`, `rec-sn7-${tag}`, `rec-v6-${tag}`, `rec-sn6-${tag}`, `rec-v5-${tag}`, `rec-v4-${tag}`, `rec-sn4-${tag}`, `rec-v3-${tag}`, `rec-sn3-${tag}`, `rec-ok-${tag}`, `rec-cancel-${tag}`, `rec-throttle-${tag}`, `rec-st-${tag}`, `rec-stc-${tag}`, `rec-sn-${tag}`, `rec-v2-${tag}`]) await c.destroyVm(n).catch(() => undefined);
await c.close();
