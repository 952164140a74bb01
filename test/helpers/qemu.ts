// Shared by the QEMU tests: waiting on a guest's serial console.
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { readSerialTicks } from '../../drivers/qemu/qemu-driver.js';

/** Resolves with the console's last tick once it reaches `atLeast`; fails with the log's tail. */
export async function waitSerialTicks(file: string, atLeast: number, timeoutMs = 60_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const t = readSerialTicks(file).ticks.at(-1) ?? 0;
    if (t >= atLeast) return t;
    if (Date.now() > deadline) throw new Error(`${file}: tick ${t} after ${timeoutMs} ms, wanted ${atLeast}\n${fs.existsSync(file) ? fs.readFileSync(file, 'utf8').slice(-2000) : '(no serial log)'}`);
    await sleep(100);
  }
}
