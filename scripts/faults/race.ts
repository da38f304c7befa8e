import type { FaultClass } from './runner.js';
export const raceClass: FaultClass = { name: 'race', summary: 'todo', defaultTrials: 0, timeoutMs: 1, async trial() {} };
