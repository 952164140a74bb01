// What an operator sees of a running migration: the `progress` query, search attributes kept
// current at each phase change, and the final result. Shared by every move type.
import { ApplicationFailure, CancellationScope, allHandlersFinished, condition, defineQuery, defineUpdate, setHandler, upsertSearchAttributes, workflowInfo, isCancellation, log, metricMeter } from '@temporalio/workflow';
import type { DecisionRecord, MigrationPhaseProgress, MigrationResult, MigrationType as MoveType, ProgressSample, CutoverResult } from '../common/types.js';
import { VmName, SourceHost, DestinationHost, MigrationType, MigrationPhase, MigrationOutcome } from '../common/search-attributes.js';

export const progressQuery = defineQuery<MigrationPhaseProgress>('progress');
/** Operator approval of the cutover (policy.approveCutover); the validator accepts it only while one waits. */
export const approveCutoverUpdate = defineUpdate<{ approved: boolean }, [{ by?: string }]>('approveCutover');
/**
 * Answered once the request's checks are done (the VM found and running, the destination fit):
 * where the VM moves from, or the refusal as an ApplicationFailure `MigrationRefused`. The client
 * sends it with the start (update-with-start), so a bad request is refused synchronously.
 */
export const admissionUpdate = defineUpdate<{ from: string; to: string }>('admission');

export class MigrationTracker {
  phaseName = 'starting';
  round = 0;
  bytesTransferred = 0;
  dirtyPages = 0;
  rate = 0;
  throttle = 0;
  decisions: DecisionRecord[] = [];
  cutover?: CutoverResult;
  bytesCopied = 0;
  bytesMirrored = 0;
  approved = false;
  /** The source host: given, or found by the checks (admit). */
  from: string;
  private admission?: { from: string } | { refused: string };
  private readonly startedAt = Date.now();

  constructor(readonly type: MoveType, readonly input: { migrationId: string; vm: string; from?: string; to: string }) {
    this.from = input.from ?? '';
    setHandler(progressQuery, () => ({
      phase: this.phaseName,
      bytesCopied: this.bytesCopied,
      bytesMirrored: this.bytesMirrored,
      round: this.round,
      bytesTransferred: this.bytesTransferred,
      dirtyPages: this.dirtyPages,
      rateBytesPerSec: this.rate,
      throttle: this.throttle,
      decisions: this.decisions.slice(-20),
    }));
    setHandler(approveCutoverUpdate, (a: { by?: string }) => {
      this.approved = true;
      this.decision({ round: this.round, action: 'approved', reason: `cutover approved by ${a.by ?? 'an operator'}` });
      return { approved: true };
    }, {
      validator: (_a: { by?: string }) => {
        if (this.phaseName !== 'awaiting-approval') throw new Error(`nothing to approve: the migration is in phase ${this.phaseName}`);
      },
    });
    setHandler(admissionUpdate, async () => {
      await condition(() => this.admission !== undefined);
      const a = this.admission!;
      if ('refused' in a) throw ApplicationFailure.create({ message: a.refused, type: 'MigrationRefused', nonRetryable: true });
      return { from: a.from, to: this.input.to };
    });
    upsertSearchAttributes([
      { key: VmName, value: input.vm },
      ...(input.from ? [{ key: SourceHost, value: input.from }] : []),
      { key: DestinationHost, value: input.to },
      { key: MigrationType, value: type },
      { key: MigrationPhase, value: 'starting' },
      { key: MigrationOutcome, value: 'running' },
    ]);
  }

  /** Refused (or failed) before the checks passed; no effect once admitted. */
  refuse(reason: string): void {
    this.admission ??= { refused: reason };
  }

  /** The request passed its checks: the move starts from `from`. */
  admit(from: string): void {
    if (!this.input.from) upsertSearchAttributes([{ key: SourceHost, value: from }]);
    this.from = from;
    this.admission = { from };
  }

