// SPDX-License-Identifier: GPL-2.0-only
/*
 * snapshot_udp.bpf.c -- iter/udp: a snapshot of the UDP sockets, IPv4 and
 * IPv6, one line each, as text:
 *     PROTO IPVER SRC:PORT DST:PORT STATE INODE NETNS
 * The original (Inspektor Gadget's snapshot_socket gadget, whose iter/udp
 * program shares a record format with its iter/tcp one) writes binary records
 * with bpf_seq_write() for the gadget runtime to decode; this prints them.
 *
 * Modeled on: Inspektor Gadget, gadgets/snapshot_socket/program.bpf.c
 * (GPL-2.0 WITH Linux-syscall-note). Written here for bpfdumpfs's tests
 * (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define CORPUS_AF_INET	2
#define CORPUS_AF_INET6	10

static __always_inline unsigned long inode_of(const struct sock *sk)
{
	const struct socket *sock = sk->sk_socket;
	unsigned long ino = 0;

	if (sock)
		bpf_probe_read_kernel(&ino, sizeof(ino),
				      &container_of(sock, struct socket_alloc, socket)->vfs_inode.i_ino);
	return ino;
}

SEC("iter/udp")
int corpus_snapshot_udp(struct bpf_iter__udp *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct udp_sock *udp = ctx->udp_sk;
	struct sock_common *c;
	struct sock *sk;
	__u32 netns;

	if (!udp)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "PROTO VER SRC DST STATE INODE NETNS\n");
	sk = &udp->inet.sk;
	c = &sk->__sk_common;
	netns = BPF_CORE_READ(c, skc_net.net, ns.inum);
	if (c->skc_family == CORPUS_AF_INET)
		BPF_SEQ_PRINTF(seq, "UDP 4 %pI4:%u %pI4:%u %02X %lu %u\n",
			       &c->skc_rcv_saddr, c->skc_num, &c->skc_daddr,
			       bpf_ntohs(c->skc_dport), c->skc_state, inode_of(sk), netns);
	else if (c->skc_family == CORPUS_AF_INET6)
		BPF_SEQ_PRINTF(seq, "UDP 6 [%pI6]:%u [%pI6]:%u %02X %lu %u\n",
			       &c->skc_v6_rcv_saddr, c->skc_num, &c->skc_v6_daddr,
			       bpf_ntohs(c->skc_dport), c->skc_state, inode_of(sk), netns);
	return 0;
}
