/**
 * The small interfaces the sync pipeline owns. Every source and sink (local
 * file or device, NBD export, remote peer) implements them, and one contract
 * suite in test/ runs against each.
 */

/** Random-access reads of a fixed-size byte range (a file, a device, an NBD export). */
export interface BlockSource {
  readonly size: number;
  /**
   * Fill `buf` from `offset`. Returns the bytes read: `buf.length`, or fewer
   * only at the end of the source. Any other short read is an error.
   */
  readAt(buf: Buffer, offset: number): Promise<number>;
  close(): Promise<void>;
}

/** One run of bytes with the same state. */
export interface Extent {
  offset: number;
  length: number;
  /** Reads as zero (a hole, or an unallocated/zeroed area of an image). */
  zero: boolean;
  /** Changed since the last run (dirty bitmap); true where the source cannot tell. */
  dirty: boolean;
}

/** A source that can say which ranges hold data and which changed. */
export interface ExtentSource extends BlockSource {
  extents(offset: number, length: number): AsyncIterable<Extent>;
}

/** Takes changed blocks at block-aligned offsets; durable only after `commit`. */
export interface BlockSink {
  /** Write `data` at `offset`. `data` may be reused by the caller once the promise settles. */
  write(offset: number, data: Buffer): Promise<void>;
  /** Make `[offset, offset+length)` read as zero (a hole where the sink can). */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Set the final size (grow or shrink). */
  truncate(size: number): Promise<void>;
  /** Flush everything written to stable storage. Idempotent. */
  commit(): Promise<void>;
  /**
   * Optional: put what has been written so far on storage now, while more is
   * written (a long copy then does not leave all of its writeback to
   * commit). Promises nothing: only commit() makes the data durable. A
   * failure must still be reported (a failed flush may not fail again).
   */
  writeback?(): Promise<void>;
  close(): Promise<void>;
}
