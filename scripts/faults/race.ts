import type { FaultClass } from './runner.js';
export const raceClass: FaultClass = { name: 'race', summary: 'todo', defaultTrials: 0, async trial() {} };
