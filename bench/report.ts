// Rendering of bench results: markdown table and a hand-written SVG of the key curves.
import type { CutoverResult } from '../common/types.js';

/** How a paired run measured on a busy machine is marked, in the tables and the target's value. */
export const NOT_QUIET_MARK = ' (machine not quiet)';

export interface CaseResult {
  name: string;
  memoryBytes: number;
  fill: number;
  /** Configured guest dirty rate as a fraction of the 1-stream loopback baseline. */
  dirtyFraction: number;
  dirtyRateBytesPerSec: number;
  policy: Record<string, unknown>;
  outcome: string;
  reason: string;
  totalMs: number;
  workflowMs: number;
  dataMovementMs: number;
  orchestrationOverheadMs: number;
  overheadBreakdownMs: Record<string, number>;
  downtimeMs: number;
  probe: { sent: number; received: number; lost: number; maxConsecutiveLost: number; maxGapMs: number; intervalMs: number } | null;
  rounds: number;
  bytesTransferred: number;
  wireRatio: number;
  throughputBytesPerSec: number;
  throughputRatio: number;
  finalThrottle: number;
  decisions: number;
  agentRssKiB: Record<string, { before: number; hwmAfter: number; growth: number }>;
  vmHwmKiB: { source: number; destination: number };
  /** Huge-page cases: whether each end's guest memory was on reserved huge pages (its smaps). */
  hugePages?: { source: boolean; destination: boolean };
  verified: boolean | null;
  cleanRollback?: boolean;
  error?: string;
  /** Bytes on the wire ÷ pre-copy time (startOutgoing returned → cutover began): the bandwidth-cap check. */
  linkBytesPerSec?: number;
  /** With compression: uncompressed frame bytes and the source CPU spent compressing. */
  compression?: { rawBytes: number; cpuMs: number };
  /** Where the downtime went (source's clock), and the pages the pause carried. */
  downtimePhasesMs?: CutoverResult['downtimePhasesMs'];
  finalPages?: number;
  /** A case run several times: every run's total ms (the case reports the fastest completed one). */
  runsTotalMs?: number[];
  /** Those of the runs that did not complete (outcome, error). */
  runsNotCompleted?: string[];
  /** A paired run: the faster of the plain pumps just before and just after it, and memory ÷ total time against that. */
  pairedPumpBytesPerSec?: number;
  pairedRatio?: number;
  /** A paired run: ms waited for a quiet machine before the first pump, the move and the second pump. */
  quietWaitsMs?: number[];
  /** A paired run: how many of its three quiet waits gave up (the machine stayed busy for 10 s); absent when none. */
  notQuiet?: number;
  /** A paired case: every run against its own pump (0 for a run that did not complete), and their median. */
  pairedRuns?: Array<{ totalMs: number; pumpBytesPerSec: number; ratio: number; quietWaitsMs: number[]; notQuiet?: number }>;
  pairedMedianRatio?: number;
}

export interface EvacuationRun { from: string; to: string; concurrency: number; vms: number; memoryBytes: number; totalMs: number; completed: number; failed: number; maxDowntimeMs: number; meanDowntimeMs: number; vmsPerMinute: number; error?: string }

/**
 * bench/engine.ts in the same run, the data movement without the control plane: its best run's
 * rate, and the faster of the pumps just before and after that run.
 */
export interface EngineAlone { streams: number; bytesPerSec: number; pumpBytesPerSec: number; ratio: number }

export interface Target { name: string; value: number | string | null; target: string; pass: boolean }

/** An idle case in a configuration the throughput target is not judged on, beside what bounds its data plane here. */
export interface OtherConfiguration { name: string; streams: number; ratio: number; bound: string; boundRatio: number }

const mib = (b: number): string => (b / 2 ** 20).toFixed(0);

