import type { FaultClass } from './runner.js';
export const diskFullClass: FaultClass = { name: 'disk-full', summary: 'todo', defaultTrials: 0, async trial() {} };
