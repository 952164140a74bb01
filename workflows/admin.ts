// Short workflows through which clients reach host agents (inventory, create, verify, ...).
// Hosts may be other machines: the CLI never talks to them except through Temporal.
import { ApplicationFailure } from '@temporalio/workflow';
import type { HostInfo, VerifyReport, VmInfo, VmSpec } from '../common/types.js';
import { hostProxies } from './hosts.js';

export type HostRequest =
  | { op: 'hostInfo'; host: string }
  | { op: 'listVms'; host: string }
  | { op: 'createVm'; host: string; spec: VmSpec }
  | { op: 'destroyVm'; host: string; vm: string; deleteStorage: boolean }
  | { op: 'verifyVm'; host: string; vm: string }
  | { op: 'guestWrite'; host: string; vm: string };

export type HostReply = HostInfo | VmInfo[] | VmInfo | { destroyed: boolean } | VerifyReport | { diskWrites: number };

export async function hostRequest(req: HostRequest): Promise<HostReply> {
  const h = hostProxies(req.host);
  switch (req.op) {
    case 'hostInfo': return h.probe.hostInfo();
    case 'listVms': return h.probe.listVms();
    case 'createVm': return h.quick.createVm({ spec: req.spec });
    case 'destroyVm': return h.quick.destroyVm({ vm: req.vm, deleteStorage: req.deleteStorage });
    case 'verifyVm': return h.quick.verifyVm({ vm: req.vm });
    case 'guestWrite': return h.probe.guestWrite({ vm: req.vm });
    default: throw ApplicationFailure.create({ message: `unknown host request ${(req as { op: string }).op}`, nonRetryable: true });
  }
}

/** Inventory of several hosts at once; a host that does not answer is reported, not fatal. */
export async function inventory(hosts: string[]): Promise<Array<{ host: string; ok: boolean; info?: HostInfo; error?: string }>> {
  return Promise.all(
    hosts.map(async (host) => {
      try { return { host, ok: true, info: await hostProxies(host).probe.hostInfo() }; } catch (e) { return { host, ok: false, error: (e as Error).message }; }
    }),
  );
}
