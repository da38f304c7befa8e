#!/usr/bin/python3
# The reference reader of bench/image-read.ts: libnbd (the library nbdcopy is
# built on) reading a list of extents of one export with nbdcopy's defaults:
# requests of at most 256 KiB, 64 in flight per connection, 4 connections
# when the export allows multi-conn. nbdcopy itself cannot be told which
# extents to read. Usage: extent-read.py URI EXTENTS_FILE, where each line of
# EXTENTS_FILE is "OFFSET LENGTH"; prints "BYTES SECONDS" (after connecting).
# Run with the system's python3 (python3-libnbd, from libnbd-bin's source).
import sys
import threading
import time

import nbd

REQUEST = 256 * 1024
IN_FLIGHT = 64
CONNECTIONS = 4

uri, path = sys.argv[1], sys.argv[2]
requests = []
with open(path) as f:
    for line in f:
        off, length = map(int, line.split())
        for at in range(off, off + length, REQUEST):
            requests.append((at, min(REQUEST, off + length - at)))

first = nbd.NBD()
first.connect_uri(uri)
handles = [first]
if first.can_multi_conn():
    for _ in range(CONNECTIONS - 1):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)

# Each connection takes every N-th request in a thread of its own (libnbd
# lets go of the GIL while it waits); buffers are reused per slot.
failed = []
queues = [requests[i::len(handles)] for i in range(len(handles))]


def run(h, q):
    bufs = [nbd.Buffer(REQUEST) for _ in range(IN_FLIGHT)]
    free = list(range(IN_FLIGHT))
    n = 0
    while n < len(q) or h.aio_in_flight():
        while free and n < len(q):
            off, length = q[n]
            n += 1
            slot = free.pop()
            buf = bufs[slot] if length == REQUEST else nbd.Buffer(length)

            def done(error, slot=slot, off=off):
                if error[0] if isinstance(error, list) else error:
                    failed.append(off)
                free.append(slot)
                return 1  # retired here

            h.aio_pread(buf, off, completion=done)
        h.poll(-1)


t0 = time.perf_counter()
threads = [threading.Thread(target=run, args=(h, q)) for h, q in zip(handles, queues)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - t0
if failed:
    sys.exit(f'read failed at {failed[0]}')
print(sum(length for _, length in requests), elapsed)
for h in handles:
    h.shutdown()
