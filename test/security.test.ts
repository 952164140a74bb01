// Data-plane security: TLS with client certificates from the lab CA, grants bound to migration,
// VM, source and destination host, one-time grants, hostile peers with valid grants, and
// storage paths confined to their roots. Every refusal is checked to have touched nothing.
import fs from 'node:fs';
import crypto from 'node:crypto';
import os from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestLab, waitUntil, sleep, type TestLab } from './helpers/lab.js';
import { connectDataPlane, DataPlaneServer, mintGrantToken, parseToken, type ClientTls, type Hello } from '../dataplane/endpoint.js';
import { DiskReceiver } from '../dataplane/disk-receiver.js';
import { FrameChannel, FrameReader, FrameType, crc32, header, jsonFrame, parseJson, type Frame } from '../dataplane/frames.js';
import { SimDriver, isAlive } from '../drivers/sim/sim-driver.js';
import { ensureHostCert, pkiDir } from '../lab/pki.js';
import { readHostConfig, resolveStorageDir, type HostConfig } from '../common/host-config.js';
import { PAGE_SIZE, BLOCK_SIZE, type VmSpec, type StorageRoot } from '../common/types.js';

let lab: TestLab;
let A: string;
let B: string;
let tag: string;

/** An in-process destination host "C": the agent's own data-plane code, with a lab certificate. */
let C: { name: string; cfg: HostConfig; driver: SimDriver; dataPlane: DataPlaneServer; disks: DiskReceiver; logs: string[] };

/** Fault points of this file's lab (common/faults.ts): agents and VM processes inherit the path. */
const faultsFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-secfaults-')), 'faults.json');

beforeAll(async () => {
  fs.writeFileSync(faultsFile, '{}');
  process.env.VMFERRY_FAULTS_FILE = faultsFile;
  lab = await startTestLab();
  [A, B] = lab.hosts as [string, string];
  tag = A.split('-')[1]!;
  const name = `hC-${tag}`;
  const home = path.join(lab.dir, 'hosts', name);
  const cfg: HostConfig = {
    name,
    memoryCapacityBytes: 8 * 2 ** 30,
    storageRoots: [
      { name: 'shared', path: path.join(lab.dir, 'shared'), shared: true },
      { name: 'local', path: path.join(home, 'local'), shared: false },
    ],
    runDir: path.join(home, 'run'),
    dataPlane: { host: '127.0.0.1', port: 0 },
    maxConcurrentMigrations: 2,
    tls: ensureHostCert(pkiDir(lab.dir), name),
  };
  for (const r of cfg.storageRoots) fs.mkdirSync(r.path, { recursive: true });
  const logs: string[] = [];
  const log = (m: string): void => { logs.push(m); };
  const driver = new SimDriver(cfg, log);
  const disks = new DiskReceiver(log);
  const dataPlane = new DataPlaneServer({ memory: (h, s, r, a) => driver.handOver(h, s, r, a), disk: (h, s, r, a) => disks.accept(h, s, r, a) }, log, { hostName: name, tls: cfg.tls });
  driver.dataPlane = dataPlane;
  driver.diskReceiver = disks;
  cfg.dataPlane = await dataPlane.listen('127.0.0.1', 0);
  C = { name, cfg, driver, dataPlane, disks, logs };
});

afterAll(async () => {
  if (C) {
    for (const v of await C.driver.list()) await C.driver.destroy(v.name, { deleteStorage: false }).catch(() => undefined);
    C.dataPlane.close();
  }
  await lab?.down();
});

const pki = (): string => pkiDir(lab.dir);
const certOf = (host: string): ClientTls => ({ ca: path.join(pki(), 'ca.pem'), cert: path.join(pki(), `${host}.pem`), key: path.join(pki(), `${host}.key`) });

async function specOnA(name: string): Promise<VmSpec> {
  if (!(await lab.client.vmSpec(name))) await lab.client.createVm({ name, host: A, memory: '16MiB', disk: '4MiB', dirtyRate: '1MiB', fill: 0.5 });
  return (await lab.client.vmSpec(name))!.spec;
}

