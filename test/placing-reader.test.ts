// The zero-copy page reader over real loopback sockets: frames split at arbitrary points, the
// agent's leftover bytes first, contiguous and scattered pages, a handler that holds the stream,
// and refusals before any data reaches memory.
import net from 'node:net';
import zlib from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { PlacingReader, type PageSink } from '../dataplane/placing-reader.js';
import { FrameFlag, FrameReader, FrameType, MAX_BODY, ZERO_FLAG, crc32, header, jsonFrame, type Frame } from '../dataplane/frames.js';

const PAGE = 4096;
const PAGES = 64;

type Entry = { p: number; data?: Buffer };

/** A Pages frame as the source writes it: index table (page | ZERO_FLAG, CRC), then the data. */
function pagesFrame(entries: Entry[], flags = 0, badIndexCrc = false): Buffer {
  const index = Buffer.alloc(4 + entries.length * 8);
  index.writeUInt32LE(entries.length, 0);
  const data: Buffer[] = [];
  entries.forEach((e, k) => {
    index.writeUInt32LE(e.data ? e.p : (e.p | ZERO_FLAG) >>> 0, 4 + k * 8);
    index.writeUInt32LE(crc32(e.data ?? Buffer.alloc(PAGE)) >>> 0, 8 + k * 8);
    if (e.data) data.push(e.data);
  });
  let payload = Buffer.concat(data);
  if (flags & FrameFlag.Deflate) payload = zlib.deflateRawSync(payload);
  const crc = badIndexCrc ? 1 : crc32(index);
  return Buffer.concat([header(FrameType.Pages, index.length + payload.length, crc, flags), index, payload]);
}

const page = (seed: number): Buffer => {
  const b = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i += 4) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return b;
};

/** A sink like the VM process's: bounds-checked runs, CRC check after placement, a log of events. */
function sink(events: string[], holdMs = 0): PageSink & { mem: Buffer; errors: Error[] } {
  const memory = Buffer.alloc(PAGES * PAGE);
  const errors: Error[] = [];
  return {
    memory,
    mem: memory,
    errors,
    pageRuns(index) {
      const n = index.readUInt32LE(0);
      const runs: Array<[number, number]> = [];
      for (let k = 0; k < n; k++) {
        const raw = index.readUInt32LE(4 + k * 8);
        const p = (raw & ~ZERO_FLAG) >>> 0;
        if (p >= PAGES) throw new Error(`page ${p} outside guest memory`);
        if (raw & ZERO_FLAG) { memory.fill(0, p * PAGE, (p + 1) * PAGE); continue; }
        const last = runs[runs.length - 1];
        if (last && last[0] + last[1] === p * PAGE) last[1] += PAGE; else runs.push([p * PAGE, PAGE]);
      }
      return runs;
    },
    pagesPlaced(index) {
      const n = index.readUInt32LE(0);
      for (let k = 0; k < n; k++) {
        const raw = index.readUInt32LE(4 + k * 8);
        if (raw & ZERO_FLAG) continue;
        if ((crc32(memory.subarray(raw * PAGE, (raw + 1) * PAGE)) >>> 0) !== index.readUInt32LE(8 + k * 8)) throw new Error(`page ${raw} failed its checksum`);
      }
      events.push(`pages ${n}`);
    },
    frame(f: Frame) {
      if (f.type === FrameType.Pages) {
        // Compressed frames come whole: place them as the copy path would.
        const n = f.body.readUInt32LE(0);
        const data = zlib.inflateRawSync(f.body.subarray(4 + n * 8));
        let at = 0;
        for (let k = 0; k < n; k++) { const p = f.body.readUInt32LE(4 + k * 8); data.copy(memory, p * PAGE, at, at + PAGE); at += PAGE; }
        events.push(`deflate ${n}`);
        return;
      }
      events.push(`${FrameType[f.type]} start`);
      if (!holdMs) return;
      return new Promise<void>((r) => setTimeout(() => { events.push(`${FrameType[f.type]} end`); r(); }, holdMs));
    },
    fail(e) { errors.push(e); events.push(`fail ${e.message}`); },
  };
}

const closers: Array<() => void> = [];
afterEach(() => { for (const c of closers.splice(0)) c(); });

/** Sends `stream` to a real socket whose server side is taken over by a PlacingReader; the first `restBytes` play the agent's leftovers. */
async function transfer(stream: Buffer, s: ReturnType<typeof sink>, restBytes: number, chunk: () => number): Promise<PlacingReader> {
  let reader!: PlacingReader;
  const accepted = new Promise<void>((resolve) => {
    const srv = net.createServer((sock) => { reader = PlacingReader.attach(sock, stream.subarray(0, restBytes), s)!; resolve(); });
    closers.push(() => srv.close());
    srv.listen(0, '127.0.0.1', () => {
      const c = net.connect((srv.address() as net.AddressInfo).port, '127.0.0.1', async () => {
        await accepted;
        for (let at = restBytes; at < stream.length;) {
          const n = Math.min(chunk(), stream.length - at);
          c.write(stream.subarray(at, at + n));
          at += n;
          await new Promise((r) => setImmediate(r));
        }
      });
      closers.push(() => c.destroy());
    });
  });
  await accepted;
  return reader;
}

