// Activities served by a host agent on its own task queue (`host-<name>`). Each is a thin,
// idempotent call into the hypervisor driver: safe to retry after a timeout or an agent
// restart. Inputs and outputs are small (ids, sizes, checksums, progress), never data.
import { Context, ApplicationFailure, CancelledFailure } from '@temporalio/activity';
import { ApplicationFailureCategory } from '@temporalio/common';
import { hasStorageMoves, type HypervisorDriver, type IncomingTarget, type RollbackResult, type StorageMoves } from '../drivers/driver.js';
import type { HostConfig } from '../common/host-config.js';
import { hostTaskQueue } from '../common/names.js';
import { faultPoint } from '../common/faults.js';
import { saveCutover, savedCutover } from './cutover-journal.js';
import type { CutoverResult, DiskMirrorStatus, DiskTargetGrant, HostInfo, MigrationPolicy, ProgressSample, VerifyReport, VmInfo, VmSpec } from '../common/types.js';
import { mintGrantToken } from '../dataplane/endpoint.js';
import { decide } from '../workflows/decide.js';

/** How soon a move refused by a full host (HostBusy) asks again. */
const HOST_BUSY_RETRY = '500 ms';

export interface CutoverArgs { migrationId: string; vm: string; destination: string; verify: MigrationPolicy['verify']; releaseSource?: boolean }

/**
 * awaitProgress's pre-authorized cutover: where to, the policy whose decide() judges the rounds,
 * and the workflow's last samples (decide() compares a round with the one before).
 */
export interface CutoverWhen { destination: string; releaseSource?: boolean; policy: MigrationPolicy; memoryBytes: number; samples?: ProgressSample[] }

/**
 * With cutoverWhen: every round's sample seen, in order (the last is the one returned); the
 * cutover result and decide()'s reason for it, when the last round was cut over.
 */
export interface CutoverByConvergence { samples?: ProgressSample[]; cutover?: CutoverResult; cutoverReason?: string }

/** The sample a retried awaitProgress reports for a cutover already journaled (no VM process left to ask). */
function sampleAfter(round: number, r: CutoverResult): ProgressSample {
  return { round: round + 1, elapsedMs: 0, bytesSent: r.bytesSent, pagesSent: 0, dirtyPages: 0, dirtyRate: 0, bandwidth: 0, throttle: 0, expectedDowntimeMs: 0, state: 'precopy' };
}

export interface HostActivityDeps {
  host: HostConfig;
  driver: HypervisorDriver;
}

async function heartbeatWhile<T>(work: Promise<T>, detail: () => unknown, everyMs = 1000): Promise<T> {
  const ctx = Context.current();
  const timer = setInterval(() => ctx.heartbeat(detail()), everyMs);
  try {
    return await Promise.race([work, ctx.cancelled.then(() => { throw new CancelledFailure('activity cancelled'); })]);
  } finally {
    clearInterval(timer);
  }
}