/** Prepares a blank incoming VM on C for a migration from A; returns its one-time token. */
async function incomingOnC(vm: string, migrationId: string): Promise<{ token: string; hello: Hello }> {
  const spec = await specOnA(vm);
  const t = await C.driver.prepareIncoming(spec, migrationId, A);
  return { token: t.token, hello: { migrationId, vm, token: t.token, kind: 'memory', from: A } };
}

async function expectIncomingUntouched(vm: string, migrationId: string): Promise<void> {
  const st = await C.driver.incomingStatus(vm, migrationId);
  expect(st).toMatchObject({ exists: true, state: 'waiting', bytesReceived: 0 });
}

const refusalsSince = (n: number): string[] => C.dataPlane.refused.slice(n);

/** Raw plaintext client: sends frames, returns the first frame the server answers with. */
async function rawExchange(frames: Buffer[], port = C.cfg.dataPlane.port): Promise<Frame | null> {
  const sock = net.connect(port, '127.0.0.1');
  await new Promise((r) => sock.once('connect', r));
  for (const f of frames) sock.write(f);
  const reader = new FrameReader();
  return new Promise((resolve) => {
    const t = setTimeout(() => { sock.destroy(); resolve(null); }, 5000);
    sock.on('data', (c: Buffer) => { const fr = reader.feed(c); if (fr.length) { clearTimeout(t); sock.destroy(); resolve(fr[0]!); } });
    sock.on('close', () => { clearTimeout(t); resolve(null); });
    sock.on('error', () => undefined);
  });
}

function pagesFrame(entries: Array<{ index: number; data: Buffer; crc?: number }>): Buffer {
  const idx = Buffer.alloc(4 + entries.length * 8);
  idx.writeUInt32LE(entries.length, 0);
  entries.forEach((e, k) => { idx.writeUInt32LE(e.index >>> 0, 4 + k * 8); idx.writeUInt32LE((e.crc ?? crc32(e.data)) >>> 0, 8 + k * 8); });
  const body = Buffer.concat([idx, ...entries.map((e) => e.data)]);
  return Buffer.concat([header(FrameType.Pages, body, crc32(idx)), body]);
}

function next(chan: FrameChannel): Promise<Frame> {
  return chan.next(10_000);
}

