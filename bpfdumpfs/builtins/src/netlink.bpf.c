// SPDX-License-Identifier: GPL-2.0
/* netlink/netlink: netlink sockets in the format of /proc/net/netlink.
 *
 * Output: the /proc header, then one line per netlink socket of the reader's
 * network namespace: "sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode",
 * with /proc's left-justified columns (so lines end in spaces, as there).
 * The iterator walks the same per-protocol hash tables as /proc, with the
 * same code, and holds no extra reference on the sockets, so "Locks" (the
 * reference count) needs no correction.
 *
 * Differences from /proc/net/netlink, and why:
 * - sk (%p, not /proc's %pK): the kernel's hashed pointer, the value /proc
 *   shows when kptr_restrict=0 (same hash key), but always a hash, never the
 *   raw address. %pK is decided at read() time by the credentials of the
 *   reading task; behind bpfdumpfs that is the root daemon, so %pK would hand
 *   raw kernel addresses to every reader when kptr_restrict=1. With
 *   kptr_restrict=1 or 2, /proc shows raw addresses (to CAP_SYSLOG) or zeros
 *   instead.
 * - Nothing else differs; Rmem, Dump, Locks and Drops change with traffic.
 *
 * Header: printed by the object with seq_num == 0 (this program filters
 * nothing), or else by the epilogue (NULL socket) when no object ran. On this
 * kernel the epilogue gets the seq_num of the last object shown (0 after
 * exactly one object) and (u64)-1 when there was none, because the netlink
 * target subtracts its start token from seq_num. seq_num 0 in the epilogue is
 * therefore ambiguous; a per-session entry (LRU hash keyed by
 * meta->session_id) created by object 0 settles it.
 */
#include "common.h"

static const char header[] =
	"sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n";

#include "net_common.h"

SESSION_MAP(hdr_sessions, __u8);

SEC("iter/netlink")
int dump_netlink(struct bpf_iter__netlink *ctx)
{
	struct bpf_iter_meta *meta = ctx->meta;
	struct seq_file *seq = meta->seq;
	struct netlink_sock *nlk = ctx->sk;
	__u64 seq_num = meta->seq_num;
	__u64 session = meta->session_id;
	__u8 one = 1;
	unsigned long *groups, group0 = 0;
	struct sock *sk;

	if (session_header(seq, &hdr_sessions, session, seq_num, nlk, &one))
		return 0;	/* epilogue: see the comment at the top */

	sk = &nlk->sk;
	groups = nlk->groups;
	if (groups)
		bpf_probe_read_kernel(&group0, sizeof(group0), groups);

	BPF_SEQ_PRINTF(seq, "%p %-3d %-10u %08x %-8d %-8d %-5d %-8d %-8u %-8lu\n",
		       sk, sk->sk_protocol, nlk->portid, (__u32)group0,
		       sk->sk_backlog.rmem_alloc.counter,
		       sk->sk_wmem_alloc.refs.counter - 1,
		       nlk->cb_running,
		       sk->__sk_common.skc_refcnt.refs.counter,
		       sk_drops_read(sk), sock_ino(sk));
	return 0;
}
