// SPDX-License-Identifier: GPL-2.0
/* udp/udp: IPv4 UDP sockets in the format of /proc/net/udp.
 *
 * Output: the /proc header, then one line per AF_INET UDP socket (not
 * UDP-Lite) of the reader's network namespace, in the iterator's order (see
 * below), each line padded with spaces to 127 characters as /proc pads it.
 *
 * "sl" is the socket's bucket in the primary (port) hash table, as
 * /proc/net/udp prints it: sockets sharing a bucket share the number, so it
 * is not a line counter, and it is idempotent per object by construction.
 * The iterator walks the secondary (address+port) hash instead, and its
 * ctx->bucket is a slot of that table, so this program recomputes /proc's
 * bucket as udp_hashfn(): (local port + net->hash_mix) & udp_table->mask.
 *
 * Differences from /proc/net/udp, and why:
 * - Line order: the iterator's (secondary hash) order, not /proc's (primary
 *   hash) order. Same lines, different order.
 * - "ref": the iterator holds one reference on every socket of its batch
 *   while the program runs; this program subtracts that one so the column
 *   shows what /proc would show.
 * - "pointer" (%p, not /proc's %pK): the kernel's hashed pointer, the value
 *   /proc shows when kptr_restrict=0 (same hash key), but always a hash, never
 *   the raw address. %pK is decided at read() time by the credentials of the
 *   reading task; behind bpfdumpfs that is the root daemon, so %pK would hand
 *   raw kernel addresses to every reader when kptr_restrict=1. With
 *   kptr_restrict=1 or 2, /proc shows raw addresses (to CAP_SYSLOG) or zeros
 *   instead.
 *
 * Header: printed by the object with seq_num == 0, before any filtering (so
 * an IPv6 socket first in the iteration cannot swallow it), or else by the
 * epilogue (NULL socket) when no object ran. On this kernel the epilogue gets
 * the seq_num of the last object shown (0 after exactly one object) and
 * (u64)-1 when there was none, because the udp target subtracts its start
 * token from seq_num. seq_num 0 in the epilogue is therefore ambiguous; a
 * per-session entry (LRU hash keyed by meta->session_id) created by object 0
 * settles it.
 */
#include "common.h"
#include <bpf/bpf_endian.h>

#define AF_INET		2
#define LINE_WIDTH	127	/* /proc: seq_setwidth(seq, 127) */
#define CHUNK		128
#define HDR_SESSIONS	1024

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, HDR_SESSIONS);
	__type(key, __u64);
	__type(value, __u8);
} hdr_sessions SEC(".maps");

#define S10 "          "
static const char spaces[] = S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10;
static const char header[] =
	"   sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
	"retrnsmt   uid  timeout inode ref pointer drops";

/* Write a bpf_snprintf() result (n counts the NUL); return bytes written. */
static __always_inline __u64 put_chunk(struct seq_file *seq, char *buf, long n)
{
	if (n <= 1)
		return 0;
	n--;
	if (n > CHUNK - 1)
		n = CHUNK - 1;
	bpf_seq_write(seq, buf, n);
	return n;
}

#define EMIT(seq, buf, fmt, args...) \
	put_chunk(seq, buf, BPF_SNPRINTF(buf, sizeof(buf), fmt, args))

/* seq_pad(): spaces up to LINE_WIDTH, then the newline. */
static __always_inline void pad_line(struct seq_file *seq, __u64 used)
{
	__u64 n = LINE_WIDTH - used;

	/* Hide n from clang so the range check stays on the register the
	 * verifier sees passed to bpf_seq_write(). */
	asm volatile("" : "+r"(n));
	if (used < LINE_WIDTH && n < sizeof(spaces))
		bpf_seq_write(seq, spaces, n);
	bpf_seq_write(seq, "\n", 1);
}

static __always_inline void put_header(struct seq_file *seq)
{
	bpf_seq_write(seq, header, sizeof(header) - 1);
	pad_line(seq, sizeof(header) - 1);
}

static __always_inline __u64 sock_ino(struct sock *sk)
{
	struct socket *sock;

	if (bpf_core_field_exists(sk->sk_ino))
		return sk->sk_ino;
	sock = sk->sk_socket;
	if (!sock)
		return 0;
	return BPF_CORE_READ(container_of(sock, struct socket_alloc, socket), vfs_inode.i_ino);
}

/* sk_drops_read(): newer kernels count UDP drops in per-NUMA counters. */
struct numa_drop_counters___new {
	atomic_t drops0;
	atomic_t drops1;
} __attribute__((preserve_access_index));

struct sock___new {
	struct numa_drop_counters___new *sk_drop_counters;
} __attribute__((preserve_access_index));

static __always_inline int sk_drops_read(struct sock *sk)
{
	int drops = sk->sk_drops.counter;

	if (bpf_core_field_exists(struct sock___new, sk_drop_counters)) {
		struct numa_drop_counters___new *ndc =
			BPF_CORE_READ((struct sock___new *)sk, sk_drop_counters);

		if (ndc)
			drops += BPF_CORE_READ(ndc, drops0.counter) +
				 BPF_CORE_READ(ndc, drops1.counter);
	}
	return drops;
}

/* The slot of /proc's walk: udp_hashfn(net, inet_num, udptable->mask). */
static __always_inline int proc_bucket(struct sock *sk)
{
	struct net *net = sk->__sk_common.skc_net.net;
	__u32 mix = 0;

	if (bpf_core_field_exists(net->hash_mix))
		mix = net->hash_mix;
	return (sk->__sk_common.skc_num + mix) & net->ipv4.udp_table->mask;
}

SEC("iter/udp")
int dump_udp(struct bpf_iter__udp *ctx)
{
	struct bpf_iter_meta *meta = ctx->meta;
	struct seq_file *seq = meta->seq;
	struct udp_sock *udp = ctx->udp_sk;
	__u64 seq_num = meta->seq_num;
	__u64 session = meta->session_id;
	struct inet_sock *inet;
	struct sock *sk;
	char buf[CHUNK];
	__u64 used;

	if (seq_num == 0 && udp) {
		__u8 one = 1;

		bpf_map_update_elem(&hdr_sessions, &session, &one, BPF_ANY);
		put_header(seq);
	}
	if (!udp) {
		/* Epilogue: see the comment at the top. */
		if (seq_num == (__u64)-1 ||
		    (seq_num == 0 && !bpf_map_lookup_elem(&hdr_sessions, &session)))
			put_header(seq);
		bpf_map_delete_elem(&hdr_sessions, &session);
		return 0;
	}

	inet = &udp->inet;
	sk = &inet->sk;
	if (sk->__sk_common.skc_family != AF_INET)
		return 0;

	used = EMIT(seq, buf, "%5d: %08X:%04X %08X:%04X %02X %08X:%08X %02X:%08lX %08X",
		    proc_bucket(sk),
		    sk->__sk_common.skc_rcv_saddr, bpf_ntohs(inet->inet_sport),
		    sk->__sk_common.skc_daddr, bpf_ntohs(sk->__sk_common.skc_dport),
		    sk->__sk_common.skc_state,
		    sk->sk_wmem_alloc.refs.counter - 1,
		    sk->sk_backlog.rmem_alloc.counter - udp->forward_deficit,
		    0, 0L, 0);
	used += EMIT(seq, buf, " %5u %8d %lu %d %p %u",
		     ctx->uid, 0, sock_ino(sk),
		     sk->__sk_common.skc_refcnt.refs.counter - 1, sk,
		     sk_drops_read(sk));
	pad_line(seq, used);
	return 0;
}
