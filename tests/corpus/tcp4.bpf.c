// SPDX-License-Identifier: GPL-2.0-only
/*
 * tcp4.bpf.c -- iter/tcp: the IPv4 TCP sockets as /proc/net/tcp shows them
 * (full sockets, TIME_WAIT and SYN_RECV request sockets): slot, local and
 * remote address, state, queues, timer, retransmits, uid, timeout, inode,
 * then refcount, a hashed socket pointer, rto, ato, quick/pingpong, cwnd and
 * ssthresh. The slot is the iterator's sequence number.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_tcp4.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

#define CORPUS_AF_INET		2
#define CORPUS_USER_HZ		100
/* include/net/inet_connection_sock.h, tcp.h */
#define CORPUS_ICSK_TIME_RETRANS	1
#define CORPUS_ICSK_TIME_PROBE0		3
#define CORPUS_ICSK_TIME_LOSS_PROBE	5
#define CORPUS_ICSK_TIME_REO_TIMEOUT	6
#define CORPUS_PINGPONG_THRESH		1
#define CORPUS_INFINITE_SSTHRESH	0x7fffffff

extern unsigned int CONFIG_HZ __kconfig;

/* jiffies to USER_HZ clock ticks, for the HZ values kernels are built with */
static __always_inline unsigned long to_clock_t(long delta)
{
	unsigned long j = delta;	/* BPF has no signed division */

	if (delta <= 0)
		return 0;
	if (CONFIG_HZ >= CORPUS_USER_HZ && CONFIG_HZ % CORPUS_USER_HZ == 0)
		return j / (CONFIG_HZ / CORPUS_USER_HZ);
	return j * CORPUS_USER_HZ / CONFIG_HZ;
}

static __always_inline int pending(const struct timer_list *t)
{
	return t->entry.pprev != 0;
}

static __always_inline unsigned long inode_of(const struct sock *sk)
{
	const struct socket *sock = sk->sk_socket;
	unsigned long ino = 0;

	if (sock)
		bpf_probe_read_kernel(&ino, sizeof(ino),
				      &container_of(sock, struct socket_alloc, socket)->vfs_inode.i_ino);
	return ino;
}

static int show_full(struct seq_file *seq, struct tcp_sock *tp, uid_t uid, __u64 slot)
{
	struct inet_connection_sock *icsk = &tp->inet_conn;
	struct sock *sk = &icsk->icsk_inet.sk;
	unsigned long expires = bpf_jiffies64();
	int timer = 0, rxq, state = sk->__sk_common.skc_state;
	__u8 why = icsk->icsk_pending;

	if (why == CORPUS_ICSK_TIME_RETRANS || why == CORPUS_ICSK_TIME_REO_TIMEOUT ||
	    why == CORPUS_ICSK_TIME_LOSS_PROBE) {
		timer = 1;
		expires = icsk->icsk_retransmit_timer.expires;
	} else if (why == CORPUS_ICSK_TIME_PROBE0) {
		timer = 4;
		expires = icsk->icsk_retransmit_timer.expires;
	} else if (pending(&sk->sk_timer)) {	/* keepalive */
		timer = 2;
		expires = sk->sk_timer.expires;
	}
	if (state == TCP_LISTEN)
		rxq = sk->sk_ack_backlog;
	else
		rxq = (int)(tp->rcv_nxt - tp->copied_seq) > 0 ? tp->rcv_nxt - tp->copied_seq : 0;

	BPF_SEQ_PRINTF(seq, "%4llu: %08X:%04X %08X:%04X ", slot,
		       sk->__sk_common.skc_rcv_saddr, sk->__sk_common.skc_num,
		       sk->__sk_common.skc_daddr, bpf_ntohs(sk->__sk_common.skc_dport));
	BPF_SEQ_PRINTF(seq, "%02X %08X:%08X %02X:%08lX %08X %5u %8d %lu ",
		       state, tp->write_seq - tp->snd_una, rxq, timer,
		       to_clock_t(expires - bpf_jiffies64()), icsk->icsk_retransmits,
		       uid, icsk->icsk_probes_out, inode_of(sk));
	BPF_SEQ_PRINTF(seq, "%d %p %lu %lu %u %u %d\n", sk->__sk_common.skc_refcnt.refs.counter,
		       tp, to_clock_t(icsk->icsk_rto), to_clock_t(icsk->icsk_ack.ato),
		       (icsk->icsk_ack.quick << 1) |
				(icsk->icsk_ack.pingpong >= CORPUS_PINGPONG_THRESH),
		       tp->snd_cwnd,
		       state == TCP_LISTEN ? icsk->icsk_accept_queue.fastopenq.max_qlen :
		       tp->snd_ssthresh >= CORPUS_INFINITE_SSTHRESH ? -1 : (int)tp->snd_ssthresh);
	return 0;
}

static int show_timewait(struct seq_file *seq, struct tcp_timewait_sock *ttw, __u64 slot)
{
	struct inet_timewait_sock *tw = &ttw->tw_sk;

	BPF_SEQ_PRINTF(seq, "%4llu: %08X:%04X %08X:%04X ", slot,
		       tw->__tw_common.skc_rcv_saddr, bpf_ntohs(tw->tw_sport),
		       tw->__tw_common.skc_daddr, bpf_ntohs(tw->__tw_common.skc_dport));
	BPF_SEQ_PRINTF(seq, "%02X %08X:%08X %02X:%08lX %08X %5d %8d %d %d %p\n",
		       tw->tw_substate, 0, 0, 3,
		       to_clock_t(tw->tw_timer.expires - bpf_jiffies64()), 0, 0, 0, 0,
		       tw->__tw_common.skc_refcnt.refs.counter, tw);
	return 0;
}

static int show_request(struct seq_file *seq, struct tcp_request_sock *treq, uid_t uid,
			__u64 slot)
{
	struct inet_request_sock *ireq = &treq->req;
	struct request_sock *req = &ireq->req;

	BPF_SEQ_PRINTF(seq, "%4llu: %08X:%04X %08X:%04X ", slot,
		       req->__req_common.skc_rcv_saddr, req->__req_common.skc_num,
		       req->__req_common.skc_daddr, bpf_ntohs(req->__req_common.skc_dport));
	BPF_SEQ_PRINTF(seq, "%02X %08X:%08X %02X:%08lX %08X %5d %8d %d %d %p\n",
		       TCP_SYN_RECV, 0, 0, 1,
		       to_clock_t(req->rsk_timer.expires - bpf_jiffies64()),
		       req->num_timeout, uid, 0, 0, 0, req);
	return 0;
}

SEC("iter/tcp")
int corpus_tcp4(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct seq_file *seq = ctx->meta->seq;
	struct tcp_timewait_sock *tw;
	struct tcp_request_sock *req;
	struct tcp_sock *tp;
	__u64 slot = ctx->meta->seq_num;

	if (!skc)
		return 0;
	if (slot == 0)
		BPF_SEQ_PRINTF(seq, "  sl  local_address rem_address   st tx_queue rx_queue "
			       "tr tm->when retrnsmt   uid  timeout inode\n");
	if (skc->skc_family != CORPUS_AF_INET)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (tp)
		return show_full(seq, tp, ctx->uid, slot);
	tw = bpf_skc_to_tcp_timewait_sock(skc);
	if (tw)
		return show_timewait(seq, tw, slot);
	req = bpf_skc_to_tcp_request_sock(skc);
	if (req)
		return show_request(seq, req, ctx->uid, slot);
	return 0;
}
