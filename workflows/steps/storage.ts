// Shared step of the storage moves: follow a disk mirror until the bulk copy has converged
// (writes keep being mirrored), reconnecting a remote mirror from its checkpoint when the
// connection breaks. Bytes only ever move inside the VM process and the data plane.
import { ApplicationFailure } from '@temporalio/workflow';
import type { DiskMirrorStatus } from '../../common/types.js';
import type { HostProxies } from '../hosts.js';
import type { MigrationTracker } from '../tracker.js';

export async function awaitMirrorSynced(
  p: { migrationId: string; vm: string; host: HostProxies; tracker: MigrationTracker },
  reconnect?: () => Promise<string>,
  maxReconnects = 5,
): Promise<DiskMirrorStatus> {
  const ids = { migrationId: p.migrationId, vm: p.vm };
  let reconnects = 0;
  for (;;) {
    const st = await p.host.copy.awaitDiskMirror(ids);
    p.tracker.storage(st);
    if (st.state === 'synced') return st;
    if (st.state === 'copying') continue;
    if (st.state === 'disconnected' && reconnect && reconnects < maxReconnects) {
      reconnects++;
      const token = await reconnect();
      p.tracker.decision({ round: 0, action: 'reconnect', reason: `disk mirror connection lost (${st.error ?? 'closed'}); resuming from checkpoint ${JSON.stringify(st.checkpoint)}` });
      await p.host.quick.resumeDiskMirror({ ...ids, token });
      continue;
    }
    throw ApplicationFailure.create({ message: `disk mirror ${st.state}${st.error ? `: ${st.error}` : ''}`, type: 'MirrorFailed', nonRetryable: true });
  }
}
