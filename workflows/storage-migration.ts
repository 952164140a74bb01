// Live storage migration on one host, in the seed's order:
//   1. copy the disk files while the VM runs   2. every guest write meanwhile goes to both copies
//   3. verify, then switch I/O to the new files only   4. delete the old files, only after the
//      switch is recorded. Until the switch, any failure leaves the VM on its original files.
import { ApplicationFailure, CancellationScope } from '@temporalio/workflow';
import type { MigrationResult, StorageMigrationInput } from '../common/types.js';
import { hostProxies } from './hosts.js';
import { Saga } from './saga.js';
import { MigrationTracker, rollBack } from './tracker.js';
import { awaitMirrorSynced } from './steps/storage.js';
import { storageMigrationInputSchema } from '../common/schemas.js';
import { validated } from './validate.js';

export async function storageMigration(input: StorageMigrationInput): Promise<MigrationResult> {
  validated(storageMigrationInputSchema, input, 'storage migration');
  const tracker = new MigrationTracker('storage', { migrationId: input.migrationId, vm: input.vm, from: input.host, to: input.host });
  const h = hostProxies(input.host);
  const ids = { migrationId: input.migrationId, vm: input.vm };
  const saga = new Saga();
  let started = false;
  let oldPaths: string[] = [];
  try {
    tracker.phase('preflight');
    const vm = await h.probe.inspectVm({ vm: input.vm });
    if (!vm) throw ApplicationFailure.create({ message: `VM ${input.vm} is not on host ${input.host}`, type: 'BadRequest', nonRetryable: true });
    if (vm.state !== 'running') throw ApplicationFailure.create({ message: `VM ${input.vm} is ${vm.state}, not running`, type: 'BadRequest', nonRetryable: true });
    if (vm.migrationId) throw ApplicationFailure.create({ message: `VM ${input.vm} is already migrating (${vm.migrationId})`, type: 'AlreadyMigrating', nonRetryable: true });
    started = true;

    tracker.phase('mirror');
    saga.add('drop the mirror, delete the partial copies', () => h.undo.abortDiskMirror({ ...ids, targets: input.targets }));
    await h.quick.startLocalDiskMirror.executeWithOptions({ summary: `Copy ${input.vm}'s disks to ${Object.values(input.targets).join(', ')}, mirroring guest writes` }, [{ ...ids, targets: input.targets, maxBandwidth: input.maxBandwidth }]);
    await awaitMirrorSynced({ ...ids, host: h, tracker });

    tracker.phase('switch');
    // Once begun, the switch completes (a cancel now is too late): its result decides.
    const sw = await CancellationScope.nonCancellable(() =>
      h.long.switchDisks.executeWithOptions({ summary: `Verify the copies and switch ${input.vm}'s I/O to them` }, [{ ...ids, targets: input.targets }]),
    );
    oldPaths = sw.oldPaths;
    // The switch is recorded (this activity's completion): from here on, forward only.
    saga.clear();
  } catch (err) {
    return rollBack(tracker, saga, err, started);
  }
  tracker.phase('cleanup');
  await CancellationScope.nonCancellable(() =>
    h.undo.deleteOldDiskFiles.executeWithOptions({ summary: `Delete ${input.vm}'s old disk files` }, [{ vm: input.vm, paths: oldPaths }]),
  );
  return tracker.finish('completed', `VM ${input.vm} runs on its new files`);
}
