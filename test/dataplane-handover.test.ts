// The data-plane endpoint hands an admitted connection to its transfer's handler, which for a
// memory transfer passes the socket on to the incoming VM process. Nothing of what the sender
// sends after its HELLO may be read by the endpoint's process from then on: Node keeps a handle
// it sent to a child open, and reading into nothing, until the child acknowledges it, so such a
// read loses bytes the VM never sees (the stream then fails a checksum or desyncs). Real sockets
// on loopback, a real child process.
import net from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { DataPlaneServer, mintGrantToken, sendSocket, type Hello } from '../dataplane/endpoint.js';
import { FrameReader, FrameType, jsonFrame } from '../dataplane/frames.js';

const servers: DataPlaneServer[] = [];
const socks: net.Socket[] = [];
const children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) c.kill();
  for (const s of socks.splice(0)) s.destroy();
  for (const s of servers.splice(0)) s.close();
});

type Admitted = { hello: Hello; sock: net.Socket; rest: Buffer };

async function endpoint(): Promise<{ server: DataPlaneServer; port: number; admitted: Promise<Admitted>; refusals: string[] }> {
  let admit!: (a: Admitted) => void;
  const admitted = new Promise<Admitted>((r) => { admit = r; });
  const refusals: string[] = [];
  const server = new DataPlaneServer({ memory: (hello, sock, rest) => admit({ hello, sock, rest }) }, (m) => refusals.push(m), { hostName: 'dst' });
  servers.push(server);
  const { port } = await server.listen('127.0.0.1', 0);
  return { server, port, admitted, refusals };
}

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
    socks.push(s);
  });
}

const hello = (token: string): Buffer => jsonFrame(FrameType.Hello, { migrationId: 'm1', vm: 'v1', token, kind: 'memory', from: 'src' });
const grant = { migrationId: 'm1', vm: 'v1', kind: 'memory' as const, source: 'src', expectStreams: 1 };
/** `n` bytes numbered by position (a u32 per 4 bytes), so any loss or reordering shows. */
function pattern(n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let k = 0; k < n; k += 4) b.writeUInt32LE(k >>> 2, k);
  return b;
}

// The VM process's side, reduced to its part in this. It starts busy (as a VM process on a
// loaded host can be), so its acknowledgement of the socket comes late: until then, Node keeps
// the sent handle open in the parent. Then it counts and checks every byte and reports.
const CHILD = `
const until = Date.now() + 400;
while (Date.now() < until);
process.on('message', (m, sock) => {
  const parts = [];
  sock.on('data', (c) => parts.push(c));
  sock.on('end', () => {
    const b = Buffer.concat(parts);
    let bad = -1;
    for (let k = 0; k + 4 <= b.length; k += 4) if (b.readUInt32LE(k) !== k >>> 2) { bad = k; break; }
    process.send({ bytes: b.length, firstBad: bad }, () => process.exit(0));
  });
});`;

describe('data-plane hand-over', () => {
  it('a connection passed to another process is no longer read here: everything the sender sends reaches that process, in order', async () => {
    const child = spawn(process.execPath, ['-e', CHILD], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    children.push(child);
    const report = new Promise<{ bytes: number; firstBad: number }>((resolve, reject) => {
      child.once('message', (m) => resolve(m as { bytes: number; firstBad: number }));
      child.once('exit', (code) => reject(new Error(`child exited ${code}`)));
    });
    let admit!: (h: Hello) => void;
    const admitted = new Promise<Hello>((r) => { admit = r; });
    // As the simulator's driver does: the socket goes to the VM process at once.
    const server = new DataPlaneServer({ memory: (hello, sock) => { sendSocket(child, { type: 'dataplane' }, sock); admit(hello); } }, () => undefined, { hostName: 'dst' });
    servers.push(server);
    const { port } = await server.listen('127.0.0.1', 0);
    const c = await connect(port);
    c.write(hello(server.grant(grant)));
    expect((await admitted).vm).toBe('v1');
    // The child has not taken the socket yet (it is busy): these bytes must wait in the kernel.
    const total = 4 << 20;
    c.end(pattern(total));
    expect(await report).toEqual({ bytes: total, firstBad: -1 });
  });

  it('refuses a connection that sent data after HELLO before the receiver answered (it would be lost in a hand-over), with the reason, and keeps the grant for a retry', async () => {
    const { server, port, admitted, refusals } = await endpoint();
    // Minted ahead (parallel start): the connection waits for the grant, as the source's first one does.
    const token = mintGrantToken('dst');
    const c = await connect(port);
    const answer = new Promise<string>((resolve) => {
      const r = new FrameReader();
      c.on('data', (d: Buffer) => { for (const f of r.feed(d)) if (f.type === FrameType.Error) resolve(JSON.parse(f.body.toString()).message as string); });
    });
    c.write(hello(token));
    await new Promise((r) => setTimeout(r, 50));
    c.write(pattern(4096));
    await new Promise((r) => setTimeout(r, 50));
    server.grant(grant, undefined, token);
    expect(await answer).toBe('data sent before the receiver answered');
    expect(refusals.join('\n')).toContain('data sent before the receiver answered');
    const handed = await Promise.race([admitted.then(() => true), new Promise((r) => setTimeout(() => r(false), 100))]);
    expect(handed).toBe(false);
    // The grant was not used up: a sender that waits is admitted with it.
    const again = await connect(port);
    again.write(hello(token));
    const ok = await admitted;
    expect(ok.hello.vm).toBe('v1');
    expect(ok.rest.length, 'nothing read past HELLO is handed on').toBe(0);
  });
});
