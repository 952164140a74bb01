// Live migration, storage shared by both hosts. In the seed's order:
//   1. blank VM on the destination   2. memory pre-copied in rounds   3. until (almost) clean
//   4. pause, last dirty pages + device state, resume on the destination, remove from source;
//      responsibility for the files passes with the ownership epoch.
import { ApplicationFailure, CancellationScope, patched } from '@temporalio/workflow';
import { DEFAULT_POLICY, type LiveMigrationInput, type MigrationResult } from '../common/types.js';
import { hostProxies, type HostProxies } from './hosts.js';
import { Saga } from './saga.js';
import { MigrationTracker, rollBack } from './tracker.js';
import { locateAndCheck, moveMemory } from './steps/memory.js';
import { liveMigrationInputSchema } from '../common/schemas.js';
import { validated } from './validate.js';

export async function liveMigration(input: LiveMigrationInput): Promise<MigrationResult> {
  validated(liveMigrationInputSchema, input, 'live migration');
  const tracker = new MigrationTracker('live', input);
  const policy = { ...DEFAULT_POLICY, ...input.policy };
  const dst = hostProxies(input.to);
  let src: HostProxies | undefined;
  const saga = new Saga();
  let started = false;
  let supervisionEnded: Promise<void> = Promise.resolve();
  let sourceReleased = false;
  // v5: the cutover activity removes the source's fenced copy itself (one round trip less).
  const releaseSourceInCutover = patched('release-in-cutover');
  try {
    tracker.phase('preflight');
    // Without `from`, the same step first finds the VM among the candidate hosts.
    const checked = await locateAndCheck({ vm: input.vm, from: input.from, candidates: input.candidates, dst });
    src = checked.src;
    const { vm, dest } = checked;
    for (const d of vm.spec.disks) {
      const root = dest.storageRoots.find((r) => r.name === d.root);
      if (!root?.shared) {
        throw ApplicationFailure.create({
          message: `disk ${d.id} of ${input.vm} is on storage root "${d.root}", which ${input.to} does not share; use a shared-nothing migration`,
          type: 'StorageNotShared',
          nonRetryable: true,
        });
      }
    }
    tracker.admit(src.name);
    started = true;
    ({ supervisionEnded, sourceReleased } = await moveMemory({ migrationId: input.migrationId, vm: input.vm, src, dst, policy, tracker, saga, destDataPlane: dest.dataPlane, destGrantToken: dest.grantToken, releaseSourceInCutover }, vm));
  } catch (err) {
    return rollBack(tracker, saga, err, started);
  }
  // Past the point of no return: the VM runs on the destination. Cleanup cannot be cancelled.
  tracker.phase('cleanup');
  // (Still needed after a cutover whose acknowledgement was lost: the activity did not release.)
  await CancellationScope.nonCancellable(() => Promise.all([
    sourceReleased ? undefined : src!.undo.releaseSource.executeWithOptions({ summary: `Remove the paused, fenced copy of ${input.vm} from ${src!.name}` }, [
      { migrationId: input.migrationId, vm: input.vm, deleteStorage: false },
    ]),
    supervisionEnded,
  ]));
  return tracker.finish('completed', `VM ${input.vm} runs on ${input.to}`);
}
