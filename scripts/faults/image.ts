import type { FaultClass } from './runner.js';
export const imageClass: FaultClass = { name: 'image', summary: 'todo', defaultTrials: 0, timeoutMs: 1, async trial() {} };