describe('data-plane TLS', () => {
  it('lab up creates a CA and per-host certificates and configures every host with them', () => {
    for (const h of [A, B]) {
      const cfg = readHostConfig(path.join(lab.dir, 'hosts', h, 'host.json'));
      expect(cfg.tls).toEqual(certOf(h));
      for (const f of Object.values(cfg.tls!)) expect(fs.existsSync(f)).toBe(true);
      expect(fs.statSync(cfg.tls!.key).mode & 0o077).toBe(0);
      const x = new crypto.X509Certificate(fs.readFileSync(cfg.tls!.cert));
      expect(x.subject).toBe(`CN=${h}`);
      expect(x.subjectAltName).toBe(`DNS:${h}`);
    }
  });

  it('(a) a live migration completes over TLS; the receiver demands TLS before any secret or data', async () => {
    await lab.client.createVm({ name: 'tls1', host: A, memory: '64MiB', disk: '8MiB', dirtyRate: '8MiB', fill: 0.6 });
    const { id } = await lab.client.startMigration({ type: 'live', vm: 'tls1', to: B, policy: { verify: 'full' } });
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome, r.reason).toBe('completed');
    expect(r.cutover!.destinationFullCrc).toBe(r.cutover!.sourceFullCrc);
    expect((await lab.client.verifyVm('tls1')).ok).toBe(true);
    // The destination VM process itself terminated TLS and verified the source's certificate.
    const vmLog = fs.readFileSync(path.join(lab.runDir(B), 'tls1', 'vm.log'), 'utf8');
    expect(vmLog).toMatch(new RegExp(`incoming data plane: TLSv1\\.[23] from ${A}, client certificate verified`));
    const agentLog = fs.readFileSync(path.join(lab.dir, 'hosts', B, 'agent.log'), 'utf8');
    expect(agentLog).toMatch(/data plane: TLS with client certificates/);

    // A raw socket to B's data plane: a token in plaintext is refused; a routing preamble for
    // an unknown grant is refused; nothing but a STARTTLS ever comes back in plaintext.
    const port = lab.status().hosts.find((h) => h.name === B)!.dataPlane.port;
    const plain = await rawExchange([jsonFrame(FrameType.Hello, { migrationId: id, vm: 'tls1', kind: 'memory', from: A, token: `v1.${B}.AAAAAAAAAAAA.${'x'.repeat(32)}` })], port);
    expect(plain?.type).toBe(FrameType.Error);
    expect(parseJson<{ message: string }>(plain!).message).toMatch(/only inside TLS/);
    const route = await rawExchange([jsonFrame(FrameType.Hello, { migrationId: id, vm: 'tls1', kind: 'memory', from: A, to: B, grant: 'AAAAAAAAAAAA' })], port);
    expect(parseJson<{ message: string }>(route!).message).toMatch(/no valid grant/);
  });

  it('(b) no client certificate: refused, the incoming VM untouched, the grant still usable', async () => {
    const { hello } = await incomingOnC('sec1', 'mig-b');
    const before = C.dataPlane.refused.length;
    await expect(connectDataPlane(C.cfg.dataPlane, hello, { ca: certOf(A).ca })).rejects.toThrow(/refused the memory transfer: .*certificate/i);
    await waitUntil('refusal logged', async () => refusalsSince(before).some((m) => /no client certificate|peer did not return a certificate|TLS handshake failed/.test(m)));
    await expectIncomingUntouched('sec1', 'mig-b');

    // Plaintext with the token, and garbage instead of a TLS handshake: refused as well.
    const plain = await rawExchange([jsonFrame(FrameType.Hello, hello)]);
    expect(parseJson<{ message: string }>(plain!).message).toMatch(/only inside TLS/);
    const tok = parseToken(hello.token)!;
    const sock = net.connect(C.cfg.dataPlane.port, '127.0.0.1');
    sock.on('error', () => undefined);
    await new Promise((r) => sock.once('connect', r));
    sock.write(jsonFrame(FrameType.Hello, { ...hello, token: undefined, to: tok.destination, grant: tok.id }));
    const first = await new Promise<Frame>((resolve) => { const rd = new FrameReader(); sock.once('data', (c: Buffer) => resolve(rd.feed(c)[0]!)); });
    expect(first.type).toBe(FrameType.StartTls); // the server demands TLS now
    sock.write(jsonFrame(FrameType.Auth, { token: hello.token })); // plaintext AUTH instead of a ClientHello
    await new Promise((r) => sock.once('close', r));
    await waitUntil('refusal logged', async () => refusalsSince(before).some((m) => /TLS handshake failed|closed during the TLS/.test(m)));
    await expectIncomingUntouched('sec1', 'mig-b');

    // The grant was not burnt by any of this: the real source still gets in.
    const chan = await connectDataPlane(C.cfg.dataPlane, hello, certOf(A));
    chan.sock.destroy();
  });

  it('(c) client certificate from another CA (CN of the right host): refused', async () => {
    const evil = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-evil-ca-'));
    const forged = ensureHostCert(evil, A); // CN = A, but signed by a CA the lab never heard of
    const { hello } = await incomingOnC('sec2', 'mig-c');
    const before = C.dataPlane.refused.length;
    await expect(connectDataPlane(C.cfg.dataPlane, hello, { ca: certOf(A).ca, cert: forged.cert, key: forged.key })).rejects.toThrow(/refused/);
    await waitUntil('refusal logged', async () => refusalsSince(before).some((m) => /not trusted|not issued by/.test(m)));
    await expectIncomingUntouched('sec2', 'mig-c');
    // And the other way round: a server the sender cannot verify never sees the token.
    await expect(connectDataPlane(C.cfg.dataPlane, hello, { ca: forged.ca, cert: certOf(A).cert, key: certOf(A).key })).rejects.toThrow(/certificate/);
    await expectIncomingUntouched('sec2', 'mig-c');
    fs.rmSync(evil, { recursive: true, force: true });
  });

  it('(d) valid lab certificate of the wrong host, or a token for another grant: refused', async () => {
    const { hello } = await incomingOnC('sec3', 'mig-d');
    const before = C.dataPlane.refused.length;
    // B holds a perfectly valid lab certificate, but the grant is A's.
    await expect(connectDataPlane(C.cfg.dataPlane, hello, certOf(B))).rejects.toThrow(/refused/);
    await waitUntil('refusal logged', async () => refusalsSince(before).some((m) => m.includes(`client certificate is for host ${B}, the grant for ${A}`)));
    // Claiming to be B in the preamble does not help: the grant names A.
    await expect(connectDataPlane(C.cfg.dataPlane, { ...hello, from: B }, certOf(B))).rejects.toThrow(/grant does not match/);
    // A's certificate but a forged secret for the right grant id.
    const tok = parseToken(hello.token)!;
    await expect(connectDataPlane(C.cfg.dataPlane, { ...hello, token: `v1.${tok.destination}.${tok.id}.${'A'.repeat(32)}` }, certOf(A))).rejects.toThrow(/no valid grant/);
    // A token for another VM's grant.
    const other = await incomingOnC('sec4', 'mig-d2');
    await expect(connectDataPlane(C.cfg.dataPlane, { ...hello, token: other.token }, certOf(A))).rejects.toThrow(/refused/);
    await expectIncomingUntouched('sec3', 'mig-d');
    await expectIncomingUntouched('sec4', 'mig-d2');
    expect(refusalsSince(before).length).toBeGreaterThanOrEqual(4);
  });

  it('(e) a replayed grant is refused', async () => {
    const { hello } = await incomingOnC('sec5', 'mig-e');
    const chan = await connectDataPlane(C.cfg.dataPlane, hello, certOf(A));
    await sleep(300); // the VM process reports the accepted connection; the agent burns the grant
    const before = C.dataPlane.refused.length;
    await expect(connectDataPlane(C.cfg.dataPlane, hello, certOf(A))).rejects.toThrow(/already used or revoked/);
    expect(refusalsSince(before).some((m) => /already used or revoked/.test(m))).toBe(true);
    // The first connection is unaffected by the replay.
    chan.sock.write(pagesFrame([{ index: 1, data: Buffer.alloc(PAGE_SIZE, 7) }]));
    await waitUntil('page received', async () => (await C.driver.incomingStatus('sec5', 'mig-e')).bytesReceived > 0);
    chan.sock.destroy();
  });

  it('(e) parallel start: a connection made before its minted grant is issued waits for it; the grant opens once, for its transfer only', async () => {
    const spec = await specOnA('secpm');
    const token = mintGrantToken(C.name);
    const hello: Hello = { migrationId: 'mig-pm', vm: 'secpm', token, kind: 'memory', from: A };
    // The source connects first (the destination is still preparing): the connection is held.
    let admitted = false;
    const early = connectDataPlane(C.cfg.dataPlane, hello, certOf(A)).then((ch) => { admitted = true; return ch; });
    await sleep(300);
    expect(admitted).toBe(false);
    // A token not for this host, or one another transfer holds, is refused before anything is prepared.
    await expect(C.driver.prepareIncoming(spec, 'mig-pm', A, { token: mintGrantToken('elsewhere') })).rejects.toThrow(/not for/);
    expect(await C.driver.get('secpm')).toBeUndefined();
    expect((await C.driver.prepareIncoming(spec, 'mig-pm', A, { token })).token).toBe(token);
    const chan = await early; // admitted as soon as the grant exists
    await sleep(300); // the VM process reports the accepted connection; the agent burns the grant
    // A retried prepareIncoming of the same transfer is a no-op: the used grant stays used.
    expect((await C.driver.prepareIncoming(spec, 'mig-pm', A, { token })).token).toBe(token);
    await expect(connectDataPlane(C.cfg.dataPlane, hello, certOf(A))).rejects.toThrow(/already used or revoked/);
    await expect(C.driver.prepareIncoming(await specOnA('secpm2'), 'mig-pm2', A, { token })).rejects.toThrow(/already held by another transfer/);
    expect(await C.driver.get('secpm2')).toBeUndefined();
    // The early connection is the transfer's: its pages land.
    chan.sock.write(pagesFrame([{ index: 1, data: Buffer.alloc(PAGE_SIZE, 7) }]));
    await waitUntil('page received', async () => (await C.driver.incomingStatus('secpm', 'mig-pm')).bytesReceived > 0);
    chan.sock.destroy();
  });

  it('(e) parallel streams: a grant opens exactly the streams the destination was prepared for, each once, stream 0 first', async () => {
    const spec = await specOnA('secs1');
    const t = await C.driver.prepareIncoming(spec, 'mig-s', A, { streams: 2 });
    const hello: Hello = { migrationId: 'mig-s', vm: 'secs1', token: t.token, kind: 'memory', from: A };
    await expect(connectDataPlane(C.cfg.dataPlane, { ...hello, stream: 1, streams: 2 }, certOf(A))).rejects.toThrow(/stream 1 before stream 0/);
    await expect(connectDataPlane(C.cfg.dataPlane, { ...hello, stream: 0, streams: 3 }, certOf(A))).rejects.toThrow(/prepared for 2 stream/);
    await expect(connectDataPlane(C.cfg.dataPlane, { ...hello, stream: 2, streams: 2 }, certOf(A))).rejects.toThrow(/outside 0\.\.1/);
    await expectIncomingUntouched('secs1', 'mig-s');
    const s0 = await connectDataPlane(C.cfg.dataPlane, { ...hello, stream: 0, streams: 2 }, certOf(A));
    await sleep(300); // the VM process reports the accepted connection; the agent takes stream 0
    await expect(connectDataPlane(C.cfg.dataPlane, { ...hello, stream: 0, streams: 2 }, certOf(A))).rejects.toThrow(/already used/);
    const s1 = await connectDataPlane(C.cfg.dataPlane, { ...hello, stream: 1, streams: 2 }, certOf(A));
    await sleep(300);
    // Every stream taken: the grant is gone.
    await expect(connectDataPlane(C.cfg.dataPlane, { ...hello, stream: 1, streams: 2 }, certOf(A))).rejects.toThrow(/already used or revoked/);
    // Pages arrive on stream 1; a barrier on stream 0 is acknowledged only once stream 1 reached it.
    s1.sock.write(pagesFrame([{ index: 300, data: Buffer.alloc(PAGE_SIZE, 9) }]));
    s0.sock.write(jsonFrame(FrameType.RoundEnd, { barrier: true, seq: 1 }));
    const early = await Promise.race([s0.next(500).then(() => 'answered', () => 'silent'), sleep(600).then(() => 'silent')]);
    expect(early).toBe('silent');
    s1.sock.write(jsonFrame(FrameType.RoundEnd, { seq: 1 }));
    const ack = await s0.expect<{ bytesReceived: number }>(FrameType.Ack, 5000);
    expect(ack.bytesReceived).toBeGreaterThan(PAGE_SIZE);
    // A page on a stream that is not its own fails the transfer (it could overtake a newer copy).
    s1.sock.write(pagesFrame([{ index: 5, data: Buffer.alloc(PAGE_SIZE, 3) }]));
    await waitUntil('incoming failed', async () => (await C.driver.incomingStatus('secs1', 'mig-s')).state === 'failed');
    expect((await C.driver.incomingStatus('secs1', 'mig-s')).error).toMatch(/page 5 arrived on stream 1, not its own \(0\)/);
    s1.sock.destroy();
    s0.sock.destroy();
  });

  it('(e) disk grants: refused for the wrong host, replay refused, hostile blocks refused; the target file untouched', async () => {
    const spec = await specOnA('sec6');
    const g = await C.driver.prepareDiskTargets(spec, 'mig-e-disk', A, 2);
    const file = Object.values(g.paths)[0]!;
    const snapshot = (): { size: number; mtime: number; zero: boolean } => {
      const st = fs.statSync(file);
      return { size: st.size, mtime: st.mtimeMs, zero: fs.readFileSync(file).every((b) => b === 0) };
    };
    const before = snapshot();
    expect(before.zero).toBe(true);
    const hello: Hello = { migrationId: 'mig-e-disk', vm: 'sec6', from: A, kind: 'disk', token: g.token };
    await expect(connectDataPlane(C.cfg.dataPlane, hello, certOf(B))).rejects.toThrow(/refused/);
    await expect(connectDataPlane(C.cfg.dataPlane, hello, { ca: certOf(A).ca })).rejects.toThrow(/refused/);
    expect(snapshot()).toEqual(before);
    // The real source, hostile: a block beyond the disk, then one with a bad checksum.
    const chan = await connectDataPlane(C.cfg.dataPlane, hello, certOf(A));
    const blocks = (n: number, block: number, data: Buffer, crc = crc32(data)): Buffer => {
      const meta = Buffer.alloc(12 + 8);
      meta.writeUInt32LE(1, 0); meta.writeUInt32LE(0, 4); meta.writeUInt32LE(n, 8);
      meta.writeUInt32LE(block, 12); meta.writeUInt32LE(crc >>> 0, 16);
      return Buffer.concat([header(FrameType.Blocks, meta.length + data.length, crc32(meta)), meta, data]);
    };
    chan.sock.write(blocks(1, 1 << 30, Buffer.alloc(BLOCK_SIZE, 9)));
    const err = await next(chan);
    expect(err.type).toBe(FrameType.Error);
    expect(parseJson<{ message: string }>(err).message).toMatch(/outside disk/);
    expect(snapshot()).toEqual(before);
    // Replay of the used disk grant.
    await expect(connectDataPlane(C.cfg.dataPlane, hello, certOf(A))).rejects.toThrow(/already used or revoked/);
    // A fresh grant (reconnect): a bad block checksum is refused before a byte is written.
    const g2 = await C.driver.prepareDiskTargets(spec, 'mig-e-disk', A, 2);
    const chan2 = await connectDataPlane(C.cfg.dataPlane, { ...hello, token: g2.token }, certOf(A));
    chan2.sock.write(blocks(1, 3, Buffer.alloc(BLOCK_SIZE, 9), 12345));
    const err2 = await next(chan2);
    expect(parseJson<{ message: string }>(err2).message).toMatch(/checksum/);
    expect(snapshot()).toEqual(before);
    await C.driver.deleteDiskTargets('sec6', 'mig-e-disk');
    expect(fs.existsSync(file)).toBe(false);
  });
});

