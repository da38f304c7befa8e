import type { FaultClass } from './runner.js';
export const mutateClass: FaultClass = { name: 'mutate', summary: 'todo', defaultTrials: 0, async trial() {} };
