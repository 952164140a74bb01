// Destination side of a disk mirror (shared-nothing): the host agent writes the blocks it
// receives into the target files prepared for that migration, and acknowledges them. Every
// frame is validated (disk index, block bounds, per-block CRC) before a byte is written, and
// a frame written twice (after a reconnect) is harmless.
import fs from 'node:fs';
import type net from 'node:net';
import { BLOCK_SIZE } from '../common/types.js';
import { FrameChannel, FrameType, crc32, jsonFrame, type Frame } from './frames.js';
import { acceptSecure, type Hello, type HandOverAuth } from './endpoint.js';

export interface DiskTargetSession {
  migrationId: string;
  vm: string;
  disks: Array<{ id: string; path: string; blocks: number }>;
}

export class DiskReceiver {
  private sessions = new Map<string, DiskTargetSession>();

  constructor(private readonly log: (m: string) => void = () => undefined) {}

  register(s: DiskTargetSession): void {
    this.sessions.set(s.migrationId, s);
  }

  unregister(migrationId: string): void {
    this.sessions.delete(migrationId);
  }

  accept(hello: Hello, sock: net.Socket, rest: Buffer, auth?: HandOverAuth): void {
    if (auth) {
      // TLS mode: authenticate (certificate of the grant's source host, then the token) before
      // a single file is opened; a refusal touches nothing.
      acceptSecure(sock, rest, auth).then(
        (sec) => {
          if (!auth.settle(true)) { sec.sock.end(jsonFrame(FrameType.Error, { message: 'grant already used' })); return; }
          this.log(`disk mirror ${auth.migrationId}: ${sec.protocol} connection from ${sec.peer}`);
          this.serve(hello, sec.sock, sec.rest);
        },
        (e: Error) => { auth.settle(false, `disk ${auth.migrationId}: ${e.message}`); },
      );
      return;
    }
    this.serve(hello, sock, rest);
  }

  private serve(hello: Hello, sock: net.Socket, rest: Buffer): void {
    const s = this.sessions.get(hello.migrationId);
    if (!s || s.vm !== hello.vm) {
      sock.end(jsonFrame(FrameType.Error, { message: `no disk target for migration ${hello.migrationId}` }));
      return;
    }
    let fds: number[];
    try {
      fds = s.disks.map((d) => fs.openSync(d.path, 'r+'));
    } catch (e) {
      sock.end(jsonFrame(FrameType.Error, { message: (e as Error).message }));
      return;
    }
    const chan = new FrameChannel(sock, rest);
    let lastSeq = 0;
    let ackScheduled = false;
    let failed = false;
    const close = (): void => { for (const fd of fds.splice(0)) { try { fs.closeSync(fd); } catch { /* closed */ } } };
    chan.onFrame = (f: Frame) => {
      if (failed) return true;
      try {
        if (f.type !== FrameType.Blocks) throw new Error(`unexpected ${FrameType[f.type]} frame on a disk mirror`);
        lastSeq = this.write(s, fds, f.body);
      } catch (e) {
        failed = true;
        this.log(`disk mirror ${s.migrationId}: ${(e as Error).message}`);
        sock.end(jsonFrame(FrameType.Error, { message: (e as Error).message }));
        close();
        return true;
      }
      if (!ackScheduled) {
        ackScheduled = true;
        setImmediate(() => {
          ackScheduled = false;
          if (!sock.destroyed) sock.write(jsonFrame(FrameType.Ack, { seq: lastSeq }));
        });
      }
      return true;
    };
    sock.on('close', close);
    sock.resume(); // the endpoint paused it while checking the grant
    sock.write(jsonFrame(FrameType.Welcome, { vm: s.vm, disks: s.disks.length }));
  }

  private write(s: DiskTargetSession, fds: number[], body: Buffer): number {
    const n = body.readUInt32LE(0);
    const di = body.readUInt32LE(4);
    const seq = body.readUInt32LE(8);
    const d = s.disks[di];
    if (!d) throw new Error(`disk index ${di} outside the ${s.disks.length} disks of ${s.vm}`);
    let off = 12 + n * 8;
    if (body.length !== off + n * BLOCK_SIZE) throw new Error('block frame length does not match its index');
    for (let k = 0; k < n; k++) {
      const b = body.readUInt32LE(12 + k * 8);
      const crc = body.readUInt32LE(16 + k * 8);
      if (b >= d.blocks) throw new Error(`block ${b} outside disk ${d.id} of ${d.blocks} blocks`);
      const data = body.subarray(off, off + BLOCK_SIZE);
      if ((crc32(data) >>> 0) !== crc) throw new Error(`block ${b} of disk ${d.id} failed its checksum`);
      try {
        fs.writeSync(fds[di]!, data, 0, BLOCK_SIZE, b * BLOCK_SIZE);
      } catch (e) {
        throw new Error(`${(e as NodeJS.ErrnoException).code ?? 'EIO'}: writing disk ${d.id} at ${d.path}: ${(e as Error).message}`);
      }
      off += BLOCK_SIZE;
    }
    return seq;
  }
}
