// SPDX-License-Identifier: GPL-2.0
/* udp/udp6: IPv6 UDP sockets in the format of /proc/net/udp6.
 *
 * Output: the /proc header, then one line per AF_INET6 UDP socket (not
 * UDP-Lite; IPv4-mapped dual-stack sockets included, as in /proc) of the
 * reader's network namespace, in the iterator's order (see below).
 * /proc/net/udp6 does not pad its lines and neither does this program.
 *
 * "sl" is the socket's bucket in the primary (port) hash table, as
 * /proc/net/udp6 prints it: sockets sharing a bucket share the number, so it
 * is not a line counter, and it is idempotent per object by construction.
 * The iterator walks the secondary (address+port) hash instead, and its
 * ctx->bucket is a slot of that table, so this program recomputes /proc's
 * bucket as udp_hashfn(): (local port + net->hash_mix) & udp_table->mask.
 *
 * Differences from /proc/net/udp6, and why:
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
 * an IPv4 socket first in the iteration cannot swallow it), or else by the
 * epilogue (NULL socket) when no object ran. On this kernel the epilogue gets
 * the seq_num of the last object shown (0 after exactly one object) and
 * (u64)-1 when there was none, because the udp target subtracts its start
 * token from seq_num. seq_num 0 in the epilogue is therefore ambiguous; a
 * per-session entry (LRU hash keyed by meta->session_id) created by object 0
 * settles it.
 */
#include "common.h"

static const char header[] =
	"  sl  local_address                         remote_address                        "
	"st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n";

#include "net_common.h"

SESSION_MAP(hdr_sessions, __u8);

SEC("iter/udp")
int dump_udp6(struct bpf_iter__udp *ctx)
{
	struct bpf_iter_meta *meta = ctx->meta;
	struct seq_file *seq = meta->seq;
	struct udp_sock *udp = ctx->udp_sk;
	__u64 seq_num = meta->seq_num;
	__u64 session = meta->session_id;
	__u8 one = 1;
	struct inet_sock *inet;
	struct sock *sk;

	if (session_header(seq, &hdr_sessions, session, seq_num, udp, &one))
		return 0;	/* epilogue: see the comment at the top */

	inet = &udp->inet;
	sk = &inet->sk;
	if (sk->__sk_common.skc_family != AF_INET6)
		return 0;

	__u32 *src = sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32;
	__u32 *dst = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32;

	BPF_SEQ_PRINTF(seq, "%5d: %08X%08X%08X%08X:%04X ",
		       udp_proc_bucket(sk), src[0], src[1], src[2], src[3],
		       bpf_ntohs(inet->inet_sport));
	BPF_SEQ_PRINTF(seq, "%08X%08X%08X%08X:%04X %02X %08X:%08X ",
		       dst[0], dst[1], dst[2], dst[3],
		       bpf_ntohs(sk->__sk_common.skc_dport),
		       sk->__sk_common.skc_state,
		       sk->sk_wmem_alloc.refs.counter - 1,
		       sk->sk_backlog.rmem_alloc.counter - udp->forward_deficit);
	BPF_SEQ_PRINTF(seq, "%02X:%08lX %08X %5u %8d %lu %d %p %u\n",
		       0, 0L, 0, ctx->uid, 0, sock_ino(sk),
		       sk->__sk_common.skc_refcnt.refs.counter - 1, sk,
		       sk_drops_read(sk));
	return 0;
}
