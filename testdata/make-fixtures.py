#!/usr/bin/env python3
"""Regenerates the binary fixtures in testdata/tarballs (deterministic: fixed mtimes,
owners and gzip timestamps). Run from anywhere: python3 testdata/make-fixtures.py"""
import gzip, io, os, tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tarballs")
MTIME = 1700000000


def info(name, kind=tarfile.REGTYPE, mode=0o644, size=0, uid=0, gid=0, link=""):
    t = tarfile.TarInfo(name)
    t.type, t.mode, t.size, t.uid, t.gid, t.mtime, t.linkname = kind, mode, size, uid, gid, MTIME, link
    t.uname = t.gname = ""
    return t


def build(entries, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for e in entries:
            if isinstance(e, tuple):
                t, data = e
                t.size = len(data)
                tf.addfile(t, io.BytesIO(data))
            else:
                tf.addfile(e)
    return buf.getvalue()


def gz(data):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
        g.write(data)
    return buf.getvalue()


def write(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


normal = build([
    info("./", tarfile.DIRTYPE, 0o755),
    info("./etc", tarfile.DIRTYPE, 0o755),
    (info("./etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n"),
    (info("./etc/hostname"), b"web1\n"),
    info("./etc/ssh", tarfile.DIRTYPE, 0o755),
    (info("./etc/ssh/sshd.conf", mode=0o600), b"PermitRootLogin no\n"),
    info("./usr", tarfile.DIRTYPE, 0o755),
    info("./usr/bin", tarfile.DIRTYPE, 0o755),
    (info("./usr/bin/hello", mode=0o755), b"#!/bin/sh\necho hello\n"),
    (info("./empty"), b""),
    info("./tmp", tarfile.DIRTYPE, 0o1777),
    (info("./tmp/scratch"), b"filtered out by example.filter\n"),
])
write("normal.tar", normal)
write("normal.tar.gz", gz(normal))

# devices and the FIFO need explicit major/minor numbers
extra = []
for name, kind, mode, dev in [("./dev/null", tarfile.CHRTYPE, 0o666, (1, 3)),
                              ("./dev/sda", tarfile.BLKTYPE, 0o660, (8, 0)),
                              ("./run/fifo", tarfile.FIFOTYPE, 0o600, (0, 0))]:
    t = info(name, kind, mode)
    t.devmajor, t.devminor = dev
    extra.append(t)
kinds = build([e for e in [
    info("./", tarfile.DIRTYPE, 0o755),
    info("./bin", tarfile.DIRTYPE, 0o755),
    (info("./bin/su", mode=0o4755), b"setuid binary\n"),
    (info("./bin/wall", mode=0o2755, gid=5), b"setgid binary\n"),
    info("./bin/su-again", tarfile.LNKTYPE, link="./bin/su"),
    info("./bin/sh", tarfile.SYMTYPE, 0o777, link="dash"),
    info("./dangling", tarfile.SYMTYPE, 0o777, link="/does/not/exist"),
    info("./dev", tarfile.DIRTYPE, 0o755),
    info("./run", tarfile.DIRTYPE, 0o755),
    info("./home", tarfile.DIRTYPE, 0o755),
    (info("./home/user.txt", uid=1000, gid=1000), b"owned by 1000\n"),
    info("./tmp", tarfile.DIRTYPE, 0o1777),
]] + extra)
write("kinds.tar", kinds)

write("nonutf8.tar", build([(info("./caf\udce9.txt"), b"latin-1 name\n")]))
write("truncated.tar.gz", gz(normal)[: len(gz(normal)) // 2])

escape = build([(info("../etc/passwd"), b"escaped\n")])
write("escape.tar", escape)
write("hardlink-to-later.tar", build([info("./a", tarfile.LNKTYPE, link="./b"), (info("./b"), b"b\n")]))
write("through-symlink.tar", build([info("./etc", tarfile.SYMTYPE, 0o777, link="/etc"),
                                    (info("./etc/passwd"), b"written through a symlink\n")]))
write("duplicate.tar", build([(info("./a"), b"first\n"), (info("./a"), b"second\n")]))
write("not-a-tar.tar", b"This is a plain text file, not a tar archive.\n" * 30)
