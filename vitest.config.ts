import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    pool: 'forks',
    // One shared Temporal dev server for the whole run (global setup). Test files run one at a
    // time: each starts real VM processes and agents, and the machine has two cores.
    globalSetup: ['test/global-setup.ts'],
    fileParallelism: false,
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 180_000,
    teardownTimeout: 60_000,
    reporters: ['default'],
  },
});
