// Shared steps of every move that carries a running VM's memory and state to another host:
// preflight, blank VM on the destination, pre-copy rounds under the convergence policy, and
// the cutover with its fenced resolution. Live and shared-nothing migration compose these.
import { ActivityFailure, ApplicationFailure, CancellationScope, condition, log, patched, proxyLocalActivities } from '@temporalio/workflow';
import type { MigrationPolicy, ProgressSample, VmInfo, HostInfo } from '../../common/types.js';
import type { OrchestratorActivities } from '../../activities/orchestrator-activities.js';
import type { CutoverByConvergence } from '../../activities/host-activities.js';
import { hostProxies, type HostProxies } from '../hosts.js';
import type { Saga } from '../saga.js';
import { reasonOf, type MigrationTracker } from '../tracker.js';
import { decide, type Decision } from '../decide.js';

export interface MemoryMoveContext {
  migrationId: string;
  vm: string;
  src: HostProxies;
  dst: HostProxies;
  policy: MigrationPolicy;
  tracker: MigrationTracker;
  saga: Saga;
  /** The destination's data-plane address (preflight's hostInfo): lets the source connect while the destination prepares. */
  destDataPlane?: { host: string; port: number };
  /** A grant token the destination minted in the checks (its hostInfo), for the memory stream. */
  destGrantToken?: string;
  /** The cutover activity also removes the source's fenced copy (live migration, files kept). */
  releaseSourceInCutover?: boolean;
}

const local = proxyLocalActivities<OrchestratorActivities>({ startToCloseTimeout: '5 s' });

/** How long one startOutgoing attempt keeps retrying a grant the destination has not issued yet. */
const GRANT_WAIT_MS = 20_000;

/** Checks that change nothing: the VM runs on the source, is not migrating, fits the destination. */
async function preflight(c: Pick<MemoryMoveContext, 'vm' | 'src' | 'dst'>): Promise<{ vm: VmInfo; dest: HostInfo }> {
  if (c.src.name === c.dst.name) throw refused(`source and destination are the same host (${c.src.name})`);
  // v3: both hosts are asked at once (two read-only calls; one round trip less).
  const both = patched('fast-path-v3') ? Promise.all([c.src.probe.inspectVm({ vm: c.vm }), c.dst.probe.hostInfo({ grantToken: true })]) : null;
  both?.catch(() => undefined);
  const vm = both ? (await both)[0] : await c.src.probe.inspectVm({ vm: c.vm });
  if (!vm) throw refused(`VM ${c.vm} is not on host ${c.src.name}`);
  if (vm.state !== 'running') throw refused(`VM ${c.vm} is ${vm.state} on ${c.src.name}, not running`);
  if (vm.migrationId) throw refused(`VM ${c.vm} is already migrating (${vm.migrationId})`, 'AlreadyMigrating');
  const dest = both ? (await both)[1] : await c.dst.probe.hostInfo();
  destinationFits(c.vm, vm, dest, c.dst.name);
  return { vm, dest };
}

function refused(message: string, type = 'BadRequest'): ApplicationFailure {
  return ApplicationFailure.create({ message, type, nonRetryable: true });
}

function destinationFits(name: string, vm: VmInfo, dest: HostInfo, destName: string): void {
  if (dest.vms.some((v) => v.name === name)) throw refused(`a VM named ${name} already exists on ${destName}`);
  const free = dest.memoryCapacityBytes - dest.memoryUsedBytes;
  if (free < vm.spec.memoryBytes) throw refused(`destination ${destName} lacks capacity: needs ${vm.spec.memoryBytes} bytes, ${free} free`, 'NoCapacity');
}

/**
 * The request's checks, finding the source first when it is not given: every candidate host
 * but the destination is asked for the VM at once, alongside the destination's inventory (the
 * same one round trip as preflight). The first host where it runs is the source; the questions
 * still pending then are cancelled (a host that does not answer delays only a VM found nowhere).
 */
