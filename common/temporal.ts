// One way to reach Temporal for every client and worker: @temporalio/envconfig (address,
// namespace, TLS, API key, profiles from TEMPORAL_* variables or the config file). The lab only
// supplies a default address when nothing else names one.
import { loadClientConnectConfig, type ClientConnectConfig } from '@temporalio/envconfig';

export const DEFAULT_NAMESPACE = 'default';

export function temporalConfig(fallbackAddress?: string): Required<ClientConnectConfig> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined) env[k] = v;
  if (!env.TEMPORAL_ADDRESS && fallbackAddress) env.TEMPORAL_ADDRESS = fallbackAddress;
  const c = loadClientConnectConfig({ overrideEnvVars: env });
  c.connectionOptions.address ??= 'localhost:7233';
  return { connectionOptions: c.connectionOptions, namespace: c.namespace ?? DEFAULT_NAMESPACE };
}

/** A history event's timestamp (`eventTime`), ms since the epoch (0 when absent). */
export function eventMs(t: unknown): number {
  const ts = t as { seconds?: unknown; nanos?: number } | null | undefined;
  return ts ? Number(ts.seconds ?? 0) * 1000 + (ts.nanos ?? 0) / 1e6 : 0;
}
