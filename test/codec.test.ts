// Payload encryption: with VMFERRY_CODEC_KEY set on clients and workers, nothing readable about
// the VM (name, paths, spec) is stored in workflow history payloads; the client still reads all.
import crypto from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, type TestLab } from './helpers/lab.js';

let lab: TestLab;
beforeAll(async () => {
  process.env.VMFERRY_CODEC_KEY = crypto.randomBytes(32).toString('base64');
  lab = await startTestLab();
});
afterAll(async () => {
  await lab?.down();
  delete process.env.VMFERRY_CODEC_KEY;
});

describe('payload codec', () => {
  it('stores history payloads encrypted; the client decodes them', async () => {
    const [A, B] = lab.hosts as [string, string];
    const name = `secret-${crypto.randomBytes(3).toString('hex')}`;
    await lab.client.createVm({ name, host: A, memory: '16MiB', disk: '4MiB' });
    const { id } = await lab.client.startMigration({ type: 'live', vm: name, to: B });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('completed');
    expect(r.vm).toBe(name);
    const raw = await lab.client.connection.workflowService.getWorkflowExecutionHistory({ namespace: lab.client.namespace, execution: { workflowId: id } });
    const payloads: Array<{ metadata?: Record<string, Uint8Array> | null; data?: Uint8Array | null }> = [];
    const collect = (o: unknown): void => {
      if (!o || typeof o !== 'object') return;
      const p = o as { payloads?: unknown[] };
      if (Array.isArray(p.payloads)) payloads.push(...(p.payloads as typeof payloads));
      for (const v of Object.values(o)) if (v && typeof v === 'object' && !(v instanceof Uint8Array)) collect(v);
    };
    const plainIn: string[] = [];
    for (const e of raw.history?.events ?? []) {
      const before = payloads.length;
      collect(e);
      // Markers written by the SDK core itself (patch markers) carry only the patch id.
      if (e.markerRecordedEventAttributes) payloads.splice(before);
      for (const p of payloads.slice(before)) if (Buffer.from(p.metadata!.encoding!).toString() !== 'binary/encrypted') plainIn.push(String(e.eventType));
    }
    expect(plainIn).toEqual([]);
    expect(payloads.length).toBeGreaterThan(5);
    for (const p of payloads) {
      expect(Buffer.from(p.metadata!.encoding!).toString()).toBe('binary/encrypted');
      expect(Buffer.from(p.data!).includes(name)).toBe(false);
      expect(Buffer.from(p.data!).includes('disk0')).toBe(false);
    }
  });
});
