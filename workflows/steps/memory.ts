// Shared steps of every move that carries a running VM's memory and state to another host:
// preflight, blank VM on the destination, pre-copy rounds under the convergence policy, and
// the cutover with its fenced resolution. Live and shared-nothing migration compose these.
import { ApplicationFailure, CancellationScope, condition, log, patched } from '@temporalio/workflow';
import type { MigrationPolicy, ProgressSample, VmInfo, HostInfo } from '../../common/types.js';
import type { HostProxies } from '../hosts.js';
import type { Saga } from '../saga.js';
import { reasonOf, type MigrationTracker } from '../tracker.js';
import { decide } from '../decide.js';

export interface MemoryMoveContext {
  migrationId: string;
  vm: string;
  src: HostProxies;
  dst: HostProxies;
  policy: MigrationPolicy;
  tracker: MigrationTracker;
  saga: Saga;
}

/** Checks that change nothing: the VM runs on the source, is not migrating, fits the destination. */
export async function preflight(c: Pick<MemoryMoveContext, 'vm' | 'src' | 'dst'>): Promise<{ vm: VmInfo; dest: HostInfo }> {
  if (c.src.name === c.dst.name) throw ApplicationFailure.create({ message: `source and destination are the same host (${c.src.name})`, type: 'BadRequest', nonRetryable: true });
  // v3: both hosts are asked at once (two read-only calls; one round trip less).
  const both = patched('fast-path-v3') ? Promise.all([c.src.probe.inspectVm({ vm: c.vm }), c.dst.probe.hostInfo()]) : null;
  both?.catch(() => undefined);
  const vm = both ? (await both)[0] : await c.src.probe.inspectVm({ vm: c.vm });
  if (!vm) throw ApplicationFailure.create({ message: `VM ${c.vm} is not on host ${c.src.name}`, type: 'BadRequest', nonRetryable: true });
  if (vm.state !== 'running') throw ApplicationFailure.create({ message: `VM ${c.vm} is ${vm.state} on ${c.src.name}, not running`, type: 'BadRequest', nonRetryable: true });
  if (vm.migrationId) throw ApplicationFailure.create({ message: `VM ${c.vm} is already migrating (${vm.migrationId})`, type: 'AlreadyMigrating', nonRetryable: true });
  const dest = both ? (await both)[1] : await c.dst.probe.hostInfo();
  if (dest.vms.some((v) => v.name === c.vm)) throw ApplicationFailure.create({ message: `a VM named ${c.vm} already exists on ${c.dst.name}`, type: 'BadRequest', nonRetryable: true });
  const free = dest.memoryCapacityBytes - dest.memoryUsedBytes;
  if (free < vm.spec.memoryBytes) throw ApplicationFailure.create({ message: `destination ${c.dst.name} lacks capacity: needs ${vm.spec.memoryBytes} bytes, ${free} free`, type: 'NoCapacity', nonRetryable: true });
  return { vm, dest };
}

/**
 * Blank VM on the destination → pre-copy rounds → cutover. Returns once the destination runs
 * the VM (the point of no return); throws with the source still running otherwise.
 */
/**
 * Where the VM runs after stopping the source's job, established through the ownership records
 * and never guessed: when the source handed the VM to a destination with storage of its own,
 * the destination is aborted first (atomically refusing a late switchover) and only then may the
 * source take the VM back.
 */
export async function settleSource(c: Pick<MemoryMoveContext, 'migrationId' | 'vm' | 'src' | 'dst'>): Promise<'source' | 'destination'> {
  const ids = { migrationId: c.migrationId, vm: c.vm };
  let r = await c.src.undo.rollbackOutgoing(ids);
  if (r.runsOn === 'undecided') {
    const d = await c.dst.undo.abortIncoming(ids);
    if (d.running) return 'destination';
    r = await c.src.undo.rollbackOutgoing({ ...ids, allowReclaim: true });
  }
  return r.runsOn === 'destination' ? 'destination' : 'source';
}

/**
 * Returns once the destination runs the VM. `supervisionEnded` settles when the destination's
 * supervision activity has finished too: the caller awaits it alongside its cleanup (v3), so a
 * finished migration leaves no activity pending and the wait costs no extra time.
 */
