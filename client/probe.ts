// UDP echo prober: what an operator's ping would see of a VM during a migration. Packets go
// to the VM's stable probe address, which moves with the VM at cutover.
import dgram from 'node:dgram';

export interface ProbeStats {
  sent: number;
  received: number;
  lost: number;
  /** Replies later than the interval (seen, but late). */
  late: number;
  /** Longest run of consecutive lost probes. */
  maxConsecutiveLost: number;
  /** Longest time between two consecutive replies, ms. */
  maxGapMs: number;
  intervalMs: number;
}

export class Prober {
  private sock = dgram.createSocket('udp4');
  private timer: NodeJS.Timeout | null = null;
  private seq = 0;
  private sentAt = new Map<number, number>();
  private replied = new Set<number>();
  private late = 0;
  private lastReply = 0;
  private maxGap = 0;

  constructor(private readonly target: { address: string; port: number }, private readonly intervalMs = 10) {
    this.sock.on('message', (msg) => {
      const n = msg.readUInt32LE(0);
      const t = this.sentAt.get(n);
      if (t === undefined || this.replied.has(n)) return;
      const now = performance.now();
      if (now - t > this.intervalMs) this.late++;
      if (this.lastReply) this.maxGap = Math.max(this.maxGap, now - this.lastReply);
      this.lastReply = now;
      this.replied.add(n);
    });
    this.sock.on('error', () => undefined);
  }

  start(): this {
    this.timer = setInterval(() => {
      const b = Buffer.alloc(16);
      b.writeUInt32LE(this.seq, 0);
      this.sentAt.set(this.seq, performance.now());
      this.seq++;
      this.sock.send(b, this.target.port, this.target.address);
    }, this.intervalMs);
    return this;
  }

  /** Stops sending, waits for stragglers, and reports. */
  async stop(): Promise<ProbeStats> {
    if (this.timer) clearInterval(this.timer);
    await new Promise((r) => setTimeout(r, Math.max(50, this.intervalMs * 5)));
    this.sock.close();
    let run = 0, maxRun = 0;
    for (let i = 0; i < this.seq; i++) {
      if (this.replied.has(i)) run = 0;
      else maxRun = Math.max(maxRun, ++run);
    }
    return {
      sent: this.seq,
      received: this.replied.size,
      lost: this.seq - this.replied.size,
      late: this.late,
      maxConsecutiveLost: maxRun,
      maxGapMs: Math.round(this.maxGap),
      intervalMs: this.intervalMs,
    };
  }
}

/** Whether the guest answers one echo probe within `timeoutMs` (a paused guest does not). */
export function echoes(target: { address: string; port: number }, timeoutMs = 100): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = dgram.createSocket('udp4');
    const done = (ok: boolean): void => { clearTimeout(timer); sock.close(); resolve(ok); };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.on('message', () => done(true));
    sock.on('error', () => done(false));
    sock.send(Buffer.alloc(16), target.port, target.address);
  });
}