export function markdown(r: { startedAt: string; scale: number; machine: Record<string, unknown>; baselines: Record<string, number>; warmUp?: Array<{ from: string; to: string; orchestrationOverheadMs: number }>; engineAlone?: EngineAlone[]; cases: CaseResult[]; storage?: Record<string, unknown> | null; evacuations?: EvacuationRun[]; notMeasured: Array<{ name: string; why: string }>; targets: Target[]; otherConfigurations?: OtherConfiguration[] }): string {
  const L: string[] = [];
  L.push(`# vmferry bench — ${r.startedAt}`, '');
  L.push(`Scale ${r.scale}; machine: ${Object.entries(r.machine).map(([k, v]) => `${k} ${String(v)}`).join(', ')}`, '');
  L.push('## Baselines (same run)', '', '| baseline | value |', '|---|---|');
  for (const [k, v] of Object.entries(r.baselines)) L.push(`| ${k} | ${mib(v)} MiB/s |`);
  const pump = r.baselines['loopback TCP, 1 stream'], crc = r.baselines['page CRC-32 (4 KiB pages)'], touch = r.baselines['copy into untouched memory (first-touch faults)'];
  if (pump && crc && touch) {
    // The destination receives, checksums and places every byte, one after the other, on one core.
    const ceiling = 1 / (1 / pump + 1 / crc + 1 / touch);
    L.push('', `Ceiling of the engine on this machine, TLS data plane (before TLS itself): the destination's serial per-byte work (receive at the pump's rate + page CRC + copy into untouched memory) allows at most ${mib(ceiling)} MiB/s = ${((ceiling / pump) * 100).toFixed(0)}% of the 1-stream pump, before any orchestration.`);
    const overTls = r.baselines["loopback TCP over the data plane's mutual TLS, 1 stream"];
    if (overTls) L.push('', `TLS itself: the same pump over the data plane's mutual TLS (AES-GCM) reaches ${((overTls / pump) * 100).toFixed(0)}% of the plain pump with nothing else to do.`);
    const fresh = r.baselines['loopback TCP, 1 stream, read into untouched memory'];
    if (fresh) {
      const direct = 1 / (1 / fresh + 1 / crc);
      L.push('', `Plaintext data plane (pages read straight into guest memory): receive into untouched memory + page CRC allows at most ${mib(direct)} MiB/s = ${((direct / pump) * 100).toFixed(0)}% of the 1-stream pump.`);
    }
    const huge = r.baselines['loopback TCP, 1 stream, read into untouched huge-page memory'];
    if (huge) {
      const direct = 1 / (1 / huge + 1 / crc);
      L.push('', `The same with guest memory on reserved huge pages: at most ${mib(direct)} MiB/s = ${((direct / pump) * 100).toFixed(0)}% of the 1-stream pump with page CRCs; ${((Math.min(huge, pump) / pump) * 100).toFixed(0)}% with verify 'sequence' (the pump into untouched huge-page memory alone: ${((huge / pump) * 100).toFixed(0)}%).`);
    }
  }
  L.push('', '## Live migration', '');
  L.push('| case | memory | dirty (of baseline) | outcome | total ms | MiB/s (ratio) | downtime ms (hv) | probe lost / max gap ms | rounds | wire ÷ mem | orchestration ms | agent HWM growth MiB | VM HWM MiB src/dst |');
  L.push('|---|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const c of r.cases) {
    const agents = Object.values(c.agentRssKiB).map((a) => (a.growth / 1024).toFixed(0)).join(' / ');
    L.push(`| ${c.name} | ${mib(c.memoryBytes)} MiB${c.fill < 1 ? ` (fill ${c.fill})` : ''} | ${(c.dirtyFraction * 100).toFixed(0)}% (${mib(c.dirtyRateBytesPerSec)} MiB/s) | ${c.outcome}${c.error ? ` (${c.error})` : ''} | ${c.totalMs.toFixed(0)}${c.runsTotalMs ? ` (best of ${c.runsTotalMs.join(', ')}${c.runsNotCompleted ? `; not completed: ${c.runsNotCompleted.join('; ')}` : ''})` : ''} | ${mib(c.throughputBytesPerSec)} (${(c.throughputRatio * 100).toFixed(0)}%) | ${c.downtimeMs} | ${c.probe ? `${c.probe.lost} / ${c.probe.maxGapMs}` : '—'} | ${c.rounds} | ${c.wireRatio.toFixed(3)} | ${c.orchestrationOverheadMs.toFixed(0)} | ${agents} | ${(c.vmHwmKiB.source / 1024).toFixed(0)} / ${(c.vmHwmKiB.destination / 1024).toFixed(0)} |`);
  }
  const phased = r.cases.filter((c) => c.downtimePhasesMs);
  if (phased.length) {
    // The pause, phase by phase on the source's clock (CutoverResult.downtimePhasesMs).
    L.push('', 'Where the downtime went (ms, source clock): last dirty pages out, wait before the handoff (a full-memory verify, the drain of a disk mirror; the digest is checked by the destination, in the resume), ownership handoff, GO → destination running (of which on the destination, its check included):', '');
    L.push('| case | downtime | final pages (count) | verify | handoff | resume (destination) |', '|---|---|---|---|---|---|');
    for (const c of phased) {
      const p = c.downtimePhasesMs!;
      L.push(`| ${c.name} | ${c.downtimeMs} | ${p.finalPages} (${c.finalPages ?? '?'}) | ${p.verify} | ${p.handoff} | ${p.resume}${p.resumeOnDestination !== undefined ? ` (${p.resumeOnDestination})` : ''} |`);
    }
  }
  L.push('', 'Orchestration overhead = workflow time − data movement (startOutgoing started → cutover completed, or the awaitProgress of the round that converged, when it cut over, from the workflow history). Breakdown per case in latest.json.');
  // Where an idle migration's time goes: the target judges memory ÷ total time (as the client
  // sees it), which holds the client's checks, the workflow's steps and the data movement.
  const idle = r.cases.filter((c) => c.dirtyFraction === 0 && c.fill === 1 && c.name.includes('idle') && c.outcome === 'completed' && c.dataMovementMs > 0);
  if (idle.length) {
    L.push('', 'Idle cases, where the total time goes (ms), and the data movement alone against the same pump:', '');
    L.push('| case | total | client (start with the source named, admission, result) | workflow steps | data movement | data movement alone: MiB/s (ratio) |');
    L.push('|---|---|---|---|---|---|');
    for (const c of idle) {
      const dataRatio = (c.throughputRatio * c.totalMs) / c.dataMovementMs;
      L.push(`| ${c.name} | ${c.totalMs.toFixed(0)} | ${Math.max(0, c.totalMs - c.workflowMs).toFixed(0)} | ${c.orchestrationOverheadMs.toFixed(0)} | ${c.dataMovementMs.toFixed(0)} | ${mib((c.memoryBytes / c.dataMovementMs) * 1000)} (${(dataRatio * 100).toFixed(0)}%) |`);
    }
  }
  const paired = r.cases.filter((c) => c.pairedRuns);
  if (paired.length) {
    L.push('', 'Idle 1 GiB cases, each run against the faster of two plain pumps (as many streams) measured just before and just after it with the lab up, each of the three once the machine was quiet (under 0.2 cores busy for 200 ms). The throughput target takes the median:', '');
    L.push('| case | runs: total ms, pump MiB/s → ratio | median |', '|---|---|---|');
    for (const c of paired) L.push(`| ${c.name} | ${c.pairedRuns!.map((p) => `${p.totalMs}, ${mib(p.pumpBytesPerSec)} → ${(p.ratio * 100).toFixed(0)}%${p.notQuiet ? NOT_QUIET_MARK : ''}`).join('; ')} | ${(c.pairedMedianRatio! * 100).toFixed(1)}% |`);
  }
  if (r.engineAlone?.length) {
    L.push('', `The engine alone (\`bench/engine.ts\`: the same VM processes and data plane, no Temporal, agents or client on these cores), 1 GiB idle, plaintext, huge pages, verify 'sequence': ${r.engineAlone.map((e) => `${e.streams} stream${e.streams > 1 ? 's' : ''} ${mib(e.bytesPerSec)} MiB/s (${(e.ratio * 100).toFixed(0)}% of the pump around it, ${mib(e.pumpBytesPerSec)} MiB/s)`).join(', ')}; best of two runs, each against the faster of the plain pumps (as many streams) just before and just after it.`);
  }
  if (r.warmUp?.length) L.push('', `Before the cases, one unmeasured 16 MiB warm-up migration per host pair (first run of each code path after the lab started): orchestration overhead ${r.warmUp.map((w) => `${w.from} → ${w.to} ${w.orchestrationOverheadMs} ms`).join(', ')}.`);
  if (r.storage) {
    const st = r.storage as { outcome?: string; reason?: string; totalMs?: number; diskBytes?: number; bytesPerSec?: number; ratioToStorageBaseline?: number; ratioToDirectIoBaseline?: number; breakdownMs?: Record<string, number>; error?: string };
    L.push('', '## Storage migration', '');
    L.push(`${mib(st.diskBytes ?? 0)} MiB disk: ${st.outcome ?? '?'}${st.reason ? ` (${st.reason})` : ''}${st.error ? ` — ${st.error}` : ''}; ${st.totalMs ? `${st.totalMs.toFixed(0)} ms, ${mib(st.bytesPerSec ?? 0)} MiB/s = ${((st.ratioToStorageBaseline ?? 0) * 100).toFixed(0)}% of min(sequential read, write) on the same storage` : ''}`);
    if (st.ratioToDirectIoBaseline !== undefined) L.push('', `The copy writes and verifies with O_DIRECT (past the page cache, whose fresh pages cost ~4 s/GiB on this VM), so it can beat the buffered baseline; against the device itself (min of O_DIRECT sequential read and write) it is at ${(st.ratioToDirectIoBaseline * 100).toFixed(0)}%.`);
    if (st.breakdownMs) L.push('', '| storage phase | ms |', '|---|---|', ...Object.entries(st.breakdownMs).map(([k, v]) => `| ${k} | ${v} |`));
  }
  if (r.evacuations?.length) {
    L.push('', '## Evacuation', '', '| from → to | VMs | at a time | completed | total s | VMs/min | downtime mean / max ms |', '|---|---|---|---|---|---|---|');
    for (const e of r.evacuations) {
      L.push(`| ${e.from} → ${e.to} | ${e.vms} × ${mib(e.memoryBytes)} MiB | ${e.concurrency} | ${e.completed}${e.error ? ` (${e.error})` : ''} | ${(e.totalMs / 1000).toFixed(1)} | ${e.vmsPerMinute} | ${e.meanDowntimeMs} / ${e.maxDowntimeMs} |`);
    }
  }
  if (r.notMeasured.length) {
    L.push('', '## Not measured', '');
    for (const n of r.notMeasured) L.push(`- ${n.name}: not measured: ${n.why}`);
  }
  L.push('', '## Targets', '', '| target | value | required | pass |', '|---|---|---|---|');
  for (const t of r.targets) L.push(`| ${t.name} | ${t.value ?? '—'} | ${t.target} | ${t.pass ? 'PASS' : 'FAIL'} |`);
  if (r.otherConfigurations?.length) {
    L.push('', 'Idle throughput in the other configurations: reported, not judged. Each is bounded on this machine by what its data plane needs before the engine does anything (measured in this run):', '');
    L.push('| case | memory ÷ total time vs the plain pump | bound: what it needs, alone | bound vs the plain pump | case ÷ bound |', '|---|---|---|---|---|');
    for (const o of r.otherConfigurations) L.push(`| ${o.name} | ${(o.ratio * 100).toFixed(1)}% | ${o.bound} | ${(o.boundRatio * 100).toFixed(0)}% | ${((o.ratio / o.boundRatio) * 100).toFixed(0)}% |`);
  }
  L.push('', '![time and downtime vs dirty rate](latest.svg)', '');
  return L.join('\n');
}

