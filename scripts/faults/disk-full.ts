import type { FaultClass } from './runner.js';
export const diskFullClass: FaultClass = { name: 'disk-full', summary: 'todo', defaultTrials: 0, timeoutMs: 1, async trial() {} };
