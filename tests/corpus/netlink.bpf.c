// SPDX-License-Identifier: GPL-2.0-only
/*
 * netlink.bpf.c -- iter/netlink: the netlink sockets as /proc/net/netlink
 * shows them:
 *     sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
 * sk is the socket's address, hashed (%p).
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_netlink.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/netlink")
int corpus_netlink(struct bpf_iter__netlink *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct netlink_sock *nlk = ctx->sk;
	unsigned long groups = 0, ino = 0;
	struct socket *sock;
	struct sock *sk;

	if (!nlk)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "sk               Eth Pid        Groups   Rmem     Wmem     "
			       "Dump  Locks    Drops    Inode\n");
	sk = &nlk->sk;
	if (nlk->groups)	/* the first word of the group bitmap */
		bpf_probe_read_kernel(&groups, sizeof(groups), nlk->groups);
	sock = sk->sk_socket;
	if (sock)
		ino = BPF_CORE_READ(container_of(sock, struct socket_alloc, socket),
				    vfs_inode.i_ino);
	BPF_SEQ_PRINTF(seq, "%p %-3d %-10u %08x %-8d %-8d %-5d %-8d %-8u %-8lu\n",
		       sk, sk->sk_protocol, nlk->portid, (__u32)groups,
		       sk->sk_backlog.rmem_alloc.counter,
		       sk->sk_wmem_alloc.refs.counter - 1, nlk->cb_running,
		       sk->__sk_common.skc_refcnt.refs.counter, sk->sk_drops.counter, ino);
	return 0;
}
