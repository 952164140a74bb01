// Faults in an incoming guest's memory on a worker thread, just ahead of the pages arriving.
// Every 4 KiB page's first write costs a page fault (~2 µs here, ~9 µs in memory the hypervisor
// no longer backs; THP is madvise-only and Node cannot madvise); on the receiving thread those
// faults cost about a third of the transfer rate. The worker keeps a window ahead of the
// highest page received so far, so the receiver mostly writes into memory that is already
// there, and memory that never arrives (zero pages are not sent) is faulted in at most one
// window beyond the last page that did.
// Guest memory on reserved huge pages (host.json `hugepages`) is left to the receiver: 512
// faults per GiB instead of 262144, and on 2 cores a second thread zeroing them competes with
// the sender (A/B, alternating, 1 GiB idle: engine harness ~2050 → ~2280 MiB/s on average; lab
// moves, two batches of 16: median ~618 → ~585 ms, then mean ~603 → ~503 ms).
import fs from 'node:fs';
import { Worker } from 'node:worker_threads';

/** Pages faulted in ahead of the highest page received (32 MiB). */
export const AHEAD_PAGES = 8192;

/**
 * Whether a process (`pid`, default this one) has a mapping of at least `bytes` on 2 MiB (or
 * larger) pages, from its smaps: guest memory on the reserved huge-page pool. Source text,
 * because the worker below runs it too (off the receiving thread); onHugePagesNow runs it here.
 */
const ON_HUGE_PAGES = `function onHugePages(fs, bytes, pid = 'self') {
  let text;
  try { text = fs.readFileSync('/proc/' + pid + '/smaps', 'utf8'); } catch { return false; }
  let size = 0;
  for (const line of text.split('\\n')) {
    if (line.startsWith('Size:')) size = Number(line.slice(5).trim().split(' ')[0]) * 1024;
    else if (line.startsWith('KernelPageSize:') && Number(line.slice(15).trim().split(' ')[0]) >= 2048 && size >= bytes) return true;
  }
  return false;
}`;

// A compare-and-exchange of 0 with 0 writes the page (so it is faulted in) without ever
// changing a byte: a page the receiver already filled keeps its data, atomically.
// Whether the memory is on huge pages is read from /proc/self/smaps here, off the receiving
// thread: a hugetlb mapping at least as large as the guest (glibc falls back to 4 KiB pages,
// silently, when the pool is short; then the window applies). On huge pages the worker ends.
const WORKER = `
const { workerData } = require('node:worker_threads');
const fs = require('node:fs');
const mem = new Int32Array(workerData.memory);
const ctl = new Int32Array(workerData.control);
const pages = mem.length / 1024;
${ON_HUGE_PAGES}
const huge = onHugePages(fs, mem.byteLength);
if (huge) Atomics.store(ctl, 2, 1);
let next = 0;
for (;;) {
  if (huge || Atomics.load(ctl, 1) !== 0) break;
  const frontier = Atomics.load(ctl, 0);
  if (next < frontier) next = frontier;
  const until = Math.min(pages, frontier + ${AHEAD_PAGES});
  if (next >= until) {
    if (until === pages) break;
    Atomics.wait(ctl, 0, frontier, 200);
    continue;
  }
  for (const end = Math.min(until, next + 256); next < end; next++) Atomics.compareExchange(mem, next * 1024, 0, 0);
}`;

export class Prefaulter {
  /** [0] highest page received, [1] stop, [2] set by the worker: the memory is on huge pages (no prefaulting). */
  private readonly control = new Int32Array(new SharedArrayBuffer(12));
  private readonly worker: Worker;

  /** `memory` must live in a SharedArrayBuffer (see Guest: incoming guests do). */
  constructor(memory: Buffer) {
    if (!(memory.buffer instanceof SharedArrayBuffer) || memory.byteOffset !== 0) throw new Error('prefaulting needs guest memory in a SharedArrayBuffer');
    this.worker = new Worker(WORKER, { eval: true, workerData: { memory: memory.buffer, control: this.control.buffer } });
    this.worker.unref();
    this.worker.on('error', () => undefined); // only an optimisation: the receiver faults pages itself
  }

  /** Whether the worker found the memory on huge pages (and left it to the receiver); false until it looked. */
  get onHugePages(): boolean {
    return Atomics.load(this.control, 2) !== 0;
  }

  /** The receiver got page `page`: keep the window ahead of it (nothing to do on huge pages). */
  advance(page: number): void {
    if (Atomics.load(this.control, 2) !== 0 || page <= Atomics.load(this.control, 0)) return;
    Atomics.store(this.control, 0, page);
    Atomics.notify(this.control, 0);
  }

  /** The transfer is over (either way): the worker exits. */
  stop(): void {
    Atomics.store(this.control, 1, 1);
    Atomics.notify(this.control, 0);
  }
}

const onHugePages = new Function(`return ${ON_HUGE_PAGES}`)() as (f: typeof fs, bytes: number, pid?: number) => boolean;
/** See ON_HUGE_PAGES: for moments off the migration's path (a booted or resumed guest). */
export const onHugePagesNow = (bytes: number): boolean => onHugePages(fs, bytes);
/** The same for another process of this host (the benchmark checks its guests with it). */
export const onHugePagesOf = (pid: number, bytes: number): boolean => onHugePages(fs, bytes, pid);
