// SPDX-License-Identifier: GPL-2.0-only
/*
 * unix.bpf.c -- iter/unix: the unix sockets as /proc/net/unix shows them:
 *     Num RefCount Protocol Flags Type St Inode Path
 * Num is the socket's address, hashed (%p), as unprivileged readers of
 * /proc/net/unix see it; an abstract name is printed with '@' for each NUL,
 * as unix_seq_show() does.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_unix.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define CORPUS_SO_ACCEPTCON	(1 << 16)
#define CORPUS_SUN_PATH		108

struct path_buf {
	char s[CORPUS_SUN_PATH + 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct path_buf);
} paths SEC(".maps");

SEC("iter/unix")
int corpus_unix(struct bpf_iter__unix *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct unix_sock *u = ctx->unix_sk;
	struct unix_address *addr;
	struct path_buf *path;
	struct sock *sk;
	__u32 zero = 0;
	int len, i, st;

	if (!u)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "Num       RefCount Protocol Flags    Type St Inode Path\n");
	sk = &u->sk;
	if (sk->sk_socket)
		st = sk->__sk_common.skc_state == TCP_ESTABLISHED ? SS_CONNECTED : SS_UNCONNECTED;
	else
		st = sk->__sk_common.skc_state == TCP_ESTABLISHED ? SS_CONNECTING : SS_DISCONNECTING;
	BPF_SEQ_PRINTF(seq, "%p: %08X %08X %08X %04X %02X %5lu", u,
		       sk->__sk_common.skc_refcnt.refs.counter, 0,
		       sk->__sk_common.skc_state == TCP_LISTEN ? CORPUS_SO_ACCEPTCON : 0,
		       sk->sk_type, st,
		       BPF_CORE_READ(container_of(sk->sk_socket, struct socket_alloc, socket),
				     vfs_inode.i_ino));

	addr = u->addr;
	path = bpf_map_lookup_elem(&paths, &zero);
	if (addr && path) {
		len = BPF_CORE_READ(addr, len) - sizeof(short);
		if (len > CORPUS_SUN_PATH)
			len = CORPUS_SUN_PATH;
		if (len < 0)
			len = 0;
		bpf_probe_read_kernel(path->s, CORPUS_SUN_PATH, addr->name[0].sun_path);
		path->s[CORPUS_SUN_PATH] = '\0';
		if (len > 0 && path->s[0] == '\0') {	/* abstract: NULs shown as '@' */
			for (i = 0; i < CORPUS_SUN_PATH; i++) {
				if (i >= len) {
					path->s[i] = '\0';
					break;
				}
				if (path->s[i] == '\0')
					path->s[i] = '@';
			}
		}
		BPF_SEQ_PRINTF(seq, " %s", path->s);
	}
	BPF_SEQ_PRINTF(seq, "\n");
	return 0;
}
