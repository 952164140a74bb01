// What an operator sees in the Temporal Web UI after a real migration: the workflow list
// filtered by VmName (query in the URL), the phase and outcome search attributes, and the
// result. Headless Chromium (scripts/install-chromium.sh) through playwright-core.
// Skips when the run's server has no UI (TEMPORAL_ADDRESS named a server) or Chromium is absent.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { Page } from 'playwright-core';
import { startTestLab, type TestLab } from './helpers/lab.js';
import { chromiumUnavailableReason, launchChromium, type Browser } from './helpers/chromium.js';
import type { MigrationResult } from '../common/types.js';

const uiUrl = inject('temporalUiUrl');
const skipReason = !uiUrl
  ? 'no Temporal Web UI in this run (the server was named by TEMPORAL_ADDRESS, so temporalUiUrl is null)'
  : chromiumUnavailableReason();
if (skipReason) console.warn(`[ui.test] skipped: ${skipReason}`);

const namespace = process.env.TEMPORAL_NAMESPACE ?? 'default';
const listUrl = (query: string): string => `${uiUrl}/namespaces/${encodeURIComponent(namespace)}/workflows?query=${encodeURIComponent(query)}`;

describe.skipIf(!!skipReason)(`Temporal Web UI${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  let lab: TestLab;
  let browser: Browser;
  let page: Page;
  let shots: string;
  // Unique on the run's shared server, so the filter can only match this file's migration.
  const vm = `ui-${crypto.randomBytes(3).toString('hex')}`;
  let result: MigrationResult;

  const shot = async (name: string): Promise<string> => {
    const file = path.join(shots, `${name}.png`);
    await page.screenshot({ path: file, fullPage: true });
    return file;
  };

  /** The list page for a query once it shows `n` workflows (visibility can trail by a moment). */
  async function openList(query: string, n: number): Promise<void> {
    await expect.poll(async () => {
      await page.goto(listUrl(query), { waitUntil: 'domcontentloaded' });
      const h1 = page.locator('h1').filter({ hasText: /Workflows?$/ });
      await h1.waitFor({ timeout: 15_000 });
      return (await h1.innerText()).replace(/\s+/g, ' ').trim();
    }, { timeout: 30_000, interval: 1000 }).toBe(`${n} ${n === 1 ? 'Workflow' : 'Workflows'}`);
  }

  beforeAll(async () => {
    shots = fs.mkdtempSync(path.join(os.tmpdir(), 'vmferry-ui-'));
    lab = await startTestLab();
    const [A, B] = lab.hosts as [string, string];
    await lab.client.createVm({ name: vm, host: A, memory: '16MiB', disk: '4MiB', dirtyRate: '2MiB', fill: 0.5 });
    const { id } = await lab.client.startMigration({ type: 'live', vm, to: B });
    result = await lab.client.awaitMigration(id);
    expect(result.outcome, result.reason).toBe('completed');
    browser = await launchChromium();
    page = browser.page;
    page.setDefaultTimeout(20_000);
  });

  afterAll(async () => {
    await browser?.close();
    await lab?.down();
    // Screenshots stay for a look (printed below); they are small.
    if (shots) console.log(`[ui.test] screenshots in ${shots}`);
  });

  it('filters the workflow list by VmName from the URL and shows the migration, completed', async () => {
    await openList(`VmName="${vm}"`, 1);
    // The query became a filter chip, and the one row is this migration.
    await expect.poll(() => page.getByText(`VmName = "${vm}"`).count()).toBeGreaterThan(0);
    const row = page.getByRole('link', { name: result.id, exact: true });
    await row.waitFor();
    const text = await page.locator('main').innerText();
    expect(text).toContain('liveMigration');
    expect(text).toContain('COMPLETED');
    await shot('list-by-vmname');
  });

  it('filters by phase and outcome too: done/completed matches, rolled-back does not', async () => {
    await openList(`VmName="${vm}" AND MigrationOutcome="completed" AND MigrationPhase="done"`, 1);
    await page.getByRole('link', { name: result.id, exact: true }).waitFor();
    await shot('list-by-outcome');
    await openList(`VmName="${vm}" AND MigrationOutcome="rolled-back"`, 0);
    await page.getByText('No Workflows Found').waitFor();
  });

  it("the workflow's page shows its search attributes (phase, outcome, hosts) and its result", async () => {
    await openList(`VmName="${vm}"`, 1);
    await page.getByRole('link', { name: result.id, exact: true }).click();
    await page.waitForURL((u) => u.pathname.includes(`/workflows/${encodeURIComponent(result.id)}/`));
    // Default tab: input and result.
    await page.getByText('"outcome": "completed"').first().waitFor();
    const main = await page.locator('main').innerText();
    expect(main).toContain(`"vm": "${vm}"`);
    expect(main).toContain(`"reason": "VM ${vm} runs on ${result.to}"`);
    await shot('workflow-result');

    await page.getByRole('tab', { name: 'Search Attributes' }).click();
    await page.waitForURL(/\/search-attributes$/);
    await page.getByText('"MigrationOutcome": "completed"').waitFor();
    const sa = (await page.locator('main').innerText()).replace(/\s+/g, ' ');
    for (const [k, v] of Object.entries({ VmName: vm, MigrationPhase: 'done', MigrationOutcome: 'completed', MigrationType: 'live', SourceHost: result.from, DestinationHost: result.to })) {
      expect(sa).toContain(`"${k}": "${v}"`);
    }
    const file = await shot('search-attributes');
    expect(fs.statSync(file).size).toBeGreaterThan(10_000);
  });
});
