/* Shared by the test dumpers of tests/test_fidelity.py.
 *
 * Most of them are task_file dumpers made with a pid parameter: they visit
 * the open files of one helper process that the test starts, holding a
 * known, unchanging set of fds (dups of /dev/null), and print lines made only
 * of the fd number and the object's place in the dump. So their output is
 * known in advance (the test computes it in Python too) and identical on
 * every open while the helper lives.
 *
 * FD_LINE is exactly 300 bytes:
 *   "fd %05u check %08x " + filler[fd % 64 .. +275) + "\n"
 * with check = fd * 2654435761 (mod 2^32).
 */
#ifndef FIDELITY_H
#define FIDELITY_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define KNUTH 2654435761u

/* FILLER: 4096 printable bytes, B64 repeated; slices of it make long lines. */
#define B64 "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"
#define B512 B64 B64 B64 B64 B64 B64 B64 B64
static const char filler[] = B512 B512 B512 B512 B512 B512 B512 B512;

#define FD_LINE_PAD 275

static __always_inline void fd_line(struct seq_file *seq, __u32 fd)
{
	__u32 off = fd & 63;

	BPF_SEQ_PRINTF(seq, "fd %05u check %08x ", fd, fd * KNUTH);
	if (off < 64)	/* for the verifier: the slice stays inside filler */
		bpf_seq_write(seq, (void *)filler + off, FD_LINE_PAD);
	bpf_seq_write(seq, "\n", 1);
}

#endif
