import type { FaultClass } from './runner.js';
export const concurrentClass: FaultClass = { name: 'concurrent', summary: 'todo', defaultTrials: 0, timeoutMs: 1, async trial() {} };