export async function moveMemory(c: MemoryMoveContext, vm: VmInfo, destSpec: VmInfo['spec'] = vm.spec): Promise<{ supervisionEnded: Promise<void> }> {
  const { migrationId, src, dst, tracker, saga, policy } = c;
  const ids = { migrationId, vm: c.vm };

  tracker.phase('prepare-destination');
  saga.add('destroy blank VM on destination', () => dst.undo.abortIncoming(ids));
  const target = await dst.quick.prepareIncoming.executeWithOptions(
    { summary: `Blank VM ${c.vm} waits on ${dst.name} for memory and state` },
    // streams: an input field only (replay compares commands, not their arguments).
    [{ migrationId, spec: destSpec, sourceHost: src.name, ...(policy.streams && policy.streams > 1 ? { streams: policy.streams } : {}) }],
  );

  tracker.phase('precopy');
  // Rollback of the source: stop the job and keep (or put) the VM running. It reports where
  // the VM runs from the ownership record, so it can never resume a VM the destination owns.
  saga.add('stop memory job, VM stays on source', async () => {
    if ((await settleSource(c)) === 'destination') log.warn('rollback found the VM owned by the destination', { ...ids });
  });
  await src.quick.startOutgoing({ ...ids, target, policy });

  const supervision = new CancellationScope();
  const supervised = supervision.run(() => dst.supervise.superviseIncoming(ids));
  supervised.catch(() => undefined);
  const lostDestination = supervised.then(
    (r) => { throw ApplicationFailure.create({ message: `destination ${dst.name} left the incoming state early (${r.state})`, nonRetryable: true }); },
    (e: Error) => { throw ApplicationFailure.create({ message: `lost control of destination ${dst.name}: ${reasonOf(e)}`, type: 'DestinationLost', nonRetryable: true }); },
  );
  lostDestination.catch(() => undefined);

  const samples: ProgressSample[] = [];
  for (;;) {
    const s = await Promise.race([src.long.awaitProgress({ ...ids, afterRound: tracker.round }), lostDestination]);
    const newRound = s.round > tracker.round || s.state === 'failed';
    tracker.sample(s);
    if (!newRound) continue; // an in-round update: progress only, nothing to decide
    samples.push(s);
    if (samples.length > 8) samples.shift();
    const d = decide(samples, policy, vm.spec.memoryBytes);
    if (d.action === 'continue') continue;
    tracker.decision({ round: s.round, action: d.action === 'throttle' ? `throttle ${d.throttle}` : d.action, reason: d.reason });
    if (d.action === 'abort') throw ApplicationFailure.create({ message: d.reason, type: 'NotConverging', nonRetryable: true });
    if (d.action === 'cutover' && policy.approveCutover && !tracker.approved) {
      // Pre-copy keeps running in the VM process while the operator decides.
      tracker.phase('awaiting-approval');
      const timeout = policy.approvalTimeoutMs ?? 15 * 60_000;
      const ok = await Promise.race([condition(() => tracker.approved, timeout), lostDestination]);
      if (!ok) throw ApplicationFailure.create({ message: `cutover not approved within ${Math.round(timeout / 1000)} s`, type: 'NotApproved', nonRetryable: true });
      tracker.phase('precopy');
      continue; // decide again on a fresh sample: the dirty set moved while we waited
    }
    if (d.action === 'throttle') {
      // The measurements behind the decision travel in the activity input: they stay in history.
      await src.quick.setOutgoingPolicy.executeWithOptions({ summary: `Auto-converge: throttle guest to ${Math.round((1 - d.throttle) * 100)}% — ${d.reason}` }, [{ ...ids, throttle: d.throttle }]);
      continue;
    }
    break;
  }
  // v1 cancelled supervision here, leaving a cancelled activity pending behind the migration.
  const supervisionEndsByItself = patched('supervision-ends-by-itself');
  if (!supervisionEndsByItself) supervision.cancel();

  tracker.phase('cutover');
  // Once begun, the switchover finishes; a cancel that arrives now is honoured by rollback only
  // if the destination did not take the VM.
  await CancellationScope.nonCancellable(async () => {
    try {
      tracker.cutover = await src.long.cutover.executeWithOptions(
        { summary: `Pause ${c.vm} on ${src.name}, send last dirty pages and device state, resume on ${dst.name}`, retry: { maximumAttempts: 3, initialInterval: '200 ms' } },
        [{ ...ids, destination: dst.name, verify: policy.verify }],
      );
    } catch (e) {
      // Uncertain outcome (lost acknowledgement, crashed agent): ask the ownership records.
      if ((await settleSource(c)) !== 'destination') throw e;
      tracker.decision({ round: tracker.round, action: 'forward', reason: `cutover acknowledgement lost, but ${dst.name} owns and runs the VM` });
    }
  });
  saga.clear();
  // Supervision ends by itself once the destination reports the VM running; waiting for it
  // (outside the downtime) leaves no activity pending behind a finished migration.
  const ended = CancellationScope.nonCancellable(async () => { await supervised.catch(() => undefined); });
  if (supervisionEndsByItself && !patched('fast-path-v3')) await ended;
  return { supervisionEnded: ended };
}