/** Two panels: total time and downtime against dirty rate (% of baseline), one line per memory size. */
export function svg(cases: CaseResult[]): string {
  const W = 900, H = 360, pad = 50, pw = (W - 3 * pad) / 2, ph = H - 2 * pad;
  const series = new Map<number, CaseResult[]>();
  for (const c of cases) {
    if (c.fill < 1 || c.outcome !== 'completed') continue;
    if (!series.has(c.memoryBytes)) series.set(c.memoryBytes, []);
    series.get(c.memoryBytes)!.push(c);
  }
  for (const s of series.values()) s.sort((a, b) => a.dirtyFraction - b.dirtyFraction);
  const colors = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd'];
  const out: string[] = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="11">`, `<rect width="${W}" height="${H}" fill="white"/>`];
  const panel = (x0: number, title: string, pick: (c: CaseResult) => number, unit: string): void => {
    const all = cases.filter((c) => c.fill >= 1 && c.outcome === 'completed');
    const xMax = Math.max(1, ...all.map((c) => c.dirtyFraction)) * 1.05;
    const yMax = Math.max(1, ...all.map(pick)) * 1.15;
    const X = (v: number): number => x0 + (v / xMax) * pw;
    const Y = (v: number): number => pad + ph - (v / yMax) * ph;
    out.push(`<text x="${x0 + pw / 2}" y="${pad - 20}" text-anchor="middle" font-size="13">${title}</text>`);
    out.push(`<line x1="${x0}" y1="${pad + ph}" x2="${x0 + pw}" y2="${pad + ph}" stroke="black"/><line x1="${x0}" y1="${pad}" x2="${x0}" y2="${pad + ph}" stroke="black"/>`);
    for (let i = 0; i <= 4; i++) {
      const yv = (yMax * i) / 4, xv = (xMax * i) / 4;
      out.push(`<text x="${x0 - 5}" y="${Y(yv) + 4}" text-anchor="end">${yv.toFixed(0)}</text><line x1="${x0}" y1="${Y(yv)}" x2="${x0 + pw}" y2="${Y(yv)}" stroke="#eee"/>`);
      out.push(`<text x="${X(xv)}" y="${pad + ph + 15}" text-anchor="middle">${(xv * 100).toFixed(0)}%</text>`);
    }
    out.push(`<text x="${x0 + pw / 2}" y="${H - 8}" text-anchor="middle">guest dirty rate (% of loopback baseline)</text>`);
    out.push(`<text x="${x0 - 38}" y="${pad + ph / 2}" transform="rotate(-90 ${x0 - 38} ${pad + ph / 2})" text-anchor="middle">${unit}</text>`);
    let k = 0;
    for (const [mem, s] of series) {
      const col = colors[k % colors.length]!;
      out.push(`<polyline fill="none" stroke="${col}" stroke-width="2" points="${s.map((c) => `${X(c.dirtyFraction).toFixed(1)},${Y(pick(c)).toFixed(1)}`).join(' ')}"/>`);
      for (const c of s) out.push(`<circle cx="${X(c.dirtyFraction).toFixed(1)}" cy="${Y(pick(c)).toFixed(1)}" r="3" fill="${col}"><title>${c.name}: ${pick(c).toFixed(0)} ${unit}</title></circle>`);
      out.push(`<text x="${x0 + 10}" y="${pad + 14 + 14 * k}" fill="${col}">${mib(mem)} MiB</text>`);
      k++;
    }
  };
  panel(pad + 10, 'Total migration time', (c) => c.totalMs, 'ms');
  panel(2 * pad + pw + 10, 'Downtime (hypervisor clock)', (c) => c.downtimeMs, 'ms');
  out.push('</svg>');
  return out.join('\n');
}
