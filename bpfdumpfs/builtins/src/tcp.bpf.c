// SPDX-License-Identifier: GPL-2.0
/* tcp/tcp: IPv4 TCP sockets in the format of /proc/net/tcp.
 *
 * Output: the /proc header, then one line per AF_INET socket of the reader's
 * network namespace, in the iterator's order (listening hash, then the
 * established hash, which also holds time-wait and request sockets), each
 * line padded with spaces to 149 characters as /proc pads it. Full sockets,
 * time-wait sockets and request (SYN_RECV) sockets use /proc's three line
 * shapes.
 *
 * Differences from /proc/net/tcp, and why:
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
 * an IPv6 socket first in the iteration cannot swallow it), or else by the
 * epilogue (NULL socket) when no object ran. On this kernel the epilogue gets
 * the seq_num of the last object shown (0 after exactly one object) and
 * (u64)-1 when there was none, because the tcp target subtracts its start
 * token from seq_num. seq_num 0 in the epilogue is therefore ambiguous; the
 * per-session map entry created by object 0 settles it (entry present: the
 * header is already out).
 */
#include "common.h"

#define LINE_WIDTH	149	/* /proc: seq_setwidth(seq, TMPSZ - 1) */
#define NET_TCP

static const char header[] =
	"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
	"retrnsmt   uid  timeout inode";

#include "net_common.h"

SESSION_MAP(sl_sessions, struct sl_state);

SEC("iter/tcp")
int dump_tcp(struct bpf_iter__tcp *ctx)
{
	struct bpf_iter_meta *meta = ctx->meta;
	struct seq_file *seq = meta->seq;
	struct sock_common *skc = ctx->sk_common;
	__u64 seq_num = meta->seq_num;
	__u64 session = meta->session_id;
	__u64 now = bpf_jiffies64();
	char buf[CHUNK];
	__u64 used;
	struct sl_state fresh = { .last_seq = (__u64)-1 };
	__u32 sl;
	int state;

	if (session_header(seq, &sl_sessions, session, seq_num, skc, &fresh))
		return 0;	/* epilogue */
	if (skc->skc_family != AF_INET)
		return 0;

	sl = line_number(&sl_sessions, session, seq_num);
	state = skc->skc_state;

	if (state == TCP_TIME_WAIT) {
		struct tcp_timewait_sock *ttw = bpf_skc_to_tcp_timewait_sock(skc);
		struct inet_timewait_sock *tw;

		if (!ttw)
			return 0;
		tw = &ttw->tw_sk;
		used = EMIT(seq, buf, "%4d: %08X:%04X %08X:%04X %02X %08X:%08X %02X:%08lX",
			    sl, skc->skc_rcv_saddr, bpf_ntohs(tw->tw_sport),
			    skc->skc_daddr, bpf_ntohs(skc->skc_dport),
			    tw->tw_substate, 0, 0, 3,
			    jiffies_delta_to_clock_t(tw->tw_timer.expires - now));
		used += EMIT(seq, buf, " %08X %5d %8d %d %d %p",
			     0, 0, 0, 0,
			     skc->skc_refcnt.refs.counter - 1, skc);
		pad_line(seq, used);
		return 0;
	}

	if (state == TCP_NEW_SYN_RECV) {
		struct tcp_request_sock *treq = bpf_skc_to_tcp_request_sock(skc);
		struct request_sock *req;

		if (!treq)
			return 0;
		req = &treq->req.req;
		used = EMIT(seq, buf, "%4d: %08X:%04X %08X:%04X %02X %08X:%08X %02X:%08lX",
			    sl, skc->skc_rcv_saddr, skc->skc_num,
			    skc->skc_daddr, bpf_ntohs(skc->skc_dport),
			    TCP_SYN_RECV, 0, 0, 1,
			    jiffies_delta_to_clock_t(req->rsk_timer.expires - now));
		used += EMIT(seq, buf, " %08X %5u %8d %u %d %p",
			     BPF_CORE_READ_BITFIELD(req, num_timeout), ctx->uid,
			     0, 0, 0, skc);
		pad_line(seq, used);
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

	used = EMIT(seq, buf, "%4d: %08X:%04X %08X:%04X %02X %08X:%08X %02X:%08lX %08X",
		    sl, skc->skc_rcv_saddr, skc->skc_num,
		    skc->skc_daddr, bpf_ntohs(skc->skc_dport), state,
		    tp->write_seq - tp->snd_una, rx_queue, timer,
		    jiffies_delta_to_clock_t(expires - now),
		    icsk->icsk_retransmits);
	used += EMIT(seq, buf, " %5u %8d %lu %d %p %lu %lu %u %u %d",
		     ctx->uid, icsk->icsk_probes_out, sock_ino(sk),
		     skc->skc_refcnt.refs.counter - 1, skc,
		     jiffies_to_clock_t(icsk->icsk_rto),
		     jiffies_to_clock_t(BPF_CORE_READ_BITFIELD(icsk, icsk_ack.ato)),
		     (icsk->icsk_ack.quick << 1) | in_pingpong_mode(sk, icsk->icsk_ack.pingpong),
		     tp->snd_cwnd, ssthresh);
	pad_line(seq, used);
	return 0;
}
