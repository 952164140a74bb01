// Focused runs of the QEMU driver tests without the shared Temporal dev server:
//   npx vitest run --config test/qemu/vitest.config.ts
// (The root config also picks these tests up; there they simply ignore the Temporal server.)
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  root: fileURLToPath(new URL('../..', import.meta.url)),
  test: {
    pool: 'forks',
    fileParallelism: false,
    include: ['test/qemu/**/*.test.ts'],
    testTimeout: 180_000,
    hookTimeout: 300_000,
    reporters: ['default'],
  },
});
