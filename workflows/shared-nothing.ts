// Shared-nothing live migration, in the seed's order:
//   1. mirror the VM's storage to the destination, and keep the mirror until the end
//   2. live-migrate memory and state (the shared step); any failure falls back to the source,
//      whose storage is still complete
//   3. only after that, break the mirror and remove the VM and its files from the source.
import { CancellationScope } from '@temporalio/workflow';
import { DEFAULT_POLICY, type MigrationResult, type SharedNothingInput } from '../common/types.js';
import { hostProxies, type HostProxies } from './hosts.js';
import { Saga } from './saga.js';
import { MigrationTracker, rollBack } from './tracker.js';
import { locateAndCheck, moveMemory } from './steps/memory.js';
import { awaitMirrorSynced } from './steps/storage.js';
import { sharedNothingInputSchema } from '../common/schemas.js';
import { validated } from './validate.js';

export async function sharedNothingMigration(input: SharedNothingInput): Promise<MigrationResult> {
  validated(sharedNothingInputSchema, input, 'shared-nothing migration');
  const tracker = new MigrationTracker('shared-nothing', input);
  const policy = { ...DEFAULT_POLICY, ...input.policy };
  const dst = hostProxies(input.to);
  let src: HostProxies | undefined;
  const ids = { migrationId: input.migrationId, vm: input.vm };
  const saga = new Saga();
  let started = false;
  let supervisionEnded: Promise<void> = Promise.resolve();
  try {
    tracker.phase('preflight');
    const checked = await locateAndCheck({ vm: input.vm, from: input.from, candidates: input.candidates, dst });
    const { vm, dest } = checked;
    const source = (src = checked.src);
    tracker.admit(source.name);
    started = true;

    tracker.phase('mirror');
    const prepare = () => dst.quick.prepareDiskTargets.executeWithOptions(
      { summary: `Empty disks for ${input.vm} on ${input.to}, and a one-time grant for the mirror` },
      [{ ...ids, spec: vm.spec, sourceHost: source.name, epoch: vm.epoch + 1, dir: input.toPath }],
    );
    saga.add('delete the destination copies', () => dst.undo.deleteDiskTargets({ ...ids, dir: input.toPath }));
    const grant = await prepare();
    saga.add('stop the disk mirror', () => source.undo.abortDiskMirror(ids));
    await source.quick.startRemoteDiskMirror.executeWithOptions({ summary: `Mirror ${input.vm}'s disks to ${input.to} over the data plane` }, [{ ...ids, grant, maxBandwidth: policy.maxBandwidth }]);
    await awaitMirrorSynced({ ...ids, host: source, tracker }, async () => (await prepare()).token);

    // The mirror stays in place (guest writes keep flowing) through the memory move.
    ({ supervisionEnded } = await moveMemory({ migrationId: input.migrationId, vm: input.vm, src: source, dst, policy, tracker, saga, destDataPlane: dest.dataPlane, destGrantToken: dest.grantToken }, vm, grant.spec));
  } catch (err) {
    return rollBack(tracker, saga, err, started);
  }
  tracker.phase('cleanup');
  await CancellationScope.nonCancellable(async () => {
    await dst.undo.adoptDiskTargets({ ...ids, dir: input.toPath });
    await src!.undo.releaseSource.executeWithOptions({ summary: `Break the mirror; remove ${input.vm} and its files from ${src!.name}` }, [{ ...ids, deleteStorage: true }]);
    await supervisionEnded;
  });
  return tracker.finish('completed', `VM ${input.vm} runs on ${input.to} with its own copy of the storage`);
}
