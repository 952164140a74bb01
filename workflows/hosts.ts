// Activity proxies for a host's task queue. Every call has a deadline (a dead host turns into
// a decision, never a hang); compensations retry until the host comes back, because the VM
// already runs safely on the other side while they wait.
import { proxyActivities, type ActivityInterfaceFor } from '@temporalio/workflow';
import type { HostActivities } from '../activities/host-activities.js';
import { hostTaskQueue } from '../common/names.js';

export interface HostProxies {
  name: string;
  /** Inspection and preflight: fail fast when the host's agent does not answer. */
  probe: ActivityInterfaceFor<HostActivities>;
  /** Short idempotent commands. */
  quick: ActivityInterfaceFor<HostActivities>;
  /** Long transfers: heartbeat, retried on another attempt from where they stopped. */
  long: ActivityInterfaceFor<HostActivities>;
  /** Following a bulk copy: heartbeats its checkpoint; a retry picks up where it was. */
  copy: ActivityInterfaceFor<HostActivities>;
  /** Destination supervision: one attempt; losing its heartbeat means losing the destination. */
  supervise: ActivityInterfaceFor<HostActivities>;
  /** Compensations and cleanup: retried until the host returns. */
  undo: ActivityInterfaceFor<HostActivities>;
}

const retry = { initialInterval: '300 ms', backoffCoefficient: 2, maximumInterval: '5 s' } as const;

export function hostProxies(name: string): HostProxies {
  const taskQueue = hostTaskQueue(name);
  return {
    name,
    probe: proxyActivities<HostActivities>({ taskQueue, scheduleToStartTimeout: '10 s', startToCloseTimeout: '30 s', scheduleToCloseTimeout: '1 m', retry: { ...retry, maximumAttempts: 3 } }),
    quick: proxyActivities<HostActivities>({ taskQueue, startToCloseTimeout: '30 s', scheduleToCloseTimeout: '3 m', retry }),
    long: proxyActivities<HostActivities>({ taskQueue, startToCloseTimeout: '3 m', heartbeatTimeout: '5 s', scheduleToCloseTimeout: '15 m', retry }),
    copy: proxyActivities<HostActivities>({ taskQueue, startToCloseTimeout: '6 h', heartbeatTimeout: '5 s', scheduleToCloseTimeout: '7 h', retry }),
    supervise: proxyActivities<HostActivities>({ taskQueue, scheduleToStartTimeout: '15 s', heartbeatTimeout: '4 s', scheduleToCloseTimeout: '6 h', retry: { maximumAttempts: 1 } }),
    // A short start-to-close: an agent killed mid-compensation is retried within seconds.
    undo: proxyActivities<HostActivities>({ taskQueue, startToCloseTimeout: '30 s', scheduleToCloseTimeout: '7 d', retry: { initialInterval: '1 s', backoffCoefficient: 2, maximumInterval: '30 s' } }),
  };
}
