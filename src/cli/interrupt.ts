/**
 * A run that must clean up outside qsync before it ends (QEMU's exports,
 * jobs and bitmaps; a libvirt backup job) is aborted on a signal, not
 * killed: it arms an AbortSignal here for the while it works there.
 */
let armed: AbortController | undefined;

export function armInterrupt(): AbortSignal {
  armed = new AbortController();
  return armed.signal;
}

export function disarmInterrupt(): void {
  armed = undefined;
}

/** On a signal: true when an armed run was asked to stop (it cleans up and ends itself); false: stop at once. */
export function interruptArmed(): boolean {
  if (!armed || armed.signal.aborted) return false;
  armed.abort();
  return true;
}