  phase(name: string): void {
    if (name === this.phaseName) return;
    log.info('migration phase', { phase: name, from: this.phaseName, vm: this.input.vm, type: this.type });
    this.phaseName = name;
    upsertSearchAttributes([{ key: MigrationPhase, value: name }]);
  }

  sample(s: ProgressSample, baseBytes = 0): void {
    this.round = s.round;
    this.bytesTransferred = baseBytes + s.bytesSent;
    this.dirtyPages = s.dirtyPages;
    this.rate = s.bandwidth;
    this.throttle = s.throttle;
  }

  storage(st: { bytesCopied: number; bytesMirrored: number }): void {
    this.bytesCopied = st.bytesCopied;
    this.bytesMirrored = st.bytesMirrored;
  }

  decision(d: DecisionRecord): void {
    this.decisions.push(d);
    if (this.decisions.length > 200) this.decisions.shift();
  }

  finish(outcome: MigrationResult['outcome'], reason: string): MigrationResult {
    this.phase(outcome === 'completed' ? 'done' : outcome);
    upsertSearchAttributes([{ key: MigrationOutcome, value: outcome }]);
    const durationMs = Date.now() - this.startedAt;
    // Our migration metrics, exported with the worker's Prometheus endpoint (skipped on replay).
    const tags = { type: this.type, outcome };
    metricMeter.createCounter('vmferry_migrations', 'migrations', 'Migrations by type and outcome').add(1, tags);
    metricMeter.createHistogram('vmferry_migration_duration', 'int', 'ms', 'Migration wall time').record(durationMs, tags);
    if (this.cutover) metricMeter.createHistogram('vmferry_migration_downtime', 'int', 'ms', 'Pause to resume on the hypervisor clock').record(this.cutover.downtimeMs, tags);
    metricMeter.createCounter('vmferry_migration_bytes', 'bytes', 'Bytes moved by migrations').add(this.bytesCopied + this.bytesMirrored + Math.max(this.bytesTransferred, this.cutover?.bytesSent ?? 0), tags);
    log.info('migration finished', { outcome, reason, durationMs, vm: this.input.vm, type: this.type });
    return {
      id: workflowInfo().workflowId,
      type: this.type,
      vm: this.input.vm,
      from: this.from,
      to: this.input.to,
      outcome,
      reason,
      durationMs,
      downtimeMs: this.cutover?.downtimeMs ?? 0,
      rounds: this.round,
      bytesTransferred: this.bytesCopied + this.bytesMirrored + (this.cutover ? Math.max(this.bytesTransferred, this.cutover.bytesSent) : this.bytesTransferred),
      decisions: this.decisions,
      cutover: this.cutover,
    };
  }
}

/** A failure's message without the SDK's wrapping ("Activity task failed" → the real cause). */
export function reasonOf(err: unknown): string {
  if (isCancellation(err)) return 'cancelled by operator';
  let e = err as { message?: string; cause?: unknown } | undefined;
  let msg = e?.message ?? String(err);
  while (e && e.cause) {
    e = e.cause as { message?: string; cause?: unknown };
    if (e.message) msg = e.message;
  }
  return msg;
}

/** The ending every move shares when it fails: compensate, then say what happened. */
export async function rollBack(tracker: MigrationTracker, saga: { compensate(): Promise<string[]> }, err: unknown, started: boolean): Promise<MigrationResult> {
  tracker.phase('rollback');
  const errors = await saga.compensate();
  const reason = reasonOf(err);
  // Refused before its checks passed: the admission update (if one waits) carries the reason,
  // and is answered before the workflow ends.
  tracker.refuse(reason);
  if (!allHandlersFinished()) await CancellationScope.nonCancellable(() => condition(allHandlersFinished));
  if (errors.length) return tracker.finish('failed', `${reason}; rollback incomplete: ${errors.join('; ')}`);
  return tracker.finish(started ? 'rolled-back' : 'failed', reason);
}
