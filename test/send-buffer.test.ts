// The kernel send buffer of memory streams (dataplane/send-buffer.ts): set through libc on real
// loopback sockets, only when asked and only towards this machine, and reachable from the
// bundled VM process, which runs from a host's run directory.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { peerIsLoopback, sendBufferSize, setSendBuffer } from '../dataplane/send-buffer.js';
import { connectDataPlane } from '../dataplane/endpoint.js';
import { FrameChannel, FrameType, jsonFrame } from '../dataplane/frames.js';
import { vmProcessArgs } from '../drivers/sim/vm-bundle.js';

const cleanup: Array<() => void> = [];
afterEach(() => { for (const f of cleanup.splice(0)) f(); });
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'send-buffer-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A loopback server that answers every HELLO with WELCOME, as a destination's data plane does. */
async function welcomingServer(): Promise<number> {
  const server = net.createServer((sock) => {
    const chan = new FrameChannel(sock);
    chan.onFrame = (f) => {
      if (f.type === FrameType.Hello) sock.write(jsonFrame(FrameType.Welcome, { ok: true }));
      return true;
    };
    sock.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  cleanup.push(() => server.close());
  return (server.address() as net.AddressInfo).port;
}

const hello = { migrationId: 'm1', vm: 'v1', token: 't', kind: 'memory' as const, from: 'A' };

describe('memory stream send buffer', () => {
  it('sets SO_SNDBUF on a TCP socket (the kernel reports it doubled)', async () => {
    const port = await welcomingServer();
    const sock = net.connect(port, '127.0.0.1');
    cleanup.push(() => sock.destroy());
    await new Promise((r) => sock.once('connect', r));
    expect(peerIsLoopback(sock)).toBe(true);
    const before = sendBufferSize(sock);
    expect(before).toBeGreaterThan(0);
    expect(setSendBuffer(sock, 300 << 10)).toBe(true);
    expect(sendBufferSize(sock)).toBe(600 << 10);
  });

  it('connectDataPlane limits it only when asked, towards this machine', async () => {
    const port = await welcomingServer();
    const plain = await connectDataPlane({ host: '127.0.0.1', port }, hello);
    cleanup.push(() => plain.sock.destroy());
    const limited = await connectDataPlane({ host: '127.0.0.1', port }, hello, undefined, { loopbackSendBuffer: 512 << 10 });
    cleanup.push(() => limited.sock.destroy());
    expect(sendBufferSize(limited.sock)).toBe(1 << 20);
    expect(sendBufferSize(plain.sock)).not.toBe(1 << 20);
  });

  it('tells loopback peers from others', () => {
    const peer = (remoteAddress: string): net.Socket => ({ remoteAddress }) as net.Socket;
    for (const a of ['127.0.0.1', '127.3.4.5', '::1', '::ffff:127.0.0.2']) expect(peerIsLoopback(peer(a)), a).toBe(true);
    for (const a of ['10.0.0.1', '::ffff:10.0.0.1', '128.0.0.1', 'fe80::1']) expect(peerIsLoopback(peer(a)), a).toBe(false);
  });

  it('the bundled VM process finds koffi by its absolute path', () => {
    const { args, why } = vmProcessArgs(path.join(tmp, 'bundle'));
    expect(why).toBeUndefined();
    const koffi = createRequire(import.meta.url).resolve('koffi');
    expect(fs.readFileSync(args.at(-1)!, 'utf8')).toContain(JSON.stringify(koffi));
  });
});
