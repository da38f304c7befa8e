import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // A state folder of its own for each test file (test/helpers/state-base.ts).
    setupFiles: ['./test/helpers/state-base.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Integration tests start QEMU, sshd and write large files: two cores, so keep files serial.
    fileParallelism: false,
    reporters: ['default', './test/helpers/summary-reporter.ts'],
  },
});
