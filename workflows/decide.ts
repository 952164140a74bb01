// Convergence policy as a pure function. The workflow calls it on every pre-copy sample, so
// each decision (and the measurements behind it) is in the history: visible in the UI,
// replayable in tests, explainable afterwards. No I/O, no clock: deterministic by construction.
import type { MigrationPolicy, ProgressSample } from '../common/types.js';

export type Decision =
  | { action: 'continue'; reason: string }
  | { action: 'throttle'; throttle: number; reason: string }
  | { action: 'cutover'; reason: string }
  | { action: 'abort'; reason: string };

export function convergenceTimeoutMs(policy: MigrationPolicy, memoryBytes: number): number {
  return Math.max(10_000, (policy.convergenceTimeoutMsPerGiB * memoryBytes) / 2 ** 30);
}

/** One auto-converge step from `throttle`: the first step to throttleInitial, then by throttleIncrement, up to throttleMax. */
export function nextThrottle(policy: MigrationPolicy, throttle: number): number {
  return Math.round(Math.min(policy.throttleMax, throttle === 0 ? policy.throttleInitial : throttle + policy.throttleIncrement) * 100) / 100;
}

const mb = (n: number): string => `${(n / 2 ** 20).toFixed(1)} MiB/s`;

export function decide(samples: readonly ProgressSample[], policy: MigrationPolicy, memoryBytes: number): Decision {
  const s = samples.at(-1);
  if (!s) return { action: 'continue', reason: 'no sample yet' };
  if (s.state === 'failed') return { action: 'abort', reason: s.error ?? 'memory job failed' };
  if (s.round >= 1 && s.expectedDowntimeMs <= policy.downtimeLimitMs) {
    return { action: 'cutover', reason: `round ${s.round}: ${s.dirtyPages} dirty pages ≈ ${s.expectedDowntimeMs} ms at ${mb(s.bandwidth)} ≤ limit ${policy.downtimeLimitMs} ms` };
  }
  const limit = convergenceTimeoutMs(policy, memoryBytes);
  if (s.elapsedMs > limit) return { action: 'abort', reason: `did not converge within ${Math.round(limit / 1000)} s (expected downtime still ${s.expectedDowntimeMs} ms)` };
  // Not converging: the guest dirties memory at more than half the link rate, or the dirty
  // set stopped shrinking over the last two rounds.
  const prev = samples.at(-2);
  const stalled = prev !== undefined && s.round >= 2 && s.dirtyPages >= prev.dirtyPages * 0.9;
  const outrun = s.round >= 2 && s.dirtyRate > 0.5 * s.bandwidth;
  if ((stalled || outrun || s.round >= policy.maxRounds) && policy.autoConverge && s.throttle < policy.throttleMax) {
    return { action: 'throttle', throttle: nextThrottle(policy, s.throttle), reason: `round ${s.round}: dirty rate ${mb(s.dirtyRate)} vs link ${mb(s.bandwidth)}, ${s.dirtyPages} pages dirty (${stalled ? 'not shrinking' : outrun ? 'guest outruns the link' : 'round limit'})` };
  }
  if (s.round >= policy.maxRounds) return { action: 'abort', reason: `no convergence after ${s.round} rounds (limit ${policy.maxRounds}); expected downtime ${s.expectedDowntimeMs} ms > ${policy.downtimeLimitMs} ms` };
  return { action: 'continue', reason: `round ${s.round}: expected downtime ${s.expectedDowntimeMs} ms` };
}
