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
 *   (more than SL_SESSIONS sessions open at once), sl falls back to seq_num.
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
#include <bpf/bpf_endian.h>

#define AF_INET		2
#define USER_HZ		100
#define NSEC_PER_SEC	1000000000ULL
#define LINE_WIDTH	149	/* /proc: seq_setwidth(seq, TMPSZ - 1) */
#define CHUNK		128
#define SL_SESSIONS	1024

/* icsk_pending values (include/net/inet_connection_sock.h) */
#define ICSK_TIME_RETRANS	1
#define ICSK_TIME_PROBE0	3
#define ICSK_TIME_LOSS_PROBE	5
#define ICSK_TIME_REO_TIMEOUT	6
#define TCP_INFINITE_SSTHRESH	0x7fffffff

extern unsigned long CONFIG_HZ __kconfig;

struct sl_state {
	__u64 last_seq;		/* seq_num of the last object given a number */
	__u32 cur;		/* number given to that object */
	__u32 next;		/* number for the next printed object */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SL_SESSIONS);
	__type(key, __u64);
	__type(value, struct sl_state);
} sl_sessions SEC(".maps");

#define S10 "          "
static const char spaces[] = S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10;
static const char header[] =
	"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
	"retrnsmt   uid  timeout inode";

/* Old kernels kept the retransmit deadline in its own field. */
struct inet_connection_sock___old {
	unsigned long icsk_timeout;
} __attribute__((preserve_access_index));

static __always_inline __u64 jiffies_to_clock_t(__u64 x)
{
	__u64 hz = CONFIG_HZ;
	__u64 tick_nsec = (NSEC_PER_SEC + hz / 2) / hz;

	if (tick_nsec % (NSEC_PER_SEC / USER_HZ) == 0) {
		if (hz < USER_HZ)
			return x * (USER_HZ / hz);
		return x / (hz / USER_HZ);
	}
	return x * tick_nsec / (NSEC_PER_SEC / USER_HZ);
}

static __always_inline __u64 jiffies_delta_to_clock_t(long delta)
{
	return jiffies_to_clock_t(delta > 0 ? delta : 0);
}

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

static __always_inline __u32 line_number(__u64 session, __u64 seq_num)
{
	struct sl_state *st = bpf_map_lookup_elem(&sl_sessions, &session);

	if (!st)	/* evicted: best effort */
		return seq_num;
	if (st->last_seq != seq_num) {
		st->cur = st->next++;
		st->last_seq = seq_num;
	}
	return st->cur;
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

/* inet_csk_in_pingpong_mode(). Kernels without the sysctl compared with a
 * constant TCP_PINGPONG_THRESH instead (1 in most releases, 3 in a few). */
static __always_inline int in_pingpong_mode(struct sock *sk, __u8 pingpong)
{
	struct net *net = sk->__sk_common.skc_net.net;

	if (bpf_core_field_exists(net->ipv4.sysctl_tcp_pingpong_thresh))
		return pingpong >= net->ipv4.sysctl_tcp_pingpong_thresh;
	return pingpong >= 1;
}

static __always_inline unsigned long retrans_expires(struct inet_connection_sock *icsk)
{
	struct inet_connection_sock___old *old = (void *)icsk;

	if (bpf_core_field_exists(old->icsk_timeout))
		return BPF_CORE_READ(old, icsk_timeout);
	return icsk->icsk_retransmit_timer.expires;
}

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
	__u32 sl;
	int state;

	if (seq_num == 0 && skc) {
		struct sl_state fresh = { .last_seq = (__u64)-1 };

		bpf_map_update_elem(&sl_sessions, &session, &fresh, BPF_ANY);
		bpf_seq_write(seq, header, sizeof(header) - 1);
		pad_line(seq, sizeof(header) - 1);
	}
	if (!skc) {
		/* Epilogue. An entry exists iff object 0 ran (and printed the
		 * header), unless LRU evicted it: then seq_num != 0 still shows
		 * that objects ran, so only a lone evicted object can repeat it. */
		if (seq_num == (__u64)-1 ||
		    (seq_num == 0 && !bpf_map_lookup_elem(&sl_sessions, &session))) {
			bpf_seq_write(seq, header, sizeof(header) - 1);
			pad_line(seq, sizeof(header) - 1);
		}
		bpf_map_delete_elem(&sl_sessions, &session);
		return 0;
	}
	if (skc->skc_family != AF_INET)
		return 0;

	sl = line_number(session, seq_num);
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
	__u8 pending;

	if (!tp)
		return 0;
	icsk = &tp->inet_conn;
	sk = &icsk->icsk_inet.sk;

	pending = icsk->icsk_pending;
	if (pending == ICSK_TIME_RETRANS || pending == ICSK_TIME_REO_TIMEOUT ||
	    pending == ICSK_TIME_LOSS_PROBE) {
		timer = 1;
		expires = retrans_expires(icsk);
	} else if (pending == ICSK_TIME_PROBE0) {
		timer = 4;
		expires = retrans_expires(icsk);
	} else if (sk->sk_timer.entry.pprev) {	/* timer_pending(keepalive) */
		timer = 2;
		expires = sk->sk_timer.expires;
	} else {
		timer = 0;
		expires = now;
	}

	if (state == TCP_LISTEN) {
		rx_queue = sk->sk_ack_backlog;
		ssthresh = icsk->icsk_accept_queue.fastopenq.max_qlen;
	} else {
		rx_queue = (int)(tp->rcv_nxt - tp->copied_seq);
		if (rx_queue < 0)
			rx_queue = 0;
		ssthresh = tp->snd_ssthresh >= TCP_INFINITE_SSTHRESH ? -1 : (int)tp->snd_ssthresh;
	}

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
