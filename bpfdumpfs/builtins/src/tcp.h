/* The tcp program, shared by tcp.bpf.c (FAMILY AF_INET, padded lines) and
 * tcp6.bpf.c (AF_INET6, unpadded): each #defines FAMILY, DUMP_FN (the program's
 * name) and, for padding, LINE_WIDTH, then includes this after common.h and its
 * header[]. See tcp.bpf.c for the output and how it differs from /proc. */
#define NET_TCP
#include "net_common.h"

SESSION_MAP(sl_sessions, struct sl_state);

SEC("iter/tcp")
int DUMP_FN(struct bpf_iter__tcp *ctx)
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
	LINE_VARS;

	if (session_header(seq, &sl_sessions, session, seq_num, skc, &fresh))
		return 0;	/* epilogue */
	if (skc->skc_family != FAMILY)
		return 0;

	sl = line_number(&sl_sessions, session, seq_num);
	state = skc->skc_state;

	if (state == TCP_TIME_WAIT) {
		struct tcp_timewait_sock *ttw = bpf_skc_to_tcp_timewait_sock(skc);
		struct inet_timewait_sock *tw;

		if (!ttw)
			return 0;
		tw = &ttw->tw_sk;
		PUT(seq, "%4d: ", sl);
		PUT_ADDRS(seq, skc, bpf_ntohs(tw->tw_sport));
		PUT(seq, " %02X %08X:%08X %02X:%08lX %08X %5d %8d %d %d %p",
		    tw->tw_substate, 0, 0, 3,
		    jiffies_delta_to_clock_t(tw->tw_timer.expires - now),
		    0, 0, 0, 0, skc->skc_refcnt.refs.counter - 1, skc);
		END_LINE(seq);
		return 0;
	}

	if (state == TCP_NEW_SYN_RECV) {
		struct tcp_request_sock *treq = bpf_skc_to_tcp_request_sock(skc);
		struct request_sock *req;

		if (!treq)
			return 0;
		req = &treq->req.req;
		PUT(seq, "%4d: ", sl);
		PUT_ADDRS(seq, skc, skc->skc_num);
		PUT(seq, " %02X %08X:%08X %02X:%08lX %08X %5u %8d %u %d %p",
		    TCP_SYN_RECV, 0, 0, 1,
		    jiffies_delta_to_clock_t(req->rsk_timer.expires - now),
		    BPF_CORE_READ_BITFIELD(req, num_timeout), ctx->uid, 0, 0, 0, skc);
		END_LINE(seq);
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

	PUT(seq, "%4d: ", sl);
	PUT_ADDRS(seq, skc, skc->skc_num);
	PUT(seq, " %02X %08X:%08X %02X:%08lX %08X %5u %8d %lu %d",
	    state, tp->write_seq - tp->snd_una, rx_queue, timer,
	    jiffies_delta_to_clock_t(expires - now), icsk->icsk_retransmits,
	    ctx->uid, icsk->icsk_probes_out, sock_ino(sk),
	    skc->skc_refcnt.refs.counter - 1);
	PUT(seq, " %p %lu %lu %u %u %d", skc,
	    jiffies_to_clock_t(icsk->icsk_rto),
	    jiffies_to_clock_t(BPF_CORE_READ_BITFIELD(icsk, icsk_ack.ato)),
	    (icsk->icsk_ack.quick << 1) | in_pingpong_mode(sk, icsk->icsk_ack.pingpong),
	    tp->snd_cwnd, ssthresh);
	END_LINE(seq);
	return 0;
}
