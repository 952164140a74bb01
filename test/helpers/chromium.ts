// Headless Chromium (the Debian package, installed by scripts/install-chromium.sh) driven by
// playwright-core: no browser download, a fresh profile per launch, nothing phoning home.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';

export const CHROMIUM = '/usr/bin/chromium';

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Why no browser can be started here, or null. */
export function chromiumUnavailableReason(): string | null {
  if (!fs.existsSync(CHROMIUM)) return `${CHROMIUM} is missing: run \`bash scripts/install-chromium.sh\` (Debian package chromium)`;
  return null;
}

export interface Browser {
  context: BrowserContext;
  page: Page;
  close(): Promise<void>;
}

/**
 * Launches Chromium with a fresh --user-data-dir (a temp dir, removed on close). Playwright
 * wants the profile as launchPersistentContext's argument rather than as a --user-data-dir
 * flag; it passes it to Chromium as exactly that flag.
 */
export async function launchChromium(opts: { width?: number; height?: number } = {}): Promise<Browser> {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-chromium-'));
  let context: BrowserContext;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: opts.width ?? 1600, height: opts.height ?? 1000 },
      timeout: 60_000,
    });
  } catch (e) {
    fs.rmSync(userDataDir, { recursive: true, force: true });
    throw e;
  }
  const page = context.pages()[0] ?? (await context.newPage());
  return {
    context,
    page,
    async close() {
      await context.close().catch(() => undefined);
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}
