// Host evacuation (maintenance mode): move every running VM off a host. Each VM's move is a
// child workflow (live when the destination shares its storage, shared-nothing otherwise), so
// each is visible and inspectable on its own in the UI. Destinations are chosen by free
// capacity; at most `concurrency` moves run at once and at most each host's limit touch a host.
// One failed VM does not stop the others.
import { defineQuery, executeChild, setHandler, upsertSearchAttributes, workflowInfo, ParentClosePolicy } from '@temporalio/workflow';
import type { HostInfo, MigrationPolicy, MigrationResult, MigrationType as MoveType } from '../common/types.js';
import { hostProxies } from './hosts.js';
import { MigrationType, SourceHost, MigrationPhase, MigrationOutcome } from '../common/search-attributes.js';
import { evacuateInputSchema } from '../common/schemas.js';
import { validated } from './validate.js';

export interface EvacuateInput {
  host: string;
  /** Candidate destinations (default: every other known host, given by the client). */
  to: string[];
  /** Moves at once overall (default 2). */
  concurrency?: number;
  /** Simultaneous migrations touching one host (default: the host's own limit, 2). */
  perHostLimit?: number;
  policy?: Partial<MigrationPolicy>;
}

export interface EvacuationItem {
  vm: string;
  to?: string;
  type?: MoveType;
  id?: string;
  state: 'waiting' | 'moving' | 'completed' | 'rolled-back' | 'failed' | 'skipped';
  reason?: string;
  downtimeMs?: number;
}

export interface EvacuationResult {
  host: string;
  items: EvacuationItem[];
  completed: number;
  failed: number;
}

export const evacuationQuery = defineQuery<EvacuationResult>('evacuation');

export async function evacuateHost(input: EvacuateInput): Promise<EvacuationResult> {
  validated(evacuateInputSchema, input, 'evacuation');
  const items: EvacuationItem[] = [];
  const summary = (): EvacuationResult => ({ host: input.host, items, completed: items.filter((i) => i.state === 'completed').length, failed: items.filter((i) => i.state !== 'completed' && i.state !== 'waiting' && i.state !== 'moving').length });
  setHandler(evacuationQuery, summary);
  upsertSearchAttributes([
    { key: MigrationType, value: 'evacuation' },
    { key: SourceHost, value: input.host },
    { key: MigrationPhase, value: 'planning' },
    { key: MigrationOutcome, value: 'running' },
  ]);

  const src = await hostProxies(input.host).probe.hostInfo();
  const dests = new Map<string, HostInfo>();
  for (const h of input.to.filter((x) => x !== input.host)) {
    try { dests.set(h, await hostProxies(h).probe.hostInfo()); } catch { /* unreachable: not a candidate */ }
  }
  for (const v of src.vms) if (v.state === 'running') items.push({ vm: v.name, state: 'waiting' });
  for (const v of src.vms) if (v.state !== 'running') items.push({ vm: v.name, state: 'skipped', reason: `VM is ${v.state}` });

  // Reservations keep two concurrent placements from overfilling one destination.
  const free = new Map([...dests].map(([h, i]) => [h, i.memoryCapacityBytes - i.memoryUsedBytes]));
  const active = new Map<string, number>();
  const limit = input.perHostLimit ?? 2;
  const concurrency = Math.max(1, input.concurrency ?? 2);
  let running = 0;
  const wakeups: Array<() => void> = [];
  const wake = (): void => { for (const w of wakeups.splice(0)) w(); };
  const slot = (): Promise<void> => new Promise((r) => wakeups.push(r));

  upsertSearchAttributes([{ key: MigrationPhase, value: 'moving' }]);
  const moves: Array<Promise<void>> = [];
  for (const item of items.filter((i) => i.state === 'waiting')) {
    const vm = src.vms.find((v) => v.name === item.vm)!;
    // Wait for a free slot: overall, on the source, and on some destination with room.
    let dest: string | undefined;
    for (;;) {
      const fits = [...free].filter(([h, f]) => f >= vm.memoryBytes && (active.get(h) ?? 0) < limit).sort((a, b) => b[1] - a[1]);
      if (fits.length === 0 && running === 0) break; // nothing can take it
      if (running < concurrency && (active.get(input.host) ?? 0) < limit && fits.length) { dest = fits[0]![0]; break; }
      await slot();
    }
    if (!dest) { item.state = 'failed'; item.reason = 'no destination has room for it'; continue; }
    const shared = vm && (await hostProxies(input.host).probe.inspectVm({ vm: item.vm }))?.spec.disks.every((d) => dests.get(dest!)!.storageRoots.some((r) => r.name === d.root && r.shared));
    const type: MoveType = shared ? 'live' : 'shared-nothing';
    const id = `${workflowInfo().workflowId}-${item.vm}`;
    Object.assign(item, { to: dest, type, id, state: 'moving' });
    free.set(dest, free.get(dest)! - vm.memoryBytes);
    active.set(dest, (active.get(dest) ?? 0) + 1);
    active.set(input.host, (active.get(input.host) ?? 0) + 1);
    running++;
    const args = [{ migrationId: id, vm: item.vm, from: input.host, to: dest, policy: input.policy }] as const;
    moves.push(
      executeChild<(a: (typeof args)[0]) => Promise<MigrationResult>>(type === 'live' ? 'liveMigration' : 'sharedNothingMigration', {
        workflowId: id,
        args: [...args],
        parentClosePolicy: ParentClosePolicy.REQUEST_CANCEL,
        staticSummary: `evacuation of ${input.host}: ${item.vm} → ${dest} (${type})`,
      })
        .then((r) => { item.state = r.outcome; item.reason = r.reason; item.downtimeMs = r.downtimeMs; if (r.outcome !== 'completed') free.set(dest!, free.get(dest!)! + vm.memoryBytes); })
        .catch((e: Error) => { item.state = 'failed'; item.reason = e.message; free.set(dest!, free.get(dest!)! + vm.memoryBytes); })
        .finally(() => {
          running--;
          active.set(dest!, active.get(dest!)! - 1);
          active.set(input.host, active.get(input.host)! - 1);
          wake();
        }),
    );
  }
  await Promise.all(moves);
  const s = summary();
  upsertSearchAttributes([{ key: MigrationPhase, value: 'done' }, { key: MigrationOutcome, value: s.failed ? 'partial' : 'completed' }]);
  return s;
}