export function createHostActivities({ host, driver }: HostActivityDeps) {
  const storage = (): HypervisorDriver & StorageMoves => {
    if (!hasStorageMoves(driver)) throw ApplicationFailure.create({ message: `the ${driver.kind} driver does not support storage moves yet`, type: 'NotSupported', nonRetryable: true });
    return driver;
  };
  const nonRetryable = (e: unknown, type: string): never => {
    throw ApplicationFailure.create({ message: (e as Error).message, type, nonRetryable: true });
  };
  /**
   * The host's limit on simultaneous migrations (host.json maxConcurrentMigrations, default 2).
   * A full host answers with a retryable HostBusy: the activity's retry policy makes the
   * migration wait for a slot (visible in the UI as the pending activity's last failure) until
   * its schedule-to-close deadline. A destination counts everything in flight on it; a source
   * counts its outgoing moves only, so two hosts migrating to each other cannot deadlock.
   * HostBusy sets its own retry delay: the proxy's backoff (up to 5 s, meant for a host that
   * does not answer) left a freed slot unused for seconds; one cheap inventory every
   * HOST_BUSY_RETRY per waiting move finds it at once.
   */
  const admitMigration = async (migrationId: string, vm: string, direction: 'incoming' | 'outgoing'): Promise<void> => {
    const limit = host.maxConcurrentMigrations > 0 ? host.maxConcurrentMigrations : 2;
    const busy = (await driver.list({ recorded: true })).filter((v) => v.migrationId && v.migrationId !== migrationId && v.name !== vm
      && v.state !== 'stopped' && v.state !== 'failed' && v.state !== 'migrated'
      && (direction === 'incoming' || v.state !== 'incoming'));
    if (busy.length >= limit) {
      throw ApplicationFailure.create({
        message: `host ${host.name} is busy: ${busy.length} migration(s) in flight (${busy.map((v) => v.name).join(', ')}), limit ${limit}; waiting for a slot`,
        type: 'HostBusy',
        nextRetryDelay: HOST_BUSY_RETRY,
        // Waiting is expected, not an error: the SDK logs it at debug, not a warning per attempt.
        category: ApplicationFailureCategory.BENIGN,
      });
    }
  };

  /**
   * Removes the source's paused, fenced copy after a completed cutover. Idempotent. `recorded`:
   * right after the cutover's answer, the state the VM process recorded before giving it is
   * enough (asking the process, busy just then with its last writes, took up to 20 ms).
   */
  const releaseSource = async (p: { migrationId: string; vm: string; deleteStorage: boolean }, opts: { recorded?: boolean } = {}): Promise<{ destroyed: boolean }> => {
    if ((await faultPoint('before-release-source')) === 'fail') throw new Error(`release of ${p.vm} failed (fault injection)`);
    const info = await driver.get(p.vm, opts);
    if (!info) return { destroyed: false };
    if (info.state === 'running') {
      throw ApplicationFailure.create({ message: `refusing to remove VM ${p.vm} from ${host.name}: it is running here`, type: 'SourceStillRunning', nonRetryable: true });
    }
    return driver.destroy(p.vm, { deleteStorage: p.deleteStorage });
  };

  /**
   * `releaseSource` (live migration, shared storage): once the destination runs the VM, remove
   * the paused, fenced source copy in the same activity (one round trip less). The result is
   * journaled first, so a retry after the release answers from the journal (and completes an
   * interrupted release) instead of finding no VM.
   */
  const cutoverAndRelease = async (p: CutoverArgs, journalRead?: CutoverResult | null): Promise<CutoverResult> => {
    // journalRead: the caller read the journal already (null: nothing there), just before.
    let r = p.releaseSource ? (journalRead === undefined ? savedCutover(host.runDir, p.migrationId, p.vm) : journalRead ?? undefined) : undefined;
    const journaled = r !== undefined;
    if (!r) {
      r = await heartbeatWhile(driver.cutover(p.vm, p.migrationId, p.destination, p.verify), () => ({ phase: 'cutover' }));
      if (p.releaseSource) saveCutover(host.runDir, p.migrationId, p.vm, r);
    }
    if (p.releaseSource) await releaseSource({ migrationId: p.migrationId, vm: p.vm, deleteStorage: false }, { recorded: !journaled });
    return r;
  };

  return {
    async hostInfo(p?: { grantToken?: boolean }): Promise<HostInfo> {
      // Names, states and memory only: the recorded states say as much, with no call to each VM.
      const vms = await driver.list({ recorded: true });
      const used = vms.filter((v) => v.state !== 'stopped' && v.state !== 'failed' && v.state !== 'migrated').reduce((a, v) => a + v.spec.memoryBytes, 0);
      return {
        name: host.name,
        taskQueue: hostTaskQueue(host.name),
        memoryCapacityBytes: host.memoryCapacityBytes,
        memoryUsedBytes: used,
        storageRoots: host.storageRoots,
        dataPlane: host.dataPlane,
        vms: vms.map((v) => ({ name: v.name, state: v.state, epoch: v.epoch, migrationId: v.migrationId, memoryBytes: v.spec.memoryBytes, ...(v.hugePages !== undefined ? { hugePages: v.hugePages } : {}) })),
        ...(p?.grantToken ? { grantToken: mintGrantToken(host.name) } : {}),
      };
    },

    async listVms(): Promise<VmInfo[]> {
      return driver.list();
    },

    async inspectVm(p: { vm: string }): Promise<VmInfo | null> {
      return (await driver.get(p.vm)) ?? null;
    },

    async createVm(p: { spec: VmSpec }): Promise<VmInfo> {
      try { return await driver.create(p.spec); } catch (e) { return nonRetryable(e, 'CreateRefused'); }
    },

    async destroyVm(p: { vm: string; deleteStorage: boolean }): Promise<{ destroyed: boolean }> {
      return driver.destroy(p.vm, { deleteStorage: p.deleteStorage });
    },

    async verifyVm(p: { vm: string }): Promise<VerifyReport> {
      return driver.verify(p.vm);
    },

    /** `token`: a grant the orchestrator minted and gave the source at the same time (parallel start). */
    async prepareIncoming(p: { migrationId: string; spec: VmSpec; sourceHost: string; streams?: number; token?: string }): Promise<IncomingTarget> {
      await admitMigration(p.migrationId, p.spec.name, 'incoming');
      // Fault injection: a destination that refuses late (after preflight passed).
      if ((await faultPoint('prepare-incoming')) === 'refuse') nonRetryable(new Error(`destination ${host.name} refused the incoming VM (fault injection)`), 'DestinationRefused');
      try { return await driver.prepareIncoming(p.spec, p.migrationId, p.sourceHost, { streams: p.streams, token: p.token }); } catch (e) { return nonRetryable(e, 'DestinationRefused'); }
    },

    /**
     * Runs alongside pre-copy: heartbeats the destination's receive progress. If this host's
     * agent dies the heartbeat stops and the workflow learns it lost control of the destination.
     * Ends once the destination runs the VM.
     */
    async superviseIncoming(p: { migrationId: string; vm: string }): Promise<{ state: string }> {
      const ctx = Context.current();
      let last: string | undefined;
      for (;;) {
        // A driver that can waits for the next state change (up to 1 s, then a heartbeat): the
        // workflow's cleanup waits for this activity to end, so it should end at the resume.
        const st = await driver.incomingStatus(p.vm, p.migrationId, last ? { waitMs: 1000, unlessState: last } : undefined);
        last = st.state;
        if (st.state === 'failed' || st.state === 'unreachable' || !st.exists) {
          throw ApplicationFailure.create({ message: `destination ${host.name}: incoming VM ${st.state}${st.error ? `: ${st.error}` : ''}`, type: 'DestinationFailed', nonRetryable: true });
        }
        if (st.state === 'running') return { state: st.state };
        // Only while it goes on: the SDK holds a completion until a heartbeat in flight is answered.
        ctx.heartbeat(st);
        if (ctx.cancellationSignal.aborted) return { state: 'supervision-cancelled' };
        if (st.waited) continue;
        // Short: the workflow's cleanup waits for this to end after the cutover.
        try { await ctx.sleep(50); } catch { return { state: 'supervision-cancelled' }; }
      }
    },

    async abortIncoming(p: { migrationId: string; vm: string }): Promise<{ aborted: boolean; running: boolean }> {
      await faultPoint('rollback-step');
      return driver.abortIncoming(p.vm, p.migrationId);
    },

    /** `grantWaitMs`: the destination is being prepared at the same time (parallel start). */
    async startOutgoing(p: { migrationId: string; vm: string; target: IncomingTarget; policy: MigrationPolicy; grantWaitMs?: number }): Promise<void> {
      await admitMigration(p.migrationId, p.vm, 'outgoing');
      try {
        await driver.startOutgoing(p.vm, p.migrationId, p.target, p.policy, { grantWaitMs: p.grantWaitMs });
      } catch (e) {
        // The destination is still preparing (e.g. waiting for a slot of its own): a retryable
        // failure, so the activity's retry policy waits as long as prepareIncoming may.
        if (p.grantWaitMs && /no valid grant/.test((e as Error).message)) throw ApplicationFailure.create({ message: `destination has not issued the grant yet: ${(e as Error).message}`, type: 'GrantNotReady' });
        nonRetryable(e, 'SourceRefused');
      }
    },

    /**
     * Waits for the next pre-copy round to finish and returns its sample. With `cutoverWhen`
     * (the workflow's pre-authorization: no operator approval asked), the rounds are judged
     * here with the workflow's own `decide()`, over the samples it passed and those seen since:
     * a round it would only let go on is not returned (the control plane stays quiet while the
     * guest runs, and no workflow task overlaps the pause); a cutover verdict is carried out at
     * once, in this activity; any other verdict returns. Every sample seen travels back in
     * `samples`, so the workflow replays the same decisions and history keeps them.
     */
    async awaitProgress(p: { migrationId: string; vm: string; afterRound: number; cutoverWhen?: CutoverWhen }): Promise<ProgressSample & CutoverByConvergence> {
      const ctx = Context.current();
      const arm = p.cutoverWhen;
      const seen: ProgressSample[] = [];
      const judged = [...(arm?.samples ?? [])];
      // A retry after the cutover began: its outcome (the journal; the VM process's cutover is
      // idempotent), never a second decision. A first attempt has nothing journaled: it reads
      // no file (null), neither here nor before its cutover.
      const saved = arm?.releaseSource ? (ctx.info.attempt > 1 ? savedCutover(host.runDir, p.migrationId, p.vm) ?? null : null) : undefined;
      const done = (s: ProgressSample, extra: CutoverByConvergence = {}): ProgressSample & CutoverByConvergence => ({ ...s, ...(arm ? { samples: seen } : {}), ...extra });
      const cut = async (s: ProgressSample, reason: string): Promise<ProgressSample & CutoverByConvergence> => {
        try {
          return done(s, { cutoverReason: reason, cutover: await cutoverAndRelease({ migrationId: p.migrationId, vm: p.vm, destination: arm!.destination, verify: arm!.policy.verify, releaseSource: arm!.releaseSource }, saved) });
        } catch (e) {
          // A failed cutover failed the job too: a retry could only find it failed. The
          // workflow settles where the VM runs from the ownership records.
          if (e instanceof CancelledFailure) throw e;
          return nonRetryable(e, 'CutoverFailed');
        }
      };
      if (saved) return cut(sampleAfter(p.afterRound, saved), 'cutover made before this activity was retried');
      // Returns on a new round, or after 2 s with in-round figures so progress stays visible.
      const deadline = Date.now() + 2_000;
      let after = p.afterRound;
      for (;;) {
        const s = await driver.outgoingProgress(p.vm, p.migrationId, after, 1000);
        if (arm && s.state === 'cutover') return cut(s, 'cutover under way before this activity was retried');
        if (arm && s.round > after && s.state === 'precopy') {
          seen.push(s);
          judged.push(s);
          if (judged.length > 8) judged.shift();
          const d = decide(judged, arm.policy, arm.memoryBytes);
          if (d.action === 'cutover') return cut(s, d.reason);
          if (d.action !== 'continue' || seen.length >= 64) return done(s);
          after = s.round;
        } else if (s.round > after || s.state !== 'precopy') return done(s);
        if (Date.now() > deadline) return done(s);
        // Not before returning: a heartbeat still in flight holds the completion (one more RPC).
        ctx.heartbeat({ round: s.round, bytesSent: s.bytesSent });
        if (ctx.cancellationSignal.aborted) throw new CancelledFailure('activity cancelled');
      }
    },

    async setOutgoingPolicy(p: { migrationId: string; vm: string; throttle?: number; maxBandwidth?: number }): Promise<void> {
      await driver.setOutgoingPolicy(p.vm, p.migrationId, { throttle: p.throttle, maxBandwidth: p.maxBandwidth });
    },

    /** The cutover the workflow decided on (see cutoverAndRelease). */
    async cutover(p: CutoverArgs): Promise<CutoverResult> {
      return cutoverAndRelease(p);
    },

    async rollbackOutgoing(p: { migrationId: string; vm: string; allowReclaim?: boolean }): Promise<RollbackResult> {
      await faultPoint('rollback-step');
      try { return await driver.rollbackOutgoing(p.vm, p.migrationId, p.allowReclaim); } catch (e) {
        if ((e as Error).name === 'VmGone') return nonRetryable(e, 'VmGone');
        throw e;
      }
    },

    // ---- storage moves ----

    async startLocalDiskMirror(p: { migrationId: string; vm: string; targets: Record<string, string>; maxBandwidth?: number }): Promise<DiskMirrorStatus> {
      await admitMigration(p.migrationId, p.vm, 'outgoing');
      try { return await storage().startLocalDiskMirror(p.vm, p.migrationId, p.targets, p.maxBandwidth); } catch (e) { return nonRetryable(e, 'StorageRefused'); }
    },

    async startRemoteDiskMirror(p: { migrationId: string; vm: string; grant: DiskTargetGrant; maxBandwidth?: number }): Promise<DiskMirrorStatus> {
      await admitMigration(p.migrationId, p.vm, 'outgoing');
      try {
        return await storage().startDiskMirror(p.vm, p.migrationId, { kind: 'remote', endpoint: p.grant.endpoint, token: p.grant.token, hello: { migrationId: p.migrationId, vm: p.vm, from: host.name } }, p.maxBandwidth);
      } catch (e) { return nonRetryable(e, 'StorageRefused'); }
    },

    async resumeDiskMirror(p: { migrationId: string; vm: string; token: string }): Promise<DiskMirrorStatus> {
      return storage().resumeDiskMirror(p.vm, p.migrationId, p.token);
    },

    /**
     * Follows the bulk copy, heartbeating its checkpoint; returns once the copy is synced (writes
     * still mirrored), disconnected (the caller re-grants and resumes) or failed.
     */
    async awaitDiskMirror(p: { migrationId: string; vm: string }): Promise<DiskMirrorStatus> {
      const ctx = Context.current();
      const until = Date.now() + 2000; // return at least every 2 s: progress stays visible
      for (;;) {
        const st = await storage().diskMirrorStatus(p.vm, p.migrationId);
        ctx.heartbeat({ bytesCopied: st.bytesCopied, checkpoint: st.checkpoint });
        if (st.state !== 'copying' || Date.now() > until) return st;
        try { await ctx.sleep(250); } catch { throw new CancelledFailure('activity cancelled'); }
      }
    },

    async diskMirrorStatus(p: { migrationId: string; vm: string }): Promise<DiskMirrorStatus> {
      return storage().diskMirrorStatus(p.vm, p.migrationId);
    },

    async abortDiskMirror(p: { migrationId: string; vm: string; targets?: Record<string, string> }): Promise<{ aborted: boolean }> {
      return storage().abortDiskMirror(p.vm, p.migrationId, p.targets);
    },

    async switchDisks(p: { migrationId: string; vm: string; targets: Record<string, string> }) {
      return heartbeatWhile(storage().switchDisks(p.vm, p.migrationId, p.targets), () => ({ phase: 'verify-and-switch' }));
    },

    async deleteOldDiskFiles(p: { vm: string; paths: string[] }): Promise<{ deleted: string[] }> {
      return storage().deleteOldDiskFiles(p.vm, p.paths);
    },

    async prepareDiskTargets(p: { migrationId: string; spec: VmSpec; sourceHost: string; epoch: number; dir?: string }): Promise<DiskTargetGrant & { spec: VmSpec }> {
      await admitMigration(p.migrationId, p.spec.name, 'incoming');
      try { return await storage().prepareDiskTargets(p.spec, p.migrationId, p.sourceHost, p.epoch, p.dir); } catch (e) { return nonRetryable(e, 'DestinationRefused'); }
    },

    async deleteDiskTargets(p: { migrationId: string; vm: string; dir?: string }): Promise<{ deleted: boolean }> {
      return storage().deleteDiskTargets(p.vm, p.migrationId, p.dir);
    },

    async adoptDiskTargets(p: { migrationId: string; vm: string; dir?: string }): Promise<void> {
      await storage().adoptDiskTargets(p.vm, p.migrationId, p.dir);
    },

    /** Removes the source copy after a completed cutover; refuses to touch a VM that runs here. */
    releaseSource,

    async guestWrite(p: { vm: string }): Promise<{ diskWrites: number }> {
      return driver.guestWrite(p.vm);
    },
  };
}

export type HostActivities = ReturnType<typeof createHostActivities>;
