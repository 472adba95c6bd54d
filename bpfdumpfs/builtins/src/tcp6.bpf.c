// SPDX-License-Identifier: GPL-2.0
/* tcp/tcp6: IPv6 TCP sockets in the format of /proc/net/tcp6.
 *
 * Output: the /proc header, then one line per AF_INET6 socket of the reader's
 * network namespace (IPv4-mapped dual-stack sockets included, as in /proc),
 * in the iterator's order (listening hash, then the established hash with
 * its time-wait and request sockets). /proc/net/tcp6 does not pad its lines
 * and neither does this program. Full sockets, time-wait sockets and request
 * (SYN_RECV) sockets use /proc's three line shapes.
 *
 * Differences from /proc/net/tcp6, and why:
 * - "sl": /proc numbers the lines it prints 0, 1, 2, ... The tcp iterator
 *   visits IPv4 and IPv6 sockets alike (ctx->meta->seq_num counts both), so
 *   this program keeps a per-session counter of printed lines in an LRU hash
 *   keyed by meta->session_id. The counter is idempotent per object: when the
 *   kernel re-runs an object after a buffer overflow (same seq_num) it reuses
 *   the number it gave that object. If the session's entry has been evicted
 *   (more than SESSIONS sessions open at once), sl falls back to seq_num.
 * - Reference count column: the iterator holds one reference on every socket
 *   of its batch while the program runs; this program subtracts that one so
 *   the column shows what /proc would show.
 * - Pointer column (%p, not /proc's %pK): the kernel's hashed pointer, the
 *   value /proc shows when kptr_restrict=0 (same hash key), but always a hash,
 *   never the raw address. %pK is decided at read() time by the credentials of
 *   the reading task; behind bpfdumpfs that is the root daemon, so %pK would
 *   hand raw kernel addresses to every reader when kptr_restrict=1. With
 *   kptr_restrict=1 or 2, /proc shows raw addresses (to CAP_SYSLOG) or zeros
 *   instead.
 * - tm->when and the other timer columns depend on jiffies at the moment of
 *   reading, as in /proc.
 *
 * Header: printed by the object with seq_num == 0, before any filtering (so
 * an IPv4 socket first in the iteration cannot swallow it), or else by the
 * epilogue (NULL socket) when no object ran. On this kernel the epilogue gets
 * the seq_num of the last object shown (0 after exactly one object) and
 * (u64)-1 when there was none, because the tcp target subtracts its start
 * token from seq_num. seq_num 0 in the epilogue is therefore ambiguous; the
 * per-session map entry created by object 0 settles it (entry present: the
 * header is already out).
 */
#include "common.h"

#define NET_TCP

static const char header[] =
	"  sl  local_address                         remote_address                        "
	"st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

#include "net_common.h"

SESSION_MAP(sl_sessions, struct sl_state);

/* "%4d: SRC:PORT DST:PORT ST", shared by the three line shapes. */
static __always_inline void print_addrs(struct seq_file *seq, __u32 sl,
					struct sock_common *skc, __u16 srcp, int state)
{
	__u32 *s = skc->skc_v6_rcv_saddr.in6_u.u6_addr32;
	__u32 *d = skc->skc_v6_daddr.in6_u.u6_addr32;

	BPF_SEQ_PRINTF(seq, "%4d: %08X%08X%08X%08X:%04X ",
		       sl, s[0], s[1], s[2], s[3], srcp);
	BPF_SEQ_PRINTF(seq, "%08X%08X%08X%08X:%04X %02X ",
		       d[0], d[1], d[2], d[3], bpf_ntohs(skc->skc_dport), state);
}

SEC("iter/tcp")
int dump_tcp6(struct bpf_iter__tcp *ctx)
{
	struct bpf_iter_meta *meta = ctx->meta;
	struct seq_file *seq = meta->seq;
	struct sock_common *skc = ctx->sk_common;
	__u64 seq_num = meta->seq_num;
	__u64 session = meta->session_id;
	__u64 now = bpf_jiffies64();
	struct sl_state fresh = { .last_seq = (__u64)-1 };
	__u32 sl;
	int state;

	if (session_header(seq, &sl_sessions, session, seq_num, skc, &fresh))
		return 0;	/* epilogue */
	if (skc->skc_family != AF_INET6)
		return 0;

	sl = line_number(&sl_sessions, session, seq_num);
	state = skc->skc_state;

	if (state == TCP_TIME_WAIT) {
		struct tcp_timewait_sock *ttw = bpf_skc_to_tcp_timewait_sock(skc);
		struct inet_timewait_sock *tw;

		if (!ttw)
			return 0;
		tw = &ttw->tw_sk;
		print_addrs(seq, sl, skc, bpf_ntohs(tw->tw_sport), tw->tw_substate);
		BPF_SEQ_PRINTF(seq, "%08X:%08X %02X:%08lX %08X %5d %8d %d %d %p\n",
			       0, 0, 3,
			       jiffies_delta_to_clock_t(tw->tw_timer.expires - now),
			       0, 0, 0, 0,
			       skc->skc_refcnt.refs.counter - 1, skc);
		return 0;
	}

	if (state == TCP_NEW_SYN_RECV) {
		struct tcp_request_sock *treq = bpf_skc_to_tcp_request_sock(skc);
		struct request_sock *req;

		if (!treq)
			return 0;
		req = &treq->req.req;
		print_addrs(seq, sl, skc, skc->skc_num, TCP_SYN_RECV);
		BPF_SEQ_PRINTF(seq, "%08X:%08X %02X:%08lX %08X %5u %8d %d %d %p\n",
			       0, 0, 1,
			       jiffies_delta_to_clock_t(req->rsk_timer.expires - now),
			       BPF_CORE_READ_BITFIELD(req, num_timeout), ctx->uid,
			       0, 0, 0, skc);
		return 0;
	}

	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	struct inet_connection_sock *icsk;
	struct sock *sk;
	unsigned long expires;
	int timer, rx_queue, ssthresh;

	if (!tp)
		return 0;
	icsk = &tp->inet_conn;
	sk = &icsk->icsk_inet.sk;

	timer = tcp_timer(icsk, sk, now, &expires);
	tcp_queues(tp, state, &rx_queue, &ssthresh);

	print_addrs(seq, sl, skc, skc->skc_num, state);
	BPF_SEQ_PRINTF(seq, "%08X:%08X %02X:%08lX %08X %5u %8d %lu %d %p ",
		       tp->write_seq - tp->snd_una, rx_queue, timer,
		       jiffies_delta_to_clock_t(expires - now),
		       icsk->icsk_retransmits, ctx->uid, icsk->icsk_probes_out,
		       sock_ino(sk), skc->skc_refcnt.refs.counter - 1, skc);
	BPF_SEQ_PRINTF(seq, "%lu %lu %u %u %d\n",
		       jiffies_to_clock_t(icsk->icsk_rto),
		       jiffies_to_clock_t(BPF_CORE_READ_BITFIELD(icsk, icsk_ack.ato)),
		       (icsk->icsk_ack.quick << 1) | in_pingpong_mode(sk, icsk->icsk_ack.pingpong),
		       tp->snd_cwnd, ssthresh);
	return 0;
}
