// Child process for test/hugepages.test.ts: a Prefaulter over fresh guest memory of argv[2]
// bytes with no page arriving, as an incoming guest waits for its first frame. Prints what the
// worker decided and what it faulted in meanwhile (KiB).
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Prefaulter } from '../../drivers/sim/prefault.js';

const kib = (field: string): number => Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1] ?? 0);
const memory = Buffer.from(new SharedArrayBuffer(Number(process.argv[2])));
const before = { rss: kib('VmRSS'), huge: kib('HugetlbPages') };
const p = new Prefaulter(memory);
await sleep(600);
const after = { rss: kib('VmRSS'), huge: kib('HugetlbPages') };
p.stop();
process.stdout.write(JSON.stringify({ onHugePages: p.onHugePages, rssGrowthKiB: after.rss - before.rss, hugetlbGrowthKiB: after.huge - before.huge }) + '\n');
