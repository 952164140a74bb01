// Orchestrator worker: runs the migration workflows. Stateless; run as many as you like.
import { fileURLToPath } from 'node:url';
import { NativeConnection, Worker } from '@temporalio/worker';
import { ORCHESTRATOR_TASK_QUEUE } from '../common/names.js';
import { temporalConfig } from '../common/temporal.js';
import { installRuntime } from '../common/runtime.js';
import { dataConverter } from '../common/codec.js';
import { orchestratorActivities } from '../activities/orchestrator-activities.js';

export const WORKFLOWS_PATH = fileURLToPath(new URL('../workflows/index.ts', import.meta.url));

const { metricsAddress } = installRuntime('orchestrator');
const { connectionOptions, namespace } = temporalConfig();
const connection = await NativeConnection.connect(connectionOptions);
const worker = await Worker.create({ connection, namespace, taskQueue: ORCHESTRATOR_TASK_QUEUE, workflowsPath: WORKFLOWS_PATH, activities: orchestratorActivities, dataConverter: dataConverter() });
console.log(`${new Date().toISOString()} [orchestrator] serving ${ORCHESTRATOR_TASK_QUEUE} on ${connectionOptions.address} (${namespace})${metricsAddress ? `; metrics http://${metricsAddress}/metrics` : ''}`);
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => worker.shutdown());
await worker.run();
await connection.close();
