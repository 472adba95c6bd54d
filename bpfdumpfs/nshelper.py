"""The helper process of namespaces.py: lives in a reader's pid namespace and
creates seq_files there.

Run as `python -m bpfdumpfs.nshelper NS_FD SOCK_FD`: it joins the pid namespace
(which only affects its children), forks the server into it, and stays outside
as the server's parent so that a container's init never has to reap it.
Protocol on the SEQPACKET socket: the daemon sends one link fd (SCM_RIGHTS);
the answer is b"f" with the seq_file fd, or b"e<errno>".
"""
from __future__ import annotations

import errno
import os
import socket
import sys

import cffi

from . import kernel
from .errors import DumperError

CLONE_NEWPID = 0x20000000
PR_SET_NAME = 15
COMM = b"bpfdumpfs-ns"  # how the helper shows in the namespace's ps and task dumps


def serve(sock: socket.socket) -> None:
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
        if not msg:
            return
        try:
            fd = kernel.iter_create(fds[0]) if fds else None
        except DumperError as e:
            sock.send(b"e%d" % e.errno)
        else:
            if fd is None:
                sock.send(b"e%d" % errno.EINVAL)
            else:
                socket.send_fds(sock, [b"f"], [fd])
                os.close(fd)
        finally:
            for f in fds:
                os.close(f)


def main() -> int:
    ns_fd, sock_fd = int(sys.argv[1]), int(sys.argv[2])
    ffi = cffi.FFI()
    ffi.cdef("int setns(int fd, int nstype); int prctl(int option, ...);")
    libc = ffi.dlopen(None)
    if libc.setns(ns_fd, CLONE_NEWPID) != 0:
        print(f"bpfdumpfs nshelper: setns: {os.strerror(ffi.errno)}", file=sys.stderr)
        return 1
    os.close(ns_fd)
    sock = socket.socket(fileno=sock_fd)
    child = os.fork()
    if child == 0:
        try:
            libc.prctl(PR_SET_NAME, ffi.new("char[]", COMM))
            serve(sock)
        finally:
            os._exit(0)
    sock.close()
    os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
