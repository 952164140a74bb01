// Worker runtime set-up shared by the orchestrator and host agents: structured (JSON) logs —
// workflow and activity log lines carry the workflow id, which is the migration id — and the
// SDK's Prometheus endpoint (with our own migration metrics) when VMFERRY_METRICS_ADDRESS is set.
import { DefaultLogger, Runtime, type LogEntry } from '@temporalio/worker';

export function installRuntime(component: string): { metricsAddress?: string } {
  const metricsAddress = process.env.VMFERRY_METRICS_ADDRESS;
  const logger = new DefaultLogger((process.env.VMFERRY_LOG_LEVEL as 'INFO' | undefined) ?? 'INFO', (e: LogEntry) => {
    const meta = e.meta ?? {};
    const line = { ts: new Date(Number(e.timestampNanos / 1_000_000n)).toISOString(), level: e.level, component, migrationId: (meta as { workflowId?: string }).workflowId, msg: e.message, ...meta };
    process.stdout.write(JSON.stringify(line) + '\n');
  });
  Runtime.install({
    logger,
    telemetryOptions: metricsAddress ? { metrics: { prometheus: { bindAddress: metricsAddress, countersTotalSuffix: true } } } : undefined,
  });
  return { metricsAddress };
}
