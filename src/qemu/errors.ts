import { QsyncError, type ErrorContext } from '../core/errors.js';

/** QEMU answered a command with `{"error": {...}}`: carries what was sent and what came back. */
export class QmpError extends QsyncError {
  /** QEMU's error class, e.g. `GenericError`, `DeviceNotFound`. */
  readonly errorClass: string;
  readonly desc: string;
  readonly command: string;
  readonly args: Record<string, unknown> | undefined;

  constructor(command: string, args: Record<string, unknown> | undefined, errorClass: string, desc: string) {
    super('QMP', `${command}: ${desc}`, { command, errorClass, desc } satisfies ErrorContext);
    this.name = 'QmpError';
    this.errorClass = errorClass;
    this.desc = desc;
    this.command = command;
    this.args = args;
  }
}

export const isQmpError = (e: unknown): e is QmpError => e instanceof QmpError;
