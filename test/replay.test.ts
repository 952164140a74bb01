// Replay: every recorded history must replay against today's workflow code (bundled once);
// a deliberately changed workflow must fail to replay, proving the check has teeth.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it, beforeAll } from 'vitest';
import { bundleWorkflowCode, Worker, type WorkflowBundleWithSourceMap } from '@temporalio/worker';
import { historyFromJSON } from '@temporalio/common/lib/proto-utils.js';
import { DeterminismViolationError } from '@temporalio/workflow';

const root = path.resolve(fileURLToPath(new URL('..', import.meta.url)));
const dir = path.join(root, 'test', 'replay', 'histories');
// Workflows that derive ids from their own (e.g. child workflow ids) replay under their real id.
const realIds = JSON.parse(fs.readFileSync(path.join(dir, 'workflow-ids.json'), 'utf8')) as Record<string, string>;
const files = fs.readdirSync(dir).filter((f) => f.endsWith('.json') && f !== 'workflow-ids.json').sort();
const histories = files.map((f) => {
  const name = f.replace(/\.json$/, '');
  return { name, workflowId: realIds[name] ?? name, history: historyFromJSON(JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'))) };
});

async function* iterate() {
  for (const h of histories) yield h;
}

describe('replay of recorded histories', () => {
  let bundle: WorkflowBundleWithSourceMap;
  beforeAll(async () => {
    bundle = await bundleWorkflowCode({ workflowsPath: path.join(root, 'workflows', 'index.ts'), logger: quietLogger });
  });

  it('has fixtures for every workflow type', () => {
    const types = new Set(histories.map((h) => h.history.events?.[0]?.workflowExecutionStartedEventAttributes?.workflowType?.name));
    expect([...types].sort()).toEqual(['evacuateHost', 'hostRequest', 'inventory', 'liveMigration', 'sharedNothingMigration', 'storageMigration']);
  });

  it('keeps fixtures of both sides of every patch', () => {
    // The newest fixtures were recorded on the patched path, the older ones before it existed.
    const patchesOf = (name: string): string[] => (histories.find((h) => h.name === name)?.history.events ?? [])
      .map((e) => e.markerRecordedEventAttributes?.details?.['patch-data']?.payloads?.[0]?.data)
      .filter((d): d is Uint8Array => !!d)
      .map((d) => (JSON.parse(Buffer.from(d).toString('utf8')) as { id?: string }).id ?? '');
    for (const name of ['live-migration-completed-v3', 'shared-nothing-completed-v3']) expect(patchesOf(name)).toContain('fast-path-v3');
    for (const name of ['live-migration-completed-v2', 'shared-nothing-completed']) expect(patchesOf(name)).not.toContain('fast-path-v3');
    for (const name of ['live-migration-completed-v4', 'shared-nothing-completed-v4']) expect(patchesOf(name)).toContain('parallel-start');
    for (const name of ['live-migration-completed-v3', 'shared-nothing-completed-v3']) expect(patchesOf(name)).not.toContain('parallel-start');
    expect(patchesOf('live-migration-completed-v5')).toContain('release-in-cutover');
    expect(patchesOf('live-migration-completed-v4')).not.toContain('release-in-cutover');
    expect(patchesOf('live-migration-completed-v2')).toContain('supervision-ends-by-itself');
    // The grant: minted by the destination in the checks, before that by a local activity.
    const localActivities = (name: string): number => (histories.find((h) => h.name === name)?.history.events ?? []).filter((e) => e.markerRecordedEventAttributes?.markerName === 'core_local_activity').length;
    for (const name of ['live-migration-completed-v7', 'shared-nothing-completed-v7']) {
      expect(patchesOf(name)).toContain('grant-from-destination');
      expect(localActivities(name)).toBe(0);
    }
    for (const name of ['live-migration-completed-v5', 'shared-nothing-completed-v4']) {
      expect(patchesOf(name)).not.toContain('grant-from-destination');
      expect(localActivities(name)).toBe(1);
    }
    // The cutover: in the source's round that converged, before that a separate activity.
    const activitiesOf = (name: string): string[] => (histories.find((h) => h.name === name)?.history.events ?? []).flatMap((e) => e.activityTaskScheduledEventAttributes?.activityType?.name ?? []);
    for (const name of ['live-migration-completed-v8', 'shared-nothing-completed-v8']) {
      expect(patchesOf(name)).toContain('cutover-in-round');
      expect(activitiesOf(name)).not.toContain('cutover');
    }
    for (const name of ['live-migration-completed-v7', 'shared-nothing-completed-v7']) {
      expect(patchesOf(name)).not.toContain('cutover-in-round');
      expect(activitiesOf(name)).toContain('cutover');
    }
    // Not a patch (the input decides it): the workflow finds the source itself when not given.
    const inputOf = (name: string): { from?: string; candidates?: string[] } => {
      const p = histories.find((h) => h.name === name)!.history.events![0]!.workflowExecutionStartedEventAttributes!.input!.payloads![0]!;
      return JSON.parse(Buffer.from(p.data!).toString('utf8'));
    };
    for (const name of ['live-migration-completed-v6', 'shared-nothing-completed-v6', 'live-migration-refused']) expect(inputOf(name)).toMatchObject({ candidates: expect.any(Array) });
    for (const name of ['live-migration-completed-v6', 'shared-nothing-completed-v6', 'live-migration-refused']) expect(inputOf(name).from).toBeUndefined();
    for (const name of ['live-migration-completed-v5', 'shared-nothing-completed-v4']) expect(inputOf(name).from).toBeDefined();
  });

  it('replays every history with the current code', async () => {
    const results = [];
    for await (const r of Worker.runReplayHistories({ workflowBundle: bundle, replayName: 'vmferry-replay' }, iterate())) results.push(r);
    expect(results.map((r) => [r.workflowId, r.error?.message ?? 'ok'])).toEqual(histories.map((h) => [h.workflowId, 'ok']));
    expect(results).toHaveLength(files.length);
  });

  it('fails to replay when the workflow changes incompatibly', async () => {
    // Copy the workflow sources, insert a timer before the first activity, bundle that.
    const tmp = fs.mkdtempSync(path.join(root, '.replay-mutant-'));
    try {
      fs.cpSync(path.join(root, 'workflows'), path.join(tmp, 'workflows'), { recursive: true });
      for (const d of ['common', 'activities', 'drivers', 'dataplane']) fs.symlinkSync(path.join(root, d), path.join(tmp, d));
      const f = path.join(tmp, 'workflows', 'live-migration.ts');
      const src = fs.readFileSync(f, 'utf8');
      const anchor = "    tracker.phase('preflight');";
      expect(src).toContain(anchor);
      fs.writeFileSync(f, src.replace("import { ApplicationFailure, CancellationScope } from '@temporalio/workflow';", "import { ApplicationFailure, CancellationScope, sleep } from '@temporalio/workflow';").replace(anchor, `${anchor}\n    await sleep(1);`));
      const mutant = await bundleWorkflowCode({ workflowsPath: path.join(tmp, 'workflows', 'index.ts'), logger: quietLogger });
      const live = histories.find((h) => h.name === 'live-migration-completed')!;
      await expect(Worker.runReplayHistory({ workflowBundle: mutant, replayName: 'vmferry-mutant' }, live.history)).rejects.toBeInstanceOf(DeterminismViolationError);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});

const noop = (): void => undefined;
const quietLogger = { log: noop, trace: noop, debug: noop, info: noop, warn: noop, error: (m: string) => console.error(m) };
