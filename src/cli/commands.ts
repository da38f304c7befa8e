/** The subcommands, as the first word of the command line (the rest is rsync's syntax). */
export const DELTA_COMMANDS = ['apply', 'verify', 'info', 'restore', 'prune'] as const;
