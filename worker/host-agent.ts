// Host agent: a Temporal worker on `host-<name>` serving the host activities, plus the host's
// data-plane endpoint. It holds no VM state of its own, so it can be killed and restarted at
// any time: VM processes keep running and are found again from their runtime directories.
// Usage: host-agent <host.json>
import fs from 'node:fs';
import path from 'node:path';
import { NativeConnection, Worker } from '@temporalio/worker';
import { readHostConfig, hostTaskQueue } from '../common/host-config.js';
import { temporalConfig } from '../common/temporal.js';
import { installRuntime } from '../common/runtime.js';
import { dataConverter } from '../common/codec.js';
import { SimDriver } from '../drivers/sim/sim-driver.js';
import { DriverRouter, createQemuDriver } from '../drivers/router.js';
import { DataPlaneServer } from '../dataplane/endpoint.js';
import { DiskReceiver } from '../dataplane/disk-receiver.js';
import { createHostActivities } from '../activities/host-activities.js';

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: host-agent <host.json>');
  process.exit(2);
}
const host = readHostConfig(configPath);
const log = (m: string): void => console.log(`${new Date().toISOString()} [agent ${host.name}] ${m}`);

const driver = new SimDriver(host, log);
// Per VM, the simulator or QEMU (when installed); the data plane below serves simulated VMs.
const qemu = createQemuDriver(host, log);
const router = new DriverRouter(host, driver, qemu.driver, qemu.availability.ok ? undefined : qemu.availability.reason);
log(qemu.availability.ok ? `QEMU driver: ${qemu.availability.version}` : `QEMU driver off: ${qemu.availability.reason} (scripts/qemu/install-qemu.sh installs it)`);
const diskReceiver = new DiskReceiver(log);
// Data-plane TLS (host.json `tls`): every transfer mutually authenticated against the CA;
// checked here so that a missing or unreadable file stops the agent at once.
if (host.tls) for (const f of [host.tls.ca, host.tls.cert, host.tls.key]) fs.accessSync(f, fs.constants.R_OK);
const dataPlane = new DataPlaneServer(
  { memory: (h, s, r, a) => driver.handOver(h, s, r, a), disk: (h, s, r, a) => diskReceiver.accept(h, s, r, a) },
  log,
  { hostName: host.name, tls: host.tls },
);
log(host.tls ? `data plane: TLS with client certificates (CA ${host.tls.ca})` : 'data plane: PLAINTEXT (no tls in host config)');
driver.dataPlane = dataPlane;
driver.diskReceiver = diskReceiver;
const addr = await dataPlane.listen(host.dataPlane.host, host.dataPlane.port);
host.dataPlane = addr;
driver.warmSpare();

installRuntime(`host-agent ${host.name}`);
const { connectionOptions, namespace } = temporalConfig();
const connection = await NativeConnection.connect(connectionOptions);
const worker = await Worker.create({
  connection,
  namespace,
  taskQueue: hostTaskQueue(host.name),
  dataConverter: dataConverter(),
  activities: createHostActivities({ host, driver: router }),
  maxConcurrentActivityTaskExecutions: 50,
});
fs.writeFileSync(
  path.join(path.dirname(configPath), 'agent.json'),
  JSON.stringify({ pid: process.pid, taskQueue: hostTaskQueue(host.name), dataPlane: addr, startedAt: new Date().toISOString() }, null, 2),
);
log(`serving task queue ${hostTaskQueue(host.name)} on ${connectionOptions.address} (${namespace}); data plane ${addr.host}:${addr.port}; VMs: ${(await router.list()).map((v) => `${v.name}(${v.state})`).join(', ') || 'none'}`);
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => worker.shutdown());
await worker.run();
dataPlane.close();
await connection.close();
log('stopped');
