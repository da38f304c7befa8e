/**
 * A fixed stretch of memory lent out in order: each loan is one contiguous
 * slice, loans come back in any order, and space is lent again once every
 * older loan is back. A copy pipeline reads ahead into it and writes behind
 * out of it, so its data never takes more than the ring, and there is no
 * fresh Buffer per read for the garbage collector to find late.
 */
export interface Loan {
  readonly buf: Buffer;
  /** Give the slice back (once; later calls do nothing). */
  release(): void;
}

interface Slot {
  start: number;
  out: boolean;
}

export class BufferRing {
  readonly #mem: Buffer;
  /** Loans not yet reclaimed, oldest first (a returned one stays until those before it are back). */
  #slots: Slot[] = [];
  #first = 0;
  /** Where the next loan starts. */
  #head = 0;
  #waiters: { len: number; resolve(l: Loan): void }[] = [];

  constructor(readonly capacity: number) {
    this.#mem = Buffer.allocUnsafe(capacity);
  }

  /** No loan is out. */
  get idle(): boolean {
    return this.#first === this.#slots.length;
  }

  /** A loan of `len` bytes (1..capacity), or undefined when the ring has no room now. */
  tryLend(len: number): Loan | undefined {
    if (!(len > 0 && len <= this.capacity)) throw new RangeError(`buffer ring: a loan of ${len} bytes (capacity ${this.capacity})`);
    if (this.#waiters.length) return undefined; // first come, first served
    return this.#lend(len);
  }

  /** A loan of `len` bytes once there is room. */
  lend(len: number): Promise<Loan> {
    const l = this.tryLend(len);
    if (l) return Promise.resolve(l);
    return new Promise((resolve) => this.#waiters.push({ len, resolve }));
  }

  #lend(len: number): Loan | undefined {
    const oldest = this.#slots[this.#first];
    let start: number;
    if (!oldest) start = this.#head = 0;
    else if (oldest.start >= this.#head) {
      // Wrapped: the free space lies between the head and the oldest loan.
      if (oldest.start - this.#head < len) return undefined;
      start = this.#head;
    } else if (this.capacity - this.#head >= len) start = this.#head;
    else if (oldest.start >= len) start = 0; // the tail end stays unused until the oldest loans are back
    else return undefined;
    this.#head = start + len;
    const slot: Slot = { start, out: true };
    this.#slots.push(slot);
    return {
      buf: this.#mem.subarray(start, start + len),
      release: () => {
        if (!slot.out) return;
        slot.out = false;
        this.#reclaim();
      },
    };
  }

  #reclaim(): void {
    while (this.#first < this.#slots.length && !this.#slots[this.#first]!.out) this.#first++;
    if (this.#first === this.#slots.length) [this.#slots, this.#first, this.#head] = [[], 0, 0];
    else if (this.#first > 1024) [this.#slots, this.#first] = [this.#slots.slice(this.#first), 0];
    for (let w = this.#waiters[0]; w; w = this.#waiters[0]) {
      const l = this.#lend(w.len);
      if (!l) return;
      this.#waiters.shift();
      w.resolve(l);
    }
  }
}

/** Rings no copy is using: their memory returns to the system only at a GC, so the next copy takes one of them. */
const idle: BufferRing[] = [];

/** A ring of at least `capacity` bytes for one copy: the smallest idle one that is large enough, when there is one (its memory is resident already). */
export function borrowRing(capacity: number): BufferRing {
  idle.sort((a, b) => a.capacity - b.capacity);
  const i = idle.findIndex((r) => r.capacity >= capacity);
  return i >= 0 ? idle.splice(i, 1)[0]! : new BufferRing(capacity);
}

/** After a copy that ended well, nothing in flight using the ring: the next copy may take it (one with loans out is left to the GC). */
export function returnRing(ring: BufferRing): void {
  if (ring.idle && !idle.includes(ring)) idle.push(ring);
}
