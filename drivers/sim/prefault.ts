// Faults in an incoming guest's memory just ahead of the pages arriving, on a worker thread.
// Every 4 KiB page's first write costs a page fault (~3 µs here, THP being madvise-only and
// Node unable to madvise); on the receiving thread those faults cost about a third of the
// transfer rate. The worker keeps a window ahead of the highest page received so far, so the
// receiver mostly writes into memory that is already there, and memory that never arrives
// (zero pages are not sent) is faulted in at most one window beyond the last page that did.
import { Worker } from 'node:worker_threads';

/** Pages faulted in ahead of the highest page received (32 MiB). */
export const AHEAD_PAGES = 8192;

// A compare-and-exchange of 0 with 0 writes the page (so it is faulted in) without ever
// changing a byte: a page the receiver already filled keeps its data, atomically.
const WORKER = `
const { workerData } = require('node:worker_threads');
const mem = new Int32Array(workerData.memory);
const ctl = new Int32Array(workerData.control);
const pages = mem.length / 1024;
let next = 0;
for (;;) {
  if (Atomics.load(ctl, 1) !== 0) break;
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
  private readonly control = new Int32Array(new SharedArrayBuffer(8));
  private readonly worker: Worker;

  /** `memory` must live in a SharedArrayBuffer (see Guest: incoming guests do). */
  constructor(memory: Buffer) {
    if (!(memory.buffer instanceof SharedArrayBuffer) || memory.byteOffset !== 0) throw new Error('prefaulting needs guest memory in a SharedArrayBuffer');
    this.worker = new Worker(WORKER, { eval: true, workerData: { memory: memory.buffer, control: this.control.buffer } });
    this.worker.unref();
    this.worker.on('error', () => undefined); // only an optimisation: the receiver faults pages itself
  }

  /** The receiver got page `page`: keep the window ahead of it. */
  advance(page: number): void {
    if (page <= Atomics.load(this.control, 0)) return;
    Atomics.store(this.control, 0, page);
    Atomics.notify(this.control, 0);
  }

  /** The transfer is over (either way): the worker exits. */
  stop(): void {
    Atomics.store(this.control, 1, 1);
    Atomics.notify(this.control, 0);
  }
}
