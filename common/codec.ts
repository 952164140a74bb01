// Optional payload encryption (a Temporal payload codec): with VMFERRY_CODEC_KEY set (32 bytes,
// base64) on every client and worker, workflow inputs, results, activity arguments and
// heartbeats are stored AES-256-GCM encrypted in Temporal's database, so VM names and paths in
// history are not readable by whoever can read that database. Search attributes (VmName, …) stay
// readable by design: the UI filters on them.
import crypto from 'node:crypto';
import type { Payload, PayloadCodec } from '@temporalio/common';

const ENCODING = 'binary/encrypted';
const KEY_ID = 'vmferry-aes256gcm';

export class AesGcmCodec implements PayloadCodec {
  constructor(private readonly key: Buffer) {
    if (key.length !== 32) throw new Error('VMFERRY_CODEC_KEY must be 32 bytes, base64-encoded');
  }

  async encode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((p) => {
      const iv = crypto.randomBytes(12);
      const c = crypto.createCipheriv('aes-256-gcm', this.key, iv);
      const plain = Buffer.from(JSON.stringify({ metadata: Object.fromEntries(Object.entries(p.metadata ?? {}).map(([k, v]) => [k, Buffer.from(v).toString('base64')])), data: Buffer.from(p.data ?? new Uint8Array()).toString('base64') }));
      const data = Buffer.concat([iv, c.update(plain), c.final(), c.getAuthTag()]);
      return { metadata: { encoding: Buffer.from(ENCODING), 'encryption-key-id': Buffer.from(KEY_ID) }, data };
    });
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((p) => {
      if (Buffer.from(p.metadata?.encoding ?? []).toString() !== ENCODING) return p;
      const buf = Buffer.from(p.data ?? new Uint8Array());
      const d = crypto.createDecipheriv('aes-256-gcm', this.key, buf.subarray(0, 12));
      d.setAuthTag(buf.subarray(buf.length - 16));
      const plain = JSON.parse(Buffer.concat([d.update(buf.subarray(12, buf.length - 16)), d.final()]).toString()) as { metadata: Record<string, string>; data: string };
      return { metadata: Object.fromEntries(Object.entries(plain.metadata).map(([k, v]) => [k, Buffer.from(v, 'base64')])), data: Buffer.from(plain.data, 'base64') };
    });
  }
}

/** The data converter every client and worker uses (undefined: plain payloads). */
export function dataConverter(): { payloadCodecs: PayloadCodec[] } | undefined {
  const k = process.env.VMFERRY_CODEC_KEY;
  if (!k) return undefined;
  return { payloadCodecs: [new AesGcmCodec(Buffer.from(k, 'base64'))] };
}
