#!/usr/bin/env python3
"""Write the hand-made seed corpus: fuzz/corpus/<target>/<name>.

Deterministic; run from anywhere: python3 fuzz/make_seeds.py
Input formats are documented at the top of each fuzz_targets/*.rs file.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE_FEATURES = 0x77  # INPUT_RANGE DOMAIN_RANGE MAP_UNMAP PROBE MMIO BYPASS_CONFIG
TRANSPORT = (1 << 32) | (1 << 29) | (1 << 28)  # VERSION_1, EVENT_IDX, INDIRECT_DESC
ACKED = DEVICE_FEATURES | TRANSPORT


def attach(domain, ep, flags=0):
    return struct.pack("<B3xIII4x", 1, domain, ep, flags)


def detach(domain, ep):
    return struct.pack("<B3xII8x", 2, domain, ep)


def map_(domain, start, end, phys, flags=3):
    return struct.pack("<B3xIQQQI", 3, domain, start, end, phys, flags)


def unmap(domain, start, end):
    return struct.pack("<B3xIQQ4x", 4, domain, start, end)


def probe(ep):
    return struct.pack("<B3xI", 5, ep) + bytes(64)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# request_decode: features u64, config byte, then [wlen u16][n u8][n bytes]...
def decode_seed(reqs, features=ACKED, config=0):
    out = struct.pack("<QB", features, config)
    for wlen, req in reqs:
        out += struct.pack("<HB", wlen, len(req)) + req
    return out


write("request_decode", "attach_map_unmap_detach", decode_seed([
    (4, attach(1, 1)),
    (4, map_(1, 0x1000, 0x1FFF, 0x8000)),
    (4, map_(1, 0x2000, 0x3FFF, 0x10000, 1)),
    (4, unmap(1, 0x1000, 0x3FFF)),
    (4, detach(1, 1)),
]))
write("request_decode", "probe_full_and_short", decode_seed([
    (516, probe(1)), (100, probe(1)), (516, probe(9)), (3, probe(1)),
]))
write("request_decode", "bypass_domain_and_move", decode_seed([
    (4, attach(7, 2, 1)), (4, attach(8, 2)), (4, attach(8, 0x18)),
    (4, map_(8, 0xFEE00000, 0xFEE00FFF, 0)), (4, map_(7, 0, 0xFFF, 0)),
], config=0b1001))
write("request_decode", "truncated_and_unknown", decode_seed([
    (8, map_(1, 0, 0xFFF, 0)[:20]), (4, bytes([6]) * 40), (4, b""),
    (4, unmap(3, 5, 1)),
], features=DEVICE_FEATURES & ~0x10))

# request_path: see the table in fuzz_targets/request_path.rs.
REQ_DESC, REQ_AVAIL, REQ_USED = 0x0, 0x100, 0x200
EVQ_DESC, EVQ_AVAIL, EVQ_USED = 0x300, 0x380, 0x400
REQS = 0x500        # request bytes, 0x80 apart
INDIRECT = 0x480    # an indirect table
WRITABLE = 0x1000   # reply buffers, 0x400 apart (zero memory past the image)
EVBUF = 0x3000      # eventq buffers, 0x40 apart


class Image:
    def __init__(self):
        self.b = bytearray()

    def put(self, addr, data):
        if len(self.b) < addr + len(data):
            self.b.extend(bytes(addr + len(data) - len(self.b)))
        self.b[addr:addr + len(data)] = data

    def desc(self, table, i, addr, length, flags, nxt=0):
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def avail(self, ring, heads):
        self.put(ring, struct.pack("<HH", 0, len(heads)))
        for i, h in enumerate(heads):
            self.put(ring + 4 + 2 * i, struct.pack("<H", h))


NEXT, WRITE, INDIR = 1, 2, 4


def simple_requests(img, reqs):
    """One chain per request: readable request, writable reply buffer."""
    heads = []
    for i, (req, wlen) in enumerate(reqs):
        img.put(REQS + 0x80 * i, req)
        img.desc(REQ_DESC, 2 * i, REQS + 0x80 * i, len(req), NEXT, 2 * i + 1)
        img.desc(REQ_DESC, 2 * i + 1, WRITABLE + 0x400 * i, wlen, WRITE)
        heads.append(2 * i)
    img.avail(REQ_AVAIL, heads)


def path_seed(img, ops, flags=0, hole=0, req_size=4, evq_size=3, evq_bufs=0):
    for i in range(evq_bufs):
        img.desc(EVQ_DESC, i, EVBUF + 0x40 * i, 24, WRITE)
    if evq_bufs:
        img.avail(EVQ_AVAIL, list(range(evq_bufs)))
    hdr = struct.pack("<BBQBB3Q", 0, hole, ACKED, req_size, flags,
                      REQ_DESC, REQ_AVAIL, REQ_USED)
    hdr += struct.pack("<B3QBHB", evq_size, EVQ_DESC, EVQ_AVAIL, EVQ_USED, 0, 0, len(ops))
    assert len(hdr) == 65
    for op in ops:
        hdr += op.ljust(16, b"\0")
    return hdr + bytes(img.b)


OP_REQ = b"\x00"
OP_EVQ = b"\x01"
OP_PENDING = b"\x01\x01"


def op_fault(reason, flags, ep, addr):
    return struct.pack("<BBHIQ", 2, reason, flags, ep, addr)


def op_poke(gpa, data):
    return struct.pack("<BIB", 3, gpa, len(data)) + data


LIFECYCLE = [(attach(1, 1), 4), (map_(1, 0x1000, 0x1FFF, 0x8000), 4),
             (probe(1), 516), (unmap(1, 0x1000, 0x1FFF), 4), (detach(1, 1), 4)]

img = Image()
simple_requests(img, LIFECYCLE)
write("request_path", "lifecycle", path_seed(img, []))

img = Image()
simple_requests(img, LIFECYCLE[:2])
# After the first kick, the driver posts two more chains (heads 4 and 6).
img.put(REQS + 0x100, probe(1))
img.desc(REQ_DESC, 4, REQS + 0x100, 72, NEXT, 5)
img.desc(REQ_DESC, 5, WRITABLE + 0x800, 100, WRITE)
img.put(REQS + 0x180, attach(2, 1))
img.desc(REQ_DESC, 6, REQS + 0x180, 20, NEXT, 7)
img.desc(REQ_DESC, 7, WRITABLE + 0xC00, 4, WRITE)
ops = [OP_REQ, op_poke(REQ_AVAIL + 8, struct.pack("<HH", 4, 6)),
       op_poke(REQ_AVAIL + 2, struct.pack("<H", 4)), OP_REQ,
       op_fault(2, 0x101, 1, 0x1000), op_fault(1, 1, 2, 0), OP_EVQ, OP_PENDING]
write("request_path", "two_kicks_and_faults", path_seed(img, ops, flags=0b11, evq_bufs=2))

# A MAP split over three readable descriptors, the reply over two writable
# ones, and an ATTACH through an indirect table.
img = Image()
m = map_(0, 0, 0xFFF, 0)
img.put(REQS, attach(0, 1))
img.put(REQS + 0x80, m)
img.desc(REQ_DESC, 0, INDIRECT, 32, INDIR)
img.put(INDIRECT, struct.pack("<QIHH", REQS, 20, NEXT, 1))
img.put(INDIRECT + 16, struct.pack("<QIHH", WRITABLE, 4, WRITE, 0))
img.desc(REQ_DESC, 1, REQS + 0x80, 5, NEXT, 2)
img.desc(REQ_DESC, 2, REQS + 0x85, 20, NEXT, 3)
img.desc(REQ_DESC, 3, REQS + 0x99, 11, NEXT, 4)
img.desc(REQ_DESC, 4, WRITABLE + 0x400, 1, WRITE | NEXT, 5)
img.desc(REQ_DESC, 5, WRITABLE + 0x401, 3, WRITE)
img.avail(REQ_AVAIL, [0, 1])
write("request_path", "split_and_indirect", path_seed(img, [OP_REQ], flags=1))

# Reply buffers in region B (after a 4 KiB hole) and one inside the hole.
img = Image()
simple_requests(img, [(attach(3, 2), 4), (probe(2), 516), (attach(4, 3), 4)])
b_start = 0x10000 + 0x1000
img.desc(REQ_DESC, 1, b_start, 4, WRITE)
img.desc(REQ_DESC, 3, b_start + 0x100, 516, WRITE)
img.desc(REQ_DESC, 5, 0x10000 + 0x10, 4, WRITE)
write("request_path", "second_region_and_hole", path_seed(img, [OP_REQ], hole=2))

# A broken avail index (beyond the queue size) and a descriptor loop.
img = Image()
simple_requests(img, [(attach(1, 1), 4)])
img.desc(REQ_DESC, 1, WRITABLE, 4, WRITE | NEXT, 0)
img.put(REQ_AVAIL + 2, struct.pack("<H", 40))
write("request_path", "broken_avail_and_loop",
      path_seed(img, [OP_REQ, op_poke(REQ_AVAIL + 2, struct.pack("<H", 1)), OP_REQ]))

# eventq: qsize sel, bound sel, flags, then ops (see fuzz_targets/eventq.rs).
SEND, POST, KICK, PENDING, RESET, TOGGLE = range(6)
PLAIN, OUTSIDE, STRADDLE, READABLE, SPLIT, READ_WRITE = range(6)


def send(reason=2, flags=1, ep=1):
    return bytes([SEND, reason, flags, ep])


def post(size, shape=PLAIN):
    return bytes([POST, size, shape])


write("eventq", "one_record", bytes([3, 7, 0]) + post(24) + send() + bytes([KICK]))
write("eventq", "small_then_big", bytes([3, 7, 1]) + post(10) + post(64) + send() + send(1, 0, 2)
      + bytes([PENDING]) + post(24) + bytes([KICK]))
write("eventq", "overflow_and_reset", bytes([2, 1, 0]) + send() + send() + send() + bytes([KICK])
      + post(24) + post(24) + bytes([KICK, RESET]) + send() + bytes([KICK]))
write("eventq", "shapes", bytes([4, 15, 1]) + send() * 6 + post(24, SPLIT) + post(30, READ_WRITE)
      + post(40, OUTSIDE) + post(40, STRADDLE) + post(24, READABLE) + post(0)
      + bytes([TOGGLE, KICK, TOGGLE, PENDING]))