export async function locateAndCheck(c: { vm: string; from?: string; candidates?: string[]; dst: HostProxies }): Promise<{ src: HostProxies; vm: VmInfo; dest: HostInfo }> {
  if (c.from) {
    const src = hostProxies(c.from);
    return { src, ...(await preflight({ vm: c.vm, src, dst: c.dst })) };
  }
  const others = [...new Set(c.candidates ?? [])].filter((h) => h !== c.dst.name);
  const destInfo = c.dst.probe.hostInfo({ grantToken: true });
  destInfo.catch(() => undefined);
  type Answer = { host: string; vm: VmInfo | null; error?: string };
  const search = new CancellationScope();
  const answers: Answer[] = [];
  const found = await search.run(() => new Promise<Answer | null>((resolve) => {
    if (!others.length) resolve(null);
    for (const host of others) {
      hostProxies(host).probe.inspectVm({ vm: c.vm }).then((vm) => ({ host, vm }), (e: unknown) => ({ host, vm: null, error: reasonOf(e) })).then((a: Answer) => {
        answers.push(a);
        if (a.vm?.state === 'running') resolve(a);
        else if (answers.length === others.length) resolve(null);
      });
    }
  }));
  search.cancel();
  const dest = await destInfo;
  const onDest = dest.vms.find((v) => v.name === c.vm);
  if (onDest?.state === 'running') throw refused(`VM ${c.vm} already runs on ${c.dst.name}: source and destination are the same host`);
  if (!found) {
    if (onDest) throw refused(`VM ${c.vm} is ${onDest.state} on ${c.dst.name}, not running`);
    const elsewhere = answers.find((a) => a.vm);
    if (elsewhere) throw refused(`VM ${c.vm} is ${elsewhere.vm!.state} on ${elsewhere.host}, not running`);
    const silent = answers.filter((a) => a.error).map((a) => `${a.host}: ${a.error}`);
    throw refused(`no VM named ${c.vm} on hosts ${[...others, c.dst.name].join(', ')}${silent.length ? ` (not answering: ${silent.join('; ')})` : ''}`, 'NoSuchVm');
  }
  const vm = found.vm!;
  if (vm.migrationId) throw refused(`VM ${c.vm} is already migrating (${vm.migrationId})`, 'AlreadyMigrating');
  destinationFits(c.vm, vm, dest, c.dst.name);
  return { src: hostProxies(found.host), vm, dest };
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
  let r;
  try {
    r = await c.src.undo.rollbackOutgoing(ids);
  } catch (e) {
    // v9: the source no longer has the VM: a cutover released it (a round that cut over while
    // its answer was lost, e.g. the Temporal server restarting). The destination says whether
    // it runs the VM, atomically refusing a late switchover if not.
    const gone = e instanceof ActivityFailure && e.cause instanceof ApplicationFailure && e.cause.type === 'VmGone';
    if (!gone || !patched('settle-source-gone')) throw e;
    if ((await c.dst.undo.abortIncoming(ids)).running) return 'destination';
    throw e;
  }
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
export async function moveMemory(c: MemoryMoveContext, vm: VmInfo, destSpec: VmInfo['spec'] = vm.spec): Promise<{ supervisionEnded: Promise<void>; sourceReleased: boolean }> {
  const { migrationId, src, dst, tracker, saga, policy } = c;
  const ids = { migrationId, vm: c.vm };

  tracker.phase('prepare-destination');
  saga.add('destroy blank VM on destination', () => dst.undo.abortIncoming(ids));
  // streams, token: input fields only (replay compares commands, not their arguments).
  const prepareIncoming = (token?: string) => dst.quick.prepareIncoming.executeWithOptions(
    { summary: `Blank VM ${c.vm} waits on ${dst.name} for memory and state` },
    [{ migrationId, spec: destSpec, sourceHost: src.name, ...(policy.streams && policy.streams > 1 ? { streams: policy.streams } : {}), ...(token ? { token } : {}) }],
  );
  // Rollback of the source: stop the job and keep (or put) the VM running. It reports where
  // the VM runs from the ownership record, so it can never resume a VM the destination owns.
  const stopSourceJob = (): void => saga.add('stop memory job, VM stays on source', async () => {
    if ((await settleSource(c)) === 'destination') log.warn('rollback found the VM owned by the destination', { ...ids });
  });

  // v4 (simulator): one round trip less. The grant is minted here and given to both ends at
  // once: the source connects while the destination prepares, retrying until the grant exists.
  // QEMU picks its incoming port only when prepared, so it keeps the sequential order.
  if (destSpec.driver !== 'qemu' && c.destDataPlane && patched('parallel-start')) {
    // v7: the destination minted the token in the checks; older histories (and an agent that
    // predates it) mint it here, in a local activity.
    const token = c.destGrantToken && patched('grant-from-destination') ? c.destGrantToken : (await local.mintGrant({ destination: dst.name })).token;
    stopSourceJob();
    const prepared = prepareIncoming(token);
    const started = src.quick.startOutgoing.executeWithOptions(
      { summary: `Connect ${c.vm}'s memory stream to ${dst.name} (as soon as it is prepared) and start pre-copy` },
      [{ ...ids, target: { endpoint: c.destDataPlane, token }, policy, grantWaitMs: GRANT_WAIT_MS }],
    );
    started.catch(() => undefined);
    try {
      await prepared;
    } catch (e) {
      // The grant will never come: stop the source's attempts, so its activity ends before the
      // rollback does (settleSource repeats this; it is idempotent).
      await CancellationScope.nonCancellable(async () => {
        await src.undo.rollbackOutgoing(ids).catch(() => undefined); // the saga's rollback reports any failure
        await started.catch(() => undefined);
      });
      throw e;
    }
    await started;
    tracker.phase('precopy');
  } else {
    const target = await prepareIncoming();
    tracker.phase('precopy');
    stopSourceJob();
    await src.quick.startOutgoing({ ...ids, target, policy });
  }

  // v8: without an operator's approval to wait for, the source's awaitProgress holds the
  // cutover pre-authorized: it judges each round with decide(), returns only a verdict other than
  // 'continue' (or a progress update), and cuts over at once on a cutover verdict (no workflow
  // task or activity dispatch between the last round and the pause, and none inside it).
  const cutoverInRound = !policy.approveCutover && patched('cutover-in-round');
  const release = c.releaseSourceInCutover === true;
  const cutoverArgs = { ...ids, destination: dst.name, verify: policy.verify, ...(release ? { releaseSource: true } : {}) };

  const supervision = new CancellationScope();
  const supervised = supervision.run(() => dst.supervise.superviseIncoming(ids));
  supervised.catch(() => undefined);
  const lostDestination = supervised.then(
    // A destination running the VM is the round's doing when it may cut over: the outcome
    // comes with the round's result.
    (r) => {
      if (cutoverInRound && r.state === 'running') return new Promise<never>(() => undefined);
      throw ApplicationFailure.create({ message: `destination ${dst.name} left the incoming state early (${r.state})`, nonRetryable: true });
    },
    (e: Error) => { throw ApplicationFailure.create({ message: `lost control of destination ${dst.name}: ${reasonOf(e)}`, type: 'DestinationLost', nonRetryable: true }); },
  );
  lostDestination.catch(() => undefined);

  const samples: ProgressSample[] = [];
  let cutInRound = false;
  let sourceReleased = false;
  for (;;) {
    let s: ProgressSample & CutoverByConvergence;
    const round = cutoverInRound
      ? src.long.awaitProgress.executeWithOptions(
        // The cutover itself happens inside this step now: the UI says so.
        { summary: `Pre-copy ${c.vm} to ${dst.name}; once a round fits the ${policy.downtimeLimitMs} ms downtime limit, pause on ${src.name}, send last dirty pages and device state, resume on ${dst.name}${release ? `, remove the fenced copy from ${src.name}` : ''}` },
        [{ ...ids, afterRound: tracker.round, cutoverWhen: { destination: dst.name, policy, memoryBytes: vm.spec.memoryBytes, samples, ...(release ? { releaseSource: true } : {}) } }],
      )
      : src.long.awaitProgress({ ...ids, afterRound: tracker.round });
    let roundFailure: unknown;
    round.catch((e: unknown) => { roundFailure = e; });
    try {
      s = await Promise.race([round, lostDestination]);
    } catch (e) {
      if (!cutoverInRound) throw e;
      // The round may have been cutting over when it failed (or was cancelled, or the
      // destination was lost): the ownership records say where the VM runs. A failure of the
      // round itself that came meanwhile (a cutover refused) says more than the destination's.
      if ((await CancellationScope.nonCancellable(() => settleSource(c))) !== 'destination') throw roundFailure ?? e;
      tracker.decision({ round: tracker.round, action: 'forward', reason: `pre-copy round ended in error (${reasonOf(e)}), but ${dst.name} owns and runs the VM` });
      cutInRound = true;
      break;
    }
    const { cutover, cutoverReason, samples: judged, ...sample } = s;
    // With cutoverWhen the source judged every round it saw, with decide() over these samples,
    // and returns them all: the same decisions follow here, round by round.
    const fresh = (judged ?? [sample]).filter((x) => x.round > tracker.round || x.state === 'failed');
    if (cutover) {
      for (const x of fresh) tracker.sample(x);
      tracker.sample(sample);
      tracker.decision({ round: s.round, action: 'cutover', reason: cutoverReason ?? 'converged' });
      tracker.phase('cutover');
      tracker.cutover = cutover;
      sourceReleased = release;
      cutInRound = true;
      break;
    }
    let d: Decision = { action: 'continue', reason: 'no new round' };
    let at = sample;
    for (const x of fresh) {
      tracker.sample(x);
      samples.push(x);
      if (samples.length > 8) samples.shift();
      d = decide(samples, policy, vm.spec.memoryBytes);
      at = x;
      if (d.action !== 'continue') break;
    }
    if (d.action === 'continue') {
      tracker.sample(sample); // the latest figures (an in-round update: progress only)
      continue;
    }
    tracker.decision({ round: at.round, action: d.action === 'throttle' ? `throttle ${d.throttle}` : d.action, reason: d.reason });
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

  // Once begun, the switchover finishes; a cancel that arrives now is honoured by rollback only
  // if the destination did not take the VM.
  if (!cutInRound) {
    tracker.phase('cutover');
    await CancellationScope.nonCancellable(async () => {
      try {
        tracker.cutover = await src.long.cutover.executeWithOptions(
          { summary: `Pause ${c.vm} on ${src.name}, send last dirty pages and device state, resume on ${dst.name}${release ? `; then remove the fenced copy from ${src.name}` : ''}`, retry: { maximumAttempts: 3, initialInterval: '200 ms' } },
          [cutoverArgs],
        );
        sourceReleased = release;
      } catch (e) {
        // Uncertain outcome (lost acknowledgement, crashed agent): ask the ownership records.
        if ((await settleSource(c)) !== 'destination') throw e;
        tracker.decision({ round: tracker.round, action: 'forward', reason: `cutover acknowledgement lost, but ${dst.name} owns and runs the VM` });
      }
    });
  }
  saga.clear();
  // Supervision ends by itself once the destination reports the VM running; waiting for it
  // (outside the downtime) leaves no activity pending behind a finished migration.
  const ended = CancellationScope.nonCancellable(async () => { await supervised.catch(() => undefined); });
  if (supervisionEndsByItself && !patched('fast-path-v3')) await ended;
  return { supervisionEnded: ended, sourceReleased };
}