const until = async (what: string, ok: () => boolean, ms = 10_000): Promise<void> => {
  const end = Date.now() + ms;
  while (!ok()) { if (Date.now() > end) throw new Error(`timed out: ${what}`); await new Promise((r) => setTimeout(r, 5)); }
};

describe('PlacingReader (plaintext zero-copy receive)', () => {
  it('places contiguous, scattered, zero and compressed pages exactly, across arbitrary splits, holding the stream while a handler runs', async () => {
    const expected = Buffer.alloc(PAGES * PAGE);
    const frames: Buffer[] = [];
    const put = (entries: Entry[], flags = 0): void => {
      frames.push(pagesFrame(entries, flags));
      for (const e of entries) (e.data ?? Buffer.alloc(PAGE)).copy(expected, e.p * PAGE);
    };
    put(Array.from({ length: 32 }, (_, i) => ({ p: i, data: page(i) }))); // one long run: read in place
    put([{ p: 40, data: page(100) }, { p: 3 }, { p: 42, data: page(101) }, { p: 50, data: page(102) }]); // scattered + a zero page: gathered
    frames.push(jsonFrame(FrameType.RoundEnd, { seq: 1 }));
    put([{ p: 60, data: page(103) }, { p: 61, data: page(104) }], FrameFlag.Deflate | FrameFlag.Live);
    put(Array.from({ length: 16 }, (_, i) => ({ p: 8 + i, data: page(200 + i) }))); // rewrites pages of the first frame
    frames.push(jsonFrame(FrameType.Device, { digest: 1 }));
    const stream = Buffer.concat(frames);
    for (const [restBytes, chunk] of [[0, () => 1 << 20], [7, () => 1 + Math.floor(Math.random() * 9000)], [5000, () => 4096]] as const) {
      const events: string[] = [];
      const s = sink(events, 30);
      await transfer(stream, s, restBytes, chunk);
      await until('all frames', () => events.includes('Device end') || s.errors.length > 0);
      expect(s.errors).toEqual([]);
      expect(events).toEqual(['pages 32', 'pages 4', 'RoundEnd start', 'RoundEnd end', 'deflate 2', 'pages 16', 'Device start', 'Device end']);
      expect(s.mem.equals(expected)).toBe(true);
    }
  });

  it('refuses a page outside memory or a bad index checksum before any of the frame\'s data is placed', async () => {
    for (const [bad, why] of [
      [pagesFrame([{ p: 1, data: page(1) }, { p: PAGES + 3, data: page(2) }]), /page 67 outside guest memory/],
      [pagesFrame([{ p: 1, data: page(1) }], 0, true), /checksum mismatch on frame type Pages/],
      [Buffer.concat([header(99 as FrameType, 0, 0)]), /unknown frame type 99/],
    ] as const) {
      const events: string[] = [];
      const s = sink(events);
      await transfer(Buffer.concat([pagesFrame([{ p: 0, data: page(9) }]), bad]), s, 0, () => 1 << 16);
      await until('failure', () => s.errors.length > 0);
      expect(s.errors[0]!.message).toMatch(why);
      expect(s.mem.subarray(0, PAGE).equals(page(9))).toBe(true);
      expect(s.mem.subarray(PAGE).equals(Buffer.alloc((PAGES - 1) * PAGE))).toBe(true);
    }
  });

  it('refuses the same malformed frames with the same reasons as the copy path (FrameReader)', async () => {
    const shortIndex = Buffer.alloc(4 + 8);
    shortIndex.writeUInt32LE(1000, 0); // 1000 entries announced: more than the frame holds
    const cases: Array<[Buffer, RegExp]> = [
      [header(99 as FrameType, 0, 0), /unknown frame type 99/],
      [header(FrameType.Pages, MAX_BODY + 1, 0), /exceeds the \d+ limit/],
      [Buffer.concat([header(FrameType.Pages, 2, 0), Buffer.alloc(2)]), /page frame without an index/],
      [Buffer.concat([header(FrameType.Pages, shortIndex.length + PAGE, crc32(shortIndex)), shortIndex, page(3)]), /page frame index exceeds the frame/],
      [pagesFrame([{ p: 1, data: page(1) }], 0, true), /checksum mismatch on frame type Pages/],
      [pagesFrame([{ p: 1, data: page(1) }], FrameFlag.Deflate, true), /checksum mismatch on frame type Pages/],
      [Buffer.concat([header(FrameType.Device, 2, 7), Buffer.from('{}')]), /checksum mismatch on frame type Device/],
    ];
    for (const [bad, why] of cases) {
      expect(() => new FrameReader().feed(bad), `FrameReader: ${why}`).toThrow(why);
      const s = sink([]);
      await transfer(bad, s, 0, () => 1 << 16);
      await until(`PlacingReader refuses (${why})`, () => s.errors.length > 0);
      expect(s.errors[0]!.message).toMatch(why);
      expect(s.mem.equals(Buffer.alloc(PAGES * PAGE))).toBe(true);
    }
  });
});