describe('hostile peer with a valid grant', () => {
  it('(f) out-of-bounds page indexes or bad page checksums fail the incoming migration', async () => {
    for (const [vm, mig, frame, why] of [
      ['sec7', 'mig-f1', pagesFrame([{ index: 16 * 2 ** 20 / PAGE_SIZE + 5, data: Buffer.alloc(PAGE_SIZE, 1) }]), /outside guest memory/],
      ['sec8', 'mig-f2', pagesFrame([{ index: 3, data: Buffer.alloc(PAGE_SIZE, 1), crc: 0xdeadbeef }]), /failed its checksum/],
    ] as const) {
      const { hello } = await incomingOnC(vm, mig);
      const chan = await connectDataPlane(C.cfg.dataPlane, hello, certOf(A));
      chan.sock.write(frame);
      const err = await next(chan);
      expect(err.type).toBe(FrameType.Error);
      expect(parseJson<{ message: string }>(err).message).toMatch(why);
      const st = await C.driver.incomingStatus(vm, mig);
      expect(st.state).toBe('failed');
      expect(st.error).toMatch(why);
      expect(await C.driver.abortIncoming(vm, mig)).toEqual({ aborted: true, running: false });
      expect(fs.existsSync(path.join(C.cfg.runDir, vm))).toBe(false);
    }
  });

  it('(f) through the workflow: a peer holding the grant and the source key sends bad pages; the migration rolls back, the VM stays fine on the source', async () => {
    await lab.client.createVm({ name: 'evil1', host: A, memory: '32MiB', disk: '4MiB', dirtyRate: '4MiB', fill: 0.5 });
    const agentA = lab.status().hosts.find((h) => h.name === A)!.pid!;
    // Hold the real source back (it would connect while the destination prepares, and so use
    // the grant first): the attacker gets there before it. Armed before the start, since the
    // start returns once admitted and the source connects right after.
    fs.writeFileSync(faultsFile, JSON.stringify({ 'source-before-connect': 'delay:4000' }));
    const t0 = Date.now();
    let id = '';
    try {
      ({ id } = await lab.client.startMigration({ type: 'live', vm: 'evil1', to: B }));
      const handle = lab.client.client.workflow.getHandle(id);
      type Ev = { eventId?: { toString(): string } | null; activityTaskScheduledEventAttributes?: { activityType?: { name?: string | null } | null } | null; activityTaskCompletedEventAttributes?: { scheduledEventId?: { toString(): string } | null; result?: { payloads?: Array<{ data?: Uint8Array | null }> | null } | null } | null };
      const events = async (): Promise<Ev[]> => ((await handle.fetchHistory()).events ?? []) as Ev[];
      const schedId = await waitUntil('prepareIncoming scheduled', async () => (await events()).find((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'prepareIncoming')?.eventId?.toString(), 30_000, 10);
      const target = await waitUntil('prepareIncoming result', async () => {
        const done = (await events()).find((e) => e.activityTaskCompletedEventAttributes?.scheduledEventId?.toString() === schedId);
        const data = done?.activityTaskCompletedEventAttributes?.result?.payloads?.[0]?.data;
        return data ? (JSON.parse(Buffer.from(data).toString('utf8')) as { endpoint: { host: string; port: number }; token: string }) : undefined;
      });
      // The token is in the workflow history; with the source host's key it opens the stream.
      const chan = await connectDataPlane(target.endpoint, { migrationId: id, vm: 'evil1', token: target.token, kind: 'memory', from: A }, certOf(A));
      chan.sock.write(pagesFrame([{ index: 0xffff, data: Buffer.alloc(PAGE_SIZE, 1) }]));
      const err = await next(chan);
      expect(parseJson<{ message: string }>(err).message).toMatch(/outside guest memory/);
    } finally {
      fs.writeFileSync(faultsFile, '{}');
    }
    const r = await lab.client.awaitMigration(id);
    expect(r.outcome).toBe('rolled-back');
    // The real source then finds its grant used: refused at once, not retried as "not yet issued".
    expect(r.reason).toMatch(/outside guest memory|already used|destination|refused/);
    expect(Date.now() - t0).toBeLessThan(15_000);
    const where = (await lab.client.listVms()).filter((v) => v.name === 'evil1').map((v) => ({ host: v.host, state: v.state }));
    expect(where).toEqual([{ host: A, state: 'running' }]);
    await waitUntil('destination cleaned', async () => !fs.readdirSync(lab.runDir(B)).includes('evil1'));
    expect((await lab.client.verifyVm('evil1')).ok).toBe(true);
    expect(isAlive(agentA)).toBe(true);
  });
});

describe('incoming status (what superviseIncoming waits on)', () => {
  it('a status call with unlessState is held until the incoming state changes (connection, failure), or until its wait ends', async () => {
    const { hello } = await incomingOnC('sec9', 'mig-w1');
    const held = await C.driver.incomingStatus('sec9', 'mig-w1', { waitMs: 300, unlessState: 'waiting' });
    expect(held).toMatchObject({ state: 'waiting', waited: true });
    // Held across the connection: answered by the change, long before its 20 s wait ends.
    const t0 = performance.now();
    const changed = C.driver.incomingStatus('sec9', 'mig-w1', { waitMs: 20_000, unlessState: 'waiting' });
    const chan = await connectDataPlane(C.cfg.dataPlane, hello, certOf(A));
    expect(await changed).toMatchObject({ state: 'receiving', waited: true });
    const failed = C.driver.incomingStatus('sec9', 'mig-w1', { waitMs: 20_000, unlessState: 'receiving' });
    chan.sock.write(pagesFrame([{ index: 3, data: Buffer.alloc(PAGE_SIZE, 1), crc: 0xdeadbeef }]));
    expect(await failed).toMatchObject({ state: 'failed', waited: true });
    expect(performance.now() - t0).toBeLessThan(15_000);
    // A state that already differs is answered at once (no wait).
    expect(await C.driver.incomingStatus('sec9', 'mig-w1', { waitMs: 20_000, unlessState: 'receiving' })).toMatchObject({ state: 'failed' });
    chan.sock.destroy();
    expect(await C.driver.abortIncoming('sec9', 'mig-w1')).toEqual({ aborted: true, running: false });
  });
});

describe('storage paths', () => {
  it('(g) resolveStorageDir refuses .. escapes and symlinks out of the roots; nothing is created', () => {
    const base = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-roots-'));
    const rootDir = path.join(base, 'root');
    const outside = path.join(base, 'outside');
    fs.mkdirSync(rootDir);
    fs.mkdirSync(outside);
    const roots: StorageRoot[] = [{ name: 'local', path: rootDir, shared: false }];
    expect(resolveStorageDir(roots, path.join(rootDir, 'vms', 'ok')).dir).toBe(path.join(fs.realpathSync(rootDir), 'vms', 'ok'));
    expect(() => resolveStorageDir(roots, `${rootDir}/../outside/x`)).toThrow(/not inside any storage root/);
    expect(() => resolveStorageDir(roots, `${rootDir}/vms/../../outside`)).toThrow(/not inside any storage root/);
    expect(() => resolveStorageDir(roots, rootDir)).toThrow(/not inside any storage root/); // the root itself is no VM dir
    expect(() => resolveStorageDir(roots, 'relative/dir')).toThrow(/absolute/);
    // A symlink inside the root pointing outside, with and without a missing tail.
    fs.symlinkSync(outside, path.join(rootDir, 'escape'));
    expect(() => resolveStorageDir(roots, path.join(rootDir, 'escape'))).toThrow(/not inside any storage root/);
    expect(() => resolveStorageDir(roots, path.join(rootDir, 'escape', 'new', 'deeper'))).toThrow(/not inside any storage root/);
    // A dangling symlink: mkdir -p through it would create directories outside the root.
    fs.symlinkSync(path.join(outside, 'not-yet'), path.join(rootDir, 'dangling'));
    expect(() => resolveStorageDir(roots, path.join(rootDir, 'dangling', 'vm'))).toThrow(/cannot be resolved|not inside/);
    // A symlinked directory chain back into the root is fine (it resolves inside).
    fs.mkdirSync(path.join(rootDir, 'real'));
    fs.symlinkSync(path.join(rootDir, 'real'), path.join(rootDir, 'alias'));
    expect(resolveStorageDir(roots, path.join(rootDir, 'alias', 'vm')).dir).toBe(path.join(fs.realpathSync(rootDir), 'real', 'vm'));
    // Nothing was created anywhere by any of these.
    expect(fs.readdirSync(outside)).toEqual([]);
    expect(fs.readdirSync(rootDir).sort()).toEqual(['alias', 'dangling', 'escape', 'real']);
    expect(fs.readdirSync(path.join(rootDir, 'real'))).toEqual([]);
    fs.rmSync(base, { recursive: true, force: true });
  });

  it('(g) a storage move to a symlink that leaves the root is refused by the workflow; nothing is written outside', async () => {
    await lab.client.createVm({ name: 'stor1', host: A, memory: '16MiB', disk: '4MiB', storage: 'local' });
    const cfgA = readHostConfig(path.join(lab.dir, 'hosts', A, 'host.json'));
    const outside = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-outside-'));
    const local2 = cfgA.storageRoots.find((r) => r.name === 'local2')!.path;
    fs.mkdirSync(local2, { recursive: true });
    fs.symlinkSync(outside, path.join(local2, 'trap'));
    let outcome: string;
    try {
      const { id } = await lab.client.startMigration({ type: 'storage', vm: 'stor1', toPath: path.join(local2, 'trap', 'stor1') });
      const r = await lab.client.awaitMigration(id);
      outcome = `${r.outcome}: ${r.reason}`;
    } catch (e) {
      outcome = `refused: ${(e as Error).message}`;
    }
    // Refused by the client, or by the host when the move starts (then rolled back).
    expect(outcome).toMatch(/^(failed|rolled-back|refused): .*not inside any storage root/);
    expect(fs.readdirSync(outside)).toEqual([]);
    expect((await lab.client.vmSpec('stor1'))!.host).toBe(A);
    expect((await lab.client.verifyVm('stor1')).ok).toBe(true);
    fs.rmSync(outside, { recursive: true, force: true });
  });
});
